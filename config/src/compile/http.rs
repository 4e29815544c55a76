//! VirtualService `http` rules: validated once per rule (as Istio's webhook does), then
//! instantiated per (service, port) the VirtualService's hosts serve over HTTP.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use super::{ClusterKey, Compiler, DestRef, Registry, SubsetMap};
use crate::duration;
use crate::parse::Document;
use crate::snapshot::{
    Cluster, CorsPolicy, DerivePort, Fault, HeaderOps, HttpAction, HttpDestination, HttpMatch,
    HttpRoute, Mirror, Redirect, RetryPolicy, Rewrite,
};
use crate::wire;

/// Istio refuses inline bodies of 1 MB or more.
const MAX_BODY: usize = 1024 * 1024;

/// One `http` rule, validated; destinations not yet bound to a port.
#[derive(Debug)]
pub(super) struct HttpRule {
    pub name: Option<String>,
    pub virtual_service: String,
    pub matches: Vec<HttpMatch>,
    pub action: RuleAction,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<(DestRef, f64)>,
    pub cors: Option<CorsPolicy>,
}

#[derive(Debug)]
pub(super) enum RuleAction {
    Route(Vec<RuleDestination>),
    Redirect(Redirect),
    DirectResponse(u16, Option<Arc<[u8]>>),
}

#[derive(Debug)]
pub(super) struct RuleDestination {
    pub dest: DestRef,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// A rule bound to one (service, port): its match blocks for that port and the clusters its
/// destinations and mirrors resolve to there. `rule: None` is the implicit catch-all.
#[derive(Debug)]
pub(super) struct HttpRouteDraft {
    pub rule: Option<Arc<HttpRule>>,
    pub matches: Vec<HttpMatch>,
    pub destinations: Vec<ClusterKey>,
    pub mirrors: Vec<ClusterKey>,
}

impl HttpRouteDraft {
    /// The implicit last route: the whole service port, as without a VirtualService.
    pub(super) fn catch_all(own: ClusterKey) -> Self {
        HttpRouteDraft {
            rule: None,
            matches: Vec::new(),
            destinations: vec![own],
            mirrors: Vec::new(),
        }
    }

    pub(super) fn build(self, cluster: &mut impl FnMut(&ClusterKey) -> Arc<Cluster>) -> HttpRoute {
        let Some(rule) = self.rule else {
            let destinations = self
                .destinations
                .iter()
                .map(|key| HttpDestination {
                    cluster: cluster(key),
                    weight: 100,
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                })
                .collect();
            return HttpRoute {
                name: None,
                virtual_service: None,
                matches: Vec::new(),
                action: HttpAction::Route(destinations),
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                rewrite: None,
                timeout: None,
                retries: RetryPolicy::default(),
                fault: None,
                mirrors: Vec::new(),
                cors: None,
                ticket: AtomicUsize::new(0),
            };
        };
        let action = match &rule.action {
            RuleAction::Route(ds) => HttpAction::Route(
                ds.iter()
                    .zip(&self.destinations)
                    .map(|(d, key)| HttpDestination {
                        cluster: cluster(key),
                        weight: d.weight,
                        request_headers: d.request_headers.clone(),
                        response_headers: d.response_headers.clone(),
                    })
                    .collect(),
            ),
            RuleAction::Redirect(r) => HttpAction::Redirect(r.clone()),
            RuleAction::DirectResponse(status, body) => HttpAction::DirectResponse {
                status: *status,
                body: body.clone(),
            },
        };
        let mirrors = rule
            .mirrors
            .iter()
            .zip(&self.mirrors)
            .map(|((_, percent), key)| Mirror {
                cluster: cluster(key),
                percent: *percent,
            })
            .collect();
        HttpRoute {
            name: rule.name.clone(),
            virtual_service: Some(rule.virtual_service.clone()),
            matches: self.matches,
            action,
            request_headers: rule.request_headers.clone(),
            response_headers: rule.response_headers.clone(),
            rewrite: rule.rewrite.clone(),
            timeout: rule.timeout,
            retries: rule.retries.clone(),
            fault: rule.fault.clone(),
            mirrors,
            cors: rule.cors.clone(),
            ticket: AtomicUsize::new(0),
        }
    }
}

impl Compiler {
    pub(super) fn http_rule(
        &mut self,
        doc: &Document,
        field: &str,
        route: &wire::HttpRoute,
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Option<HttpRule> {
        let before = self.issues.len();
        if route.delegate.is_some() {
            self.issue(
                doc,
                format!("{field}.delegate"),
                "delegate is not supported yet: write the routes in this VirtualService",
            );
            return None;
        }
        let matches = route
            .matches
            .iter()
            .enumerate()
            .map(|(m, attrs)| self.http_match(doc, &format!("{field}.match[{m}]"), attrs))
            .collect();
        let action = self.http_action(doc, field, route, registry, subsets);
        let headers = route.headers.as_ref();
        let request_headers = self.header_ops(
            doc,
            &format!("{field}.headers.request"),
            headers.and_then(|h| h.request.as_ref()),
            true,
        );
        let response_headers = self.header_ops(
            doc,
            &format!("{field}.headers.response"),
            headers.and_then(|h| h.response.as_ref()),
            false,
        );
        let rewrite = route
            .rewrite
            .as_ref()
            .and_then(|r| self.rewrite(doc, &format!("{field}.rewrite"), r));
        if let Some(authority) = rewrite.as_ref().and_then(|r| r.authority.as_ref()) {
            if request_headers
                .set
                .iter()
                .chain(&request_headers.add)
                .any(|(k, _)| k == "host")
            {
                self.issue(
                    doc,
                    format!("{field}.headers.request"),
                    format!("authority header cannot be set multiple times: rewrite.authority already sets `{authority}`"),
                );
            }
        }
        let timeout = route
            .timeout
            .as_deref()
            .and_then(|t| self.duration(doc, &format!("{field}.timeout"), t));
        let retries = match &route.retries {
            Some(r) => self.retries(doc, &format!("{field}.retries"), r),
            None => RetryPolicy::default(),
        };
        let fault = route
            .fault
            .as_ref()
            .and_then(|f| self.fault(doc, &format!("{field}.fault"), f));
        let mirrors = self.mirrors(doc, field, route, registry, subsets);
        let cors = route
            .cors_policy
            .as_ref()
            .map(|c| self.cors(doc, &format!("{field}.corsPolicy"), c));
        let action = action?;
        (self.issues.len() == before).then(|| HttpRule {
            name: route.name.clone(),
            virtual_service: String::new(),
            matches,
            action,
            request_headers,
            response_headers,
            rewrite,
            timeout,
            retries,
            fault,
            mirrors,
            cors,
        })
    }

    fn http_action(
        &mut self,
        doc: &Document,
        field: &str,
        route: &wire::HttpRoute,
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Option<RuleAction> {
        let has_route = !route.route.is_empty();
        // Istio's conflicts: an action other than forwarding excludes route, fault, rewrite
        // and the other such action.
        let actions = [
            ("redirect", route.redirect.is_some()),
            ("directResponse", route.direct_response.is_some()),
        ];
        let others = [
            ("route", has_route),
            ("fault", route.fault.is_some()),
            ("rewrite", route.rewrite.is_some()),
        ];
        let mut conflict = false;
        for (i, (action, set)) in actions.iter().enumerate() {
            for (other, present) in others.iter().chain(&actions[..i]) {
                if *set && *present {
                    self.issue(
                        doc,
                        field,
                        format!("HTTP route cannot contain both {other} and {action}"),
                    );
                    conflict = true;
                }
            }
        }
        if conflict {
            return None;
        }
        if let Some(r) = &route.redirect {
            return self
                .redirect(doc, &format!("{field}.redirect"), r)
                .map(RuleAction::Redirect);
        }
        if let Some(d) = &route.direct_response {
            return self.direct_response(doc, &format!("{field}.directResponse"), d);
        }
        if !has_route {
            self.issue(
                doc,
                field,
                "HTTP route, redirect or directResponse is required",
            );
            return None;
        }
        let mut destinations = Vec::new();
        for (d, dest) in route.route.iter().enumerate() {
            let dfield = format!("{field}.route[{d}]");
            let resolved = self.destination(
                doc,
                &format!("{dfield}.destination"),
                &dest.destination,
                registry,
                subsets,
            );
            let weight = match dest.weight {
                Some(w) if !(0..=i64::from(i32::MAX)).contains(&w) => {
                    self.issue(
                        doc,
                        format!("{dfield}.weight"),
                        format!("weight {w} is out of range (0 to 2147483647)"),
                    );
                    0
                }
                Some(w) => w as u32,
                None => 0,
            };
            let request_headers = self.header_ops(
                doc,
                &format!("{dfield}.headers.request"),
                dest.headers.as_ref().and_then(|h| h.request.as_ref()),
                true,
            );
            let response_headers = self.header_ops(
                doc,
                &format!("{dfield}.headers.response"),
                dest.headers.as_ref().and_then(|h| h.response.as_ref()),
                false,
            );
            if let Some(dest) = resolved {
                destinations.push(RuleDestination {
                    dest,
                    weight,
                    request_headers,
                    response_headers,
                });
            }
        }
        // Istio (1.20+): weights are relative and need not add up to 100, but several
        // destinations must not all be 0. A single destination takes everything.
        if destinations.len() == 1 {
            destinations[0].weight = 100;
        } else if route.route.len() > 1 && route.route.iter().all(|d| d.weight.unwrap_or(0) == 0) {
            self.issue(
                doc,
                format!("{field}.route"),
                "total destination weight = 0: give at least one destination a weight",
            );
        }
        Some(RuleAction::Route(destinations))
    }

    fn redirect(
        &mut self,
        doc: &Document,
        field: &str,
        r: &wire::HttpRedirect,
    ) -> Option<Redirect> {
        let before = self.issues.len();
        if r.uri.is_none()
            && r.authority.is_none()
            && r.port.is_none()
            && r.derive_port.is_none()
            && r.scheme.is_none()
        {
            self.issue(
                doc,
                field,
                "redirect must specify uri, authority, scheme, port or derivePort",
            );
        }
        let code = match r.redirect_code {
            None => 301,
            Some(c @ 300..=399) => c as u16,
            Some(c) => {
                self.issue(
                    doc,
                    format!("{field}.redirectCode"),
                    format!("{c} is not a valid redirect code, must be 3xx"),
                );
                301
            }
        };
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                self.issue(
                    doc,
                    format!("{field}.scheme"),
                    r#"invalid redirect scheme, must be "http" or "https""#,
                );
            }
        }
        if r.port.is_some() && r.derive_port.is_some() {
            self.issue(doc, field, "only one of port or derivePort may be set");
        }
        let port = r
            .port
            .and_then(|p| self.port_number(doc, &format!("{field}.port"), p));
        (self.issues.len() == before).then(|| Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            port,
            derive_port: r.derive_port.map(|d| match d {
                wire::DerivePort::FromProtocolDefault => DerivePort::FromProtocolDefault,
                wire::DerivePort::FromRequestPort => DerivePort::FromRequestPort,
            }),
            scheme: r.scheme.clone(),
            code,
        })
    }

    fn direct_response(
        &mut self,
        doc: &Document,
        field: &str,
        d: &wire::HttpDirectResponse,
    ) -> Option<RuleAction> {
        let status = self.http_status(doc, &format!("{field}.status"), i64::from(d.status))?;
        let body: Option<Vec<u8>> = match &d.body {
            None => None,
            Some(wire::HttpBody {
                string: Some(_),
                bytes: Some(_),
            }) => {
                self.issue(
                    doc,
                    format!("{field}.body"),
                    "only one of string or bytes may be set",
                );
                return None;
            }
            Some(wire::HttpBody {
                string: Some(s), ..
            }) => Some(s.clone().into_bytes()),
            Some(wire::HttpBody { bytes: Some(b), .. }) => match base64_decode(b) {
                Some(bytes) => Some(bytes),
                None => {
                    self.issue(doc, format!("{field}.body.bytes"), "not valid base64");
                    return None;
                }
            },
            Some(_) => Some(Vec::new()),
        };
        if body.as_ref().is_some_and(|b| b.len() >= MAX_BODY) {
            self.issue(
                doc,
                format!("{field}.body"),
                "large direct responses are refused: the body must be less than 1MB",
            );
            return None;
        }
        Some(RuleAction::DirectResponse(status, body.map(Arc::from)))
    }

    /// Istio's range for injected and direct statuses: 200–599.
    pub(super) fn http_status(&mut self, doc: &Document, field: &str, status: i64) -> Option<u16> {
        if (200..=599).contains(&status) {
            Some(status as u16)
        } else {
            self.issue(
                doc,
                field,
                format!("HTTP status {status} is not in range 200-599"),
            );
            None
        }
    }

    fn rewrite(&mut self, doc: &Document, field: &str, r: &wire::HttpRewrite) -> Option<Rewrite> {
        if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
            self.issue(
                doc,
                field,
                "rewrite may only contain one of uri or uriRegexRewrite",
            );
            return None;
        }
        if r.uri.is_none() && r.uri_regex_rewrite.is_none() && r.authority.is_none() {
            self.issue(
                doc,
                field,
                "rewrite must specify at least one of uri, uriRegexRewrite or authority",
            );
            return None;
        }
        let uri_regex = match &r.uri_regex_rewrite {
            None => None,
            Some(wire::RegexRewrite {
                matches: Some(m),
                rewrite: Some(to),
            }) if !m.is_empty() && !to.is_empty() => {
                let re = self.regex(doc, &format!("{field}.uriRegexRewrite.match"), m, false)?;
                Some((re, rewrite_template(to)))
            }
            Some(_) => {
                self.issue(
                    doc,
                    format!("{field}.uriRegexRewrite"),
                    "uriRegexRewrite requires both match and rewrite",
                );
                return None;
            }
        };
        Some(Rewrite {
            uri: r.uri.clone(),
            uri_regex,
            authority: r.authority.clone(),
        })
    }

    /// Parses a duration field and applies Istio's bounds (at least 1ms, ms precision).
    pub(super) fn duration(&mut self, doc: &Document, field: &str, text: &str) -> Option<Duration> {
        match duration::parse(text).and_then(duration::check_istio) {
            Ok(d) => Some(d),
            Err(e) => {
                self.issue(doc, field, e);
                None
            }
        }
    }
}

/// Istio's `\1` capture references → the regex crate's `${1}`; a literal `$` → `$$`.
fn rewrite_template(istio: &str) -> String {
    let mut out = String::with_capacity(istio.len() + 4);
    let mut chars = istio.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (protobuf JSON `bytes`), padding optional; `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in digits {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_templates_translate_captures() {
        assert_eq!(rewrite_template(r"/v2/\1"), "/v2/${1}");
        assert_eq!(rewrite_template(r"\12x$"), "${12}x$$");
        assert_eq!(rewrite_template(r"/a\b"), r"/a\b");
    }

    #[test]
    fn base64_bodies() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a!==").is_none());
    }
}
