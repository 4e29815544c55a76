//! A pod of the local mesh: its namespace, its processes, and how tests and the demo talk to
//! it from inside (so that its capture rules apply).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{io_err, log_file, Launch, MeshError, PodSpec, ECHO_PORT, HTTP_PORT, PROXY_UID};
use crate::netns::Netns;

/// A running pod.
pub struct Pod {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub spec: PodSpec,
    pub(super) processes: Vec<(String, Child)>,
    pub(super) netns: Netns,
    pub(super) log_dir: PathBuf,
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Starts the built-in app and waits for its READY line.
    pub(super) fn start_app(&mut self, bin_dir: &Path) -> Result<(), MeshError> {
        let mut app = self.netns.command(bin_dir.join("isthmus-ctl"), None)?;
        app.args([
            "app",
            "--name",
            &self.name,
            "--http",
            &format!("[::]:{HTTP_PORT}"),
            "--echo",
            &format!("[::]:{ECHO_PORT}"),
        ])
        .stdout(Stdio::piped())
        .stderr(log_file(&self.log_dir, "app.log")?);
        let mut child = app.spawn().map_err(io_err("starting the app"))?;
        let ready = child.stdout.take().map(|out| {
            BufReader::new(out)
                .lines()
                .next()
                .and_then(Result::ok)
                .unwrap_or_default()
        });
        self.processes.push(("app".into(), child));
        if ready.as_deref() != Some("READY") {
            return Err(MeshError::Failed(format!(
                "app in {} did not start: {}",
                self.name,
                self.log("app.log")
            )));
        }
        Ok(())
    }

    /// Runs isthmus-init and starts the sidecar as UID 1337 (not waiting for readiness).
    pub(super) fn start_sidecar(
        &mut self,
        launch: &Launch,
        config_dir: &Path,
    ) -> Result<(), MeshError> {
        let out = self
            .netns
            .command(launch.bin_dir.join("isthmus-init"), None)?
            .output()
            .map_err(io_err("running isthmus-init"))?;
        if !out.status.success() {
            return Err(MeshError::Failed(format!(
                "isthmus-init in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut proxy = self.netns.command_limited(
            launch.bin_dir.join("isthmus-proxy"),
            Some(PROXY_UID),
            self.spec.nofile,
        )?;
        proxy
            .arg("--config-dir")
            .arg(config_dir)
            .args([
                "--workload",
                &self.name,
                "--namespace",
                &launch.namespace,
                "--app",
                self.spec.app.as_deref().unwrap_or(&self.name),
                "--app-version",
                &self.spec.version,
            ])
            .args(["--access-log", "--config-debounce-ms", "20"])
            .args(&launch.proxy_args)
            .stdout(Stdio::null())
            .stderr(log_file(&self.log_dir, "proxy.log")?);
        if launch.block_io_uring {
            crate::seccomp::deny_io_uring(&mut proxy);
        }
        let child = proxy.spawn().map_err(io_err("starting isthmus-proxy"))?;
        self.processes.push(("proxy".into(), child));
        Ok(())
    }

    /// SIGKILLs and reaps the process named `name` ("app" or "proxy"); false if none runs.
    pub(super) fn kill(&mut self, name: &str) -> bool {
        let Some(i) = self.processes.iter().position(|(n, _)| n == name) else {
            return false;
        };
        let (_, mut child) = self.processes.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    /// The app's process id.
    pub fn app_pid(&self) -> Option<u32> {
        self.processes
            .iter()
            .find(|(name, _)| name == "app")
            .map(|(_, c)| c.id())
    }

    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }

    /// The sidecar's process id.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.processes
            .iter()
            .find(|(name, _)| name == "proxy")
            .map(|(_, c)| c.id())
    }

    /// Waits (bounded) for the sidecar to exit; its exit status, or `None` if still running.
    pub fn wait_proxy_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .processes
                .iter_mut()
                .find(|(name, _)| name == "proxy")
                .and_then(|(_, child)| child.try_wait().ok().flatten());
            if status.is_some() || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(file)).unwrap_or_default()
    }

    /// Connects from inside this pod (so the connection is subject to its capture rules).
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream, MeshError> {
        self.netns
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .map_err(io_err(format!("connecting to {addr}")))
    }

    /// A plain HTTP/1.1 GET from inside this pod; returns (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), MeshError> {
        let mut stream = self.connect(addr)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err("timeout"))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .map_err(io_err("sending request"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(io_err(format!("reading from {addr}")))?;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                MeshError::Failed(format!("no HTTP response from {addr}: {response:?}"))
            })?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// GET on the sidecar's admin port.
    pub fn admin(&self, path: &str) -> Result<String, MeshError> {
        self.http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)), path)
            .map(|(_, body)| body)
    }

    /// The sidecar's Prometheus text.
    pub fn metrics(&self) -> Result<String, MeshError> {
        self.http_get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 15020)),
            "/stats/prometheus",
        )
        .map(|(_, body)| body)
    }

    /// Polls the readiness endpoint (15021) until it answers 200; bounded.
    pub(super) fn wait_ready(&mut self) -> Result<(), MeshError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 15021));
        loop {
            if let Ok((200, _)) = self.http_get(addr, "/healthz/ready") {
                return Ok(());
            }
            let exited = self
                .processes
                .iter_mut()
                .filter(|(name, _)| name == "proxy")
                .find_map(|(_, child)| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(MeshError::Failed(format!(
                    "sidecar of {} exited ({status}):\n{}",
                    self.name,
                    self.log("proxy.log")
                )));
            }
            if Instant::now() > deadline {
                return Err(MeshError::Failed(format!(
                    "sidecar of {} not ready after 20s:\n{}",
                    self.name,
                    self.log("proxy.log")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `/config_dump` until the sidecar reports `version` loaded (or rejected); bounded.
    pub fn wait_for_version(
        &self,
        version: &str,
        rejected: bool,
    ) -> Result<serde_json::Value, MeshError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(body) = self.admin("/config_dump") {
                if let Ok(dump) = serde_json::from_str::<serde_json::Value>(&body) {
                    let seen = if rejected {
                        &dump["lastError"]["version"]
                    } else {
                        &dump["version"]
                    };
                    if seen == version {
                        return Ok(dump);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(MeshError::Failed(format!(
                    "sidecar of {} did not report config {version} within 20s:\n{}",
                    self.name,
                    self.log("proxy.log")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pod {
    /// A pod that goes away (removed, or half-created when a step failed) takes its processes
    /// with it, sidecar first; its namespace is deleted after, when `netns` drops.
    fn drop(&mut self) {
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
