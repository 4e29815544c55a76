//! The mesh CA's endpoint (docs/SECURITY.md, "Issuance"): `POST /v1/certificates` over TLS, a
//! workload's CSR authenticated by its projected service-account token. The token is checked
//! with the TokenReview API (its audience must be ours), the identity it proves must be the
//! one URI SAN of the CSR ([`csr`]), and the CA signs its own parameters for the CSR's key —
//! the workload's private key never leaves the sidecar.
//!
//! Every replica serves it (the CA is shared through its Secret). Cheap local checks (size,
//! JSON, CSR signature) come before the TokenReview, so garbage never costs the API server a
//! request; a TokenReview that fails or times out refuses (503): nothing is ever issued
//! unverified.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use serde_json::{json, Value};

use super::certs::CertificateAuthority;
use super::csr::{self, CheckedCsr};
use super::https;
use super::identity::SpiffeId;

/// The one path.
pub const PATH: &str = "/v1/certificates";
/// Without `validitySeconds`.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Whatever is asked.
pub const MAX_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Clock skew between the controller and the sidecars.
const BACKDATE: Duration = Duration::from_secs(60);
/// A CSR is under 1 KiB; the token a few.
const LIMITS: https::Limits = https::Limits {
    max_head: 16 * 1024,
    max_body: 64 * 1024,
    read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(90),
};
/// A TokenReview slower than this is a 503: the sidecar retries, nothing waits forever.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The CA endpoint's flags.
#[derive(Debug, Clone)]
pub struct IssuerOptions {
    /// `--ca-listen` (`[::]:15012`, istiod's CA port).
    pub listen: SocketAddr,
    /// `POD_NAMESPACE`: the CA Secret's and the Service's namespace.
    pub namespace: String,
    /// `--service`: named in the serving certificate.
    pub service: String,
    /// `--ca-secret`.
    pub ca_secret: String,
    /// `--trust-domain` (`cluster.local`).
    pub trust_domain: String,
    /// `--token-audience` (`isthmus-ca`): what the injector's projected token is for.
    pub token_audience: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("--trust-domain {0:?}: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("the CA endpoint: {0} (--ca-listen changes the address)")]
    Bind(#[from] https::BindError),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// `isthmus_controller_certificates_issued_total`, `isthmus_controller_csr_rejected_total{reason}`.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    issued: Counter,
    rejected: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "isthmus_controller_certificates_issued",
            "Workload certificates issued by the CA endpoint",
            self.issued.clone(),
        );
        registry.register(
            "isthmus_controller_csr_rejected",
            "Certificate requests refused, by reason",
            self.rejected.clone(),
        );
    }
}

/// A refusal: the HTTP status, the metric's reason and what the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            reason,
            message: message.into(),
        }
    }
}

impl From<csr::CsrError> for Refusal {
    fn from(e: csr::CsrError) -> Self {
        let code = match e {
            csr::CsrError::Forbidden { .. } => 403,
            _ => 400,
        };
        Refusal::new(code, e.reason(), e.to_string())
    }
}

/// The request body: the CSR and the validity asked for, capped.
#[derive(Debug)]
pub struct CertificateRequest {
    pub csr: CheckedCsr,
    pub validity: Duration,
}

/// Parses the body (`{"csr": PEM, "validitySeconds": N}`) and checks the CSR.
pub fn parse_request(body: &[u8]) -> Result<CertificateRequest, Refusal> {
    let malformed = |why: &str| Refusal::new(400, "malformed_request", why);
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(&format!("the body is not JSON: {e}")))?;
    let pem = value
        .get("csr")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no \"csr\" (a PEM string)"))?;
    let validity = match value.get("validitySeconds") {
        None | Some(Value::Null) => DEFAULT_VALIDITY,
        Some(v) => match v.as_u64() {
            Some(secs) if secs > 0 => Duration::from_secs(secs).min(MAX_VALIDITY),
            _ => return Err(malformed("\"validitySeconds\" must be a positive integer")),
        },
    };
    let csr = csr::parse(pem.as_bytes())?;
    Ok(CertificateRequest { csr, validity })
}

/// The leaf's parameters: only the identity, as a client and server certificate.
pub fn leaf_params(
    identity: &SpiffeId,
    now: SystemTime,
    validity: Duration,
    serial: [u8; 16],
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + validity).into();
    let mut serial = serial;
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x01; // and no leading zero to strip
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

/// RFC 3339 in UTC, to the second.
fn rfc3339(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Answers `POST /v1/certificates`.
struct CaServer {
    ca: Arc<CertificateAuthority>,
    client: kube::Client,
    trust_domain: String,
    audience: String,
    metrics: Metrics,
}

impl CaServer {
    async fn issue(&self, request: &https::Request) -> Result<Value, Refusal> {
        let asked = parse_request(&request.body)?;
        let token = request
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::new(401, "no_token", "no Authorization: Bearer token"))?;
        let proved = self.review(token).await?;
        csr::authorize(&asked.csr, &proved)?;
        let now = SystemTime::now();
        let signing_failed = |e: String| Refusal::new(500, "signing_failed", e);
        let mut serial = [0u8; 16];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut serial)
            .map_err(|_| signing_failed("no randomness for the serial".into()))?;
        let params = leaf_params(&proved, now, asked.validity, serial)
            .map_err(|e| signing_failed(e.to_string()))?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(&asked.csr.public_key_der)
            .map_err(|e| signing_failed(e.to_string()))?;
        let leaf = self
            .ca
            .sign_public_key(&params, &key)
            .map_err(|e| signing_failed(e.to_string()))?;
        tracing::info!(identity = %proved, validity_secs = asked.validity.as_secs(), "issued a workload certificate");
        Ok(json!({
            "certChain": [leaf, self.ca.cert_pem()],
            "trustBundle": self.ca.cert_pem(),
            "notAfter": rfc3339(now + asked.validity),
        }))
    }

    /// The identity `token` proves, by TokenReview for our audience.
    async fn review(&self, token: &str) -> Result<SpiffeId, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let unavailable = |why: String| {
            tracing::warn!(error = %why, "TokenReview failed: refusing (may the controller create tokenreviews?)");
            Refusal::new(
                503,
                "token_review_unavailable",
                "the token could not be verified now; retry",
            )
        };
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| unavailable("timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_default();
            return Err(Refusal::new(
                401,
                "unauthenticated",
                format!("the token is not valid {why}")
                    .trim_end()
                    .to_owned(),
            ));
        }
        if !status
            .audiences
            .iter()
            .flatten()
            .any(|a| a == &self.audience)
        {
            return Err(Refusal::new(
                401,
                "wrong_audience",
                format!("the token is not for audience {:?}", self.audience),
            ));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        SpiffeId::from_username(&username, &self.trust_domain)
            .map_err(|e| Refusal::new(403, "not_a_workload", e.to_string()))
    }
}

impl https::Handler for CaServer {
    async fn handle(&self, request: https::Request) -> https::Response {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", PATH) => match self.issue(&request).await {
                Ok(answer) => {
                    self.metrics.issued.inc();
                    https::Response::json(200, &answer)
                }
                Err(refusal) => {
                    tracing::debug!(reason = refusal.reason, message = %refusal.message, "CSR refused");
                    self.refuse(refusal)
                }
            },
            (_, PATH) => self.refuse(Refusal::new(405, "bad_method", "POST only")),
            _ => self.refuse(Refusal::new(
                404,
                "not_found",
                "not found: POST /v1/certificates",
            )),
        }
    }

    fn refused(&self, code: u16, message: &'static str) -> https::Response {
        let reason = if code == 413 {
            "too_large"
        } else {
            "malformed_request"
        };
        self.refuse(Refusal::new(code, reason, message.trim_end()))
    }
}

impl CaServer {
    fn refuse(&self, refusal: Refusal) -> https::Response {
        self.metrics
            .rejected
            .get_or_create(&ReasonLabel {
                reason: refusal.reason,
            })
            .inc();
        https::Response::json(refusal.code, &json!({ "error": refusal.message }))
    }
}

/// A started CA endpoint, and the trust bundle it issues under (the CA's root PEM): what the
/// controller publishes into every meshed namespace.
pub struct Started {
    pub server: https::Running,
    pub trust_bundle: String,
}

/// Loads (or makes) the CA, binds the listener and starts serving.
pub async fn start(
    client: &kube::Client,
    options: &IssuerOptions,
    metrics: Metrics,
) -> Result<Started, IssuerError> {
    if !super::identity::is_trust_domain(&options.trust_domain) {
        return Err(IssuerError::TrustDomain(options.trust_domain.clone()));
    }
    let bound = https::bind(
        client,
        &options.namespace,
        &options.service,
        &options.ca_secret,
        options.listen,
    )
    .await?;
    let addr = bound.addr;
    tracing::info!(%addr, path = PATH, trust_domain = %options.trust_domain, audience = %options.token_audience, "serving the CA");
    let trust_bundle = bound.ca.cert_pem().to_owned();
    let server = CaServer {
        ca: bound.ca.clone(),
        client: client.clone(),
        trust_domain: options.trust_domain.clone(),
        audience: options.token_audience.clone(),
        metrics,
    };
    let tasks = vec![
        tokio::spawn(https::serve(
            bound.listener,
            bound.acceptor,
            LIMITS,
            Arc::new(server),
            "ca",
        )),
        tokio::spawn(super::admission::renew(bound.ca, bound.cert)),
    ];
    Ok(Started {
        server: https::Running::new(addr, tasks),
        trust_bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_defaults_to_a_day_and_is_capped_at_a_week() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
        )];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let body = |extra: &str| format!(r#"{{"csr": {}{extra}}}"#, json!(pem)).into_bytes();
        assert_eq!(parse_request(&body("")).unwrap().validity, DEFAULT_VALIDITY);
        assert_eq!(
            parse_request(&body(r#", "validitySeconds": 3600"#))
                .unwrap()
                .validity,
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_request(&body(r#", "validitySeconds": 99999999"#))
                .unwrap()
                .validity,
            MAX_VALIDITY
        );
        for bad in [
            r#", "validitySeconds": 0"#,
            r#", "validitySeconds": -5"#,
            r#", "validitySeconds": "1h""#,
        ] {
            assert_eq!(parse_request(&body(bad)).unwrap_err().code, 400, "{bad}");
        }
        assert_eq!(
            parse_request(b"{}").unwrap_err().reason,
            "malformed_request"
        );
        assert_eq!(parse_request(b"\xff\x00").unwrap_err().code, 400);
        assert_eq!(
            parse_request(br#"{"csr": "junk"}"#).unwrap_err().reason,
            "malformed_csr"
        );
    }

    #[test]
    fn not_after_is_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20Z");
    }
}
