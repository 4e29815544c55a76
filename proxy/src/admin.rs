//! The admin (127.0.0.1:15000), readiness (:15021) and Prometheus (:15020) endpoints: a small
//! HTTP/1 server on the control thread, never on the data path's cores. The Prometheus port also
//! answers the kubelet's rewritten app probes (`/app-health/...`, [`crate::app_probe`]), as
//! Istio's agent does on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::app_probe::{self, AppProbers};
use crate::listen::LogLimiter;
use crate::metrics::Metrics;
use crate::state::ConfigStore;

/// Changes the log filter at runtime (`POST /logging?level=debug`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoints read and control.
pub struct AdminState {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    /// Set once every data-path listener is bound.
    pub listening: AtomicBool,
    /// Set on SIGTERM or `/quitquitquit`: readiness fails so no new traffic is sent here.
    pub draining: AtomicBool,
    pub shutdown: Notify,
    /// Set when a worker died: the process is about to exit, and must not look ready.
    pub workers_failed: AtomicBool,
    pub set_log_level: SetLogLevel,
    pub info: serde_json::Value,
    pub limits: AdminLimits,
    /// The app's own probes, run on the kubelet's behalf.
    pub probers: AppProbers,
    /// The workload identity, shown in `/config_dump`. Readiness does not wait for it yet:
    /// nothing uses the certificate before the mTLS data path (TODO there: not ready without
    /// a valid certificate when mTLS is in use, as Istio's sidecar).
    pub identity: crate::identity::Workload,
}

/// Bounds on the admin endpoints, which must answer probes whatever clients do.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// A request's head must arrive within this (a whole-request deadline, not per read:
    /// a client dribbling a byte a second cannot hold a connection).
    pub request_timeout: Duration,
    /// Connections open at once, per endpoint (admin, readiness, scrape); more are closed.
    pub max_connections: usize,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            request_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

impl AdminState {
    /// Ready: listeners bound, a config loaded, every worker alive, not draining.
    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Acquire)
            && self.store.has_loaded()
            && !self.draining.load(Ordering::Acquire)
            && !self.workers_failed.load(Ordering::Acquire)
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.shutdown.notify_waiters();
        self.shutdown.notify_one();
    }
}

/// Which set of endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Readiness,
    Prometheus,
}

/// Serves `role` on an already-bound listener until the process ends.
pub async fn serve(listener: TcpListener, role: Role, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(state.limits.max_connections));
    let mut errors = LogLimiter::new(Duration::from_secs(5));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                if let Some(held) = errors.allow(Instant::now()) {
                    tracing::warn!(?role, held_back = held, "admin accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.metrics.admin_refused.inc();
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, role, &state).await {
                tracing::debug!("admin request: {e}");
            }
            drop(slot);
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn json(value: &serde_json::Value) -> Self {
        Response {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        }
    }
}

const MAX_HEAD: usize = 16 * 1024;

async fn handle(mut stream: TcpStream, role: Role, state: &AdminState) -> std::io::Result<()> {
    let deadline = tokio::time::Instant::from_std(Instant::now() + state.limits.request_timeout);
    let mut head = Vec::with_capacity(1024);
    let response = loop {
        let mut chunk = [0u8; 2048];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("GET").to_string();
                let target = req.path.unwrap_or("/").to_string();
                if role == Role::Prometheus && target.starts_with(app_probe::PATH_PREFIX) {
                    break app_health(&method, &target, state).await;
                }
                break route(role, &method, &target, state);
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => break Response::text(431, "request head too large\n"),
            Err(e) => break Response::text(400, format!("bad request: {e}\n")),
        }
    };
    // Any status can come back from an app probe.
    let reason = ::http::StatusCode::from_u16(response.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        response.status,
        response.content_type,
        response.body.len(),
        response.body
    );
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await?;
    // Lingering close: closing with unread input would send RST, and the client could lose
    // the response (a 431 is exactly that case). Drain a bounded amount first.
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let linger = tokio::time::Instant::now() + Duration::from_secs(1);
    while drained < 256 * 1024 {
        match tokio::time::timeout_at(linger, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
    Ok(())
}

/// A rewritten app probe: the original runs against the app, its verdict is the answer.
async fn app_health(method: &str, target: &str, state: &AdminState) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "use GET\n");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let answer = state.probers.answer(path).await;
    if answer.status >= 300 {
        tracing::debug!(
            path,
            status = answer.status,
            "app probe: {}",
            answer.body.trim_end()
        );
    }
    Response::text(answer.status, answer.body)
}

fn route(role: Role, method: &str, target: &str, state: &AdminState) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let readiness = || {
        if state.ready() {
            Response::text(200, "LIVE\n")
        } else if state.workers_failed.load(Ordering::Acquire) {
            Response::text(503, "NOT READY: a worker died; the proxy is exiting\n")
        } else if state.draining.load(Ordering::Acquire) {
            Response::text(503, "DRAINING\n")
        } else if state.listening.load(Ordering::Acquire) {
            let why = state
                .store
                .status()
                .last_error
                .map(|(_, issues)| issues.join("; "))
                .unwrap_or_else(|| "loading".into());
            Response::text(503, format!("NOT READY: no config loaded ({why})\n"))
        } else {
            Response::text(
                503,
                "NOT READY: waiting for listeners and the first config\n",
            )
        }
    };
    let metrics = || Response {
        status: 200,
        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body: state.metrics.encode(),
    };
    match (role, path) {
        (Role::Readiness, "/healthz/ready") => readiness(),
        (Role::Prometheus, "/stats/prometheus" | "/metrics") => metrics(),
        (Role::Admin, "/ready") => readiness(),
        (Role::Admin, "/stats/prometheus") => metrics(),
        (Role::Admin, "/config_dump") => {
            let mut dump = state.store.dump();
            dump["proxy"] = state.info.clone();
            dump["proxy"]["ready"] = json!(state.ready());
            dump["identity"] = state.identity.dump();
            Response::json(&dump)
        }
        (Role::Admin, "/quitquitquit") if method == "POST" => {
            state.begin_drain();
            Response::text(200, "draining, then exiting\n")
        }
        (Role::Admin, "/logging") if method == "POST" => {
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .unwrap_or("");
            match (state.set_log_level)(level) {
                Ok(()) => Response::text(200, format!("log level: {level}\n")),
                Err(e) => Response::text(400, format!("bad level `{level}`: {e}\n")),
            }
        }
        (Role::Admin, "/quitquitquit" | "/logging") => Response::text(405, "use POST\n"),
        (Role::Admin, "/") => Response::text(
            200,
            "GET /config_dump\nGET /ready\nGET /stats/prometheus\nPOST /logging?level=LEVEL\nPOST /quitquitquit\n",
        ),
        _ => Response::text(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start_with(limits: AdminLimits) -> (SocketAddr, Arc<AdminState>) {
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(AdminState {
            store: ConfigStore::new(metrics.clone()),
            metrics,
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: Notify::new(),
            workers_failed: AtomicBool::new(false),
            set_log_level: Arc::new(|l: &str| {
                if l == "debug" {
                    Ok(())
                } else {
                    Err("no".into())
                }
            }),
            info: json!({}),
            limits,
            probers: AppProbers::default(),
            identity: crate::identity::Workload::Disabled("test".into()),
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Role::Admin, state.clone()));
        (addr, state)
    }

    async fn start() -> (SocketAddr, Arc<AdminState>) {
        start_with(AdminLimits::default()).await
    }

    async fn send(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A readiness probe that tolerates being refused: what came back, maybe nothing.
    async fn ready_probe(addr: SocketAddr) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"GET /ready HTTP/1.1\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    }

    fn config_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("isthmus-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), "").unwrap();
        dir
    }

    #[tokio::test]
    async fn readiness_follows_listeners_config_workers_and_drain() {
        let (addr, state) = start().await;
        assert!(send(addr, b"GET /ready HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 503"));
        state.listening.store(true, Ordering::Release);
        // Listening but no config: not ready, and the reason is given.
        state
            .store
            .reload_from(std::path::Path::new("/nonexistent/isthmus"));
        let reply = send(addr, b"GET /ready HTTP/1.1\r\n\r\n").await;
        assert!(
            reply.starts_with("HTTP/1.1 503") && reply.contains("does not exist"),
            "{reply}"
        );
        state.store.reload_from(&config_dir());
        assert!(send(addr, b"GET /ready HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        state.workers_failed.store(true, Ordering::Release);
        let reply = send(addr, b"GET /ready HTTP/1.1\r\n\r\n").await;
        assert!(
            reply.starts_with("HTTP/1.1 503") && reply.contains("worker died"),
            "{reply}"
        );
        state.workers_failed.store(false, Ordering::Release);
        assert!(send(addr, b"GET /quitquitquit HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(send(addr, b"POST /quitquitquit HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        let reply = send(addr, b"GET /ready HTTP/1.1\r\n\r\n").await;
        assert!(
            reply.starts_with("HTTP/1.1 503") && reply.ends_with("DRAINING\n"),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_clear_errors() {
        let (addr, _) = start().await;
        assert!(send(addr, b"\x00\x01garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        let mut huge = b"GET / HTTP/1.1\r\nx: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 20_000));
        assert!(send(addr, &huge).await.starts_with("HTTP/1.1 431"));
        assert!(send(addr, b"GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(send(addr, b"POST /logging?level=debug HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(send(addr, b"POST /logging?level=%% HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        let dump = send(addr, b"GET /config_dump HTTP/1.1\r\n\r\n").await;
        assert!(dump.contains("\"lastError\": null"), "{dump}");
    }

    /// Found in review: the admin timeout was per read, so a client sending a byte every few
    /// seconds held a connection forever. The deadline covers the whole request head.
    #[tokio::test]
    async fn a_dribbling_client_is_cut_off_at_the_request_deadline() {
        let (addr, _) = start_with(AdminLimits {
            request_timeout: Duration::from_millis(300),
            max_connections: 64,
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut closed_after = None;
        for byte in b"GET /ready HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if stream.write_all(&[*byte]).await.is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed_after = Some(started.elapsed());
                    break;
                }
                Ok(Ok(n)) => panic!("answered a partial request: {:?}", &probe[..n]),
                Err(_) => {} // still open: keep dribbling
            }
        }
        let closed_after = closed_after.expect("the connection outlived the request deadline");
        assert!(closed_after < Duration::from_secs(2), "{closed_after:?}");
    }

    /// Connections over the cap are closed at once and counted; probes work again when the
    /// idle ones go away.
    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let (addr, state) = start_with(AdminLimits {
            request_timeout: Duration::from_secs(30),
            max_connections: 4,
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            let s = TcpStream::connect(addr).await.unwrap();
            idle.push(s);
        }
        // Each idle connection is accepted in turn; the fifth finds no slot.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if ready_probe(addr).await.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "never refused");
            tokio::task::yield_now().await;
        }
        assert!(state.metrics.admin_refused.get() >= 1);
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if ready_probe(addr).await.starts_with(b"HTTP/1.1 503") {
                break;
            }
            assert!(Instant::now() < deadline, "slots never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
