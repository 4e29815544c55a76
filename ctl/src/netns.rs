//! Network namespaces as pods: create, enter (a thread or a child process), delete.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr} (is iproute2 installed, and are we root?)")]
    Ip { command: String, stderr: String },
    #[error("cannot run `ip`: {0} (install iproute2)")]
    Spawn(io::Error),
    #[error("cannot open namespace {name}: {source}")]
    Open { name: String, source: io::Error },
}

/// Runs `ip ARGS`, turning a failure into an error that shows the command.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        // A namespace left by a killed run of the same name is stale: replace it.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn open(&self) -> Result<File, NetnsError> {
        File::open(self.path()).map_err(|source| NetnsError::Open {
            name: self.name.clone(),
            source,
        })
    }

    /// `ip -n NAME ARGS`.
    pub fn exec_ip(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs inside this namespace, optionally as `uid`/`gid`, and dies with us.
    pub fn command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        as_user: Option<u32>,
    ) -> Result<Command, NetnsError> {
        self.command_limited(program, as_user, None)
    }

    /// [`Netns::command`] with `RLIMIT_NOFILE` set to `nofile` (soft and hard). It is set
    /// before the switch to `as_user`, which could not raise it.
    pub fn command_limited(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        as_user: Option<u32>,
        nofile: Option<u64>,
    ) -> Result<Command, NetnsError> {
        let ns = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(n) = nofile {
                    let limit = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(id) = as_user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it creates belong to
    /// the namespace (and keep working when handed back to other threads).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        self.spawn(f)?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Starts `f` on a new thread that has entered this namespace, without waiting for it:
    /// for load generators and servers that run while the caller changes the mesh.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T, NetnsError>>, NetnsError> {
        let ns = self.open()?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Open {
                name,
                source: io::Error::from(e),
            })?;
            Ok(f())
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}
