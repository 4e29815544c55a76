//! The sidecar against the real CA: `isthmus-ctl controller` (in this process, as
//! ctl/tests/ca_kmock.rs runs it) serving the CA API v1 over kmock's TokenReview, and the
//! isthmus-proxy binary asking it for its identity. The scripted CA of `identity.rs` covers
//! renewal, refusal, expiry and a wrong root; this shows the two sides agree on the wire.

mod support;

#[path = "../../ctl/tests/support/controller.rs"]
mod controller;
#[path = "../../ctl/tests/support/kmock.rs"]
mod kmock;

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::{metric, start, Options as ProxyOptions, Proxy};

const CART_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wOmNhcnQifQ.cart";
const ADMIN_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wOmFkbWluIn0.admin";

/// A sidecar of shop/`service_account` sending `token` to the controller's CA at `addr`,
/// trusting `root` — or, without one, as injected: `trust-bundle.pem` of its config directory.
/// Failed requests are retried within a second.
fn sidecar(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    root: Option<&str>,
    service_account: &str,
    token: &str,
) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let mut args: Vec<String> = vec![
        "--ca-address".into(),
        addr.to_string(),
        "--ca-server-name".into(),
        controller::SNI.into(),
        "--ca-token".into(),
        dir.join("token").display().to_string(),
        "--namespace".into(),
        "shop".into(),
        "--service-account".into(),
        service_account.into(),
        "--ca-retry-initial-ms".into(),
        "50".into(),
        "--ca-retry-max-secs".into(),
        "1".into(),
    ];
    if let Some(root) = root {
        std::fs::write(dir.join("root.pem"), root).unwrap();
        args.extend([
            "--ca-root".into(),
            dir.join("root.pem").display().to_string(),
        ]);
    }
    start(ProxyOptions {
        endpoint: Some("127.0.0.1:9".parse().unwrap()),
        args,
        ..ProxyOptions::default()
    })
}

fn identity(proxy: &Proxy) -> serde_json::Value {
    let dump = proxy.get("/config_dump");
    let body = dump.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()["identity"].clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// kmock with shop/cart's and shop/admin's tokens, and a controller for shop serving the CA:
/// kmock, a client, the CA's address and root, and the controller's stop handle.
fn controller_ca(
    runtime: &tokio::runtime::Runtime,
) -> Option<(
    kmock::Kmock,
    kube::Client,
    std::net::SocketAddr,
    String,
    tokio::sync::oneshot::Sender<()>,
)> {
    let kmock = kmock::Kmock::start_or_skip()?;
    let (client, addr, root, stop) = runtime.block_on(async {
        let client = kmock.client().await;
        let entry = |sa: &str| {
            json!({"username": format!("system:serviceaccount:shop:{sa}"), "audiences": ["isthmus-ca"]})
                .to_string()
        };
        let table: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kmock-tokens", "namespace": "kmock-system"},
            "data": {CART_TOKEN: entry("cart"), ADMIN_TOKEN: entry("admin")},
        }))
        .unwrap();
        Api::<ConfigMap>::namespaced(client.clone(), "kmock-system")
            .create(&PostParams::default(), &table)
            .await
            .unwrap();
        let (status, stop, _task) = controller::spawn(&client, controller::ca_options());
        let addr = controller::wait_for("the CA's address", Duration::from_secs(20), async || {
            status.ca_addr()
        })
        .await;
        let root = controller::ca_pem(&client).await;
        (client, addr, root, stop)
    });
    Some((kmock, client, addr, root, stop))
}

#[test]
fn the_controller_issues_the_sidecar_its_identity_and_refuses_another_accounts() {
    let runtime = runtime();
    let Some((_kmock, _client, addr, root, _stop)) = controller_ca(&runtime) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("isthmus-identity-ctl-{}", std::process::id()));

    let cart = sidecar(&dir.join("cart"), addr, Some(&root), "cart", CART_TOKEN);
    cart.wait_until("the certificate", |p| identity(p)["state"] == "ISSUED");
    let id = identity(&cart);
    assert_eq!(
        id["certificate"]["spiffeId"],
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    assert!(
        id["certificate"]["issuer"]
            .as_str()
            .unwrap()
            .contains("isthmus"),
        "{id}"
    );
    let metrics = cart.metrics();
    assert_eq!(
        metric(
            &metrics,
            "isthmus_proxy_certificate_requests_total",
            &[("result", "success")]
        ),
        1.0
    );

    // admin's token, but the sidecar claims cart: the CA signs only what the token proves.
    let impostor = sidecar(
        &dir.join("impostor"),
        addr,
        Some(&root),
        "cart",
        ADMIN_TOKEN,
    );
    impostor.wait_until("a refusal", |p| {
        metric(
            &p.metrics(),
            "isthmus_proxy_certificate_requests_total",
            &[("result", "denied")],
        ) >= 1.0
    });
    let id = identity(&impostor);
    assert_eq!(id["state"], "PENDING");
    assert!(id["certificate"].is_null());
    assert!(id["lastError"].as_str().unwrap().contains("403"), "{id}");
    drop((cart, impostor));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The injected sidecar's way: no `--ca-root`, so it trusts `trust-bundle.pem` of its config
/// directory, which the controller publishes in the namespace's routing ConfigMap. Before the
/// bundle is there it retries and stays ready; once the kubelet would have copied it, the next
/// attempt is issued, and the config version it reports counts the bundle.
#[test]
fn a_sidecar_trusts_the_bundle_the_controller_publishes_and_waits_for_it_ready() {
    let runtime = runtime();
    let Some((_kmock, client, addr, root, _stop)) = controller_ca(&runtime) else {
        return;
    };
    let routing = runtime.block_on(async {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
        controller::wait_for(
            "shop's routing ConfigMap",
            Duration::from_secs(20),
            async || config_maps.get_opt("isthmus-config").await.unwrap(),
        )
        .await
    });
    let bundle = routing.data.unwrap()["trust-bundle.pem"].clone();
    assert_eq!(bundle, root, "the published bundle is the CA's root");

    let dir = std::env::temp_dir().join(format!("isthmus-identity-bundle-{}", std::process::id()));
    let cart = sidecar(&dir, addr, None, "cart", CART_TOKEN);
    cart.wait_until("a failed attempt without the bundle", |p| {
        metric(
            &p.metrics(),
            "isthmus_proxy_certificate_requests_total",
            &[("result", "local_error")],
        ) >= 1.0
    });
    assert_eq!(identity(&cart)["state"], "PENDING");
    assert!(
        cart.get("/ready").starts_with("HTTP/1.1 200"),
        "still ready"
    );
    let before = cart.version();

    std::fs::write(cart.dir.join("trust-bundle.pem"), &bundle).unwrap();
    cart.wait_until("the certificate", |p| identity(p)["state"] == "ISSUED");
    assert_eq!(
        identity(&cart)["certificate"]["spiffeId"],
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    cart.wait_until("the bundle in the version", |p| p.version() != before);
    drop(cart);
    let _ = std::fs::remove_dir_all(&dir);
}
