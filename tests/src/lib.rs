//! Helpers for the end-to-end scenarios in `tests/`: prerequisites, payload patterns, metric
//! lookups, and real clients run inside pods ([`http`]: curl and h2load, [`ws`]: WebSocket,
//! [`grpc`]: the grpcio peers in `tests/peers/`). The mesh itself is
//! `isthmus_ctl::local::Mesh` — the same code the demo runs; its app is the HTTP test server.

pub mod grpc;
pub mod http;
pub mod load;
pub mod probe;
pub mod traffic;
pub mod ws;

use std::io::{Read, Write};
use std::net::TcpStream;

/// E2E tests need root (namespaces, iptables). Anywhere else they fail loudly, unless the
/// caller opts out with `ISTHMUS_SKIP_E2E=1`; then they are recorded as skipped (see
/// [`skip`]), not passed.
pub fn prerequisites() -> bool {
    if std::env::var_os("ISTHMUS_SKIP_E2E").is_some() {
        skip("ISTHMUS_SKIP_E2E is set");
        return false;
    }
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "e2e tests need root (network namespaces, iptables); set ISTHMUS_SKIP_E2E=1 to skip"
    );
    for tool in ["ip", "iptables-restore", "ip6tables-restore"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` not found: apt-get install -y iptables iproute2"
        );
    }
    true
}

/// Records the running test as skipped. libtest has no run-time skip (a test that returns
/// counts as passed), so `scripts/test.sh` sets `ISTHMUS_SKIP_LOG` and moves every test listed
/// there from "passed" to "skipped" in its closing line.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed test");
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

/// A deterministic, non-repeating-looking payload: byte `i` of the stream.
fn pattern_block() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..(1 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `total` bytes of the pattern on one thread while reading the echo on this one;
/// checks every byte comes back in order. Returns the bytes verified.
pub fn echo_exact(stream: TcpStream, total: usize) -> u64 {
    let block = pattern_block();
    // A stuck relay must fail the test, not hang CI.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let send_block = block.clone();
    let sender = std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut chunk = vec![0u8; send_block.len()];
        while sent < total {
            let n = (total - sent).min(chunk.len());
            let mib = (sent >> 20) as u8;
            for (out, b) in chunk[..n].iter_mut().zip(&send_block) {
                *out = b ^ mib;
            }
            writer.write_all(&chunk[..n]).expect("write payload");
            sent += n;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut reader = stream;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            let pos = got + i;
            let want = block[pos & ((1 << 20) - 1)] ^ ((pos >> 20) as u8);
            assert_eq!(*b, want, "byte {pos} differs");
        }
        got += n;
    }
    sender.join().expect("sender");
    assert_eq!(got, total, "echo ended early: {got} of {total} bytes");
    got as u64
}

/// Asserts that the proxy closes `stream` (end of stream or reset) within 5 s without sending
/// a byte. A read that times out fails: a connection left hanging is not "closed".
pub fn assert_closed_without_data(mut stream: TcpStream) {
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected a close, got {n} bytes: {:?}", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a close, got: {e} ({:?})", e.kind()),
    }
}

/// Sums the values of the series of `metric` whose labels include every `key="value"` given.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The counts a Binomial(`n`, `p`) falls within at 4 standard deviations (a false failure
/// about once in 16,000 runs): what a weighted split or a fault percentage is checked against.
pub fn binomial_4sigma(n: usize, p: f64) -> std::ops::RangeInclusive<usize> {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let low = (mean - 4.0 * sigma).floor().max(0.0) as usize;
    let high = (mean + 4.0 * sigma).ceil().min(n as f64) as usize;
    low..=high
}

#[cfg(test)]
mod tests {
    #[test]
    fn binomial_bounds_are_four_sigma() {
        // σ = √(1000 · 0.8 · 0.2) ≈ 12.65.
        assert_eq!(super::binomial_4sigma(1000, 0.8), 749..=851);
        assert_eq!(super::binomial_4sigma(1000, 0.5), 436..=564);
        assert_eq!(super::binomial_4sigma(10, 1.0), 10..=10);
    }
}
