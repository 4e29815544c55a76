//! Compiled HTTP routes: one VirtualService `http` rule per (service, port), every reference
//! resolved to a cluster, every regex compiled, every default filled in. The proxy reads these
//! as plain data; nothing here does I/O.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::Cluster;
use crate::duration::show;

/// One VirtualService `http` rule, compiled for one (service, port).
#[derive(Debug)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// `ns/name` of the VirtualService; `None` for the implicit default route.
    pub virtual_service: Option<String>,
    /// Empty: matches every request. Blocks are ORed; the fields of one block are ANDed.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    /// Route-level header operations (`headers.request` / `headers.response`), applied after
    /// the chosen destination's own.
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    /// `None`: no route timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// Istio's default policy when `retries` is absent; `attempts == 0` disables retries.
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    /// `mirror` (with `mirrorPercentage` or the deprecated `mirrorPercent`) and `mirrors`.
    pub mirrors: Vec<Mirror>,
    pub cors: Option<CorsPolicy>,
    pub(crate) ticket: AtomicUsize,
}

/// What a matched request gets.
#[derive(Debug)]
pub enum HttpAction {
    /// Forward to one of these, picked by weight (relative weights; a 0 weight is never picked).
    Route(Vec<HttpDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: u16,
        body: Option<Arc<[u8]>>,
    },
}

#[derive(Debug)]
pub struct HttpDestination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    /// Header operations of this destination (`route[].headers`), applied before the route's.
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// One `match` block.
#[derive(Debug, Clone, Default)]
pub struct HttpMatch {
    pub name: Option<String>,
    /// Against the path (without the query string).
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Every one must match.
    pub headers: Vec<HeaderMatch>,
    /// None may match (a header absent, or present with a non-matching value, passes).
    pub without_headers: Vec<HeaderMatch>,
    /// `None`: the parameter must be present (any value).
    pub query_params: Vec<(String, Option<StringMatch>)>,
    /// The service port the request was addressed to.
    pub port: Option<u16>,
    /// `uri` compares case-insensitively (exact and prefix; a regex as written).
    pub ignore_uri_case: bool,
    /// The client workload's labels must include these.
    pub source_labels: Vec<(String, String)>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lowercased.
    pub name: String,
    /// `None`: presence only (`{}` in YAML).
    pub value: Option<StringMatch>,
}

/// Istio's `StringMatch`. A regex matches the whole string (Envoy `safe_regex`, RE2 syntax):
/// it is compiled anchored.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

/// `set` replaces, `add` appends, `remove` deletes. Names are lowercased; values are literal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Replaces the path (and query).
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub derive_port: Option<DerivePort>,
    pub scheme: Option<String>,
    /// 301 unless set.
    pub code: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    /// Replaces the part of the path the `uri` match matched: the prefix for a prefix match,
    /// the whole path for exact and regex matches (and when no `uri` match applied), as Envoy's
    /// `prefix_rewrite` does in the routes Istio generates.
    pub uri: Option<String>,
    /// `uriRegexRewrite`: every match of the regex (unanchored) in the path is replaced with the
    /// template. Istio's `\1` capture references are converted to the `regex` crate's `${1}` and
    /// literal `$` escaped, so `regex.replace_all(path, template)` is the whole rewrite.
    pub uri_regex: Option<(regex::Regex, String)>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Prefer endpoints in other localities for retries (no effect in a single locality).
    pub retry_remote_localities: bool,
    /// `retryIgnorePreviousHosts` (Istio default true): a retry avoids endpoints already tried.
    pub retry_ignore_previous_hosts: bool,
    /// `backoff`: base interval between retries; `None` = Envoy's 25ms (capped at 10x).
    pub backoff: Option<Duration>,
}

/// Envoy's `retry_on` conditions as Istio parses `retryOn`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub envoy_ratelimited: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub retriable_headers: bool,
    pub http3_post_connect_failure: bool,
    pub reset_before_request: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
    /// Statuses retried when `retriable_status_codes` is set.
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    pub fixed: Duration,
    /// Share of requests delayed, 0–100 (0 when unset: Istio delays nothing without it).
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    pub kind: Abort,
    /// Share of requests aborted, 0–100 (0 when unset, as Istio).
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status code (from Istio's name, e.g. `UNAVAILABLE` = 14).
    Grpc(u32),
}

#[derive(Debug)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// Share of requests mirrored, 0–100 (100 when unset).
    pub percent: f64,
}

#[derive(Debug, Clone)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    /// Whole seconds (Istio refuses sub-second values).
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    /// Preflights from origins that do not match go to the upstream (`FORWARD`, the default)
    /// rather than being answered without CORS headers (`IGNORE`).
    pub unmatched_preflights_forward: bool,
}

/// Istio's retry policy when a route has no `retries`: 2 retries on connect failure, refused
/// stream, gRPC UNAVAILABLE and CANCELLED, and HTTP 503; previously tried hosts avoided.
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            retry_remote_localities: false,
            retry_ignore_previous_hosts: true,
            backoff: None,
        }
    }
}

impl RetryPolicy {
    /// `attempts: 0`.
    pub fn disabled() -> Self {
        RetryPolicy {
            attempts: 0,
            retry_on: RetryOn::default(),
            ..RetryPolicy::default()
        }
    }

    fn dump(&self) -> Value {
        if self.attempts == 0 {
            return json!("disabled");
        }
        json!({
            "attempts": self.attempts,
            "perTryTimeout": self.per_try_timeout.map(show),
            "retryOn": self.retry_on.to_string(),
        })
    }
}

impl RetryOn {
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` + 503.
    pub fn istio_default() -> Self {
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            grpc_unavailable: true,
            grpc_cancelled: true,
            retriable_status_codes: true,
            status_codes: vec![503],
            ..RetryOn::default()
        }
    }

    /// Sets the condition named `token` (Envoy's spelling). `false` if the name is unknown.
    pub(crate) fn set(&mut self, token: &str) -> bool {
        let flag = match token {
            "5xx" => &mut self.five_xx,
            "gateway-error" => &mut self.gateway_error,
            "reset" => &mut self.reset,
            "connect-failure" => &mut self.connect_failure,
            "envoy-ratelimited" => &mut self.envoy_ratelimited,
            "retriable-4xx" => &mut self.retriable_4xx,
            "refused-stream" => &mut self.refused_stream,
            "retriable-status-codes" => &mut self.retriable_status_codes,
            "retriable-headers" => &mut self.retriable_headers,
            "http3-post-connect-failure" => &mut self.http3_post_connect_failure,
            "reset-before-request" => &mut self.reset_before_request,
            "cancelled" => &mut self.grpc_cancelled,
            "deadline-exceeded" => &mut self.grpc_deadline_exceeded,
            "internal" => &mut self.grpc_internal,
            "resource-exhausted" => &mut self.grpc_resource_exhausted,
            "unavailable" => &mut self.grpc_unavailable,
            _ => return false,
        };
        *flag = true;
        true
    }

    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        [
            (self.five_xx, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.connect_failure, "connect-failure"),
            (self.envoy_ratelimited, "envoy-ratelimited"),
            (self.retriable_4xx, "retriable-4xx"),
            (self.refused_stream, "refused-stream"),
            (self.retriable_status_codes, "retriable-status-codes"),
            (self.retriable_headers, "retriable-headers"),
            (
                self.http3_post_connect_failure,
                "http3-post-connect-failure",
            ),
            (self.reset_before_request, "reset-before-request"),
            (self.grpc_cancelled, "cancelled"),
            (self.grpc_deadline_exceeded, "deadline-exceeded"),
            (self.grpc_internal, "internal"),
            (self.grpc_resource_exhausted, "resource-exhausted"),
            (self.grpc_unavailable, "unavailable"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
    }
}

/// Envoy's spelling, status codes last: `connect-failure,...,retriable-status-codes,503`.
impl std::fmt::Display for RetryOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        let codes = self.status_codes.iter().map(ToString::to_string);
        for part in self.names().map(str::to_string).chain(codes) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(&part)?;
        }
        Ok(())
    }
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(s),
        }
    }

    /// ASCII case-insensitive for exact and prefix; a regex matches as written (Envoy ignores
    /// `ignore_case` for `safe_regex`; write `(?i)` in the regex instead).
    pub fn matches_ignoring_case(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s.eq_ignore_ascii_case(e),
            StringMatch::Prefix(p) => s
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StringMatch::Regex(r) => r.is_match(s),
        }
    }

    /// The regex as the user wrote it (without the anchoring added when compiling).
    pub fn describe(&self) -> String {
        match self {
            StringMatch::Exact(e) => format!("exact:{e}"),
            StringMatch::Prefix(p) => format!("prefix:{p}"),
            StringMatch::Regex(r) => {
                let s = r.as_str();
                let inner = s
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s);
                format!("regex:{inner}")
            }
        }
    }
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    fn dump(&self) -> Value {
        json!({"set": self.set, "add": self.add, "remove": self.remove})
    }
}

impl HttpMatch {
    fn dump(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        if let Some(n) = &self.name {
            put("name", json!(n));
        }
        for (key, sm) in [
            ("uri", &self.uri),
            ("scheme", &self.scheme),
            ("method", &self.method),
            ("authority", &self.authority),
        ] {
            if let Some(sm) = sm {
                put(key, json!(sm.describe()));
            }
        }
        let headers = |hs: &[HeaderMatch]| -> Value {
            hs.iter()
                .map(|h| {
                    let v = h
                        .value
                        .as_ref()
                        .map_or("present".into(), StringMatch::describe);
                    (h.name.clone(), Value::String(v))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        if !self.headers.is_empty() {
            put("headers", headers(&self.headers));
        }
        if !self.without_headers.is_empty() {
            put("withoutHeaders", headers(&self.without_headers));
        }
        if !self.query_params.is_empty() {
            let q: serde_json::Map<_, _> = self
                .query_params
                .iter()
                .map(|(k, v)| {
                    let v = v.as_ref().map_or("present".into(), StringMatch::describe);
                    (k.clone(), Value::String(v))
                })
                .collect();
            put("queryParams", q.into());
        }
        if let Some(p) = self.port {
            put("port", json!(p));
        }
        if self.ignore_uri_case {
            put("ignoreUriCase", json!(true));
        }
        if !self.source_labels.is_empty() {
            put("sourceLabels", json!(self.source_labels));
        }
        if let Some(ns) = &self.source_namespace {
            put("sourceNamespace", json!(ns));
        }
        m.into()
    }
}

impl HttpRoute {
    /// A monotonically increasing number for deterministic weighted selection.
    pub fn next_ticket(&self) -> usize {
        self.ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// The destinations of a `Route` action; empty for redirects and direct responses.
    pub fn destinations(&self) -> &[HttpDestination] {
        match &self.action {
            HttpAction::Route(d) => d,
            _ => &[],
        }
    }

    /// Every cluster the route sends to: destinations, then mirrors.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.destinations()
            .iter()
            .map(|d| &d.cluster)
            .chain(self.mirrors.iter().map(|m| &m.cluster))
    }

    pub(crate) fn same_destinations(&self, other: &HttpRoute) -> bool {
        let (a, b) = (self.destinations(), other.destinations());
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(a, b)| a.weight == b.weight && a.cluster.name == b.cluster.name)
    }

    pub(crate) fn dump(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("virtualService".into(), json!(self.virtual_service));
        m.insert(
            "match".into(),
            self.matches.iter().map(HttpMatch::dump).collect(),
        );
        let action = match &self.action {
            HttpAction::Route(ds) => json!({"route": ds.iter().map(|d| {
                let mut v = json!({
                    "cluster": d.cluster.name.as_ref(),
                    "weight": d.weight,
                    "endpoints": d.cluster.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                    "policy": d.cluster.policy.dump(),
                });
                if !d.request_headers.is_empty() {
                    v["requestHeaders"] = d.request_headers.dump();
                }
                if !d.response_headers.is_empty() {
                    v["responseHeaders"] = d.response_headers.dump();
                }
                v
            }).collect::<Vec<_>>()}),
            HttpAction::Redirect(r) => json!({"redirect": {
                "uri": r.uri, "authority": r.authority, "port": r.port,
                "derivePort": r.derive_port.map(|d| format!("{d:?}")),
                "scheme": r.scheme, "code": r.code,
            }}),
            HttpAction::DirectResponse { status, body } => json!({"directResponse": {
                "status": status, "bodyBytes": body.as_ref().map(|b| b.len()),
            }}),
        };
        if let Value::Object(a) = action {
            m.extend(a);
        }
        if !self.request_headers.is_empty() {
            m.insert("requestHeaders".into(), self.request_headers.dump());
        }
        if !self.response_headers.is_empty() {
            m.insert("responseHeaders".into(), self.response_headers.dump());
        }
        if let Some(r) = &self.rewrite {
            m.insert(
                "rewrite".into(),
                json!({
                    "uri": r.uri,
                    "uriRegex": r.uri_regex.as_ref().map(|(re, to)| format!("{} -> {to}", re.as_str())),
                    "authority": r.authority,
                }),
            );
        }
        if let Some(t) = self.timeout {
            m.insert("timeout".into(), json!(show(t)));
        }
        m.insert("retries".into(), self.retries.dump());
        if let Some(f) = &self.fault {
            m.insert(
                "fault".into(),
                json!({
                    "delay": f.delay.as_ref().map(|d| json!({"fixed": show(d.fixed), "percent": d.percent})),
                    "abort": f.abort.as_ref().map(|a| json!({"kind": format!("{:?}", a.kind), "percent": a.percent})),
                }),
            );
        }
        if !self.mirrors.is_empty() {
            m.insert(
                "mirrors".into(),
                self.mirrors
                    .iter()
                    .map(|mi| json!({"cluster": mi.cluster.name.as_ref(), "percent": mi.percent}))
                    .collect(),
            );
        }
        if let Some(c) = &self.cors {
            m.insert(
                "cors".into(),
                json!({
                    "allowOrigins": c.allow_origins.iter().map(StringMatch::describe).collect::<Vec<_>>(),
                    "allowMethods": c.allow_methods,
                    "allowHeaders": c.allow_headers,
                    "exposeHeaders": c.expose_headers,
                    "maxAge": c.max_age.map(show),
                    "allowCredentials": c.allow_credentials,
                    "unmatchedPreflightsForward": c.unmatched_preflights_forward,
                }),
            );
        }
        m.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches() {
        let re = StringMatch::Regex(regex::Regex::new("^(?:/api/v[0-9]+)$").unwrap());
        assert!(re.matches("/api/v2"));
        assert!(!re.matches("/api/v2/x"), "anchored: the whole string");
        assert_eq!(re.describe(), "regex:/api/v[0-9]+");
        let p = StringMatch::Prefix("/Api".into());
        assert!(!p.matches("/api/x"));
        assert!(p.matches_ignoring_case("/api/x"));
        assert!(!p.matches_ignoring_case("/a"));
        assert!(StringMatch::Exact("GET".into()).matches_ignoring_case("get"));
    }

    #[test]
    fn default_retry_policy_is_istios() {
        let p = RetryPolicy::default();
        assert_eq!(p.attempts, 2);
        assert_eq!(
            p.retry_on.to_string(),
            "connect-failure,refused-stream,retriable-status-codes,cancelled,unavailable,503"
        );
        assert!(p.retry_ignore_previous_hosts);
        assert_eq!(RetryPolicy::disabled().attempts, 0);
    }
}
