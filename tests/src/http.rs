//! Real HTTP clients run inside a pod (so its capture rules apply): curl for one request with
//! everything parsed or for many requests in one process, and h2load for load. Plus parsers
//! for the built-in app's `/headers` and `/__stats` answers.
//!
//! ```no_run
//! # use isthmus_tests::http::Curl;
//! # fn f(pod: &isthmus_ctl::local::Pod) {
//! let r = Curl::new("http://10.96.0.10/status/503").header("x-a", "1").run(pod).unwrap();
//! assert_eq!((r.exit, r.status), (isthmus_tests::http::CurlExit::Ok, 503));
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use isthmus_ctl::local::Pod;
use serde_json::Value;

/// Header or trailer fields in order, names as received.
pub type Fields = Vec<(String, String)>;

/// How a curl transfer ended: its exit code, named where tests tell the cases apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurlExit {
    Ok,
    /// 6: the host name did not resolve.
    Resolve,
    /// 7: the connection was refused (or no route).
    Refused,
    /// 16: HTTP/2 framing layer error (e.g. a GOAWAY or a bad frame).
    Http2,
    /// 18: the body ended before its announced length (or last chunk).
    Partial,
    /// 28: `--max-time` (or the connect timeout) ran out.
    Timeout,
    /// 52: the server closed without sending any response.
    EmptyReply,
    /// 55: sending failed (the peer closed while we wrote).
    SendFailed,
    /// 56: receiving failed: in practice the connection was reset (stderr says which).
    Reset,
    /// 92: HTTP/2 stream error (RST_STREAM).
    Http2Stream,
    Other(i32),
}

impl CurlExit {
    pub fn from_code(code: i32) -> Self {
        match code {
            0 => CurlExit::Ok,
            6 => CurlExit::Resolve,
            7 => CurlExit::Refused,
            16 => CurlExit::Http2,
            18 => CurlExit::Partial,
            28 => CurlExit::Timeout,
            52 => CurlExit::EmptyReply,
            55 => CurlExit::SendFailed,
            56 => CurlExit::Reset,
            92 => CurlExit::Http2Stream,
            n => CurlExit::Other(n),
        }
    }
}

/// One curl request, built up and then run inside a pod. Defaults: GET, `--max-time 10`,
/// no proxy from the environment, HTTP/1.1 (curl's default for `http://`).
#[derive(Debug, Clone)]
pub struct Curl {
    url: String,
    args: Vec<String>,
    body: Option<Vec<u8>>,
    max_time: Duration,
}

/// A request's full answer, as curl saw it.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    pub exit: CurlExit,
    /// The final response's status; 0 if none arrived.
    pub status: u16,
    /// `%{http_version}`: "1.1", "2", "1.0"; "0" if no response.
    pub http_version: String,
    /// The final response's header lines, names as received, in order.
    pub headers: Fields,
    /// Statuses of the interim (1xx) responses before it, e.g. `[100]`.
    pub interim: Vec<u16>,
    /// Trailer fields after a chunked (or HTTP/2) body.
    pub trailers: Fields,
    pub body: Vec<u8>,
    /// curl's own error message (`-sS`), empty on success.
    pub error: String,
    pub time_total: Duration,
}

/// One of many requests made by [`Curl::run_many`]: no body, headers by lower-case name.
#[derive(Debug, Clone)]
pub struct Brief {
    pub exit: CurlExit,
    pub status: u16,
    pub http_version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub time_total: Duration,
}

/// h2load's summary of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct H2loadSummary {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Responses by class: `[2xx, 3xx, 4xx, 5xx]`.
    pub status: [u64; 4],
}

/// An h2load run, built up and then run inside a pod.
#[derive(Debug, Clone)]
pub struct H2load {
    url: String,
    requests: u64,
    clients: u32,
    streams: u32,
    h1: bool,
    headers: Vec<String>,
}

static SCRATCH: AtomicU32 = AtomicU32::new(0);

/// A scratch directory for one curl run's files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let dir = std::env::temp_dir().join(format!(
            "isthmus-curl-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Curl {
    pub fn new(url: impl Into<String>) -> Self {
        Curl {
            url: url.into(),
            args: Vec::new(),
            body: None,
            max_time: Duration::from_secs(10),
        }
    }

    /// `-X METHOD` (use `HEAD` through [`Curl::arg`]`("-I")`, so curl expects no body).
    pub fn method(self, method: &str) -> Self {
        self.arg("-X").arg(method)
    }

    /// An extra request header; `header("expect", "")` removes one curl would add.
    pub fn header(self, name: &str, value: &str) -> Self {
        let line = if value.is_empty() {
            format!("{name}:")
        } else {
            format!("{name}: {value}")
        };
        self.arg("-H").arg(line)
    }

    /// A request body (`--data-binary`, POST unless [`Curl::method`] says otherwise). curl
    /// adds `Expect: 100-continue` for bodies over 1 MiB.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sends the body chunked (`Transfer-Encoding: chunked`) instead of with a length.
    pub fn chunked(self) -> Self {
        self.header("transfer-encoding", "chunked")
    }

    /// HTTP/2 without upgrade (h2c prior knowledge).
    pub fn http2_prior_knowledge(self) -> Self {
        self.arg("--http2-prior-knowledge")
    }

    pub fn http1_0(self) -> Self {
        self.arg("--http1.0")
    }

    pub fn max_time(mut self, max_time: Duration) -> Self {
        self.max_time = max_time;
        self
    }

    /// Any other curl argument, e.g. `--connect-to`, `--resolve`, `-I`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    fn command(&self, pod: &Pod, extra: &[String]) -> Result<std::process::Command, String> {
        let mut cmd = pod
            .netns()
            .command("curl", None)
            .map_err(|e| e.to_string())?;
        cmd.args(["-sS", "--noproxy", "*", "--max-time"])
            .arg(format!("{:.3}", self.max_time.as_secs_f64()))
            .args(&self.args)
            .args(extra);
        if self.body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        Ok(cmd)
    }

    fn output(&self, mut cmd: std::process::Command) -> Result<Output, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running curl: {e} (apt-get install curl)"))?;
        let stdin = child.stdin.take();
        let body = self.body.clone().unwrap_or_default();
        // Fed on its own thread: a large body must not block on a pipe curl reads slowly.
        let feeder = std::thread::spawn(move || {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(&body);
            }
        });
        let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
        let _ = feeder.join();
        Ok(out)
    }

    /// Runs the request inside `pod`. `Err` only when curl could not run or said nothing;
    /// a failed transfer is an `Ok` whose `exit` says how it failed.
    pub fn run(&self, pod: &Pod) -> Result<CurlResponse, String> {
        let scratch = Scratch::new()?;
        let (head, body) = (scratch.file("head"), scratch.file("body"));
        let extra = [
            "-D".to_string(),
            head.clone(),
            "-o".into(),
            body.clone(),
            "-w".into(),
            "%{json}".into(),
            self.url.clone(),
        ];
        let out = self.output(self.command(pod, &extra)?)?;
        let w: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "curl wrote no -w JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let dump = std::fs::read_to_string(&head).unwrap_or_default();
        let (blocks, trailers) = parse_header_dump(&dump);
        let (interim, headers) = match blocks.split_last() {
            Some(((_, headers), before)) => (
                before.iter().map(|(status, _)| *status).collect(),
                headers.clone(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(CurlResponse {
            exit: CurlExit::from_code(out.status.code().unwrap_or(-1)),
            status: w["http_code"].as_u64().unwrap_or(0) as u16,
            http_version: w["http_version"].as_str().unwrap_or("0").to_string(),
            headers,
            interim,
            trailers,
            body: std::fs::read(&body).unwrap_or_default(),
            error: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            time_total: Duration::from_secs_f64(w["time_total"].as_f64().unwrap_or(0.0)),
        })
    }

    /// Makes the request `count` times from one curl process (a config file of `count`
    /// URLs): one after another on a kept-alive connection, or with `parallel > 1` that many
    /// at a time (`--parallel`, each on its own connection at first). Bodies are discarded;
    /// each request reports its status, version and headers.
    pub fn run_many(&self, pod: &Pod, count: usize, parallel: usize) -> Result<Vec<Brief>, String> {
        let scratch = Scratch::new()?;
        let config = scratch.file("urls");
        let url = self.url.replace('\\', "\\\\").replace('"', "\\\"");
        let mut text = String::with_capacity(count * (url.len() + 32));
        for _ in 0..count {
            text.push_str(&format!("url = \"{url}\"\noutput = \"/dev/null\"\n"));
        }
        std::fs::write(&config, text).map_err(|e| format!("{config}: {e}"))?;
        let mut extra = vec![
            "-K".to_string(),
            config,
            "-w".into(),
            "{\"w\":%{json},\"h\":%{header_json}}\\n".into(),
        ];
        if parallel > 1 {
            extra.extend([
                "--parallel".into(),
                "--parallel-immediate".into(),
                "--parallel-max".into(),
                parallel.to_string(),
            ]);
        }
        let out = self.output(self.command(pod, &extra)?)?;
        // One JSON object per request; `%{header_json}` spans lines, so read a stream of values.
        let briefs: Vec<Brief> = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<Value>()
            .map(|v| v.map(|v| brief(&v)))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!(
                    "curl -w output: {e}: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
        if briefs.len() != count {
            return Err(format!(
                "curl reported {} of {count} requests: {}",
                briefs.len(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(briefs)
    }
}

fn brief(v: &Value) -> Brief {
    let w = &v["w"];
    let headers = v["h"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, vals)| {
                    let vals = vals.as_array().map(Vec::as_slice).unwrap_or_default();
                    let vals = vals.iter().filter_map(|s| s.as_str().map(String::from));
                    (k.to_ascii_lowercase(), vals.collect())
                })
                .collect()
        })
        .unwrap_or_default();
    Brief {
        exit: CurlExit::from_code(w["exitcode"].as_i64().unwrap_or(-1) as i32),
        status: w["http_code"].as_u64().unwrap_or(0) as u16,
        http_version: w["http_version"].as_str().unwrap_or("0").to_string(),
        headers,
        time_total: Duration::from_secs_f64(w["time_total"].as_f64().unwrap_or(0.0)),
    }
}

/// The value of the first header named `name` (any case).
fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl CurlResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        find(&self.trailers, name)
    }

    /// The app's `x-served-by`: which pod answered.
    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Brief {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }
}

/// Counts of each value of `f` over `briefs`, e.g. requests per `x-served-by`.
pub fn tally<'a>(
    briefs: &'a [Brief],
    f: impl Fn(&'a Brief) -> Option<&'a str>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for b in briefs {
        *counts.entry(f(b).unwrap_or("-").to_string()).or_default() += 1;
    }
    counts
}

/// Splits curl's `-D` output into its header blocks (status, header lines) and the trailer
/// lines after the last block's blank line.
pub fn parse_header_dump(dump: &str) -> (Vec<(u16, Fields)>, Fields) {
    let mut blocks: Vec<(u16, Fields)> = Vec::new();
    let mut trailers = Vec::new();
    let mut in_head = false;
    for line in dump.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            let status = line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            blocks.push((status, Vec::new()));
            in_head = true;
        } else if line.is_empty() {
            in_head = false;
        } else if let Some((name, value)) = line.split_once(':') {
            let field = (name.to_string(), value.trim().to_string());
            match blocks.last_mut() {
                Some((_, headers)) if in_head => headers.push(field),
                Some(_) => trailers.push(field),
                None => {}
            }
        }
    }
    (blocks, trailers)
}

/// The app's `/headers` body: the request line and each header line as received.
pub fn parse_headers_echo(body: &str) -> (String, Vec<(String, String)>) {
    let mut lines = body.lines();
    let line = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_string(), v.trim().to_string()))
        .collect();
    (line, headers)
}

/// The app's `/__stats` counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppStats {
    pub total: u64,
    /// By first path segment: `/status`, `/fail`, `/`.
    pub prefixes: BTreeMap<String, u64>,
    /// By `/fail/{key}` or `?key=`.
    pub keys: BTreeMap<String, u64>,
}

impl AppStats {
    pub fn parse(body: &str) -> Result<AppStats, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))?;
        let map = |v: &Value| {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(AppStats {
            total: v["total"].as_u64().ok_or("no total")?,
            prefixes: map(&v["prefixes"]),
            keys: map(&v["keys"]),
        })
    }

    pub fn key(&self, key: &str) -> u64 {
        self.keys.get(key).copied().unwrap_or(0)
    }

    pub fn prefix(&self, prefix: &str) -> u64 {
        self.prefixes.get(prefix).copied().unwrap_or(0)
    }
}

/// The app's counters, read with curl from inside `pod` at `base` (e.g. `http://10.66.0.21:8080`).
/// Read it from the app's own pod at `127.0.0.1:8080` to count what reached that one upstream.
pub fn app_stats(pod: &Pod, base: &str) -> Result<AppStats, String> {
    let r = Curl::new(format!("{base}/__stats")).run(pod)?;
    if r.status != 200 {
        return Err(format!(
            "{base}/__stats: {:?} {} {}",
            r.exit, r.status, r.error
        ));
    }
    AppStats::parse(&r.text())
}

impl H2load {
    /// Defaults: 100 requests, 1 client, 1 stream per client, HTTP/2 prior knowledge for
    /// `http://` URLs.
    pub fn new(url: impl Into<String>) -> Self {
        H2load {
            url: url.into(),
            requests: 100,
            clients: 1,
            streams: 1,
            h1: false,
            headers: Vec::new(),
        }
    }

    pub fn requests(mut self, n: u64) -> Self {
        self.requests = n;
        self
    }

    pub fn clients(mut self, n: u32) -> Self {
        self.clients = n;
        self
    }

    /// Concurrent streams per client connection (`-m`); pipelined requests with `--h1`.
    pub fn streams(mut self, n: u32) -> Self {
        self.streams = n;
        self
    }

    /// HTTP/1.1 instead of HTTP/2 (`--h1`).
    pub fn h1(mut self) -> Self {
        self.h1 = true;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(format!("{name}: {value}"));
        self
    }

    /// Runs h2load inside `pod` and parses its summary; `Err` if h2load is missing or printed
    /// no summary.
    pub fn run(&self, pod: &Pod) -> Result<H2loadSummary, String> {
        let mut cmd = pod
            .netns()
            .command("h2load", None)
            .map_err(|e| e.to_string())?;
        cmd.args(["-n", &self.requests.to_string()])
            .args(["-c", &self.clients.to_string()])
            .args(["-m", &self.streams.to_string()]);
        if self.h1 {
            cmd.arg("--h1");
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        let out = cmd
            .arg(&self.url)
            .output()
            .map_err(|e| format!("running h2load: {e} (apt-get install nghttp2-client)"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_h2load(&text).ok_or_else(|| {
            format!(
                "no h2load summary ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// Parses h2load's `requests:` and `status codes:` lines.
pub fn parse_h2load(text: &str) -> Option<H2loadSummary> {
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
    let counts = |line: &str| -> BTreeMap<String, u64> {
        line.split(',')
            .filter_map(|part| {
                let (n, what) = part.trim().split_once(' ')?;
                Some((what.trim().to_string(), n.parse().ok()?))
            })
            .collect()
    };
    let requests = counts(text.lines().find_map(|l| l.strip_prefix("requests:"))?);
    let status = counts(text.lines().find_map(|l| l.strip_prefix("status codes:"))?);
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied();
    Some(H2loadSummary {
        total: get(&requests, "total")?,
        started: get(&requests, "started")?,
        done: get(&requests, "done")?,
        succeeded: get(&requests, "succeeded")?,
        failed: get(&requests, "failed")?,
        errored: get(&requests, "errored")?,
        timeout: get(&requests, "timeout")?,
        status: [
            get(&status, "2xx")?,
            get(&status, "3xx")?,
            get(&status, "4xx")?,
            get(&status, "5xx")?,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dump_splits_interim_final_and_trailers() {
        let dump = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Served-By: a\r\n\
                    transfer-encoding: chunked\r\n\r\nx-checksum: 00ff\r\n\r\n";
        let (blocks, trailers) = parse_header_dump(dump);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], (100, vec![]));
        assert_eq!(blocks[1].0, 200);
        assert_eq!(find(&blocks[1].1, "x-served-by"), Some("a"));
        assert_eq!(blocks[1].1[0].0, "X-Served-By", "name case kept");
        assert_eq!(trailers, vec![("x-checksum".into(), "00ff".into())]);
    }

    #[test]
    fn headers_echo_keeps_line_and_case() {
        let (line, headers) = parse_headers_echo("GET /headers HTTP/1.1\nHost: a\nX-MiXed: b c\n");
        assert_eq!(line, "GET /headers HTTP/1.1");
        assert_eq!(
            headers,
            vec![
                ("Host".to_string(), "a".to_string()),
                ("X-MiXed".to_string(), "b c".to_string())
            ]
        );
    }

    #[test]
    fn h2load_summary_parses() {
        let text = "finished in 10.06ms, 9940.36 req/s, 1.43MB/s\n\
            requests: 100 total, 100 started, 99 done, 98 succeeded, 2 failed, 1 errored, 0 timeout\n\
            status codes: 97 2xx, 0 3xx, 1 4xx, 0 5xx\n\
            traffic: 14.36KB (14700) total, 4.69KB (4800) headers (space savings 0.00%)\n";
        assert_eq!(
            parse_h2load(text),
            Some(H2loadSummary {
                total: 100,
                started: 100,
                done: 99,
                succeeded: 98,
                failed: 2,
                errored: 1,
                timeout: 0,
                status: [97, 0, 1, 0],
            })
        );
        assert_eq!(parse_h2load("connect failed\n"), None);
    }

    #[test]
    fn exit_codes_are_named() {
        assert_eq!(CurlExit::from_code(7), CurlExit::Refused);
        assert_eq!(CurlExit::from_code(56), CurlExit::Reset);
        assert_eq!(CurlExit::from_code(28), CurlExit::Timeout);
        assert_eq!(CurlExit::from_code(3), CurlExit::Other(3));
    }
}
