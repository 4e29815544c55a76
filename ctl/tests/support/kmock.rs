//! kmock, the Kubernetes API emulator (`kmock_apiserver.py` says what it emulates), as a child
//! process with a kube-rs client, and the skip record for machines without it.
// Each test binary uses a part.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// Records the test as skipped for scripts/test.sh's summary, as `isthmus_tests::skip` does.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("ISTHMUS_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// The Python that has kmock: `$ISTHMUS_KMOCK_PYTHON`, the venv scripts/setup-kmock.sh makes
/// under target/, or `python3`.
pub fn python() -> Option<String> {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/kmock-venv/bin/python"
    );
    let candidates = std::env::var("ISTHMUS_KMOCK_PYTHON")
        .ok()
        .into_iter()
        .chain([venv.to_owned(), "python3".to_owned()]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import kmock"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The emulator process; killed on drop.
pub struct Kmock {
    child: Child,
    port: u16,
}

impl Kmock {
    /// Starts kmock, or records the test as skipped and returns `None`.
    pub fn start_or_skip() -> Option<Kmock> {
        Self::start_without_or_skip("")
    }

    /// As [`Kmock::start_or_skip`], without the resources named (comma-separated, as in the
    /// script's RESOURCES): a CRD that is not installed.
    pub fn start_without_or_skip(without: &str) -> Option<Kmock> {
        let Some(python) = python() else {
            skip("no Python with kmock (run scripts/setup-kmock.sh, or set ISTHMUS_KMOCK_PYTHON)");
            return None;
        };
        // From the workspace root, so the proxy's tests (which include this file) find it too.
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ctl/tests/kmock_apiserver.py"
        );
        let mut child = Command::new(python)
            .arg(script)
            .env("KMOCK_WITHOUT", without)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kmock");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Ok(port) = line.trim().parse() else {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("kmock did not start: {line:?} {err}");
        };
        Some(Kmock { child, port })
    }

    /// A kubeconfig naming this server: for the kube-rs client, and for kubectl as a second one.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kmock, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\ncontexts: [{{name: kmock, context: {{cluster: kmock, user: test}}}}]\n\
             current-context: kmock\n",
            self.port
        )
    }

    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig()).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        Client::try_from(config).unwrap()
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
