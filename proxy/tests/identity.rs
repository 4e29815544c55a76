//! The sidecar's workload identity, as a process against a CA speaking the CA API v1
//! (docs/SECURITY.md) in this test: a rustls server signing CSRs with the real CA's leaf
//! parameters (isthmus-ctl's `leaf_params`), whose behaviour is scripted (issue, refuse,
//! answer for another key, serve a certificate from another root). identity_controller.rs
//! runs the sidecar against the real controller.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use isthmus_ctl::controller::identity::SpiffeId;
use isthmus_ctl::controller::issuer::leaf_params;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateSigningRequestDer, PrivateKeyDer};
use support::*;
use x509_parser::prelude::{FromDer, X509Certificate};

const SERVER_NAME: &str = "isthmus-controller.isthmus-system.svc";
const IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/cart";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Issue,
    /// 403, as for a token that does not prove the identity.
    Refuse,
    /// 200 with a certificate for a key the CA made, not the CSR's.
    OtherKey,
}

/// One request the CA received (over TLS, so only from a client that trusted it).
#[derive(Clone)]
struct Seen {
    at: Instant,
    token: String,
    uri_sans: Vec<String>,
    other_sans: usize,
    status: u16,
    /// When it signed, and the `notAfter` it wrote (whole seconds, as X.509 has them).
    issued_at: SystemTime,
    not_after: Option<SystemTime>,
    /// The issued leaf's serial as x509-parser prints it, and whether its key is the CSR's.
    serial: Option<String>,
    leaf_key_is_csr_key: bool,
}

struct CaState {
    mode: Mode,
    seen: Vec<Seen>,
    handshakes: usize,
}

struct TestCa {
    addr: SocketAddr,
    /// What the sidecar is told to trust.
    root_pem: String,
    state: Arc<Mutex<CaState>>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn random_serial() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    let half = h.finish().to_be_bytes();
    let mut serial = [0u8; 16];
    serial[..8].copy_from_slice(&half);
    serial[8..].copy_from_slice(&half);
    serial
}

impl TestCa {
    /// A CA on 127.0.0.1 whose serving certificate is signed by its own root, or, with
    /// `serving_from_another_root`, by a root the sidecar is not told to trust.
    fn start(mode: Mode, serving_from_another_root: bool) -> TestCa {
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params("isthmus-test-ca");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let root_pem = ca_cert.pem();
        let issuer = Arc::new(Issuer::new(ca, ca_key));

        let (serving_issuer, chain_root) = if serving_from_another_root {
            let key = KeyPair::generate().unwrap();
            let params = ca_params("someone-else");
            let cert = params.self_signed(&key).unwrap();
            (Arc::new(Issuer::new(params, key)), cert.der().clone())
        } else {
            (issuer.clone(), ca_cert.der().clone())
        };
        let serving_key = KeyPair::generate().unwrap();
        let serving = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&serving_key, &serving_issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![serving.der().clone(), chain_root],
                PrivateKeyDer::from_pem_slice(serving_key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(CaState {
            mode,
            seen: Vec::new(),
            handshakes: 0,
        }));
        let (state2, root2) = (state.clone(), root_pem.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, state, issuer, root) = (
                    config.clone(),
                    state2.clone(),
                    issuer.clone(),
                    root2.clone(),
                );
                std::thread::spawn(move || serve_one(tcp, config, &state, &issuer, &root));
            }
        });
        TestCa {
            addr,
            root_pem,
            state,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn serve_one(
    tcp: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    state: &Mutex<CaState>,
    issuer: &Issuer<'static, KeyPair>,
    root_pem: &str,
) {
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, token, length) = loop {
        let Ok(n) = tls.read(&mut chunk) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
            assert_eq!(req.method, Some("POST"));
            assert_eq!(req.path, Some("/v1/certificates"));
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
                    .unwrap_or_default()
            };
            let token = header("authorization")
                .strip_prefix("Bearer ")
                .unwrap_or_default()
                .to_string();
            break (
                len,
                token,
                header("content-length").parse::<usize>().unwrap(),
            );
        }
    };
    state.lock().unwrap().handshakes += 1;
    while buf.len() < head_len + length {
        let Ok(n) = tls.read(&mut chunk) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: serde_json::Value = serde_json::from_slice(&buf[head_len..]).unwrap();
    let csr_pem = body["csr"].as_str().unwrap();
    let validity = body["validitySeconds"].as_u64().unwrap_or(86_400);
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
    let csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    let csr_key = parsed
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let uri_sans: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    let other_sans = csr.params.subject_alt_names.len() - uri_sans.len();
    let mode = state.lock().unwrap().mode;
    let mut seen = Seen {
        at: Instant::now(),
        token,
        uri_sans: uri_sans.clone(),
        other_sans,
        status: 200,
        issued_at: SystemTime::now(),
        not_after: None,
        serial: None,
        leaf_key_is_csr_key: false,
    };
    let (status, reply) = if mode == Mode::Refuse || uri_sans != [IDENTITY] || other_sans > 0 {
        (
            403,
            serde_json::json!({"error": "the token does not prove this identity"}),
        )
    } else {
        // The real CA's leaf: only the identity, client + server, backdated a minute.
        let identity = SpiffeId::parse(IDENTITY).unwrap();
        let serial = random_serial();
        let params = leaf_params(
            &identity,
            SystemTime::now(),
            Duration::from_secs(validity),
            serial,
        )
        .unwrap();
        let leaf = if mode == Mode::OtherKey {
            params.signed_by(&KeyPair::generate().unwrap(), issuer)
        } else {
            params.signed_by(&csr.public_key, issuer)
        }
        .unwrap();
        let (_, cert) = X509Certificate::from_der(leaf.der()).unwrap();
        seen.serial = Some(cert.raw_serial_as_string());
        seen.not_after = Some(
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(cert.validity().not_after.timestamp() as u64),
        );
        seen.leaf_key_is_csr_key = cert.public_key().subject_public_key.data.as_ref() == csr_key;
        (
            200,
            serde_json::json!({
                "certChain": [leaf.pem(), root_pem],
                "trustBundle": root_pem,
                "notAfter": "2099-01-01T00:00:00Z",
            }),
        )
    };
    seen.status = status;
    state.lock().unwrap().seen.push(seen);
    let body = reply.to_string();
    let _ = write!(
        tls,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// A directory with the CA root and the token, for one sidecar.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(root_pem: &str, token: &str) -> Files {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "isthmus-identity-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("root.pem"), root_pem).unwrap();
        let files = Files { dir };
        files.set_token(token);
        files
    }

    /// Replaced atomically, as the kubelet does.
    fn set_token(&self, token: &str) {
        std::fs::write(self.dir.join(".token.tmp"), token).unwrap();
        std::fs::rename(self.dir.join(".token.tmp"), self.dir.join("token")).unwrap();
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sidecar(ca: &TestCa, files: &Files, validity_secs: u64) -> Proxy {
    let dir = files.dir.display().to_string();
    start(Options {
        endpoint: Some("127.0.0.1:9".parse().unwrap()),
        args: [
            "--ca-address",
            &ca.addr.to_string(),
            "--ca-root",
            &format!("{dir}/root.pem"),
            "--ca-token",
            &format!("{dir}/token"),
            "--namespace",
            "shop",
            "--service-account",
            "cart",
            "--cert-validity-secs",
            &validity_secs.to_string(),
            "--ca-retry-initial-ms",
            "200",
            "--ca-retry-max-secs",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
}

fn identity(proxy: &Proxy) -> serde_json::Value {
    let dump = proxy.get("/config_dump");
    let body = dump.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    json["identity"].clone()
}

fn serial(proxy: &Proxy) -> Option<String> {
    identity(proxy)["certificate"]["serial"]
        .as_str()
        .map(String::from)
}

fn requests(proxy: &Proxy, result: &str) -> f64 {
    metric(
        &proxy.metrics(),
        "isthmus_proxy_certificate_requests_total",
        &[("result", result)],
    )
}

fn expiry_gauge(proxy: &Proxy) -> f64 {
    let name = "isthmus_proxy_certificate_expiry_timestamp_seconds ";
    proxy
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .expect("the expiry gauge is exported")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_sidecar_gets_a_certificate_for_its_identity_and_its_own_key() {
    let ca = TestCa::start(Mode::Issue, false);
    let files = Files::new(&ca.root_pem, "token-1");
    let proxy = sidecar(&ca, &files, 3600);
    proxy.wait_until("a certificate", |p| serial(p).is_some());

    let seen = ca.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].uri_sans,
        [IDENTITY],
        "the CSR names exactly the identity"
    );
    assert_eq!(seen[0].other_sans, 0, "no DNS or IP names asked for");
    assert_eq!(seen[0].token, "token-1");
    assert!(seen[0].leaf_key_is_csr_key);

    let id = identity(&proxy);
    assert_eq!(id["state"], "ISSUED");
    assert_eq!(id["spiffeId"], IDENTITY);
    assert_eq!(id["certificate"]["spiffeId"], IDENTITY);
    assert_eq!(
        id["certificate"]["serial"].as_str(),
        seen[0].serial.as_deref()
    );
    assert!(id["certificate"]["issuer"]
        .as_str()
        .unwrap()
        .contains("isthmus-test-ca"));
    assert!(!proxy.get("/config_dump").contains("PRIVATE KEY"));

    assert_eq!(requests(&proxy, "success"), 1.0);
    let expiry = expiry_gauge(&proxy);
    assert!(
        (expiry - (unix_now() + 3600.0)).abs() < 30.0,
        "expiry gauge {expiry} is about an hour from now"
    );
    assert!(proxy.log().contains("workload certificate issued"));
}

#[test]
fn an_answer_for_another_key_is_not_used() {
    let ca = TestCa::start(Mode::OtherKey, false);
    let files = Files::new(&ca.root_pem, "token-1");
    let proxy = sidecar(&ca, &files, 3600);
    proxy.wait_until("two refused answers", |p| requests(p, "invalid") >= 2.0);
    let id = identity(&proxy);
    assert_eq!(id["state"], "PENDING");
    assert!(id["certificate"].is_null());
    assert!(id["lastError"]
        .as_str()
        .unwrap()
        .contains("not for the key this sidecar sent"));
    assert_eq!(expiry_gauge(&proxy), 0.0);
}

#[test]
fn the_certificate_is_renewed_at_half_life_with_the_token_read_again() {
    let ca = TestCa::start(Mode::Issue, false);
    let files = Files::new(&ca.root_pem, "token-1");
    let proxy = sidecar(&ca, &files, 4);
    proxy.wait_until("a certificate", |p| serial(p).is_some());
    let first = serial(&proxy).unwrap();
    files.set_token("token-2");
    proxy.wait_until("a renewal", |p| serial(p).is_some_and(|s| s != first));
    let seen = ca.seen();
    assert!(seen.len() >= 2);
    let gap = seen[1].at - seen[0].at;
    // Half the life left at issuance (4 s less the seconds X.509 truncates), brought forward
    // by at most a tenth, plus the request's own time (key generation and a handshake: up to a
    // second on a loaded CI machine) — still well before the 4 s expiry.
    let half = seen[0]
        .not_after
        .unwrap()
        .duration_since(seen[0].issued_at)
        .unwrap()
        / 2;
    assert!(
        gap >= half.mul_f64(0.9) - Duration::from_millis(100)
            && gap < half + Duration::from_millis(1500),
        "renewed {gap:?} after issuance, half-life {half:?}"
    );
    assert_eq!(seen[0].token, "token-1");
    assert_eq!(seen[1].token, "token-2", "the rotated token is sent");
    assert_eq!(identity(&proxy)["state"], "ISSUED");
    assert!(requests(&proxy, "success") >= 2.0);
}

#[test]
fn a_refusing_ca_is_retried_with_backoff_and_the_old_certificate_kept_until_it_expires() {
    let ca = TestCa::start(Mode::Issue, false);
    let files = Files::new(&ca.root_pem, "token-1");
    let proxy = sidecar(&ca, &files, 4);
    proxy.wait_until("a certificate", |p| serial(p).is_some());
    let first = serial(&proxy).unwrap();
    let expiry = expiry_gauge(&proxy);
    ca.set_mode(Mode::Refuse);

    proxy.wait_until("two refusals", |p| requests(p, "denied") >= 2.0);
    let id = identity(&proxy);
    if unix_now() < expiry - 0.5 {
        assert_eq!(id["state"], "ISSUED", "the old certificate is kept");
        assert_eq!(id["certificate"]["serial"].as_str(), Some(first.as_str()));
        assert_eq!(expiry_gauge(&proxy), expiry);
    }
    assert!(id["lastError"].as_str().unwrap().contains("403"));

    proxy.wait_until("the expiry", |p| identity(p)["state"] == "EXPIRED");
    assert!(
        unix_now() >= expiry - 1.0,
        "dropped at its notAfter, not before"
    );
    let id = identity(&proxy);
    assert!(
        id["certificate"].is_null(),
        "an expired certificate is not kept"
    );
    assert_eq!(expiry_gauge(&proxy), 0.0);
    assert!(proxy.log().contains("expired before it could be renewed"));
    assert!(proxy.log().contains("the CA refused: 403"));

    // Retries back off: the gaps between refused requests grow (200 ms doubling, cap 1 s).
    let refused: Vec<Instant> = ca
        .seen()
        .iter()
        .filter(|s| s.status == 403)
        .map(|s| s.at)
        .collect();
    assert!(refused.len() >= 3, "{} refused requests", refused.len());
    // A gap is the backoff (the k-th retry waits min(200 ms × 2^k, 1 s), up to a tenth less for
    // jitter) plus that request's own key generation and handshake, which on a loaded machine
    // can take longer than the first backoff — so each gap is checked against its own floor,
    // not against its neighbour (the exact schedule is unit-tested in identity::schedule).
    let gaps: Vec<Duration> = refused.windows(2).map(|w| w[1] - w[0]).collect();
    for (k, gap) in gaps.iter().enumerate().take(3) {
        let backoff = Duration::from_millis(200 << k).min(Duration::from_secs(1));
        assert!(
            *gap >= backoff.mul_f64(0.9) - Duration::from_millis(10),
            "retry {k} came before its backoff: gaps {gaps:?}"
        );
    }
    assert!(
        gaps.iter().all(|g| *g < Duration::from_millis(1600)),
        "capped: {gaps:?}"
    );
}

#[test]
fn a_ca_not_signed_by_the_configured_root_is_never_sent_the_token() {
    let ca = TestCa::start(Mode::Issue, true);
    let files = Files::new(&ca.root_pem, "token-1");
    let proxy = sidecar(&ca, &files, 3600);
    proxy.wait_until("two failed requests", |p| requests(p, "unavailable") >= 2.0);
    assert_eq!(
        ca.state.lock().unwrap().handshakes,
        0,
        "no request reached it"
    );
    let id = identity(&proxy);
    assert_eq!(id["state"], "PENDING");
    assert!(id["lastError"].as_str().unwrap().contains("TLS"), "{id}");
}

#[test]
fn without_a_ca_address_the_identity_is_off_and_says_why() {
    let proxy = start(Options {
        endpoint: Some("127.0.0.1:9".parse().unwrap()),
        ..Options::default()
    });
    let id = identity(&proxy);
    assert_eq!(id["state"], "DISABLED");
    assert!(id["reason"].as_str().unwrap().contains("--ca-address"));
    assert!(!proxy
        .metrics()
        .contains("isthmus_proxy_certificate_requests_total{"));
}
