//! The controller run in the test's process against kmock, and what the tests ask it: its CA
//! Secret, HTTPS requests to its servers (trusting only that CA), its metrics.
// Each test binary uses a part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_ctl::controller::{Controller, Options, Status};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// The controller's namespace (its CA Secret, Lease, Service).
pub const NS: &str = "isthmus-system";
/// The name its serving certificate is for.
pub const SNI: &str = "isthmus-controller.isthmus-system.svc";

pub async fn wait_for<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A controller for namespace `shop` serving the CA on a free loopback port (the CA tests', and
/// the proxy's identity_controller.rs).
pub fn ca_options() -> Options {
    Options {
        namespaces: vec!["shop".into()],
        monitoring: "127.0.0.1:0".parse().unwrap(),
        debounce: Duration::from_millis(20),
        ca: Some(isthmus_ctl::controller::issuer::IssuerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            namespace: NS.into(),
            service: "isthmus-controller".into(),
            ca_secret: "isthmus-ca".into(),
            trust_domain: "cluster.local".into(),
            token_audience: "isthmus-ca".into(),
        }),
        ..Options::default()
    }
}

/// A controller running in this process until the returned sender is dropped or fired.
pub fn spawn(
    client: &Client,
    options: Options,
) -> (
    Arc<Status>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let controller = Controller::new(client.clone(), options);
    let status = controller.status();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        controller.run(shutdown).await.unwrap();
    });
    (status, stop, task)
}

/// `ca.crt` of the controller's CA Secret, once it exists.
pub async fn ca_pem(client: &Client) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    wait_for("the CA Secret", Duration::from_secs(20), async || {
        let secret = secrets.get_opt("isthmus-ca").await.unwrap()?;
        let data = secret.data?;
        assert!(data.contains_key("ca.key"));
        Some(String::from_utf8(data.get("ca.crt")?.0.clone()).unwrap())
    })
    .await
}

/// One HTTP/1.1 POST of `body` to `path` over TLS to `addr`, trusting only `ca`, with SNI
/// [`SNI`] and the extra `headers` (complete lines): the status code and the body.
pub async fn post(
    addr: SocketAddr,
    ca: &str,
    path: &str,
    headers: &[String],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SNI).unwrap(), tcp)
        .await
        .expect("TLS handshake with a client that trusts only ca.crt");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {SNI}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    // A server that refuses early (413) may close before reading all of a large body.
    let _ = tls.write_all(&request).await;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, response[split..].to_vec())
}

/// The value of the sample `series` (name and labels, as printed) on the monitoring port.
pub async fn metric(status: &Status, series: &str) -> Option<f64> {
    let addr = status.monitoring_addr()?;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
