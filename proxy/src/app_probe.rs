//! The app's own health probes, run by the sidecar (Istio's probe rewriting).
//!
//! The injector points an app container's liveness, readiness and startup probes at
//! `:15020/app-health/<container>/livez|readyz|startupz` and hands the originals to the sidecar
//! in `ISTHMUS_KUBE_APP_PROBERS` (JSON keyed by those paths, Istio's `ISTIO_KUBE_APP_PROBERS`
//! format). The kubelet's probe then reaches a port outside inbound capture, so it keeps working
//! when inbound mTLS is STRICT (the kubelet has no mesh certificate), and a `tcpSocket` probe
//! tests the app instead of the sidecar's capture listener (which accepts every port). The
//! sidecar runs the original probe against the app, from UID 1337, which is never captured.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The environment variable the injector sets on the sidecar.
pub const ENV: &str = "ISTHMUS_KUBE_APP_PROBERS";
/// Every rewritten probe's path starts with this, on the stats port (15020).
pub const PATH_PREFIX: &str = "/app-health/";
/// Kubernetes' default `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The most of a response head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;
/// The most of a gRPC health response read: a HealthCheckResponse is a few bytes.
const MAX_GRPC_BODY: usize = 64 * 1024;

/// One original probe, as Kubernetes spells it (`port` already a number: the injector resolves
/// named ports against the container's ports). Unknown fields are ignored, as Istio's agent
/// does, so a newer injector's extra fields do not stop an older sidecar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    pub http_get: Option<HttpGet>,
    pub tcp_socket: Option<TcpSocket>,
    pub grpc: Option<Grpc>,
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    pub path: Option<String>,
    pub port: u16,
    pub host: Option<String>,
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct TcpSocket {
    pub port: u16,
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Grpc {
    pub port: u16,
    pub service: Option<String>,
}

/// Why `ISTHMUS_KUBE_APP_PROBERS` cannot be used at all (not a JSON object). One bad entry is
/// not this: it answers 503 with its reason and the others still run.
#[derive(Debug, thiserror::Error)]
pub enum ProbersError {
    #[error("{ENV} is not a JSON object of probes: {0}")]
    Json(#[from] serde_json::Error),
}

/// Why one probe of the app failed (the kubelet sees 503 and this text).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from the app within {0:?}")]
    Timeout(Duration),
    #[error("talking to the app: {0}")]
    Io(#[from] std::io::Error),
    #[error("the app's answer is not HTTP: {0}")]
    BadResponse(String),
    #[error("gRPC health check: {0}")]
    Grpc(String),
}

/// A probe the sidecar can run: where, what, and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Http {
        addr: SocketAddr,
        request: Vec<u8>,
    },
    Tcp {
        addr: SocketAddr,
    },
    Grpc {
        addr: SocketAddr,
        service: String,
    },
    /// An entry the sidecar cannot run: its path fails with this reason (the sidecar keeps
    /// running, so the pod's other probes and its traffic are unaffected).
    Invalid(String),
}

/// The app probes of one pod, keyed by their `/app-health/...` path.
#[derive(Debug, Default)]
pub struct AppProbers {
    checks: HashMap<String, (Check, Duration)>,
}

/// What the kubelet is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// An HTTP response's status and (when asked for) the start of its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl AppProbers {
    /// Parses the injector's JSON. Probes without a `host` go to `target`: the pod's IP, where
    /// the kubelet would have sent them (an app listening on 127.0.0.1 only fails its probes
    /// here as it would without a mesh), or 127.0.0.1 when the pod IP is not known.
    pub fn parse(json: &str, target: IpAddr) -> Result<AppProbers, ProbersError> {
        let entries: HashMap<String, serde_json::Value> = serde_json::from_str(json)?;
        let mut checks = HashMap::new();
        for (path, entry) in entries {
            let prober = serde_json::from_value::<Prober>(entry).map_err(|e| e.to_string());
            let (check, timeout) = match prober.and_then(|p| Ok((check(&path, &p, target)?, p))) {
                Ok((check, prober)) => (check, prober.timeout_seconds),
                Err(reason) => {
                    tracing::warn!(%path, %reason, "{ENV}: this app probe cannot be run; it answers 503");
                    (Check::Invalid(reason), None)
                }
            };
            let timeout = timeout
                .filter(|&s| s > 0)
                .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
            checks.insert(path, (check, timeout));
        }
        Ok(AppProbers { checks })
    }

    /// From the flag (or [`ENV`]): nothing set means no app probes.
    pub fn from_flag(
        json: Option<&str>,
        pod_ip: Option<IpAddr>,
    ) -> Result<AppProbers, ProbersError> {
        match json {
            Some(json) if !json.trim().is_empty() => {
                AppProbers::parse(json, pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            }
            _ => Ok(AppProbers::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Runs the probe registered at `path` and answers as the kubelet expects: the app's own
    /// status for an HTTP probe (2xx passes through; a 3xx, a success for the kubelet, becomes
    /// 200 so that no redirect is followed to somewhere else), 200 or 503 otherwise, 404 for a
    /// path nobody registered.
    pub async fn answer(&self, path: &str) -> Answer {
        let Some((check, timeout)) = self.checks.get(path) else {
            return Answer {
                status: 404,
                body: format!("no app probe is registered at {path}\n"),
            };
        };
        if let Check::Invalid(reason) = check {
            return Answer {
                status: 503,
                body: format!("app probe not run: the sidecar cannot run it: {reason}\n"),
            };
        }
        let ran = tokio::time::timeout(*timeout, run(check)).await;
        let outcome = ran.unwrap_or(Err(ProbeError::Timeout(*timeout)));
        match outcome {
            Ok(status @ 200..=299) => Answer {
                status,
                body: "app probe passed\n".into(),
            },
            Ok(status @ 300..=399) => Answer {
                status: 200,
                body: format!("app probe passed (the app answered {status})\n"),
            },
            Ok(status) => Answer {
                status: if (400..=599).contains(&status) {
                    status
                } else {
                    503
                },
                body: format!("app probe failed: the app answered {status}\n"),
            },
            Err(e) => Answer {
                status: 503,
                body: format!("app probe failed: {e}\n"),
            },
        }
    }
}

/// A plain HTTP/1.1 GET: the request's bytes, `Connection: close`. The kubelet's defaults
/// (`Host` = the address dialled, `User-Agent: kube-probe/…`, `Accept: */*`) unless the probe's
/// own headers replace them.
pub fn get_request(addr: SocketAddr, path: &str, headers: &[Header]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    let mut out = format!("GET {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("user-agent") {
        out.push_str("User-Agent: kube-probe/isthmus\r\n");
    }
    if !has("accept") {
        out.push_str("Accept: */*\r\n");
    }
    for h in headers {
        out.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Sends `request` to `addr` and reads the response's status (and up to `body_limit` bytes of
/// its body, until the server closes). The caller bounds the time.
pub async fn http_status(
    addr: SocketAddr,
    request: &[u8],
    body_limit: usize,
) -> Result<HttpAnswer, ProbeError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let (status, head_len) = loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ProbeError::BadResponse(
                "the connection closed before a status line".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break (response.code.unwrap_or(0), len),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ProbeError::BadResponse("response head over 16 KiB".into()))
            }
            Err(e) => return Err(ProbeError::BadResponse(e.to_string())),
        }
    };
    let mut body = buf.split_off(head_len);
    while body.len() < body_limit {
        let mut chunk = [0u8; 2048];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(body_limit);
    Ok(HttpAnswer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Checks one entry and turns it into what the sidecar will run.
fn check(path: &str, prober: &Prober, target: IpAddr) -> Result<Check, String> {
    if !path.starts_with(PATH_PREFIX) {
        return Err(format!("the path must start with {PATH_PREFIX}"));
    }
    let addr = |host: &Option<String>, port: u16| -> Result<SocketAddr, String> {
        if port == 0 {
            return Err("port 0".into());
        }
        let ip = match host.as_deref() {
            None | Some("") => target,
            Some(h) => h
                .parse()
                .map_err(|_| format!("host `{h}` is not an IP address (names are not resolved)"))?,
        };
        Ok(SocketAddr::new(ip, port))
    };
    match (&prober.http_get, &prober.tcp_socket, &prober.grpc) {
        (Some(get), None, None) => {
            if let Some(scheme) = get.scheme.as_deref() {
                if !scheme.eq_ignore_ascii_case("HTTP") {
                    return Err(format!(
                        "scheme {scheme}: the sidecar probes apps over plain HTTP only"
                    ));
                }
            }
            let probe_path = match get.path.as_deref() {
                None | Some("") => "/".to_string(),
                Some(p) if p.starts_with('/') => p.to_string(),
                Some(p) => format!("/{p}"),
            };
            let headers = get.http_headers.iter();
            let headers = headers.map(|h| (h.name.as_str(), h.value.as_str()));
            if let Some(problem) = isthmus_config::app_probe::http_get_problem(&probe_path, headers)
            {
                return Err(problem);
            }
            let addr = addr(&get.host, get.port)?;
            Ok(Check::Http {
                addr,
                request: get_request(addr, &probe_path, &get.http_headers),
            })
        }
        (None, Some(tcp), None) => Ok(Check::Tcp {
            addr: addr(&tcp.host, tcp.port)?,
        }),
        (None, None, Some(grpc)) => Ok(Check::Grpc {
            addr: addr(&None, grpc.port)?,
            service: grpc.service.clone().unwrap_or_default(),
        }),
        _ => Err("exactly one of httpGet, tcpSocket and grpc must be set".into()),
    }
}

/// Runs one check: the HTTP status the kubelet would have judged, or 200 for a successful
/// connect or gRPC `SERVING`.
async fn run(check: &Check) -> Result<u16, ProbeError> {
    match check {
        Check::Http { addr, request } => Ok(http_status(*addr, request, 0).await?.status),
        Check::Tcp { addr } => {
            TcpStream::connect(*addr)
                .await
                .map_err(|source| ProbeError::Connect {
                    addr: *addr,
                    source,
                })?;
            Ok(200)
        }
        Check::Grpc { addr, service } => grpc_health(*addr, service).await.map(|()| 200),
        Check::Invalid(reason) => Err(ProbeError::BadResponse(reason.clone())),
    }
}

/// `grpc.health.v1.Health/Check` over h2c, as the kubelet's gRPC probe does: passes when the
/// server answers `SERVING` with grpc-status 0.
async fn grpc_health(addr: SocketAddr, service: &str) -> Result<(), ProbeError> {
    let grpc = |m: &str| ProbeError::Grpc(m.to_string());
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let (mut client, connection) = ::h2::client::handshake(stream)
        .await
        .map_err(|e| grpc(&format!("HTTP/2 handshake: {e}")))?;
    let connection = tokio::spawn(connection);
    let request = ::http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "kube-probe/isthmus")
        .body(())
        .map_err(|e| grpc(&e.to_string()))?;
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| grpc(&format!("sending the request: {e}")))?;
    send.send_data(health_request(service), true)
        .map_err(|e| grpc(&format!("sending the request: {e}")))?;
    let result = async {
        let response = response
            .await
            .map_err(|e| grpc(&format!("no response: {e}")))?;
        let trailers_only = grpc_status(response.headers());
        let mut body = response.into_body();
        let mut message = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| grpc(&format!("reading the response: {e}")))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if message.len() + chunk.len() > MAX_GRPC_BODY {
                return Err(grpc("the response is over 64 KiB"));
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| grpc(&format!("reading the trailers: {e}")))?;
        let status = trailers
            .as_ref()
            .and_then(grpc_status)
            .or(trailers_only)
            .ok_or_else(|| grpc("no grpc-status"))?;
        if status != "0" {
            return Err(grpc(&format!("grpc-status {status}")));
        }
        match serving_status(&message) {
            Some(1) => Ok(()),
            Some(s) => Err(grpc(&format!("status {s}, not SERVING"))),
            None => Err(grpc("the response is not a HealthCheckResponse")),
        }
    }
    .await;
    connection.abort();
    result
}

fn grpc_status(headers: &::http::HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A length-prefixed `HealthCheckRequest { service }` (field 1, a string; absent when empty).
fn health_request(service: &str) -> Bytes {
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        let mut len = service.len();
        while len >= 0x80 {
            message.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

/// `HealthCheckResponse.status` (field 1, varint) from one length-prefixed message; 0
/// (UNKNOWN) when the field is absent, as protobuf decodes it.
fn serving_status(frame: &[u8]) -> Option<u64> {
    let mut buf = frame;
    if buf.len() < 5 || buf[0] != 0 {
        return None;
    }
    buf.advance(1);
    let len = buf.get_u32() as usize;
    let mut message = buf.get(..len)?;
    let mut status = 0;
    while let Some(&tag) = message.first() {
        message.advance(1);
        let value = varint(&mut message)?;
        match tag {
            0x08 => status = value,
            t if t & 0x07 == 0 => {}
            _ => return None,
        }
    }
    Some(status)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let &byte = buf.first()?;
        buf.advance(1);
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests;
