//! Start-up, supervision and shutdown: bind, start the config watcher, workers and admin,
//! exit non-zero if a worker dies, drain on SIGTERM.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;

use crate::admin::{self, AdminLimits, AdminState, Role, SetLogLevel};
use crate::app_probe::{AppProbers, ProbersError};
use crate::args::Args;
use crate::connect::ConnectPolicy;
use crate::drain::{self, Drain, Phase};
use crate::http;
use crate::listen::{self, ListenError, OrigDst, Slots};
use crate::metrics::{BackendLabels, Metrics};
use crate::process;
use crate::relay::Bounds;
use crate::runtime::{self, Backend, Epoll, Runtime, RuntimeError, Uring, WorkerExit};
use crate::serve::{Context, Direction};
use crate::state::ConfigStore;
use crate::telemetry::Identity;
use crate::watch::{self, Pacing};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot bind the admin endpoint {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the control runtime: {0}")]
    Control(std::io::Error),
    #[error("cannot start the config watcher: {0}")]
    Watcher(std::io::Error),
    #[error("cannot start the DNS resolver thread: {0}")]
    Dns(std::io::Error),
    #[error(transparent)]
    AppProbers(#[from] ProbersError),
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("nothing to listen on: --no-capture needs at least one --explicit listener")]
    NoListeners,
    #[error("worker {index} died ({why}); exiting so that the container is restarted")]
    WorkerDied { index: usize, why: String },
}

/// One listener group: a socket per worker, all on the same address.
struct Group {
    direction: Direction,
    orig: OrigDst,
    sockets: Vec<std::net::TcpListener>,
}

/// The most connections `fd_limit` descriptors carry: two each (downstream and upstream),
/// after a reserve for listeners, rings, the admin endpoints (which must keep answering probes
/// when the data path is saturated), config reads and logs.
pub fn connection_budget(fd_limit: u64) -> usize {
    let reserve = (fd_limit / 8).clamp(64, 256);
    (fd_limit.saturating_sub(reserve) / 2).max(1) as usize
}

/// Runs the proxy until it is told to stop; returns after draining, or with an error when a
/// worker dies (supervision: the process exits non-zero and the kubelet restarts it — a
/// sidecar missing a worker would keep its listener's share of connections unanswered).
pub fn run(args: Args, set_log_level: SetLogLevel) -> Result<(), RunError> {
    if args.workers == 0 {
        return Err(RunError::NoWorkers);
    }
    let probers = AppProbers::from_flag(args.app_probers.as_deref(), args.pod_ip)?;
    if !probers.is_empty() {
        tracing::info!(
            probes = probers.len(),
            "app probes: answered on :{}/app-health/",
            args.stats_port
        );
    }
    process::abort_on_panic();
    let fd_limit = process::raise_fd_limit();
    let budget = connection_budget(fd_limit);
    let max_connections = match args.max_connections {
        0 => budget,
        n if n > budget => {
            tracing::warn!(
                "--max-connections {n} needs more file descriptors than the limit of {fd_limit} \
                 allows (2 per connection, plus a reserve): capped at {budget}. Raise the limit \
                 (ulimit -n, or the container runtime's) for more"
            );
            budget
        }
        n => n,
    };
    let (backend, fallback) = runtime::select(args.io_backend)?;
    match &fallback {
        Some(why) => tracing::warn!(
            "io_uring unavailable ({why}): running on epoll. io_uring is blocked by the container \
             runtime's default seccomp profile or kernel.io_uring_disabled; allow io_uring_setup, \
             io_uring_enter and io_uring_register to use it"
        ),
        None => tracing::info!(backend = backend.as_str(), "data path backend"),
    }
    let metrics = Arc::new(Metrics::new());
    metrics
        .io_backend
        .get_or_create(&BackendLabels {
            backend: backend.as_str(),
        })
        .set(1);
    crate::outlier::count_ejections(metrics.outlier_ejections.clone());
    let store = ConfigStore::new(metrics.clone());
    crate::dns::start(
        store.clone(),
        Duration::from_secs(args.dns_refresh_secs.max(1)),
    )
    .map_err(RunError::Dns)?;

    // Bind every data-path socket before anything reports ready.
    let groups = bind_groups(&args)?;
    let ctx = Arc::new(Context {
        store: store.clone(),
        metrics: metrics.clone(),
        identity: Identity {
            workload: args.workload.as_str().into(),
            namespace: args.namespace.as_str().into(),
            app: args.app.as_str().into(),
            version: args.app_version.as_str().into(),
            cluster: args.cluster.as_str().into(),
        },
        connect: ConnectPolicy {
            attempt_timeout: Duration::from_millis(args.connect_timeout_ms),
            deadline: Duration::from_millis(args.connect_deadline_ms),
            attempts: args.connect_attempts.max(1),
        },
        bounds: Bounds {
            idle: Duration::from_secs(args.idle_timeout_secs),
            half_close: Duration::from_secs(args.half_close_timeout_secs),
        },
        before_config: args.outbound_before_config,
        access_log: args.access_log,
        http: http::Settings {
            source_labels: vec![
                ("app".to_string(), args.app.clone()),
                ("version".to_string(), args.app_version.clone()),
            ],
            access_log: args.access_log.then_some(args.access_log_format),
            header_timeout: Duration::from_millis(args.http_header_timeout_ms.max(1)),
            ..http::Settings::default()
        },
        own_ports: vec![
            args.outbound_port,
            args.inbound_port,
            args.admin_port,
            args.stats_port,
            args.readiness_port,
        ],
        next_id: AtomicU64::new(0),
    });

    // The first config loads on the watcher's thread; until it has, the proxy is not ready
    // and refuses traffic whose policy it cannot know.
    watch::spawn(
        store.clone(),
        args.config_dir.clone(),
        Pacing {
            debounce: Duration::from_millis(args.config_debounce_ms),
            max_delay: Duration::from_millis(
                args.config_debounce_max_ms.max(args.config_debounce_ms),
            ),
            resync: Duration::from_secs(args.config_resync_secs.max(1)),
            missing_poll: Duration::from_secs(1),
        },
    )
    .map_err(RunError::Watcher)?;

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Control)?;
    control.block_on(async move {
        let identity = crate::identity::start(&args, metrics.clone());
        let admin_state = Arc::new(AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
            workers_failed: AtomicBool::new(false),
            set_log_level,
            info: json!({
                "backend": backend.as_str(),
                "ioUringFallback": fallback.as_ref().map(|e| e.to_string()),
                "workers": args.workers,
                "maxConnections": max_connections,
                "fdLimit": fd_limit,
                "configDir": args.config_dir.display().to_string(),
                "pid": std::process::id(),
                "build": env!("CARGO_PKG_VERSION"),
            }),
            limits: AdminLimits {
                request_timeout: Duration::from_millis(args.admin_request_timeout_ms),
                max_connections: args.admin_max_connections.max(1),
            },
            probers,
            identity,
        });
        let endpoints = [
            (
                SocketAddr::from((Ipv4Addr::LOCALHOST, args.admin_port)),
                Role::Admin,
            ),
            (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.readiness_port)),
                Role::Readiness,
            ),
            (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.stats_port)),
                Role::Prometheus,
            ),
        ];
        for (addr, role) in endpoints {
            let listener = admin::bind(addr)
                .await
                .map_err(|source| RunError::Admin { addr, source })?;
            tokio::spawn(admin::serve(listener, role, admin_state.clone()));
        }

        let drain = Drain::new();
        let (died_tx, mut died) = mpsc::unbounded_channel();
        start_workers(
            backend,
            args.workers,
            groups,
            ctx,
            Slots::new(max_connections),
            drain.watch(),
            died_tx,
        )?;
        admin_state.listening.store(true, Ordering::Release);
        tracing::info!(workers = args.workers, max_connections, "proxy listening");

        tokio::select! {
            () = wait_for_shutdown(&admin_state) => {}
            Some((index, why)) = died.recv() => {
                admin_state.workers_failed.store(true, Ordering::Release);
                let why = match why {
                    WorkerExit::Runtime(e) => format!("its runtime failed: {e}"),
                    WorkerExit::Returned => "it stopped serving".to_string(),
                };
                tracing::error!(worker = index, "worker died ({why}); exiting");
                return Err(RunError::WorkerDied { index, why });
            }
        }
        drain.advance(Phase::Draining);
        let deadline = Instant::now() + Duration::from_secs(args.drain_timeout_secs);
        wait_idle(&metrics, deadline).await;
        // Whatever is left is closed now, and the outbound listeners with it.
        drain.advance(Phase::Closing);
        wait_idle(&metrics, Instant::now() + Duration::from_secs(1)).await;
        tracing::info!(open = metrics.active_connections.get(), "exiting");
        Ok(())
    })
}

fn bind_groups(args: &Args) -> Result<Vec<Group>, RunError> {
    let mut groups = Vec::new();
    let v6 = listen::ipv6_available();
    if !args.no_capture {
        for (port, direction) in [
            (args.outbound_port, Direction::Outbound),
            (args.inbound_port, Direction::Inbound),
        ] {
            groups.push(Group {
                direction,
                orig: OrigDst::Redirect,
                sockets: listen::bind_reuseport(
                    (Ipv4Addr::UNSPECIFIED, port).into(),
                    args.workers,
                )?,
            });
            if v6 {
                groups.push(Group {
                    direction,
                    orig: OrigDst::Redirect,
                    sockets: listen::bind_reuseport(
                        (Ipv6Addr::UNSPECIFIED, port).into(),
                        args.workers,
                    )?,
                });
            }
        }
    }
    for explicit in &args.explicit {
        groups.push(Group {
            direction: Direction::Outbound,
            orig: OrigDst::Fixed(explicit.destination),
            sockets: listen::bind_reuseport(explicit.listen, args.workers)?,
        });
    }
    // A worker with no listener would end at once and take the proxy down as "died".
    if groups.is_empty() {
        return Err(RunError::NoListeners);
    }
    Ok(groups)
}

type WorkerListeners = Vec<(Direction, OrigDst, std::net::TcpListener)>;

fn start_workers(
    backend: Backend,
    workers: usize,
    groups: Vec<Group>,
    ctx: Arc<Context>,
    slots: Arc<Slots>,
    drain: drain::Watch,
    died: mpsc::UnboundedSender<(usize, WorkerExit)>,
) -> Result<(), RunError> {
    // Worker i takes socket i of every group.
    let mut per_worker_listeners: Vec<WorkerListeners> = (0..workers).map(|_| Vec::new()).collect();
    for group in groups {
        for (i, socket) in group.sockets.into_iter().enumerate() {
            per_worker_listeners[i].push((group.direction, group.orig, socket));
        }
    }
    let listeners = Arc::new(std::sync::Mutex::new(per_worker_listeners));
    let make = move |index: usize| {
        let mine = std::mem::take(&mut listeners.lock().unwrap_or_else(|p| p.into_inner())[index]);
        let (ctx, slots, drain) = (ctx.clone(), slots.clone(), drain.clone());
        async move {
            match backend {
                Backend::IoUring => worker::<Uring>(index, mine, ctx, slots, drain).await,
                Backend::Epoll => worker::<Epoll>(index, mine, ctx, slots, drain).await,
            }
        }
    };
    let on_exit = move |index, why| {
        let _ = died.send((index, why));
    };
    // Worker threads run until the process exits; the supervisor hears when one ends.
    runtime::start_workers(backend, workers, make, on_exit)?;
    Ok(())
}

async fn worker<R: Runtime>(
    index: usize,
    listeners: WorkerListeners,
    ctx: Arc<Context>,
    slots: Arc<Slots>,
    drain: drain::Watch,
) {
    if inject_fault(index) {
        return;
    }
    let mut tasks = Vec::new();
    for (direction, orig, socket) in listeners {
        match R::listener(socket) {
            Ok(listener) => tasks.push(tokio::task::spawn_local(listen::accept_loop::<R>(
                listener,
                direction,
                orig,
                ctx.clone(),
                slots.clone(),
                drain.clone(),
            ))),
            Err(e) => tracing::error!(?direction, "cannot register listener: {e}"),
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    // Listeners are closed (shutdown): give the connections the drain is ending (this
    // worker's among them) time to finish closing before the runtime, and with it their
    // tasks, goes away.
    if drain.phase() < Phase::Draining {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while slots.open() > 0 && Instant::now() < deadline {
        R::sleep_until(Instant::now() + Duration::from_millis(10)).await;
    }
}

/// Debug builds only: `ISTHMUS_INJECT_FAULT=worker-exit|worker-panic` makes worker 0 fail at
/// start, so the supervision tests can watch the process react. Absent from release builds.
/// Returns true when the worker must return at once.
fn inject_fault(index: usize) -> bool {
    #[cfg(debug_assertions)]
    if index == 0 {
        match std::env::var("ISTHMUS_INJECT_FAULT").as_deref() {
            Ok("worker-panic") => panic!("injected fault: worker 0 panics"),
            Ok("worker-exit") => {
                tracing::warn!("injected fault: worker 0 returns");
                return true;
            }
            _ => {}
        }
    }
    let _ = index;
    false
}

async fn wait_for_shutdown(state: &AdminState) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no SIGTERM handler: {e}");
            state.shutdown.notified().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        _ = state.shutdown.notified() => tracing::info!("/quitquitquit: draining"),
    }
    state.draining.store(true, Ordering::Release);
}

/// Waits until no connection is being relayed, or `deadline`.
async fn wait_idle(metrics: &Metrics, deadline: Instant) {
    while metrics.active_connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_leaves_a_reserve() {
        assert_eq!(connection_budget(128), 32);
        assert_eq!(connection_budget(1024), 448);
        assert_eq!(connection_budget(20_000), 9_872);
        assert_eq!(connection_budget(1 << 20), 524_160);
        assert_eq!(connection_budget(10), 1);
    }
}
