//! Per-route policies of VirtualService `http` rules: retries, fault injection, mirrors and
//! CORS, validated as Istio's webhook validates them.

use super::matching::Empty;
use super::{Compiler, DestRef, Registry, SubsetMap};
use crate::parse::Document;
use crate::snapshot::{
    Abort, CorsPolicy, Fault, FaultAbort, FaultDelay, RetryOn, RetryPolicy, StringMatch,
};
use crate::wire;

impl Compiler {
    pub(super) fn retries(
        &mut self,
        doc: &Document,
        field: &str,
        r: &wire::HttpRetry,
    ) -> RetryPolicy {
        let attempts = r.attempts.unwrap_or(0);
        let retry_on = r.retry_on.as_deref().filter(|s| !s.trim().is_empty());
        if attempts < 0 {
            self.issue(
                doc,
                format!("{field}.attempts"),
                "attempts cannot be negative",
            );
            return RetryPolicy::disabled();
        }
        if attempts == 0 {
            if r.per_try_timeout.is_some()
                || retry_on.is_some()
                || r.retry_remote_localities.is_some()
            {
                self.issue(
                    doc,
                    field,
                    "retry policy configured when attempts are set to 0 (disabled): set attempts",
                );
            }
            return RetryPolicy::disabled();
        }
        let attempts = u32::try_from(attempts.min(i64::from(i32::MAX))).unwrap_or(u32::MAX);
        let per_try_timeout = r
            .per_try_timeout
            .as_deref()
            .and_then(|t| self.duration(doc, &format!("{field}.perTryTimeout"), t));
        let retry_on = match retry_on {
            None => RetryOn::istio_default(),
            Some(list) => self.retry_on(doc, &format!("{field}.retryOn"), list),
        };
        RetryPolicy {
            attempts,
            per_try_timeout,
            retry_on,
            retry_remote_localities: r.retry_remote_localities.unwrap_or(false),
            retry_ignore_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
            backoff: r
                .backoff
                .as_deref()
                .and_then(|t| self.duration(doc, &format!("{field}.backoff"), t)),
        }
    }

    /// Istio's `parseRetryOn`: comma-separated Envoy conditions; integers that are HTTP status
    /// codes are retriable statuses (and imply `retriable-status-codes`).
    fn retry_on(&mut self, doc: &Document, field: &str, list: &str) -> RetryOn {
        let mut on = RetryOn::default();
        for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Ok(code) = token.parse::<u16>() {
                if is_known_status(code) {
                    if !on.status_codes.contains(&code) {
                        on.status_codes.push(code);
                    }
                    on.retriable_status_codes = true;
                    continue;
                }
            } else if on.set(token) {
                continue;
            }
            self.issue(
                doc,
                field,
                format!(
                    "`{token}` is not a valid retryOn policy (Envoy conditions such as 5xx, \
                     gateway-error, reset, connect-failure, retriable-4xx, refused-stream, \
                     retriable-status-codes; gRPC cancelled, deadline-exceeded, internal, \
                     resource-exhausted, unavailable; or an HTTP status code)"
                ),
            );
        }
        on
    }

    pub(super) fn fault(
        &mut self,
        doc: &Document,
        field: &str,
        f: &wire::HttpFaultInjection,
    ) -> Option<Fault> {
        if f.delay.is_none() && f.abort.is_none() {
            self.issue(
                doc,
                field,
                "HTTP fault injection must have an abort and/or a delay",
            );
            return None;
        }
        let before = self.issues.len();
        let delay = f.delay.as_ref().and_then(|d| {
            let field = format!("{field}.delay");
            if d.exponential_delay.is_some() {
                self.issue(
                    doc,
                    format!("{field}.exponentialDelay"),
                    "exponentialDelay is not supported (Istio refuses it too): use fixedDelay",
                );
                return None;
            }
            let Some(text) = d.fixed_delay.as_deref() else {
                self.issue(doc, &field, "fixedDelay is required");
                return None;
            };
            let fixed = self.duration(doc, &format!("{field}.fixedDelay"), text)?;
            let percent = self.fault_percent(doc, &field, d.percentage, d.percent)?;
            Some(FaultDelay { fixed, percent })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let field = format!("{field}.abort");
            let kind = match (a.http_status, &a.grpc_status, &a.http2_error) {
                (_, _, Some(_)) => {
                    self.issue(doc, format!("{field}.http2Error"), "HTTP/2 abort fault injection is not supported (Istio refuses it too)");
                    return None;
                }
                (Some(_), Some(_), _) => {
                    self.issue(doc, &field, "only one of httpStatus or grpcStatus may be set");
                    return None;
                }
                (Some(s), None, None) => Abort::Http(self.http_status(doc, &format!("{field}.httpStatus"), s)?),
                (None, Some(name), None) => match grpc_code(name) {
                    Some(code) => Abort::Grpc(code),
                    None => {
                        self.issue(doc, format!("{field}.grpcStatus"), format!("gRPC status `{name}` is not supported: use a name such as UNAVAILABLE or NOT_FOUND"));
                        return None;
                    }
                },
                (None, None, None) => {
                    self.issue(doc, &field, "abort needs httpStatus or grpcStatus");
                    return None;
                }
            };
            let percent = self.fault_percent(doc, &field, a.percentage, a.percent)?;
            Some(FaultAbort { kind, percent })
        });
        (self.issues.len() == before).then_some(Fault { delay, abort })
    }

    /// `percentage.value`, else the deprecated integer `percent`, else 0 (Istio injects
    /// nothing without a percentage).
    fn fault_percent(
        &mut self,
        doc: &Document,
        field: &str,
        percentage: Option<wire::Percent>,
        percent: Option<i64>,
    ) -> Option<f64> {
        match (percentage, percent) {
            (Some(p), _) => self.percent(doc, &format!("{field}.percentage.value"), p.value),
            (None, Some(p)) => self.percent(doc, &format!("{field}.percent"), p as f64),
            (None, None) => Some(0.0),
        }
    }

    pub(super) fn percent(&mut self, doc: &Document, field: &str, value: f64) -> Option<f64> {
        if (0.0..=100.0).contains(&value) {
            Some(value)
        } else {
            self.issue(
                doc,
                field,
                format!("percentage must be between 0 and 100 (it is {value})"),
            );
            None
        }
    }

    pub(super) fn mirrors(
        &mut self,
        doc: &Document,
        field: &str,
        route: &wire::HttpRoute,
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Vec<(DestRef, f64)> {
        let mut out = Vec::new();
        if route.mirror.is_some() && !route.mirrors.is_empty() {
            self.issue(
                doc,
                field,
                "HTTP route cannot contain both mirror and mirrors",
            );
            return out;
        }
        if route.mirror.is_none()
            && (route.mirror_percent.is_some() || route.mirror_percentage.is_some())
        {
            self.issue(
                doc,
                field,
                "mirrorPercentage applies to `mirror`; with `mirrors`, set each entry's percentage",
            );
        }
        if let Some(m) = &route.mirror {
            let percent = match (route.mirror_percentage, route.mirror_percent) {
                (Some(p), _) => {
                    self.percent(doc, &format!("{field}.mirrorPercentage.value"), p.value)
                }
                (None, Some(p)) => {
                    self.percent(doc, &format!("{field}.mirrorPercent"), f64::from(p))
                }
                (None, None) => Some(100.0),
            };
            let dest = self.destination(doc, &format!("{field}.mirror"), m, registry, subsets);
            if let (Some(dest), Some(percent)) = (dest, percent) {
                out.push((dest, percent));
            }
        }
        for (i, m) in route.mirrors.iter().enumerate() {
            let mfield = format!("{field}.mirrors[{i}]");
            let percent = match m.percentage {
                Some(p) => self.percent(doc, &format!("{mfield}.percentage.value"), p.value),
                None => Some(100.0),
            };
            let dest = self.destination(
                doc,
                &format!("{mfield}.destination"),
                &m.destination,
                registry,
                subsets,
            );
            if let (Some(dest), Some(percent)) = (dest, percent) {
                out.push((dest, percent));
            }
        }
        out
    }

    pub(super) fn cors(&mut self, doc: &Document, field: &str, c: &wire::CorsPolicy) -> CorsPolicy {
        let mut allow_origins: Vec<_> = c
            .allow_origin
            .iter()
            .map(|o| StringMatch::Exact(o.clone()))
            .collect();
        for (i, o) in c.allow_origins.iter().enumerate() {
            let f = format!("{field}.allowOrigins[{i}]");
            if [&o.exact, &o.prefix, &o.regex]
                .iter()
                .all(|v| v.as_deref().is_none_or(str::is_empty))
            {
                self.issue(doc, &f, "an empty match is not a valid CORS allowed origin");
                continue;
            }
            if let Some(sm) = self.string_match(doc, &f, Some(o), Empty::Strict) {
                allow_origins.push(sm);
            }
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if !CORS_METHODS.contains(&m.as_str()) {
                self.issue(
                    doc,
                    format!("{field}.allowMethods[{i}]"),
                    format!("`{m}` is not a supported HTTP method"),
                );
            }
        }
        for (list, name) in [
            (&c.allow_headers, "allowHeaders"),
            (&c.expose_headers, "exposeHeaders"),
        ] {
            for (i, h) in list.iter().enumerate() {
                let ok = h == "*" || (!h.is_empty() && h.bytes().all(is_token_byte));
                if !ok {
                    self.issue(
                        doc,
                        format!("{field}.{name}[{i}]"),
                        format!("`{h}` is not a valid header name"),
                    );
                }
            }
        }
        let max_age = c.max_age.as_deref().and_then(|t| {
            let f = format!("{field}.maxAge");
            let d = self.duration(doc, &f, t)?;
            if d.subsec_nanos() != 0 {
                self.issue(doc, &f, "maxAge is accurate only to seconds precision");
                return None;
            }
            Some(d)
        });
        CorsPolicy {
            allow_origins,
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age,
            allow_credentials: c.allow_credentials,
            unmatched_preflights_forward: c.unmatched_preflights
                != Some(wire::UnmatchedPreflights::Ignore),
        }
    }
}

/// What Istio's CORS validation accepts.
const CORS_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*",
];

/// An RFC 7230 token character.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The statuses Go's `http.StatusText` knows: what Istio accepts as a retriable status code.
fn is_known_status(code: u16) -> bool {
    matches!(code,
        100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426 | 428 | 429
        | 431 | 451 | 500..=508 | 510 | 511)
}

/// gRPC status names as Istio accepts them in `abort.grpcStatus`.
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_names_and_statuses() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("unavailable"), None);
        assert!(is_known_status(503) && is_known_status(429) && !is_known_status(599));
    }
}
