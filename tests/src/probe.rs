//! Looking at a sidecar from outside: readiness, open connections, memory and descriptors,
//! always with a deadline so that a stuck proxy fails the test instead of hanging it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use isthmus_ctl::local::Pod;

/// The value of a metric without labels (`name VALUE`), e.g. a plain gauge.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Connections the pod's sidecar is relaying or serving a request on: its
/// `isthmus_proxy_active_connections` less keep-alive HTTP connections idle between requests.
pub fn active_connections(pod: &Pod) -> Result<f64, String> {
    let text = pod.metrics().map_err(|e| e.to_string())?;
    let open = gauge(&text, "isthmus_proxy_active_connections")
        .ok_or_else(|| format!("no isthmus_proxy_active_connections in:\n{text}"))?;
    // Keep-alive HTTP connections waiting for their next request are open by design (a
    // client sidecar pools its upstream connections): they are not stuck.
    let idle = gauge(&text, "isthmus_proxy_http_idle_connections").unwrap_or(0.0);
    Ok(open - idle)
}

/// Polls `check` every 20 ms until it returns `Ok`; after `within`, panics with `what` and the
/// last error.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not true after {within:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until the sidecar relays exactly `n` connections.
pub fn wait_active(pod: &Pod, n: f64, within: Duration) {
    wait_until(
        &format!("{}'s sidecar relaying {n} connections", pod.name),
        within,
        || match active_connections(pod)? {
            v if v == n => Ok(()),
            v => Err(format!("{v} active")),
        },
    )
}

/// No stuck connections: the sidecar's active count returns to 0 within `within`.
pub fn wait_idle(pod: &Pod, within: Duration) {
    wait_active(pod, 0.0, within)
}

/// The sidecar answers 200 on `/healthz/ready` (one bounded request, no retry).
pub fn assert_ready(pod: &Pod) {
    let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, 15021));
    match pod.http_get(ready, "/healthz/ready") {
        Ok((200, _)) => {}
        other => panic!(
            "{}'s sidecar not ready: {other:?}\n{}",
            pod.name,
            pod.log("proxy.log")
        ),
    }
}

/// One GET of `path` on the sidecar's local `port` with a short timeout; the body of a 200.
/// For probing a sidecar that may not answer at all.
pub fn try_local_get(
    pod: &Pod,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let target = path.to_string();
    pod.netns()
        .run(move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            crate::traffic::HttpClient::connect(addr, timeout)?.get_last(&target)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("GET {path} on :{port}: {e}"))
}

/// Ready and idle: what every fault scenario must leave behind.
pub fn assert_settled(pod: &Pod) {
    assert_ready(pod);
    wait_idle(pod, Duration::from_secs(15));
}

/// Every config the sidecar loaded, from its log: (version, number of files), in order.
pub fn config_loads(pod: &Pod) -> Vec<(String, usize)> {
    let field = |line: &str, key: &str| -> Option<String> {
        let rest = line.split(&format!(" {key}=")).nth(1)?;
        Some(rest.split(' ').next()?.trim_matches('"').to_string())
    };
    pod.log("proxy.log")
        .lines()
        .filter(|l| l.contains("config loaded"))
        .filter_map(|l| Some((field(l, "version")?, field(l, "files")?.parse().ok()?)))
        .collect()
}

/// Resident memory of a process (`VmRSS` in `/proc/PID/status`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}:\n{status}"))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("process {pid}: {e}"))
}

/// Raises this process's `RLIMIT_NOFILE` towards `n`: the hard limit too where allowed
/// (CAP_SYS_RESOURCE), else only up to the hard limit. Returns the soft limit now in force;
/// children started afterwards inherit it.
pub fn raise_nofile(n: u64) -> u64 {
    use nix::libc;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let want = n as libc::rlim_t;
        if limit.rlim_cur >= want {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return n;
        }
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        limit.rlim_cur
    }
}

/// Waits until the sum of `metric{labels}` in the pod's sidecar reaches `want` and returns
/// what it then is (the caller asserts it is not more). A request is recorded just after its
/// response is written, so a scrape right after the client's last response may be a moment
/// early.
pub fn wait_metric(pod: &Pod, metric: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    wait_until(
        &format!("{}: {metric}{labels:?} reaching {want}", pod.name),
        Duration::from_secs(10),
        || {
            let text = pod.metrics().map_err(|e| e.to_string())?;
            match crate::metric_sum(&text, metric, labels) {
                v if v >= want => Ok(v),
                v => Err(format!("{v}")),
            }
        },
    )
}
