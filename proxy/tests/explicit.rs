//! The proxy as a process with explicit listeners (no iptables, no root): routing from the
//! config directory, a server-first protocol, hot reload, and refusal of unreachable endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proxy {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
    dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server-first peer: it greets with its name before the client says anything, then echoes.
fn greeter(name: &'static str) -> SocketAddr {
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

fn config(endpoint: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: test}}\n\
         spec:\n  hosts: [db]\n  addresses: [10.96.0.1]\n  ports: [{{number: 3306, name: mysql, protocol: MYSQL}}]\n\
         \x20 resolution: STATIC\n  endpoints: [{{address: {}, ports: {{mysql: {}}}}}]\n",
        endpoint.ip(),
        endpoint.port()
    )
}

fn write_config(dir: &Path, text: &str) {
    let tmp = dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("mesh.yaml")).unwrap();
}

fn start(backend: &str, endpoint: SocketAddr) -> Proxy {
    let dir =
        std::env::temp_dir().join(format!("isthmus-explicit-{backend}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir, &config(endpoint));
    let (admin, listen) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
        .args([
            "--no-capture",
            "--io-backend",
            backend,
            "--config-debounce-ms",
            "10",
        ])
        .arg("--config-dir")
        .arg(&dir)
        .args(["--explicit", &format!("127.0.0.1:{listen}=10.96.0.1:3306")])
        .args(["--admin-port", &admin.to_string()])
        .args([
            "--stats-port",
            &free_port().to_string(),
            "--readiness-port",
            &free_port().to_string(),
        ])
        .args(["--connect-timeout-ms", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Proxy {
        child,
        admin: ([127, 0, 0, 1], admin).into(),
        listen: ([127, 0, 0, 1], listen).into(),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(proxy.admin, "/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "proxy not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy
}

fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn greeting(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn version(admin: SocketAddr) -> String {
    let dump = get(admin, "/config_dump");
    let body = dump.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    json["version"].as_str().unwrap_or_default().to_string()
}

fn scenario(backend: &str) {
    let (a, b) = (greeter("server-a"), greeter("server-b"));
    let proxy = start(backend, a);
    // Server-first: the greeting arrives although the client never sends a byte.
    assert_eq!(greeting(proxy.listen), "server-a");

    let before = version(proxy.admin);
    write_config(&proxy.dir, &config(b));
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(proxy.admin) == before {
        assert!(Instant::now() < deadline, "reload not picked up");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(greeting(proxy.listen), "server-b");

    // An endpoint nobody listens on: the client's connection is closed, and counted as UF.
    let before = version(proxy.admin);
    write_config(&proxy.dir, &config(([127, 0, 0, 1], free_port()).into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(proxy.admin) == before {
        assert!(Instant::now() < deadline, "reload not picked up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    let metrics = get(proxy.admin, "/stats/prometheus");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("response_flags=\"UF\"")),
        "{metrics}"
    );
}

#[test]
fn explicit_listener_routes_reloads_and_refuses_io_uring() {
    scenario("auto");
}

#[test]
fn explicit_listener_routes_reloads_and_refuses_epoll() {
    scenario("epoll");
}
