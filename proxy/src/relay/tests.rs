//! The relay on both backends over loopback: the test holds the far ends of a downstream and
//! an upstream socket (plain std sockets) and the worker relays between its own ends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;

use super::*;
use crate::drain::Drain;
use crate::runtime::{self, Epoll, Uring};
use crate::test_support::skip_unless_io_uring;

/// How a relay run ended, reduced to what the tests compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Finished,
    Failed(Side),
    IdleTimeout,
    HalfCloseTimeout,
    Drained,
}

impl From<&End> for Ended {
    fn from(end: &End) -> Self {
        match end {
            End::Finished => Ended::Finished,
            End::Failed { side, .. } => Ended::Failed(*side),
            End::IdleTimeout => Ended::IdleTimeout,
            End::HalfCloseTimeout => Ended::HalfCloseTimeout,
            End::Drained => Ended::Drained,
        }
    }
}

struct Run {
    /// The app's side of the downstream connection.
    client: TcpStream,
    /// The server's side of the upstream connection.
    server: TcpStream,
    ended: mpsc::Receiver<(Ended, Transferred, Duration)>,
    drain: Drain,
    buffers: Gauge,
}

fn accept_one(listener: &TcpListener) -> TcpStream {
    listener.accept().unwrap().0
}

/// Starts a worker of backend `R` relaying between a fresh downstream and upstream pair.
fn start<R: Runtime>(bounds: Bounds, prefix: &[u8]) -> Run {
    let down = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let (down_addr, up_addr): (SocketAddr, SocketAddr) =
        (down.local_addr().unwrap(), up.local_addr().unwrap());
    let (tx, ended) = mpsc::channel();
    let drain = Drain::new();
    let watch = drain.watch();
    let buffers = Gauge::default();
    let gauge = buffers.clone();
    let prefix = prefix.to_vec();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    runtime::start_workers(
        R::BACKEND,
        1,
        move |_| {
            let (tx, mut watch, gauge, prefix) =
                (tx.clone(), watch.clone(), gauge.clone(), prefix.clone());
            async move {
                let downstream = R::connect(down_addr).await.unwrap();
                let upstream = R::connect(up_addr).await.unwrap();
                let (c1, c2) = (Counter::default(), Counter::default());
                let started = Instant::now();
                let ends = Ends {
                    downstream: &downstream,
                    upstream: &upstream,
                    prefix,
                    to_upstream: &c1,
                    to_downstream: &c2,
                    buffers: &gauge,
                };
                let (moved, end) = relay::<R>(ends, bounds, &mut watch).await;
                let _ = tx
                    .lock()
                    .unwrap()
                    .send(((&end).into(), moved, started.elapsed()));
            }
        },
        |_, _| {},
    )
    .unwrap();
    let client = accept_one(&down);
    let server = accept_one(&up);
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    Run {
        client,
        server,
        ended,
        drain,
        buffers,
    }
}

fn bounds(idle_ms: u64, half_close_ms: u64) -> Bounds {
    Bounds {
        idle: Duration::from_millis(idle_ms),
        half_close: Duration::from_millis(half_close_ms),
    }
}

impl Run {
    fn ended(&self) -> (Ended, Transferred, Duration) {
        self.ended
            .recv_timeout(Duration::from_secs(10))
            .expect("the relay did not end")
    }
}

/// Reads until EOF or error; panics if the read timed out (a socket left open).
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the socket stayed open (read timed out) instead of closing"
                );
                return (got, Some(e.kind()));
            }
        }
    }
}

/// An upstream reset while the client is silent reaches the client at once, as a reset; the
/// relay ends with the upstream's failure. On io_uring the client's pending read used to keep
/// its socket open until the client sent something.
fn upstream_reset_reaches_the_client<R: Runtime>() {
    let mut run = start::<R>(bounds(60_000, 60_000), b"");
    run.client.write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    run.server.read_exact(&mut four).unwrap();
    socket2::SockRef::from(&run.server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let Run {
        mut client,
        server,
        ended,
        drain: _drain,
        ..
    } = run;
    drop(server);
    let (ended, moved, _) = ended.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ended, Ended::Failed(Side::Upstream));
    assert_eq!(moved.upstream, 4);
    let (_, error) = read_until_closed(&mut client);
    assert_eq!(error, Some(std::io::ErrorKind::ConnectionReset));
}

/// An upstream that resets while the client is still sending: the reset's error goes to
/// whichever system call comes first — often the relay's write to the upstream, leaving its
/// read a plain end of stream that used to be passed on as FIN (then RST). The client must see
/// a reset, never a clean close of a truncated stream.
///
/// The client's own writer can take the reset's error the same way, so its reader seeing end
/// of stream is not proof of a FIN: the TCP state at that moment is (CLOSE_WAIT after a FIN,
/// CLOSE after a reset).
fn upstream_reset_under_writes_is_a_reset<R: Runtime>() {
    // The race is the kernel's: without the fix about one run in eight showed it over 10
    // rounds, so 30 rounds.
    for round in 0..30 {
        let Run {
            client,
            mut server,
            ended,
            drain: _drain, // dropping it would end the relay as drained
            ..
        } = start::<R>(bounds(60_000, 60_000), b"");
        let mut writer = client.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..1024 {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        // The client drains the echo as it comes: the state when its read sees the end.
        let mut reader = client;
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(tcp_state(&reader)),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        // The upstream echoes, so both halves are busy when it resets.
        let mut sink = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < 4 << 20 {
            let n = match server.read(&mut sink) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other.unwrap(),
            };
            assert!(n > 0, "round {round}: the relay closed the upstream early");
            server.write_all(&sink[..n]).unwrap();
            got += n;
        }
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let (end, _, _) = ended.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(end, Ended::Failed(Side::Upstream), "round {round}");
        match receiver.join().unwrap() {
            Err(std::io::ErrorKind::ConnectionReset) | Ok(TCP_CLOSE) => {}
            other => panic!("round {round}: the client did not see a reset: {other:?}"),
        }
        sender.join().unwrap();
    }
}

const TCP_CLOSE: u8 = 7;

fn tcp_state(stream: &TcpStream) -> u8 {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: filled by the kernel.
    unsafe { info.assume_init() }.tcpi_state
}

/// The idle bound closes a silent connection (both sockets), and the half-close bound a
/// connection whose other side went quiet after one side's FIN.
fn bounds_end_quiet_connections<R: Runtime>() {
    let mut run = start::<R>(bounds(200, 60_000), b"");
    let (ended, _, after) = run.ended();
    assert_eq!(ended, Ended::IdleTimeout);
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_secs(5),
        "{after:?}"
    );
    assert_eq!(read_until_closed(&mut run.client).1, None);
    assert_eq!(read_until_closed(&mut run.server).1, None);

    let mut run = start::<R>(bounds(60_000, 200), b"");
    run.client.shutdown(std::net::Shutdown::Write).unwrap();
    let (ended, _, _) = run.ended();
    assert_eq!(ended, Ended::HalfCloseTimeout);
    assert_eq!(read_until_closed(&mut run.server), (Vec::new(), None));
}

/// Traffic keeps a connection alive past its idle bound (2.4 s of traffic, a byte every
/// 200 ms, against a 1 s bound); a half-closed connection that keeps answering (1.6 s) is not
/// cut by its 1 s bound; prefix bytes go upstream first; FIN passes each way. The gaps are far
/// below the bounds so a loaded CI machine cannot trip them.
fn activity_and_half_close_are_respected<R: Runtime>() {
    let mut run = start::<R>(bounds(1000, 1000), b"PREFIX:");
    for i in 0..12u8 {
        run.client.write_all(&[i]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut got = [0u8; 19];
    run.server.read_exact(&mut got).unwrap();
    assert_eq!(&got[..7], b"PREFIX:");
    assert_eq!(&got[7..], (0..12u8).collect::<Vec<_>>().as_slice());
    run.client.shutdown(std::net::Shutdown::Write).unwrap();
    // The server answers slowly but steadily after the client's FIN.
    for _ in 0..8 {
        run.server.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    run.server.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        read_until_closed(&mut run.client),
        (b"xxxxxxxx".to_vec(), None)
    );
    assert_eq!(read_until_closed(&mut run.server), (Vec::new(), None));
    let (ended, moved, _) = run.ended();
    assert_eq!(ended, Ended::Finished);
    assert_eq!((moved.upstream, moved.downstream), (19, 8));
}

/// Buffers grow for a bulk transfer and go back to their initial size when it pauses; the
/// drain's closing phase ends the connection.
fn buffers_shrink_when_idle_and_drain_closes<R: Runtime>() {
    let mut run = start::<R>(bounds(60_000, 60_000), b"");
    let initial = (2 * INITIAL_BUFFER) as i64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.buffers.get() != initial {
        assert!(Instant::now() < deadline, "buffers: {}", run.buffers.get());
        std::thread::sleep(Duration::from_millis(5));
    }
    let payload = vec![7u8; 16 << 20];
    let mut server = run.server.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 20];
        while got < 16 << 20 {
            got += server.read(&mut buf).unwrap();
        }
        got
    });
    run.client.write_all(&payload).unwrap();
    assert_eq!(reader.join().unwrap(), 16 << 20);
    assert!(
        run.buffers.get() > initial,
        "no buffer grew: {}",
        run.buffers.get()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.buffers.get() != initial {
        assert!(
            Instant::now() < deadline,
            "buffers stayed at {}",
            run.buffers.get()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still relays after shrinking.
    run.client.write_all(b"after").unwrap();
    let mut five = [0u8; 5];
    run.server.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"after");
    run.drain.advance(crate::drain::Phase::Closing);
    assert_eq!(run.ended().0, Ended::Drained);
    assert_eq!(read_until_closed(&mut run.client).1, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.buffers.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "buffers not released: {}",
            run.buffers.get()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

macro_rules! on_both_backends {
    ($($case:ident),*) => {
        mod epoll {
            $(#[test] fn $case() { super::$case::<super::Epoll>(); })*
        }
        mod io_uring {
            $(#[test] fn $case() {
                if super::skip_unless_io_uring() {
                    return;
                }
                super::$case::<super::Uring>();
            })*
        }
    };
}

on_both_backends!(
    upstream_reset_reaches_the_client,
    upstream_reset_under_writes_is_a_reset,
    bounds_end_quiet_connections,
    activity_and_half_close_are_respected,
    buffers_shrink_when_idle_and_drain_closes
);
