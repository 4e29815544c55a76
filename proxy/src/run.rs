//! Start-up and shutdown: bind, load, start workers, serve admin, drain on SIGTERM.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin::{self, AdminState, Role, SetLogLevel};
use crate::args::Args;
use crate::listen::{self, ListenError, OrigDst};
use crate::metrics::{BackendLabels, Metrics};
use crate::runtime::{self, Backend, Epoll, Runtime, RuntimeError, Uring};
use crate::serve::{self, Context, Direction};
use crate::state::{self, ConfigStore};
use crate::telemetry::Identity;

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
    #[error("--workers must be at least 1")]
    NoWorkers,
}

/// One listener group: a socket per worker, all on the same address.
struct Group {
    direction: Direction,
    orig: OrigDst,
    sockets: Vec<std::net::TcpListener>,
}

/// Runs the proxy until it is told to stop; returns after draining.
pub fn run(args: Args, set_log_level: SetLogLevel) -> Result<(), RunError> {
    if args.workers == 0 {
        return Err(RunError::NoWorkers);
    }
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
    let store = ConfigStore::new(metrics.clone());

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
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        connect_attempts: args.connect_attempts.max(1),
        access_log: args.access_log,
        own_ports: vec![
            args.outbound_port,
            args.inbound_port,
            args.admin_port,
            args.stats_port,
            args.readiness_port,
        ],
        next_id: AtomicU64::new(0),
    });

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Control)?;
    control.block_on(async move {
        let admin_state = Arc::new(AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
            set_log_level,
            info: json!({
                "backend": backend.as_str(),
                "ioUringFallback": fallback.as_ref().map(|e| e.to_string()),
                "workers": args.workers,
                "configDir": args.config_dir.display().to_string(),
                "pid": std::process::id(),
                "build": env!("CARGO_PKG_VERSION"),
            }),
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

        // The first config loads before workers start; the watcher takes over from there.
        store.reload_from(&args.config_dir).await;
        tokio::spawn(state::watch_dir(
            store.clone(),
            args.config_dir.clone(),
            Duration::from_millis(args.config_debounce_ms),
            Duration::from_secs(args.config_resync_secs.max(1)),
        ));

        start_workers(backend, args.workers, groups, ctx)?;
        state::lower_priority();
        admin_state.listening.store(true, Ordering::Release);
        tracing::info!(workers = args.workers, "proxy ready");

        wait_for_shutdown(&admin_state).await;
        drain(&metrics, Duration::from_secs(args.drain_timeout_secs)).await;
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
    Ok(groups)
}

fn start_workers(
    backend: Backend,
    workers: usize,
    groups: Vec<Group>,
    ctx: Arc<Context>,
) -> Result<(), RunError> {
    // Worker i takes socket i of every group.
    let mut per_worker: Vec<Vec<(Direction, OrigDst, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for group in groups {
        for (i, socket) in group.sockets.into_iter().enumerate() {
            per_worker[i].push((group.direction, group.orig, socket));
        }
    }
    let per_worker = Arc::new(std::sync::Mutex::new(per_worker));
    let make = move |index: usize| {
        let mine = std::mem::take(&mut per_worker.lock().unwrap_or_else(|p| p.into_inner())[index]);
        let ctx = ctx.clone();
        async move {
            match backend {
                Backend::IoUring => worker::<Uring>(mine, ctx).await,
                Backend::Epoll => worker::<Epoll>(mine, ctx).await,
            }
        }
    };
    // Worker threads run until the process exits.
    runtime::start_workers(backend, workers, make)?;
    Ok(())
}

async fn worker<R: Runtime>(
    listeners: Vec<(Direction, OrigDst, std::net::TcpListener)>,
    ctx: Arc<Context>,
) {
    let mut tasks = Vec::new();
    for (direction, orig, socket) in listeners {
        match R::listener(socket) {
            Ok(listener) => tasks.push(tokio::task::spawn_local(serve::accept_loop::<R>(
                listener,
                direction,
                orig,
                ctx.clone(),
            ))),
            Err(e) => tracing::error!(?direction, "cannot register listener: {e}"),
        }
    }
    for task in tasks {
        let _ = task.await;
    }
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

/// Readiness already fails; wait for open connections to finish, up to `timeout`.
async fn drain(metrics: &Metrics, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while metrics.active_connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(open = metrics.active_connections.get(), "exiting");
}
