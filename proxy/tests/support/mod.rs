//! The proxy as a process with explicit listeners (no iptables, no root), and the peers the
//! process-level tests talk to.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub child: Child,
    pub admin: SocketAddr,
    pub listen: SocketAddr,
    /// The Prometheus port (also the app probes') and the readiness port, on 127.0.0.1.
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The proxy's stdout (the HTTP access log).
    pub out: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.out);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[allow(unused_imports)]
pub use isthmus_tests::{metric_sum as metric, skip};

/// A server-first peer: it greets with its name before the client says anything, then echoes.
pub fn greeter(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                stream.write_all(format!("{name}\n").as_bytes())?;
                let mut buf = [0u8; 1024];
                loop {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    stream.write_all(&buf[..n])?;
                }
            });
        }
    });
    addr
}

/// A registry with one service, `db` at 10.96.0.1:3306, whose one endpoint is `endpoint`.
pub fn config(endpoint: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: test}}\n\
         spec:\n  hosts: [db]\n  addresses: [10.96.0.1]\n  ports: [{{number: 3306, name: mysql, protocol: MYSQL}}]\n\
         \x20 resolution: STATIC\n  endpoints: [{{address: {}, ports: {{mysql: {}}}}}]\n",
        endpoint.ip(),
        endpoint.port()
    )
}

pub fn write_config(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("mesh.yaml")).unwrap();
}

pub struct Options<'a> {
    pub backend: &'a str,
    /// The endpoint the first config names; `None`: start with no config directory at all.
    pub endpoint: Option<SocketAddr>,
    pub args: Vec<String>,
    pub env: Vec<(&'a str, &'a str)>,
    /// Wait for readiness before returning.
    pub wait_ready: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            backend: "auto",
            endpoint: None,
            args: Vec::new(),
            env: Vec::new(),
            wait_ready: true,
        }
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn start(options: Options<'_>) -> Proxy {
    let tag = format!(
        "{}-{}-{}",
        options.backend,
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(format!("isthmus-proc-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(endpoint) = options.endpoint {
        write_config(&dir, &config(endpoint));
    }
    let log = std::env::temp_dir().join(format!("isthmus-proc-{tag}.log"));
    let out = std::env::temp_dir().join(format!("isthmus-proc-{tag}.out"));
    // A port from `free_port` may be taken by a concurrent test before the proxy binds it:
    // a start that fails on "Address already in use" is retried with fresh ports.
    let mut attempt = 0;
    let (child, admin, listen, stats, readiness) = loop {
        let (admin, listen) = (free_port(), free_port());
        let (stats, readiness) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
            .args([
                "--no-capture",
                "--io-backend",
                options.backend,
                "--config-debounce-ms",
                "10",
            ])
            .arg("--config-dir")
            .arg(&dir)
            .args(["--explicit", &format!("127.0.0.1:{listen}=10.96.0.1:3306")])
            .args(["--admin-port", &admin.to_string()])
            .args([
                "--stats-port",
                &stats.to_string(),
                "--readiness-port",
                &readiness.to_string(),
            ])
            .args(["--connect-timeout-ms", "500"])
            .args(&options.args)
            .envs(options.env.iter().copied())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The admin endpoint is bound last: once it accepts, every port is ours.
        let deadline = Instant::now() + Duration::from_secs(10);
        let bound = loop {
            if TcpStream::connect(("127.0.0.1", admin)).is_ok() {
                break true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break false;
            }
            if Instant::now() > deadline {
                break true;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let lost_race = !bound
            && std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Address already in use"));
        if lost_race && attempt < 5 {
            attempt += 1;
            continue;
        }
        break (child, admin, listen, stats, readiness);
    };
    let proxy = Proxy {
        child,
        admin: ([127, 0, 0, 1], admin).into(),
        listen: ([127, 0, 0, 1], listen).into(),
        stats: ([127, 0, 0, 1], stats).into(),
        readiness: ([127, 0, 0, 1], readiness).into(),
        dir,
        log,
        out,
    };
    if options.wait_ready {
        proxy.wait_until("ready", |p| p.get("/ready").starts_with("HTTP/1.1 200"));
    }
    proxy
}

impl Proxy {
    /// Polls `done` every 10 ms for up to 10 s.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Proxy) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; proxy log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> String {
        let Ok(mut s) = TcpStream::connect(self.admin) else {
            return String::new();
        };
        let _ = write!(s, "GET {path} HTTP/1.1\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    pub fn metrics(&self) -> String {
        self.get("/stats/prometheus")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn version(&self) -> String {
        let dump = self.get("/config_dump");
        let body = dump.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        json["version"].as_str().unwrap_or_default().to_string()
    }

    /// Replaces the config and waits until the proxy serves it.
    pub fn reconfigure(&self, text: &str) {
        let before = self.version();
        write_config(&self.dir, text);
        self.wait_until("the reload", |p| p.version() != before);
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The greeting line a server-first peer sends through `addr`.
pub fn greeting(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// How a connection the proxy should close ended, as seen by the client within 5 s.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// End of stream, no bytes.
    Eof,
    Reset,
    /// Bytes arrived: the proxy did not close it.
    Data(Vec<u8>),
}

/// Reads from `stream` until it closes; a read that times out fails the test (a connection
/// left open is not "closed").
pub fn expect_closed(stream: &mut TcpStream) -> Closed {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => Closed::Eof,
        Ok(n) => Closed::Data(buf[..n].to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Closed::Reset,
        Err(e) => panic!(
            "expected the proxy to close the connection, got: {e} ({:?})",
            e.kind()
        ),
    }
}
