//! The controller's CA endpoint (docs/SECURITY.md) against kmock, whose TokenReview answers from
//! a token table the test seeds (`kmock_apiserver.py` says how): a workload with a valid token
//! gets a chain that verifies against the trust bundle and names exactly its SPIFFE identity;
//! a CSR for another identity, a forged token, a token for another audience, garbage, an
//! oversized body and an unreachable TokenReview are refused with the contract's codes; two
//! replicas issue under the same root.

mod support;

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::Client;
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use serde_json::{json, Value};
use support::controller::{ca_options, ca_pem, metric, spawn, wait_for};
use support::kmock::Kmock;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// Tokens look like JWTs; kmock only looks them up.
const WEB_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wOndlYiJ9.web";
const OTHER_AUDIENCE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wOndlYiJ9.k8s";
const NODE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJub2RlIn0.node";

/// kmock's token table: shop/web's token for `isthmus-ca`, the same account's token for the
/// API server's own audience, and a node's token.
async fn seed_tokens(client: &Client) {
    let entry =
        |user: &str, audience: &str| json!({"username": user, "audiences": [audience]}).to_string();
    let table: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kmock-tokens", "namespace": "kmock-system"},
        "data": {
            WEB_TOKEN: entry("system:serviceaccount:shop:web", "isthmus-ca"),
            OTHER_AUDIENCE_TOKEN: entry("system:serviceaccount:shop:web", "https://kubernetes.default.svc"),
            NODE_TOKEN: entry("system:node:worker-1", "isthmus-ca"),
        },
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), "kmock-system")
        .create(&PostParams::default(), &table)
        .await
        .unwrap();
}

fn csr(key: &KeyPair, uri: &str) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// POST /v1/certificates with `token` (if any) and `body`: the code and the JSON answer.
async fn request(
    addr: std::net::SocketAddr,
    ca: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let headers: Vec<String> = token
        .map(|t| format!("authorization: Bearer {t}"))
        .into_iter()
        .collect();
    let (code, body) =
        support::controller::post(addr, ca, "/v1/certificates", &headers, body).await;
    let answer = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("a JSON answer: {}", String::from_utf8_lossy(&body)));
    (code, answer)
}

fn body(csr: &str, validity: Option<u64>) -> Vec<u8> {
    let mut body = json!({ "csr": csr });
    if let Some(secs) = validity {
        body["validitySeconds"] = json!(secs);
    }
    body.to_string().into_bytes()
}

/// Starts kmock with the token table and one controller serving the CA: kmock, the client, the
/// controller's status and stop handle, its CA address and the CA's PEM.
async fn start() -> Option<(
    Kmock,
    Client,
    std::sync::Arc<isthmus_ctl::controller::Status>,
    tokio::sync::oneshot::Sender<()>,
    std::net::SocketAddr,
    String,
)> {
    let kmock = Kmock::start_or_skip()?;
    let client = kmock.client().await;
    seed_tokens(&client).await;
    let (status, stop, _task) = spawn(&client, ca_options());
    let addr = wait_for("the CA's address", Duration::from_secs(20), async || {
        status.ca_addr()
    })
    .await;
    let ca = ca_pem(&client).await;
    Some((kmock, client, status, stop, addr, ca))
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Checks `answer`'s chain as a peer that trusts only `answer.trustBundle` would check a client
/// certificate (webpki: signature, validity, clientAuth), and returns the leaf's DER.
fn verified_leaf(answer: &Value, expected_root: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let bundle = answer["trustBundle"].as_str().unwrap();
    assert_eq!(bundle, expected_root, "the trust bundle is the CA's root");
    let chain = answer["certChain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].as_str().unwrap(), expected_root);
    let leaf = der_of(chain[0].as_str().unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der_of(bundle))).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&CertificateDer::from(leaf.clone()), &[], UnixTime::now())
        .expect("the leaf verifies against the trust bundle");
    leaf
}

/// The leaf's subject alternative names, key, lifetime and EKUs, as read by x509-parser.
fn inspect(leaf: &[u8]) -> (Vec<String>, Vec<u8>, Duration, bool) {
    let (_, cert) = X509Certificate::from_der(leaf).unwrap();
    let mut names = Vec::new();
    let mut server_and_client = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    names.push(match name {
                        GeneralName::URI(uri) => format!("URI:{uri}"),
                        other => format!("{other:?}"),
                    });
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                server_and_client = eku.server_auth && eku.client_auth
            }
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "a leaf is not a CA"),
            _ => {}
        }
    }
    let validity = cert.validity();
    let lifetime = (validity.not_after - validity.not_before).unwrap();
    (
        names,
        cert.public_key().raw.to_vec(),
        Duration::from_secs(lifetime.whole_seconds() as u64),
        server_and_client,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_gets_a_chain_for_exactly_its_identity() {
    let Some((_kmock, _client, status, _stop, addr, ca)) = start().await else {
        return;
    };
    let key = KeyPair::generate().unwrap();
    let (code, answer) = request(addr, &ca, Some(WEB_TOKEN), &body(&csr(&key, WEB), None)).await;
    assert_eq!(code, 200, "{answer}");
    let leaf = verified_leaf(&answer, &ca);
    let (names, public_key, lifetime, server_and_client) = inspect(&leaf);
    assert_eq!(
        names,
        vec![format!("URI:{WEB}")],
        "exactly the SPIFFE URI SAN"
    );
    assert_eq!(
        public_key,
        key.subject_public_key_info(),
        "the CSR's P-256 key"
    );
    // 24 h from now, valid from a minute ago (clock skew).
    assert_eq!(lifetime, Duration::from_secs(24 * 3600 + 60));
    assert!(server_and_client, "serverAuth and clientAuth");
    let not_after: &str = answer["notAfter"].as_str().unwrap();
    let in_a_day = SystemTime::now() + Duration::from_secs(24 * 3600);
    let year = time::OffsetDateTime::from(in_a_day).year();
    assert!(
        not_after.starts_with(&year.to_string()) && not_after.ends_with('Z'),
        "{not_after}"
    );

    // The validity asked for, and a week at most.
    let (code, answer) = request(
        addr,
        &ca,
        Some(WEB_TOKEN),
        &body(&csr(&key, WEB), Some(3600)),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        inspect(&verified_leaf(&answer, &ca)).2,
        Duration::from_secs(3600 + 60)
    );
    let month = 30 * 24 * 3600;
    let (code, answer) = request(
        addr,
        &ca,
        Some(WEB_TOKEN),
        &body(&csr(&key, WEB), Some(month)),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        inspect(&verified_leaf(&answer, &ca)).2,
        Duration::from_secs(7 * 24 * 3600 + 60)
    );
    assert_eq!(
        metric(&status, "isthmus_controller_certificates_issued_total").await,
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_identities_tokens_and_bodies_are_refused_with_the_contracts_codes() {
    let Some((_kmock, _client, status, _stop, addr, ca)) = start().await else {
        return;
    };
    let key = KeyPair::generate().unwrap();
    let web = body(&csr(&key, WEB), None);
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        (
            "a CSR for another service account",
            Some(WEB_TOKEN),
            body(&csr(&key, "spiffe://cluster.local/ns/shop/sa/db"), None),
            403,
        ),
        (
            "a CSR for another namespace",
            Some(WEB_TOKEN),
            body(&csr(&key, "spiffe://cluster.local/ns/bank/sa/web"), None),
            403,
        ),
        (
            "a CSR for another trust domain",
            Some(WEB_TOKEN),
            body(&csr(&key, "spiffe://evil.example/ns/shop/sa/web"), None),
            403,
        ),
        (
            "a forged token",
            Some("eyJhbGciOiJub25lIn0.e30.forged"),
            web.clone(),
            401,
        ),
        (
            "a token for another audience",
            Some(OTHER_AUDIENCE_TOKEN),
            web.clone(),
            401,
        ),
        ("no token", None, web.clone(), 401),
        ("a node's token", Some(NODE_TOKEN), web.clone(), 403),
        (
            "garbage",
            Some(WEB_TOKEN),
            b"\x16\x03garbage{".to_vec(),
            400,
        ),
        (
            "a CSR that is not PEM",
            Some(WEB_TOKEN),
            br#"{"csr": "MIIB"}"#.to_vec(),
            400,
        ),
        (
            "over 64 KiB",
            Some(WEB_TOKEN),
            body(
                &format!("{}{}", csr(&key, WEB), " ".repeat(64 * 1024)),
                None,
            ),
            413,
        ),
    ];
    for (what, token, body, expected) in cases {
        let (code, answer) = request(addr, &ca, token, &body).await;
        assert_eq!(code, expected, "{what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: an error says why: {answer}"
        );
        assert!(answer.get("certChain").is_none(), "{what}: nothing issued");
    }
    let rejected =
        |reason: &str| format!("isthmus_controller_csr_rejected_total{{reason=\"{reason}\"}}");
    assert_eq!(
        metric(&status, &rejected("forbidden_identity")).await,
        Some(3.0)
    );
    assert_eq!(
        metric(&status, &rejected("unauthenticated")).await,
        Some(2.0)
    );
    assert_eq!(metric(&status, &rejected("too_large")).await, Some(1.0));
    assert_eq!(
        metric(&status, "isthmus_controller_certificates_issued_total").await,
        Some(0.0)
    );
    // Still issuing after all that.
    let (code, _) = request(addr, &ca, Some(WEB_TOKEN), &web).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_token_review_refuses_with_503_never_issues() {
    let Some((kmock, _client, _status, _stop, addr, ca)) = start().await else {
        return;
    };
    let key = KeyPair::generate().unwrap();
    let web = body(&csr(&key, WEB), None);
    let (code, _) = request(addr, &ca, Some(WEB_TOKEN), &web).await;
    assert_eq!(code, 200, "issues while the API server answers");
    drop(kmock);
    let (code, answer) = request(addr, &ca, Some(WEB_TOKEN), &web).await;
    assert_eq!(code, 503, "{answer}");
    assert!(answer.get("certChain").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_issue_under_the_same_root() {
    let Some((_kmock, client, _status, _stop, first, ca)) = start().await else {
        return;
    };
    let (second_status, _stop2, _task2) = spawn(&client, ca_options());
    let second = wait_for("the second CA", Duration::from_secs(20), async || {
        second_status.ca_addr()
    })
    .await;
    assert_ne!(first, second);
    let key = KeyPair::generate().unwrap();
    for addr in [first, second] {
        let (code, answer) =
            request(addr, &ca, Some(WEB_TOKEN), &body(&csr(&key, WEB), None)).await;
        assert_eq!(code, 200, "{answer}");
        verified_leaf(&answer, &ca);
    }
}
