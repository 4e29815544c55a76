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
//! HTTP/1.1 over TLS by [`https`] (shared with the CA): bodies are bounded, every read has a
//! deadline, and garbage gets a 400.

use std::time::Duration;

use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{json, Value};

use super::https;
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

/// The webhook's bounds on a request.
pub const LIMITS: https::Limits = https::Limits {
    max_head: MAX_HEAD,
    max_body: MAX_BODY,
    read_timeout: READ_TIMEOUT,
    idle_timeout: IDLE_TIMEOUT,
};

/// The webhook's requests: `POST /inject` only.
pub struct Webhook {
    pub config: InjectConfig,
    pub metrics: Metrics,
}

impl https::Handler for Webhook {
    async fn handle(&self, request: https::Request) -> https::Response {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", PATH) => match review(&request.body, &self.config) {
                Ok((answer, verdict)) => {
                    self.metrics.count(match verdict {
                        Verdict::Injected => "injected",
                        Verdict::Skipped => "skipped",
                        Verdict::Denied => "denied",
                    });
                    https::Response::json(200, &answer)
                }
                Err(e) => {
                    self.metrics.count("bad_request");
                    https::Response::text(400, format!("{e}\n"))
                }
            },
            (_, PATH) => https::Response::text(405, "POST only\n"),
            _ => https::Response::text(404, "not found: POST /inject\n"),
        }
    }

    fn refused(&self, code: u16, message: &'static str) -> https::Response {
        self.metrics.count("bad_request");
        https::Response::text(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            let webhook = Webhook {
                config: InjectConfig::default(),
                metrics: Metrics::default(),
            };
            https::connection(server, LIMITS, &webhook).await
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
