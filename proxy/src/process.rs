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
///
/// The one exception is [`contain`]: compiling a config is a pure function of the files, so a
/// panic there corrupts nothing and is treated as a rejected config. Otherwise one bad
/// ConfigMap edit that hits a bug would crash-loop every sidecar of the mesh at once.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CONTAINED.with(std::cell::Cell::get) {
            tracing::error!("bug: panic while compiling a config, treated as a rejection: {info}");
            return;
        }
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "panic: {info}; aborting (isthmus-proxy exits on any panic)"
        );
        default(info);
        std::process::abort();
    }));
}

thread_local! {
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a pure computation, turning a panic into `Err(message)` instead of aborting. Only for
/// code that touches no shared state (config compilation).
pub fn contain<T>(pure: impl FnOnce() -> T) -> Result<T, String> {
    CONTAINED.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(pure));
    CONTAINED.with(|c| c.set(false));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contain_turns_a_panic_into_an_error() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(
            contain(|| -> u8 { panic!("boom {}", 1) }),
            Err("boom 1".to_string())
        );
        assert_eq!(contain(|| -> u8 { panic!("static") }), Err("static".into()));
        assert!(!CONTAINED.with(std::cell::Cell::get));
    }
}
