//! The controller's webhook, certificates and leader election against kmock (a Kubernetes API
//! emulator; `kmock_apiserver.py` says what it emulates): the controller makes its CA and
//! stores it in a Secret, serves AdmissionReviews over real TLS to a client that trusts only
//! that Secret's `ca.crt`, keeps the webhook configuration's caBundle equal to it; of two
//! controllers exactly one holds the Lease and writes, and the other takes over when it stops.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use isthmus_ctl::controller::admission::WebhookOptions;
use isthmus_ctl::controller::certs;
use isthmus_ctl::controller::lease::LeaseOptions;
use isthmus_ctl::controller::Options;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::{json, Value};
use support::controller::{ca_pem, metric, spawn, wait_for, NS};
use support::kmock::Kmock;
use tokio::sync::oneshot;

fn options() -> Options {
    Options {
        namespaces: vec!["shop".into()],
        monitoring: "127.0.0.1:0".parse().unwrap(),
        debounce: Duration::from_millis(20),
        ..Options::default()
    }
}

/// An AdmissionReview POSTed to the webhook.
async fn post(addr: std::net::SocketAddr, ca: &str, body: &[u8]) -> (u16, Vec<u8>) {
    support::controller::post(addr, ca, "/inject", &[], body).await
}

fn webhook_options(config: Option<&str>) -> WebhookOptions {
    WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: NS.into(),
        service: "isthmus-controller".into(),
        ca_secret: "isthmus-ca".into(),
        webhook_config: config.map(str::to_owned),
        inject: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_serves_admission_reviews_over_tls_with_the_ca_from_its_secret() {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let (status, _stop, _task) = spawn(
        &client,
        Options {
            webhook: Some(webhook_options(None)),
            ..options()
        },
    );
    let ca = ca_pem(&client).await;
    let addr = wait_for(
        "the webhook's address",
        Duration::from_secs(20),
        async || status.webhook_addr(),
    )
    .await;

    let review = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/admission/plain-pod.json"
    ))
    .unwrap();
    let (code, body) = post(addr, &ca, &review).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "11111111-0000-0000-0000-000000000001"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");

    let (code, _) = post(addr, &ca, b"{\"apiVersion\": garbage").await;
    assert_eq!(code, 400, "malformed JSON is a bad request");
    let (code, _) = post(addr, &ca, &[0xff; 64]).await;
    assert_eq!(code, 400);
    // Still serving after the garbage.
    let (code, _) = post(addr, &ca, &review).await;
    assert_eq!(code, 200);
    let reviews = "isthmus_controller_webhook_reviews_total";
    assert_eq!(
        metric(&status, &format!("{reviews}{{result=\"injected\"}}")).await,
        Some(2.0)
    );
    assert_eq!(
        metric(&status, &format!("{reviews}{{result=\"bad_request\"}}")).await,
        Some(2.0)
    );

    // A second controller (another replica) uses the stored CA, not a new one.
    let (second, _stop2, _task2) = spawn(
        &client,
        Options {
            webhook: Some(webhook_options(None)),
            ..options()
        },
    );
    let addr2 = wait_for("the second webhook", Duration::from_secs(20), async || {
        second.webhook_addr()
    })
    .await;
    let (code, _) = post(addr2, &ca, &review).await;
    assert_eq!(
        code, 200,
        "the second replica's certificate chains to the same CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundle_of_the_webhook_configuration_is_kept_equal_to_the_ca() {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "isthmus-sidecar-injector"},
        "webhooks": [{"name": "inject.isthmus.io", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail",
            "namespaceSelector": {"matchLabels": {"isthmus-injection": "enabled"}},
            "clientConfig": {"service": {"name": "isthmus-controller", "namespace": NS, "path": "/inject"}}}],
    }))
    .unwrap();
    configs
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    let (_status, _stop, _task) = spawn(
        &client,
        Options {
            webhook: Some(webhook_options(Some("isthmus-sidecar-injector"))),
            ..options()
        },
    );
    let ca = ca_pem(&client).await;
    let bundle = async || {
        let config = configs.get("isthmus-sidecar-injector").await.unwrap();
        let hook = &config.webhooks.unwrap()[0];
        hook.client_config.ca_bundle.as_ref().map(|b| b.0.clone())
    };
    wait_for("the caBundle", Duration::from_secs(20), async || {
        bundle().await.filter(|b| b == ca.as_bytes())
    })
    .await;

    // Re-applied by hand (as `install` would) with an empty caBundle: put back.
    let mut config = configs.get("isthmus-sidecar-injector").await.unwrap();
    config.webhooks.as_mut().unwrap()[0].client_config.ca_bundle = None;
    configs
        .replace("isthmus-sidecar-injector", &PostParams::default(), &config)
        .await
        .unwrap();
    wait_for(
        "the caBundle restored",
        Duration::from_secs(20),
        async || bundle().await.filter(|b| b == ca.as_bytes()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_making_the_ca_at_once_end_up_with_the_same_one() {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let (a, b) = tokio::join!(
        certs::load_or_create(&client, NS, "isthmus-ca"),
        certs::load_or_create(&client, NS, "isthmus-ca"),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.cert_pem(),
        b.cert_pem(),
        "the loser of the create uses the winner's CA"
    );
    assert_eq!(a.cert_pem(), ca_pem(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmock_refuses_a_put_with_a_stale_resource_version() {
    // What leader election and the caBundle rely on, as the real API server does it.
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "l", "namespace": NS}, "spec": {"holderIdentity": "a"},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut update = created.clone();
    update.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("l", &PostParams::default(), &update)
        .await
        .unwrap();
    update.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let stale = leases.replace("l", &PostParams::default(), &update).await;
    assert!(
        matches!(&stale, Err(kube::Error::Api(s)) if s.code == 409),
        "{stale:?}"
    );
    assert_eq!(holder_of(&leases, "l").await.as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_started_together_elect_exactly_one() {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let (a, _stop_a, _task_a) = spawn(&client, elected("replica-a"));
    let (b, _stop_b, _task_b) = spawn(&client, elected("replica-b"));
    let replicas = [("replica-a", &a), ("replica-b", &b)];
    let leader = wait_for(
        "a leader that wrote, and both ready",
        Duration::from_secs(20),
        async || {
            let holder = holder(&leases).await?;
            let (_, leader) = replicas.iter().find(|(id, _)| *id == holder)?;
            (leader.writes() > 0 && a.ready() && b.ready()).then_some(holder)
        },
    )
    .await;
    for (id, status) in replicas {
        let leads = id == leader;
        assert_eq!(
            metric(status, "isthmus_controller_leader").await,
            Some(if leads { 1.0 } else { 0.0 }),
            "{id}"
        );
        if !leads {
            assert_eq!(status.reconciles(), 0, "the follower {id} reconciled");
            assert_eq!(status.writes(), 0, "the follower {id} wrote");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_its_identity_and_namespace_from_the_downward_api_and_releases_on_sigterm()
{
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let dir = std::env::temp_dir().join(format!("isthmus-webhook-kmock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kmock.kubeconfig()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus-ctl"))
        .args([
            "controller",
            "--namespace",
            "shop",
            "--monitoring",
            "127.0.0.1:0",
        ])
        .args(["--webhook", "127.0.0.1:0", "--ca-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "isthmus-controller-7d9f-x2")
        .env("POD_NAMESPACE", "mesh-control")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "mesh-control");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "mesh-control");
    let up = wait_for_result(async || {
        let holder = holder(&leases).await?;
        secrets.get_opt("isthmus-ca").await.unwrap()?;
        Some(holder)
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        up.as_deref(),
        Some("isthmus-controller-7d9f-x2"),
        "POD_NAME holds the Lease in POD_NAMESPACE, beside the CA"
    );
    assert!(exit.expect("exits on SIGTERM").success());
    assert_eq!(
        holder(&leases).await,
        None,
        "the Lease is released on SIGTERM"
    );
}

/// Like [`wait_for`], but a timeout is `None`, so the caller can stop its child first.
async fn wait_for_result<T>(mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(v) = check().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn elected(identity: &str) -> Options {
    let mut lease = LeaseOptions::new(NS.into(), "isthmus-controller".into(), identity.into());
    lease.lease_duration = Duration::from_secs(4);
    lease.renew_deadline = Duration::from_secs(3);
    lease.retry_period = Duration::from_millis(300);
    Options {
        leader_election: Some(lease),
        ..options()
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    holder_of(leases, "isthmus-controller").await
}

async fn holder_of(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.unwrap()?.spec?.holder_identity
}

/// A Service with its own cluster IP, as the API server allocates them: two Services on one
/// VIP and port make a registry no sidecar loads, which the controller refuses to write.
async fn create_service(client: &Client, name: &str, cluster_ip: &str) {
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
}

async fn registry_has(client: &Client, service: &str) -> bool {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    config_maps
        .get_opt("isthmus-registry")
        .await
        .unwrap()
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("registry.json").cloned())
        .is_some_and(|text| text.contains(&format!("{service}.shop.svc")))
}

/// Two replicas: `first` leads and writes, `second` writes nothing; `first` stops by `stop`
/// (a clean shutdown or a crash) and `second` must lead and write within `within`.
async fn takeover(
    stop: impl FnOnce(
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) -> Box<dyn Future<Output = ()> + Unpin + Send>,
    within: Duration,
) {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let (first, stop_first, first_task) = spawn(&client, elected("replica-a"));
    wait_for("replica-a to lead", Duration::from_secs(20), async || {
        (holder(&leases).await.as_deref() == Some("replica-a") && first.writes() > 0).then_some(())
    })
    .await;
    let (second, _stop_second, _second_task) = spawn(&client, elected("replica-b"));
    wait_for("replica-b ready", Duration::from_secs(20), async || {
        second.ready().then_some(())
    })
    .await;

    // A change while both run: the leader writes it, the follower nothing.
    let before = first.writes();
    create_service(&client, "web", "10.96.0.10").await;
    wait_for(
        "the leader to write the new service",
        Duration::from_secs(20),
        async || registry_has(&client, "web").await.then_some(()),
    )
    .await;
    assert!(first.writes() > before);
    assert_eq!(second.writes(), 0, "the follower wrote");
    assert_eq!(second.reconciles(), 0, "the follower reconciled");
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));
    assert_eq!(metric(&first, "isthmus_controller_leader").await, Some(1.0));
    assert_eq!(
        metric(&second, "isthmus_controller_leader").await,
        Some(0.0)
    );

    stop(stop_first, first_task).await;
    let stopped = Instant::now();
    create_service(&client, "api", "10.96.0.11").await;
    wait_for(
        "replica-b to lead and write",
        within + Duration::from_secs(5),
        async || {
            (holder(&leases).await.as_deref() == Some("replica-b")
                && registry_has(&client, "api").await)
                .then_some(())
        },
    )
    .await;
    let took = stopped.elapsed();
    assert!(second.writes() > 0);
    assert_eq!(
        metric(&second, "isthmus_controller_leader").await,
        Some(1.0)
    );
    assert!(
        took <= within,
        "takeover took {took:?}, more than {within:?}"
    );
    eprintln!("takeover took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_one_writes_and_a_clean_stop_hands_over_at_once() {
    // The stopping leader releases the Lease: the other takes it on its next try (300 ms).
    takeover(
        |stop, task| {
            Box::new(Box::pin(async move {
                let _ = stop.send(());
                task.await.unwrap();
            }))
        },
        Duration::from_secs(2),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_one_writes_and_a_crashed_leader_is_replaced_within_the_lease() {
    // No release: the Lease must expire (4 s) before the other takes it.
    takeover(
        |_stop, task| {
            Box::new(Box::pin(async move {
                task.abort();
                let _ = task.await;
            }))
        },
        Duration::from_secs(4) + Duration::from_millis(1500),
    )
    .await;
}
