//! The gRPC test peers (`tests/peers/grpc_server.py`, `grpc_client.py`, grpcio under the
//! system Python) run inside pods. See the scripts' docstrings for the methods: Echo, Stream,
//! Fail (UNAVAILABLE for the first `x-fail-count` calls per `x-fail-key`), Count.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use isthmus_ctl::local::Pod;
use serde_json::Value;

/// The port the tests run the gRPC server on (the mesh registry's `grpc` port).
pub use isthmus_ctl::local::GRPC_PORT;

/// A Python that can `import grpc`: `$ISTHMUS_PYTHON`, else `/usr/bin/python3` (where
/// Debian's python3-grpcio installs), else `python3` on PATH. `None` if none can; tests then
/// skip (scripts/setup.sh python3-grpcio installs it; .ci/run does).
pub fn python() -> Option<&'static PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let candidates = std::env::var_os("ISTHMUS_PYTHON")
                .map(PathBuf::from)
                .into_iter()
                .chain(["/usr/bin/python3".into(), "python3".into()]);
            candidates.into_iter().find(|p| {
                std::process::Command::new(p)
                    .args(["-c", "import grpc"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .as_ref()
}

/// `tests/peers/NAME`.
pub fn peer_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// A running `grpc_server.py` in a pod; killed on drop (declare it after the mesh, so it goes
/// first).
pub struct GrpcServer {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl GrpcServer {
    /// Starts the server in `pod` as `name` on `port` (all addresses) and waits for READY.
    pub fn start(pod: &Pod, name: &str, port: u16) -> Result<GrpcServer, String> {
        let python = python().ok_or("no Python with grpcio (apt-get install python3-grpcio)")?;
        let mut child = pod
            .netns()
            .command(python, None)
            .map_err(|e| e.to_string())?
            .arg(peer_script("grpc_server.py"))
            .args([name, &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting grpc_server.py: {e}"))?;
        let (Some(stdout), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err("grpc_server.py: no pipes".into());
        };
        // Drained all along, so a chatty server never blocks on a full pipe.
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&text);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = BufReader::new(stdout).lines().next();
            let _ = tx.send(line.and_then(Result::ok).unwrap_or_default());
        });
        let mut server = GrpcServer { child, stderr };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line == "READY" => Ok(server),
            got => {
                let _ = server.child.kill();
                let _ = server.child.wait();
                Err(format!(
                    "grpc_server.py did not start ({got:?}): {}",
                    server.stderr()
                ))
            }
        }
    }

    /// What the server wrote on stderr so far (complete once it has exited).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC message as it goes on the wire (uncompressed, length-prefixed), for sending gRPC
/// with a plain HTTP/2 client such as curl.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One call's outcome, as `grpc_client.py` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    /// The status code's name: `OK`, `UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...
    pub code: String,
    pub details: String,
    /// The unary response (lossy UTF-8); `None` on error or for Stream.
    pub payload: Option<String>,
    /// Stream's messages.
    pub messages: Vec<String>,
    pub initial: BTreeMap<String, String>,
    pub trailing: BTreeMap<String, String>,
}

/// A `grpc_client.py` invocation, built up and then run inside a pod.
#[derive(Debug, Clone)]
pub struct GrpcClient {
    target: String,
    method: String,
    args: Vec<String>,
}

impl GrpcClient {
    /// `method`: `Echo`, `Stream`, `Fail`, `Count`, or a full `/service/method`.
    pub fn new(target: impl Into<String>, method: &str) -> Self {
        GrpcClient {
            target: target.into(),
            method: method.to_string(),
            args: Vec::new(),
        }
    }

    pub fn payload(self, payload: &str) -> Self {
        self.arg("--payload").arg(payload)
    }

    /// Makes the call `n` times on one channel.
    pub fn repeat(self, n: u32) -> Self {
        self.arg("--repeat").arg(n.to_string())
    }

    /// Sends `:authority` `authority` instead of the target.
    pub fn authority(self, authority: &str) -> Self {
        self.arg("--authority").arg(authority)
    }

    pub fn metadata(self, key: &str, value: &str) -> Self {
        self.arg("--metadata").arg(format!("{key}={value}"))
    }

    /// Each call's deadline.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.arg("--timeout")
            .arg(format!("{:.3}", timeout.as_secs_f64()))
    }

    fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs the client inside `pod`; one [`GrpcCall`] per call made.
    pub fn run(&self, pod: &Pod) -> Result<Vec<GrpcCall>, String> {
        let python = python().ok_or("no Python with grpcio (apt-get install python3-grpcio)")?;
        let out = pod
            .netns()
            .command(python, None)
            .map_err(|e| e.to_string())?
            .arg(peer_script("grpc_client.py"))
            .args([&self.target, &self.method])
            .args(&self.args)
            .output()
            .map_err(|e| format!("running grpc_client.py: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "grpc_client.py {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        stdout.lines().map(parse_call).collect()
    }
}

/// One JSON line of `grpc_client.py`.
pub fn parse_call(line: &str) -> Result<GrpcCall, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line:?}"))?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let map = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default()
    };
    Ok(GrpcCall {
        code: v["code"].as_str().ok_or("no code")?.to_string(),
        details: text(&v["details"]),
        payload: v["payload"].as_str().map(String::from),
        messages: v["messages"]
            .as_array()
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default(),
        initial: map(&v["initial"]),
        trailing: map(&v["trailing"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_line_parses() {
        let call = parse_call(
            r#"{"call": 0, "code": "UNAVAILABLE", "details": "attempt 1 of 2 fails", "initial": {"x-served-by": "s1"}, "messages": [], "payload": null, "trailing": {"x-attempt": "1", "x-served-by": "s1"}}"#,
        )
        .unwrap();
        assert_eq!(call.code, "UNAVAILABLE");
        assert_eq!(call.payload, None);
        assert_eq!(call.trailing["x-attempt"], "1");
        assert_eq!(call.initial["x-served-by"], "s1");
    }
}
