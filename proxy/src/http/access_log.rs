//! The HTTP access log: one line per request on stdout (logs go to stderr), in Istio's default
//! text format or as JSON with Istio's field names — what `kubectl logs -c istio-proxy` users
//! already parse. Off by default (`--access-log`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

/// `--access-log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Istio's default text format (`meshConfig.accessLogEncoding: TEXT`).
    Text,
    /// Istio's JSON encoding (`accessLogEncoding: JSON`).
    Json,
}

/// What the log needs from a request, taken when it arrives (only when logging is on).
#[derive(Debug, Clone, Default)]
pub struct RequestLine {
    pub start: Option<SystemTime>,
    pub method: String,
    pub path: String,
    pub protocol: &'static str,
    pub authority: String,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub forwarded_for: Option<String>,
    pub route: Option<String>,
}

impl RequestLine {
    /// The line's request half: `target` as the client sent it, `protocol` as Istio writes it
    /// (`HTTP/1.1`, `HTTP/2`), `started` when its first byte arrived.
    pub fn new(
        view: &crate::http::router::RequestView<'_>,
        target: &str,
        protocol: &'static str,
        route: Option<String>,
        started: std::time::Instant,
    ) -> Self {
        RequestLine {
            start: SystemTime::now().checked_sub(started.elapsed()),
            method: view.method.to_string(),
            path: target.to_string(),
            protocol,
            authority: view.authority.to_string(),
            user_agent: view.header("user-agent").map(str::to_string),
            request_id: view.header("x-request-id").map(str::to_string),
            forwarded_for: view.header("x-forwarded-for").map(str::to_string),
            route,
        }
    }
}

/// One request's line.
pub struct Entry<'a> {
    pub request: &'a RequestLine,
    pub code: u16,
    pub flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_host: Option<SocketAddr>,
    pub cluster: &'a str,
    /// Where the client connected (the original destination).
    pub downstream_local: SocketAddr,
    pub downstream_remote: SocketAddr,
}

/// Writes `entry` as one line on stdout.
pub fn write(format: Format, entry: &Entry<'_>) {
    let mut line = match format {
        Format::Text => text(entry),
        Format::Json => json(entry).to_string(),
    };
    line.push('\n');
    // One write of a whole line: lines from different workers never interleave.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

fn dash(v: Option<&str>) -> &str {
    v.filter(|v| !v.is_empty()).unwrap_or("-")
}

/// Istio's default format:
/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
/// %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
/// "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
/// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
/// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER%
/// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
/// %REQUESTED_SERVER_NAME% %ROUTE_NAME%` — fields isthmus does not have are `-`.
pub fn text(e: &Entry<'_>) -> String {
    let r = e.request;
    format!(
        "[{}] \"{} {} {}\" {} {} - - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {}",
        rfc3339(r.start.unwrap_or_else(SystemTime::now)),
        r.method,
        r.path,
        r.protocol,
        e.code,
        e.flags,
        e.bytes_received,
        e.bytes_sent,
        e.duration_ms,
        dash(r.forwarded_for.as_deref()),
        dash(r.user_agent.as_deref()),
        dash(r.request_id.as_deref()),
        dash(Some(&r.authority)),
        e.upstream_host.map_or("-".to_string(), |a| a.to_string()),
        dash(Some(e.cluster)),
        e.downstream_local,
        e.downstream_remote,
        dash(r.route.as_deref()),
    )
}

/// Istio's JSON access log fields.
pub fn json(e: &Entry<'_>) -> serde_json::Value {
    let r = e.request;
    json!({
        "start_time": rfc3339(r.start.unwrap_or_else(SystemTime::now)),
        "method": r.method,
        "path": r.path,
        "protocol": r.protocol,
        "response_code": e.code,
        "response_flags": e.flags,
        "response_code_details": null,
        "connection_termination_details": null,
        "upstream_transport_failure_reason": null,
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration": e.duration_ms,
        "upstream_service_time": null,
        "x_forwarded_for": r.forwarded_for,
        "user_agent": r.user_agent,
        "request_id": r.request_id,
        "authority": r.authority,
        "upstream_host": e.upstream_host.map(|a| a.to_string()),
        "upstream_cluster": e.cluster,
        "upstream_local_address": null,
        "downstream_local_address": e.downstream_local.to_string(),
        "downstream_remote_address": e.downstream_remote.to_string(),
        "requested_server_name": null,
        "route_name": r.route,
    })
}

/// `2026-11-22T18:04:05.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_and_the_istio_text_line() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_370_645_123);
        assert_eq!(rfc3339(t), "2026-11-22T18:04:05.123Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        let request = RequestLine {
            start: Some(t),
            method: "GET".into(),
            path: "/productpage".into(),
            protocol: "HTTP/1.1",
            authority: "productpage:9080".into(),
            user_agent: Some("curl/8.5.0".into()),
            ..RequestLine::default()
        };
        let entry = Entry {
            request: &request,
            code: 200,
            flags: "-",
            bytes_received: 0,
            bytes_sent: 5183,
            duration_ms: 12,
            upstream_host: Some("10.66.0.2:9080".parse().unwrap()),
            cluster: "outbound|9080||productpage.default.svc.cluster.local",
            downstream_local: "10.96.0.20:9080".parse().unwrap(),
            downstream_remote: "10.66.0.9:51000".parse().unwrap(),
        };
        assert_eq!(
            text(&entry),
            "[2026-11-22T18:04:05.123Z] \"GET /productpage HTTP/1.1\" 200 - - - \"-\" 0 5183 12 - \"-\" \
             \"curl/8.5.0\" \"-\" \"productpage:9080\" \"10.66.0.2:9080\" \
             outbound|9080||productpage.default.svc.cluster.local - 10.96.0.20:9080 10.66.0.9:51000 - -"
        );
        assert_eq!(json(&entry)["response_code"], 200);
    }
}
