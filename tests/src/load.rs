//! Load for fault scenarios, from inside a pod: long pattern streams, steady mixed exchanges
//! that tally answers and failures, paced keep-alive GETs, and many connections held open.
//! Every loop is bounded by a count and a deadline.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_ctl::local::Pod;

use crate::probe::{active_connections, wait_active, wait_until};
use crate::traffic::{echo_once, echo_until_end, get_once, Ended, HttpClient};

/// Starts a long pattern stream on `stream` in the background; returns its progress and the
/// thread that reports how it ended.
pub fn background_stream(stream: TcpStream) -> (Arc<AtomicU64>, std::thread::JoinHandle<Ended>) {
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    // 1 GiB: far more than is sent before the fault, so the fault always lands mid-stream.
    let handle =
        std::thread::spawn(move || echo_until_end(stream, 1 << 30, Duration::from_secs(10), &seen));
    (progress, handle)
}

/// Waits (up to 30 s) until a background stream has verified `bytes`.
pub fn wait_progress(progress: &AtomicU64, bytes: u64) {
    wait_until(
        "stream progress",
        Duration::from_secs(30),
        || match progress.load(Ordering::Acquire) {
            n if n >= bytes => Ok(()),
            n => Err(format!("{n} bytes verified")),
        },
    );
}

/// Opens connections from inside `pod` through its sidecar, keeping every one open (relayed or not),
/// until `give_up` attempts in a row are not relayed or `max` attempts were made. Returns the
/// held connections and how many were relayed (echoed byte-exact).
pub fn saturate(pod: &Pod, vip: SocketAddr, max: usize, give_up: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::new();
    let (mut relayed, mut in_a_row) = (0, 0);
    for i in 0..max {
        let Ok(mut stream) = pod.connect(vip) else {
            in_a_row += 1;
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let msg = format!("connection {i}\n");
        let echoed = std::io::Write::write_all(&mut stream, msg.as_bytes()).and_then(|()| {
            let mut back = vec![0u8; msg.len()];
            std::io::Read::read_exact(&mut stream, &mut back).map(|()| back)
        });
        match echoed {
            Ok(back) => {
                assert_eq!(back, msg.as_bytes(), "corrupted echo on connection {i}");
                relayed += 1;
                in_a_row = 0;
            }
            Err(_) => in_a_row += 1,
        }
        open.push(stream);
        if in_a_row >= give_up {
            break;
        }
    }
    (open, relayed)
}

/// Raises `stop` when dropped, so that load threads end even when the test fails first.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What one load thread saw: answers per backend, failures with their time span, corruption.
#[derive(Default)]
pub struct Tally {
    /// Backend name → (answers, start of the last exchange it answered).
    pub answered: BTreeMap<String, (u64, Option<Instant>)>,
    /// Echo exchanges that came back byte-exact.
    pub echoes: u64,
    /// (start, end, what) of each failed exchange.
    pub failures: Vec<(Instant, Instant, String)>,
    pub corrupt: Vec<String>,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        for (name, (n, last)) in other.answered {
            let entry = self.answered.entry(name).or_default();
            entry.0 += n;
            entry.1 = entry.1.max(last);
        }
        self.echoes += other.echoes;
        self.failures.extend(other.failures);
        self.corrupt.extend(other.corrupt);
    }

    pub fn completed(&self) -> u64 {
        self.echoes + self.answered.values().map(|(n, _)| n).sum::<u64>()
    }
}

/// Steady load from inside the client pod until `stop` (bounded by `max` iterations): each
/// iteration one GET on a new connection (which backend answered) and one 16 KiB echo on a
/// new connection (byte-exact), about 200 iterations a second.
pub fn mixed_exchanges(
    http: SocketAddr,
    echo: SocketAddr,
    seed: u8,
    stop: &AtomicBool,
    max: u64,
    done: &AtomicU64,
) -> Tally {
    let timeout = Duration::from_secs(10);
    let mut tally = Tally::default();
    for i in 0..max {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let start = Instant::now();
        match get_once(http, timeout) {
            Ok(body) => match body
                .strip_prefix("hello from ")
                .and_then(|b| b.strip_suffix('\n'))
            {
                Some(name) => {
                    let entry = tally.answered.entry(name.to_string()).or_default();
                    entry.0 += 1;
                    entry.1 = entry.1.max(Some(start));
                }
                None => tally.corrupt.push(format!("GET: {body:?}")),
            },
            Err(e) => tally
                .failures
                .push((start, Instant::now(), format!("GET: {e}"))),
        }
        let msg: Vec<u8> = (0..16 * 1024u32)
            .map(|j| (j as u8) ^ (i as u8) ^ seed)
            .collect();
        let start = Instant::now();
        match echo_once(echo, &msg, timeout) {
            Ok(back) if back == msg => tally.echoes += 1,
            // A short echo that ends cleanly is a failed exchange (the connection was closed
            // under it), not corruption; a wrong byte within what came back is corruption.
            Ok(back) if msg.starts_with(&back) => tally.failures.push((
                start,
                Instant::now(),
                format!("echo: {} of {} bytes", back.len(), msg.len()),
            )),
            Ok(back) => tally
                .corrupt
                .push(format!("echo {i}: {} bytes differ", back.len())),
            Err(e) => tally
                .failures
                .push((start, Instant::now(), format!("echo: {e}"))),
        }
        done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
    tally
}

/// What a paced HTTP client saw.
#[derive(Default)]
pub struct Paced {
    pub ok: u64,
    pub errors: Vec<String>,
    pub backends: BTreeMap<String, u64>,
}

/// `count` GETs of the built-in app's `hello from NAME` at `interval` (catching up, not skipping, when behind), on keep-alive
/// connections replaced every `per_connection` requests; gives up at `deadline`.
pub fn paced_gets(
    addr: SocketAddr,
    count: u64,
    interval: Duration,
    per_connection: u64,
    deadline: Instant,
) -> Paced {
    let mut seen = Paced::default();
    let start = Instant::now();
    let mut client: Option<HttpClient> = None;
    for i in 0..count {
        if Instant::now() > deadline {
            seen.errors
                .push(format!("deadline passed after {i} of {count} requests"));
            break;
        }
        if let Some(wait) = (start + interval * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if i % per_connection == 0 {
            client = None;
        }
        let result = match client.take() {
            Some(c) => Ok(c),
            None => HttpClient::connect(addr, Duration::from_secs(10)),
        }
        .and_then(|mut c| c.get().map(|body| (c, body)));
        match result {
            Ok((c, body)) => {
                client = Some(c);
                match body
                    .strip_prefix("hello from ")
                    .and_then(|b| b.strip_suffix('\n'))
                {
                    Some(name) => {
                        seen.ok += 1;
                        *seen.backends.entry(name.to_string()).or_default() += 1;
                    }
                    _ => seen.errors.push(format!("request {i}: body {body:?}")),
                }
            }
            Err(e) => seen.errors.push(format!("request {i}: {e}")),
        }
    }
    seen
}

/// Opens `n` connections to `addr` from inside `pod` and waits until its sidecar relays them
/// all. In batches of 100, each relayed before the next: the test app's accept backlog (128)
/// and its thread per connection cannot absorb thousands of connects at once, and each
/// dropped SYN would cost a 1 s retransmission.
pub fn open_relayed(pod: &Pod, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let before = active_connections(pod).unwrap() as usize;
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(100);
        let opened = conns.len();
        let more: Vec<TcpStream> = pod
            .netns()
            .run(move || {
                (0..batch)
                    .map(|i| {
                        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                            .unwrap_or_else(|e| panic!("connection {} of {n}: {e}", opened + i))
                    })
                    .collect()
            })
            .unwrap();
        conns.extend(more);
        wait_active(pod, (before + conns.len()) as f64, Duration::from_secs(30));
    }
    conns
}
