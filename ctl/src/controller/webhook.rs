//! The sidecar injection webhook: `POST /inject` over TLS with an AdmissionReview v1, answered
//! with a JSONPatch made by the same pure functions as `isthmus-ctl inject` — the webhook and
//! the CLI inject identically.
//!
//! Which namespaces are injected is the API server's business (the webhook configuration's
//! `namespaceSelector`, `isthmus-injection=enabled`); this server sees only their pods. A pod
//! whose annotations cannot be honoured is denied with the reason (fail closed: injecting it
//! without a traffic annotation would capture traffic the operator excluded). Anything that is
//! not a Pod CREATE is allowed unchanged.
//!
//! HTTP/1.1 by hand, as on the monitoring port: the API server sends one JSON body per request
//! with a `content-length`, on kept-alive connections. Bodies are bounded, every read has a
//! deadline, and garbage gets a 400.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::inject::{self, patch, InjectConfig, Outcome};

/// The path the webhook configuration names.
pub const PATH: &str = "/inject";
/// The API server refuses objects over 3 MiB (etcd's limit plus headroom); an AdmissionReview
/// carries the object once (twice for UPDATE, which is not ours).
const MAX_BODY: usize = 4 * 1024 * 1024;
const MAX_HEAD: usize = 16 * 1024;
/// The API server's default webhook timeout is 10 s; a client slower than that is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no AdmissionReview answer (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error("not an AdmissionReview admission.k8s.io/v1 with request.uid")]
    NotAReview,
}

/// What happened to one review, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    /// Allowed unchanged: opted out, hostNetwork, not a Pod CREATE.
    Skipped,
    Denied,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// `isthmus_controller_webhook_reviews{result}`.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    reviews: Family<ResultLabel, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "isthmus_controller_webhook_reviews",
            "Admission reviews answered, by result (injected, skipped, denied, bad_request)",
            self.reviews.clone(),
        );
    }

    fn count(&self, result: &'static str) {
        self.reviews.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Answers one AdmissionReview: the response review, and what was decided.
pub fn review(body: &[u8], config: &InjectConfig) -> Result<(Value, Verdict), ReviewError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| ReviewError::Json(e.to_string()))?;
    let request = review
        .get("request")
        .filter(|_| {
            review.get("apiVersion").and_then(Value::as_str) == Some("admission.k8s.io/v1")
                && review.get("kind").and_then(Value::as_str) == Some("AdmissionReview")
        })
        .ok_or(ReviewError::NotAReview)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(ReviewError::NotAReview)?;
    let (response, verdict) = decide(request, config);
    let mut response = response;
    response.insert("uid".into(), Value::String(uid.to_owned()));
    let answer = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    });
    Ok((answer, verdict))
}

/// The `response` of a review, without its uid.
fn decide(request: &Value, config: &InjectConfig) -> (serde_json::Map<String, Value>, Verdict) {
    let allowed = || {
        let mut r = serde_json::Map::new();
        r.insert("allowed".into(), Value::Bool(true));
        r
    };
    let str_at = |pointer: &str| request.pointer(pointer).and_then(Value::as_str);
    let is_pod_create = str_at("/kind/kind") == Some("Pod")
        && str_at("/kind/group").is_none_or(str::is_empty)
        && str_at("/operation") == Some("CREATE")
        && str_at("/subResource").is_none_or(str::is_empty);
    let Some(pod) = request.get("object").filter(|_| is_pod_create) else {
        return (allowed(), Verdict::Skipped);
    };
    let mut injected = pod.clone();
    match inject::inject_template(&mut injected, &inject::workload_of_pod(pod), config) {
        Ok(Outcome::Skipped(why)) => {
            tracing::debug!(pod = %pod_name(request, pod), why, "not injected");
            (allowed(), Verdict::Skipped)
        }
        Ok(Outcome::Injected { warnings }) => {
            let ops = patch::json_patch(pod, &injected);
            let mut r = allowed();
            if !ops.is_empty() {
                let text = Value::Array(ops).to_string();
                r.insert("patchType".into(), "JSONPatch".into());
                r.insert(
                    "patch".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(text)
                        .into(),
                );
            }
            if !warnings.is_empty() {
                // Shown by kubectl to whoever created the pod.
                r.insert("warnings".into(), json!(warnings));
            }
            tracing::info!(pod = %pod_name(request, pod), "injected");
            (r, Verdict::Injected)
        }
        Err(e) => {
            let message = format!("isthmus sidecar injection: {e}");
            tracing::info!(pod = %pod_name(request, pod), reason = %e, "denied");
            let mut r = serde_json::Map::new();
            r.insert("allowed".into(), Value::Bool(false));
            r.insert(
                "status".into(),
                json!({"code": 400, "reason": "BadRequest", "message": message}),
            );
            (r, Verdict::Denied)
        }
    }
}

fn pod_name(request: &Value, pod: &Value) -> String {
    let ns = request
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{ns}/{name}")
}

/// Serves the webhook on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    config: Arc<InjectConfig>,
    metrics: Metrics,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, config, metrics) = (acceptor.clone(), config.clone(), metrics.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            if let Err(e) = connection(tls, &config, &metrics).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

/// One request, parsed as far as the webhook needs.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
}

enum Read {
    Request(Request),
    /// The peer closed (or went idle) between requests.
    Closed,
    /// Answer with this status and close.
    Refuse(u16, &'static str),
}

/// Requests on one connection, kept alive until the peer closes, idles or errs.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    config: &InjectConfig,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buf).await? {
            Read::Request(r) => r,
            Read::Closed => return Ok(()),
            Read::Refuse(code, message) => {
                metrics.count("bad_request");
                respond(&mut stream, code, "text/plain", message.as_bytes(), true).await?;
                return Ok(());
            }
        };
        let (code, content_type, body) = match (request.method.as_str(), request.path.as_str()) {
            ("POST", PATH) => match review(&request.body, config) {
                Ok((answer, verdict)) => {
                    metrics.count(match verdict {
                        Verdict::Injected => "injected",
                        Verdict::Skipped => "skipped",
                        Verdict::Denied => "denied",
                    });
                    (200, "application/json", answer.to_string().into_bytes())
                }
                Err(e) => {
                    metrics.count("bad_request");
                    (400, "text/plain", format!("{e}\n").into_bytes())
                }
            },
            (_, PATH) => (405, "text/plain", b"POST only\n".to_vec()),
            _ => (404, "text/plain", b"not found: POST /inject\n".to_vec()),
        };
        respond(&mut stream, code, content_type, &body, request.close).await?;
        if request.close {
            return Ok(());
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<Read> {
    let mut chunk = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Ok(Read::Refuse(431, "request head too large\n"));
        }
        let deadline = if buf.is_empty() {
            IDLE_TIMEOUT
        } else {
            READ_TIMEOUT
        };
        match tokio::time::timeout(deadline, stream.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return Ok(Read::Closed),
            Err(_) => return Ok(Read::Refuse(408, "request head not received in time\n")),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Read::Closed),
            Ok(Ok(0)) => return Ok(Read::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target, version) = (
        first.next().unwrap_or("").to_owned(),
        first.next().unwrap_or("").to_owned(),
        first.next().unwrap_or(""),
    );
    if !version.starts_with("HTTP/1.") {
        return Ok(Read::Refuse(400, "not an HTTP/1.x request\n"));
    }
    let mut length = 0usize;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Ok(Read::Refuse(400, "malformed header line\n"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(n) => length = n,
                Err(_) => return Ok(Read::Refuse(400, "bad content-length\n")),
            },
            "transfer-encoding" => {
                return Ok(Read::Refuse(411, "send the body with a content-length\n"))
            }
            "connection" if value.eq_ignore_ascii_case("close") => close = true,
            _ => {}
        }
    }
    if length > MAX_BODY {
        return Ok(Read::Refuse(413, "body too large\n"));
    }
    buf.drain(..head_end);
    while buf.len() < length {
        match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk)).await {
            Err(_) => return Ok(Read::Refuse(408, "body not received in time\n")),
            Ok(Ok(0)) => return Ok(Read::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    let path = target.split('?').next().unwrap_or("").to_owned();
    Ok(Read::Request(Request {
        method,
        path,
        body,
        close,
    }))
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    stream.flush().await?;
    if close {
        stream.shutdown().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(kind: &str, operation: &str, object: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": kind},
                        "operation": operation, "namespace": "shop", "object": object},
        })
        .to_string()
        .into_bytes()
    }

    fn pod(annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "annotations": annotations},
               "spec": {"containers": [{"name": "web", "image": "web"}]}})
    }

    #[test]
    fn garbage_and_other_documents_are_bad_requests() {
        let config = InjectConfig::default();
        assert!(matches!(
            review(b"{not json", &config),
            Err(ReviewError::Json(_))
        ));
        assert_eq!(
            review(b"[1,2]", &config).unwrap_err(),
            ReviewError::NotAReview
        );
        assert_eq!(
            review(
                br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
                &config
            )
            .unwrap_err(),
            ReviewError::NotAReview
        );
        assert_eq!(
            review(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
                &config
            )
            .unwrap_err(),
            ReviewError::NotAReview
        );
    }

    #[test]
    fn pod_update_is_allowed_unchanged() {
        let (answer, verdict) = review(
            &admission("Pod", "UPDATE", pod(json!({}))),
            &InjectConfig::default(),
        )
        .unwrap();
        assert_eq!(verdict, Verdict::Skipped);
        assert_eq!(answer["response"], json!({"uid": "u-1", "allowed": true}));
    }

    #[test]
    fn a_pod_that_is_not_an_object_is_denied_not_a_panic() {
        let (answer, verdict) = review(
            &admission("Pod", "CREATE", json!("a string")),
            &InjectConfig::default(),
        )
        .unwrap();
        assert_eq!(verdict, Verdict::Denied);
        assert_eq!(answer["response"]["allowed"], json!(false));
    }

    #[test]
    fn a_pods_workload_is_its_deployment_or_controller_or_its_own_name() {
        let owned = |kind: &str, name: &str| {
            json!({"metadata": {"labels": {"pod-template-hash": "5f6d"},
                   "ownerReferences": [{"kind": kind, "name": name, "controller": true}]}})
        };
        assert_eq!(
            inject::workload_of_pod(&owned("ReplicaSet", "web-5f6d")),
            inject::Workload::Named("web".into())
        );
        assert_eq!(
            inject::workload_of_pod(&owned("StatefulSet", "db")),
            inject::Workload::Named("db".into())
        );
        assert_eq!(
            inject::workload_of_pod(&owned("ReplicaSet", "odd")),
            inject::Workload::Named("odd".into())
        );
        assert_eq!(
            inject::workload_of_pod(&json!({"metadata": {}})),
            inject::Workload::PodName
        );
    }

    /// Sends `request` on a fresh connection and returns all the server wrote before closing.
    async fn exchange(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            connection(server, &InjectConfig::default(), &Metrics::default()).await
        });
        client.write_all(request).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        server.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn oversized_bodies_and_heads_are_refused_without_reading_them() {
        let big = format!(
            "POST /inject HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(exchange(big.as_bytes()).await.starts_with("HTTP/1.1 413 "));
        let head = format!(
            "POST /inject HTTP/1.1\r\nx: {}\r\n",
            "a".repeat(MAX_HEAD + 1)
        );
        assert!(exchange(head.as_bytes()).await.starts_with("HTTP/1.1 431 "));
        let wrong = b"GET /inject HTTP/1.1\r\nconnection: close\r\n\r\n";
        assert!(exchange(wrong).await.starts_with("HTTP/1.1 405 "));
        assert!(exchange(b"\x16\x03\x01 not http\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400 "));
    }

    #[tokio::test]
    async fn keep_alive_serves_requests_in_turn_and_refuses_chunked_bodies() {
        let body = admission("Service", "CREATE", json!({}));
        let mut requests = Vec::new();
        for _ in 0..2 {
            requests.extend_from_slice(
                format!(
                    "POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            requests.extend_from_slice(&body);
        }
        requests.extend_from_slice(
            b"POST /inject HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        let out = exchange(&requests).await;
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.contains("HTTP/1.1 411 Length Required"), "{out}");
    }
}
