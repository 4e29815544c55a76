//! Process plumbing: thread priority, giving freed heap back, the descriptor limit, and the
//! panic policy.

/// Gives the calling thread a lower CPU priority (nice 10) than the data path's workers:
/// parsing a large config takes hundreds of milliseconds and must not delay relaying.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// Parsing a large config allocates far more than the snapshot keeps; glibc holds on to the
/// freed pages. Hand them back so RSS reflects the snapshot, not the parse.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft descriptor limit to the hard one (what Go and Envoy's launchers do: the
/// soft default of 1024 is far below what a proxy needs) and returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// The proxy's one panic policy: a panic anywhere — a worker, a connection task, the control
/// thread — is a bug that may have left shared state inconsistent, so it is logged with its
/// thread and location and the process aborts (non-zero exit; the kubelet restarts the
/// container). Never a sidecar that looks alive with a dead worker.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "panic: {info}; aborting (isthmus-proxy exits on any panic)"
        );
        default(info);
        std::process::abort();
    }));
}
