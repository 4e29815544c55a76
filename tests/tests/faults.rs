//! Faults through real sidecars in the netns harness: upstreams that die or reset mid-stream,
//! endpoints churning under load, config flapping under load; descriptor exhaustion and
//! 10,000 idle connections are in `faults/capacity.rs`. Every loop is bounded and every wait
//! has a deadline: a proxy that hangs fails the test. After each fault: completed streams were
//! byte-exact, the sidecars are still ready, and no connection is left open in them.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use isthmus_config::SourceFile;
use isthmus_ctl::local::{Mesh, MeshSpec, PodSpec, ECHO_PORT, HTTP_SERVICE_PORT};
use isthmus_tests::load::{
    background_stream, mixed_exchanges, paced_gets, wait_progress, Paced, StopOnDrop, Tally,
};
use isthmus_tests::probe::{assert_settled, config_loads, wait_active, wait_until};
use isthmus_tests::traffic::{resetting_echo_server, End};
use isthmus_tests::{echo_exact, metric_sum, prerequisites};

#[path = "faults/capacity.rs"]
mod capacity;

const MIB: usize = 1 << 20;

/// The flapping and 10k-connection scenarios each want the two cores to themselves: they take
/// this lock to write, every other scenario to read (those may share the machine).
static CORES: RwLock<()> = RwLock::new(());

fn heavy() -> RwLockWriteGuard<'static, ()> {
    CORES
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn light() -> RwLockReadGuard<'static, ()> {
    CORES
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn mesh(backend: &str, services: &[&str], pods: Vec<PodSpec>, extra: &[&str]) -> Mesh {
    let mut spec = MeshSpec::new(services, pods);
    spec.proxy_args = ["--io-backend", backend]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    Mesh::start(spec).unwrap_or_else(|e| panic!("mesh did not start: {e}"))
}

/// An end that is a close or a reset, not a hang, and came soon after the fault.
fn assert_prompt_close(ended: &isthmus_tests::traffic::Ended, fault: Instant) {
    assert_ne!(
        ended.end,
        End::TimedOut,
        "the stream hung instead of closing ({} bytes verified)",
        ended.verified
    );
    let after = ended.at.saturating_duration_since(fault);
    assert!(
        after < Duration::from_secs(3),
        "the stream ended {after:?} after the fault"
    );
}

/// The server's app is SIGKILLed while a byte-exact stream runs through the client's outbound
/// capture and the server's inbound capture. The client sees a close or reset at once, not a
/// hang; both sidecars stay ready and drop the connection; the restarted app serves again.
fn upstream_app_killed_mid_stream(backend: &str) {
    let _cores = light();
    if !prerequisites() {
        return;
    }
    let mut mesh = mesh(
        backend,
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("server", Some("echo"), "v1"),
        ],
        &[],
    );
    let vip = SocketAddr::from((mesh.vip4("echo"), ECHO_PORT));
    let (progress, stream) = background_stream(mesh.pod("client").connect(vip).unwrap());
    wait_progress(&progress, 8 * MIB as u64);
    wait_active(mesh.pod("server"), 1.0, Duration::from_secs(5));

    assert!(mesh.kill_app("server"), "the app was not running");
    let killed = Instant::now();
    let ended = stream.join().expect("stream thread");
    eprintln!("app killed: {ended:?} after {:?}", ended.at - killed);
    assert_prompt_close(&ended, killed);
    assert!(ended.verified >= 8 * MIB as u64, "{ended:?}");

    for pod in ["client", "server"] {
        assert_settled(mesh.pod(pod));
    }
    mesh.restart_app("server").unwrap();
    assert_eq!(
        echo_exact(mesh.pod("client").connect(vip).unwrap(), 4 * MIB),
        (4 * MIB) as u64
    );
    for pod in ["client", "server"] {
        assert_settled(mesh.pod(pod));
    }
}

#[test]
fn upstream_app_killed_mid_stream_auto() {
    upstream_app_killed_mid_stream("auto");
}

#[test]
fn upstream_app_killed_mid_stream_epoll() {
    upstream_app_killed_mid_stream("epoll");
}

/// The client sidecar relays (passthrough) to an upstream that echoes 4 MiB and then resets
/// (SO_LINGER 0). The client's stream ends at once with at most those 4 MiB, all correct; the
/// sidecar stays ready, drops the connection, and the next connection to that upstream works.
fn upstream_resets_mid_stream(backend: &str) {
    let _cores = light();
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        backend,
        &[],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::unmeshed("upstream"),
        ],
        &[],
    );
    let upstream = mesh.pod("upstream");
    let addr = SocketAddr::new(upstream.ip(false), 9100);
    let listener = upstream
        .netns()
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let reset_after = 4 * MIB;
    let (reset_tx, reset_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        resetting_echo_server(listener, reset_after, 2, Duration::from_secs(60), reset_tx)
    });

    let (progress, stream) = background_stream(mesh.pod("client").connect(addr).unwrap());
    let ended = stream.join().expect("stream thread");
    let reset = reset_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream never reset");
    eprintln!(
        "upstream reset: {ended:?}, {:?} after the RST",
        ended.at - reset
    );
    assert_prompt_close(&ended, reset);
    assert!(
        ended.verified <= reset_after as u64,
        "more bytes than the upstream sent: {ended:?}"
    );
    assert_eq!(progress.load(Ordering::Acquire), ended.verified);

    let client = mesh.pod("client");
    assert_settled(client);
    assert_eq!(
        echo_exact(client.connect(addr).unwrap(), 4 * MIB),
        (4 * MIB) as u64
    );
    server
        .join()
        .expect("server thread")
        .expect("upstream server");
    assert_settled(client);
}

#[test]
fn upstream_resets_mid_stream_auto() {
    upstream_resets_mid_stream("auto");
}

#[test]
fn upstream_resets_mid_stream_epoll() {
    upstream_resets_mid_stream("epoll");
}

/// A service with several endpoint pods; under steady load from a client, pods are added and
/// removed (registry rewritten through the `..data` swap, each removal abrupt: the pod's
/// processes and namespace go at once, without waiting for the client's sidecar to catch up).
/// Every completed exchange is correct; failures are bounded by the exchanges that can have been
/// in flight to a removed pod; new pods get traffic, removed pods get none once gone.
fn endpoints_churn_under_load(backend: &str) {
    let _cores = light();
    if !prerequisites() {
        return;
    }
    // A connect to a vanished pod is not answered at all (its address is gone): a short
    // connect timeout makes the sidecar move on to the next endpoint quickly.
    let mut mesh = mesh(
        backend,
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-a", Some("hello"), "v1"),
            PodSpec::meshed("hello-b", Some("hello"), "v1"),
        ],
        &["--connect-timeout-ms", "1000"],
    );
    let http = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let echo = SocketAddr::from((mesh.vip4("hello"), ECHO_PORT));
    const THREADS: u8 = 2;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = StopOnDrop(stop.clone());
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..THREADS)
        .map(|seed| {
            let (stop, done) = (stop.clone(), done.clone());
            mesh.pod("client")
                .netns()
                .spawn(move || mixed_exchanges(http, echo, seed, &stop, 20_000, &done))
                .unwrap()
        })
        .collect();
    let wait_done = |n: u64| {
        let target = done.load(Ordering::Relaxed) + n;
        wait_until("load progress", Duration::from_secs(30), || {
            match done.load(Ordering::Relaxed) {
                d if d >= target => Ok(()),
                d => Err(format!("{d} of {target} iterations")),
            }
        })
    };
    wait_done(50);

    // (pod removed, when its removal started, when the client's sidecar had the new registry)
    let mut removals: Vec<(String, Instant, Instant)> = Vec::new();
    let steps: [(&str, bool); 4] = [
        ("hello-c", true),
        ("hello-a", false),
        ("hello-d", true),
        ("hello-b", false),
    ];
    for (pod, add) in steps {
        let started = Instant::now();
        let version = if add {
            mesh.add_pod(PodSpec::meshed(pod, Some("hello"), "v1"))
                .unwrap()
        } else {
            mesh.remove_pod(pod).unwrap()
        };
        mesh.wait_for_version(&version, false).unwrap();
        if !add {
            removals.push((pod.to_string(), started, Instant::now()));
        }
        eprintln!(
            "{} {pod}: applied in {:?}",
            if add { "added" } else { "removed" },
            started.elapsed()
        );
        wait_done(100);
    }
    stop.store(true, Ordering::Release);
    let mut tally = Tally::default();
    for thread in load {
        tally.merge(thread.join().expect("load thread").expect("netns"));
    }
    eprintln!(
        "churn: {} exchanges completed, answers {:?}, failures {:?}",
        tally.completed(),
        tally
            .answered
            .iter()
            .map(|(k, v)| (k, v.0))
            .collect::<Vec<_>>(),
        tally.failures.iter().map(|f| &f.2).collect::<Vec<_>>()
    );

    assert!(
        tally.corrupt.is_empty(),
        "corrupted exchanges: {:?}",
        tally.corrupt
    );
    // Each load thread has one exchange in flight at a time, so a removal can break that one
    // and, at most, the thread's next connect if the dying pod accepted it just before it died
    // (a connect the dead pod refuses or never answers is retried on another endpoint).
    assert!(
        tally.failures.len() <= removals.len() * THREADS as usize * 2,
        "{} failures for {} removals: {:?}",
        tally.failures.len(),
        removals.len(),
        tally.failures
    );
    for (start, end, what) in &tally.failures {
        assert!(
            removals
                .iter()
                .any(|(_, from, to)| start <= to && end >= from),
            "a failure outside every removal window: {what}"
        );
    }
    for (pod, _, acked) in &removals {
        if let Some((_, Some(last))) = tally.answered.get(pod) {
            assert!(
                last < acked,
                "{pod} answered an exchange started after it was removed"
            );
        }
    }
    for pod in ["hello-c", "hello-d"] {
        assert!(
            tally.answered.contains_key(pod),
            "new pod {pod} got no traffic: {:?}",
            tally.answered.keys()
        );
    }
    for pod in ["client", "hello-c", "hello-d"] {
        assert_settled(mesh.pod(pod));
        // Every registry written had one file; no generation may load with none.
        assert_no_partial_config(mesh.pod(pod), 1, "");
    }
}

#[test]
fn endpoints_churn_under_load_auto() {
    endpoints_churn_under_load("auto");
}

#[test]
fn endpoints_churn_under_load_epoll() {
    endpoints_churn_under_load("epoll");
}

/// Every config the sidecar loaded, except the one it started with, had `files` files: a
/// generation read while the writer replaced it (kubelet deletes the old one) is not loaded.
fn assert_no_partial_config(pod: &isthmus_ctl::local::Pod, files: usize, initial: &str) {
    let loads = config_loads(pod);
    assert!(
        !loads.is_empty(),
        "no `config loaded` lines in {}'s proxy.log: has the log format changed?",
        pod.name
    );
    let partial: Vec<_> = loads
        .into_iter()
        .filter(|(version, n)| *n != files && version != initial)
        .collect();
    assert!(
        partial.is_empty(),
        "{}'s sidecar loaded partial configs (version, files) during the swaps: {partial:?}",
        pod.name
    );
}

/// All TCP traffic of `hello` to one subset (`v1` or `v2`).
fn all_to(subset: &str) -> Vec<SourceFile> {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: hello, namespace: mesh}}\n\
         spec:\n  host: hello\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: mesh}}\n\
         spec:\n  hosts: [hello]\n  http:\n  - route:\n    - destination: {{host: hello, subset: {subset}}}\n\
         \x20 tcp:\n  - route:\n    - destination: {{host: hello, subset: {subset}}}\n"
    );
    vec![SourceFile::new("flap.yaml", text)]
}

/// The config alternates between two valid versions (everything to v1, everything to v2) every
/// 100 ms for 30 s while the client sends 1000 requests a second (30,000 in all). Four client
/// threads at 250/s each, on keep-alive connections replaced every 25 requests: about 1,200
/// new connections are routed while the config flips under them, without turning the run into
/// a benchmark of the test app's thread-per-connection accept. Zero errors, only valid
/// answers from both versions, a reload per flip (allowing for debounce), ready and idle after.
#[test]
fn config_flapping_under_load() {
    if !prerequisites() {
        return;
    }
    let _heavy = heavy();
    let mesh = mesh(
        "auto",
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
            PodSpec::meshed("hello-v2", Some("hello"), "v2"),
        ],
        &[],
    );
    let configs = [all_to("v1"), all_to("v2")];
    // The registry alone, as the sidecars started.
    let initial = mesh.write_config(Vec::new()).unwrap();
    let first = mesh.write_config(configs[0].clone()).unwrap();
    mesh.wait_for_version(&first, false).unwrap();
    let reloads = || {
        metric_sum(
            &mesh.pod("client").metrics().unwrap(),
            "isthmus_config_reloads_total",
            &[("result", "success")],
        )
    };
    let reloads_before = reloads();

    const THREADS: u64 = 4;
    const REQUESTS: u64 = 30_000;
    let http = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let deadline = Instant::now() + Duration::from_secs(75);
    let load: Vec<_> = (0..THREADS)
        .map(|_| {
            mesh.pod("client")
                .netns()
                .spawn(move || {
                    paced_gets(
                        http,
                        REQUESTS / THREADS,
                        Duration::from_millis(4),
                        25,
                        deadline,
                    )
                })
                .unwrap()
        })
        .collect();

    const FLIPS: u32 = 300;
    let start = Instant::now();
    let mut last = first;
    for k in 1..=FLIPS {
        if let Some(wait) =
            (start + Duration::from_millis(100) * k).checked_duration_since(Instant::now())
        {
            std::thread::sleep(wait);
        }
        last = mesh.write_config(configs[k as usize % 2].clone()).unwrap();
    }
    let flipping = start.elapsed();
    let mut seen = Paced::default();
    for thread in load {
        let part = thread.join().expect("load thread").expect("netns");
        seen.ok += part.ok;
        seen.errors.extend(part.errors);
        for (name, n) in part.backends {
            *seen.backends.entry(name).or_default() += n;
        }
    }
    let loading = start.elapsed();
    mesh.wait_for_version(&last, false).unwrap();
    let reloaded = reloads() - reloads_before;
    eprintln!(
        "flapping: {FLIPS} flips in {flipping:?}, {reloaded} reloads; {} requests ok in {loading:?}, \
         backends {:?}, {} errors {:?}",
        seen.ok,
        seen.backends,
        seen.errors.len(),
        seen.errors.iter().take(5).collect::<Vec<_>>()
    );
    // Every generation written had both files (registry and routes): a sidecar that loads
    // fewer read a generation while it was being replaced, and served without them meanwhile.
    for pod in ["client", "hello-v1", "hello-v2"] {
        assert_no_partial_config(mesh.pod(pod), 2, &initial);
    }
    assert!(
        seen.errors.is_empty(),
        "{} errors: {:?}",
        seen.errors.len(),
        seen.errors.iter().take(20).collect::<Vec<_>>()
    );
    assert_eq!(seen.ok, REQUESTS);
    assert_eq!(
        seen.backends.keys().collect::<Vec<_>>(),
        ["hello-v1", "hello-v2"],
        "routing did not follow the flips"
    );
    // Debounce may merge flips that land close together; most must still be loaded.
    assert!(
        reloaded >= f64::from(FLIPS) / 2.0,
        "{reloaded} reloads for {FLIPS} flips"
    );
    for pod in ["client", "hello-v1", "hello-v2"] {
        assert_settled(mesh.pod(pod));
    }
}
