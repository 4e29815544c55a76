//! HTTP match blocks, string matches and header operations, validated as Istio's webhook
//! validates them (`validateHTTPRouteMatchRequest`, `validateStringMatch`, header name rules).

use std::collections::BTreeMap;

use super::Compiler;
use crate::parse::Document;
use crate::snapshot::{HeaderMatch, HeaderOps, HttpMatch, StringMatch};
use crate::wire;

/// Istio caps regexes at 1024 characters (Envoy's RE2 program size limit, approximated).
const MAX_REGEX_LEN: usize = 1024;

/// What an empty `StringMatch` (`{}`) or an empty prefix means where it appears.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Empty {
    /// `uri`: `{}` is no condition and `prefix: ""` matches every path.
    NoCondition,
    /// `scheme`, `method`, `authority`: `{}` is no condition; an empty prefix is an error.
    Strict,
    /// A header or query parameter: `{}` means "present"; an empty prefix is an error.
    Presence,
}

impl Compiler {
    pub(super) fn http_match(
        &mut self,
        doc: &Document,
        field: &str,
        m: &wire::HttpMatchRequest,
    ) -> HttpMatch {
        let uri = self.string_match(
            doc,
            &format!("{field}.uri"),
            m.uri.as_ref(),
            Empty::NoCondition,
        );
        let scheme = self.string_match(
            doc,
            &format!("{field}.scheme"),
            m.scheme.as_ref(),
            Empty::Strict,
        );
        let method = self.string_match(
            doc,
            &format!("{field}.method"),
            m.method.as_ref(),
            Empty::Strict,
        );
        let authority = self.string_match(
            doc,
            &format!("{field}.authority"),
            m.authority.as_ref(),
            Empty::Strict,
        );
        let headers = self.header_matches(doc, &format!("{field}.headers"), &m.headers, false);
        let without_headers = self.header_matches(
            doc,
            &format!("{field}.withoutHeaders"),
            &m.without_headers,
            true,
        );
        let mut query_params = Vec::new();
        for (name, sm) in &m.query_params {
            let f = format!("{field}.queryParams.{name}");
            if name.is_empty() {
                self.issue(doc, &f, "query parameter name cannot be empty");
            }
            let value = self.string_match(doc, &f, Some(sm), Empty::Presence);
            query_params.push((name.clone(), value));
        }
        let port = m
            .port
            .and_then(|p| self.port_number(doc, &format!("{field}.port"), p));
        self.mesh_only_gateways(doc, &format!("{field}.gateways"), &m.gateways);
        for (k, v) in &m.source_labels {
            if k.is_empty() || k.contains('*') || v.contains('*') {
                self.issue(
                    doc,
                    format!("{field}.sourceLabels"),
                    format!("invalid label `{k}: {v}` (empty keys and wildcards are not allowed)"),
                );
            }
        }
        if let Some(ns) = &m.source_namespace {
            if !is_dns_label(ns) {
                self.issue(
                    doc,
                    format!("{field}.sourceNamespace"),
                    format!("sourceNamespace match `{ns}` is invalid (not a DNS-1123 label)"),
                );
            }
        }
        HttpMatch {
            name: m.name.clone(),
            uri,
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
            source_labels: m.source_labels.clone().into_iter().collect(),
            source_namespace: m.source_namespace.clone(),
        }
    }

    /// `gateways` (on a VirtualService or a match): isthmus has no gateways, so only the
    /// reserved `mesh` (every sidecar) has a meaning.
    pub(super) fn mesh_only_gateways(&mut self, doc: &Document, field: &str, gateways: &[String]) {
        for (i, g) in gateways.iter().enumerate() {
            if g != "mesh" {
                self.issue(
                    doc,
                    format!("{field}[{i}]"),
                    format!(
                        "gateway `{g}` is not supported: isthmus has no gateways, only `mesh` \
                         (the sidecars) may be named"
                    ),
                );
            }
        }
    }

    fn header_matches(
        &mut self,
        doc: &Document,
        field: &str,
        headers: &BTreeMap<String, wire::StringMatch>,
        without: bool,
    ) -> Vec<HeaderMatch> {
        let mut out = Vec::new();
        for (name, sm) in headers {
            let f = format!("{field}.{name}");
            if name.starts_with('@') {
                self.issue(
                    doc,
                    &f,
                    "JWT claim based routing is only supported for gateways (isthmus has none)",
                );
                continue;
            }
            self.header_name(doc, &f, name);
            // In withoutHeaders, `regex: "*"` is Istio's spelling of "present" (so: absent).
            let value = if without
                && sm.regex.as_deref() == Some("*")
                && sm.exact.is_none()
                && sm.prefix.is_none()
            {
                None
            } else {
                self.string_match(doc, &f, Some(sm), Empty::Presence)
            };
            out.push(HeaderMatch {
                name: name.to_ascii_lowercase(),
                value,
            });
        }
        out
    }

    /// Compiles a `StringMatch`. `None` for "no condition" / "present" (see [`Empty`]) and after
    /// an error (already reported).
    pub(super) fn string_match(
        &mut self,
        doc: &Document,
        field: &str,
        sm: Option<&wire::StringMatch>,
        empty: Empty,
    ) -> Option<StringMatch> {
        let sm = sm?;
        let set = [&sm.exact, &sm.prefix, &sm.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            self.issue(doc, field, "only one of exact, prefix or regex may be set");
            return None;
        }
        if let Some(e) = &sm.exact {
            return Some(StringMatch::Exact(e.clone()));
        }
        if let Some(p) = &sm.prefix {
            if p.is_empty() && empty != Empty::NoCondition {
                self.issue(doc, field, "prefix string match should not be empty");
                return None;
            }
            return Some(StringMatch::Prefix(p.clone()));
        }
        if let Some(r) = &sm.regex {
            return self.regex(doc, field, r, true).map(StringMatch::Regex);
        }
        None
    }

    /// Compiles an RE2-syntax regex; `anchored` makes it match the whole string, as Envoy's
    /// `safe_regex` matchers do.
    pub(super) fn regex(
        &mut self,
        doc: &Document,
        field: &str,
        pattern: &str,
        anchored: bool,
    ) -> Option<regex::Regex> {
        if pattern.is_empty() {
            self.issue(doc, field, "regex string match should not be empty");
            return None;
        }
        if pattern.len() > MAX_REGEX_LEN {
            self.issue(
                doc,
                field,
                format!("regex is too large, max length allowed is {MAX_REGEX_LEN}"),
            );
            return None;
        }
        let source = if anchored {
            format!("^(?:{pattern})$")
        } else {
            pattern.to_string()
        };
        match regex::Regex::new(&source) {
            Ok(r) => Some(r),
            Err(e) => {
                let why = e.to_string();
                let why = why.lines().last().unwrap_or(&why).trim().to_string();
                self.issue(
                    doc,
                    field,
                    format!("invalid regex `{pattern}`: {why} (Istio uses RE2 syntax)"),
                );
                None
            }
        }
    }

    fn header_name(&mut self, doc: &Document, field: &str, name: &str) -> bool {
        if name.is_empty() {
            self.issue(doc, field, "header name cannot be empty");
            return false;
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.issue(
                doc,
                field,
                format!("header name `{name}` is not a valid header name"),
            );
            return false;
        }
        true
    }

    /// `headers.request` / `headers.response`. Pseudo-headers and `host` cannot be touched,
    /// except that a request `set`/`add` of `host` or `:authority` rewrites the authority (kept
    /// as `host` in the compiled operations).
    pub(super) fn header_ops(
        &mut self,
        doc: &Document,
        field: &str,
        ops: Option<&wire::HeaderOperations>,
        request: bool,
    ) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let mut out = HeaderOps::default();
        for (kind, map, into) in [
            ("set", &ops.set, &mut out.set),
            ("add", &ops.add, &mut out.add),
        ] {
            for (name, value) in map {
                let f = format!("{field}.{kind}.{name}");
                let lower = name.to_ascii_lowercase();
                let authority = lower == "host" || lower == ":authority";
                if authority && request {
                    into.push(("host".to_string(), value.clone()));
                } else if self.operation_name(doc, &f, name) {
                    into.push((lower, value.clone()));
                }
                if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    self.issue(doc, &f, "header value must not contain CR, LF or NUL");
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            if self.operation_name(doc, &format!("{field}.remove[{i}]"), name) {
                out.remove.push(name.to_ascii_lowercase());
            }
        }
        out
    }

    fn operation_name(&mut self, doc: &Document, field: &str, name: &str) -> bool {
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            self.issue(
                doc,
                field,
                format!(
                    "header `{name}` cannot be changed here (pseudo-headers and host are the \
                     proxy's; rewrite the authority with rewrite.authority)"
                ),
            );
            return false;
        }
        self.header_name(doc, field, name)
    }
}

/// Kubernetes' DNS-1123 label: lowercase alphanumerics and `-`, at most 63, alphanumeric ends.
pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
