use std::io::{Read, Write};
use std::time::Duration;

use super::*;
use crate::test_support::{on_worker, skip_unless_io_uring};

/// Through each backend over loopback: the worker dials us, we send a message and FIN, the
/// worker echoes it back and closes its side. Exercises connect, read, write_all and
/// shutdown_write the way the relay uses them.
fn echo_roundtrip<R: Runtime>() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(b"hello, backend").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        peer.read_to_end(&mut back).unwrap();
        back
    });
    on_worker::<R, _, _, ()>(move || async move {
        let stream = R::connect(addr).await.unwrap();
        let mut buf = Vec::with_capacity(4);
        let mut echoed = Vec::new();
        loop {
            let (n, b) = stream.read(buf).await;
            if n.unwrap() == 0 {
                break;
            }
            echoed.extend_from_slice(&b);
            let (r, b) = stream.write_all(b).await;
            r.unwrap();
            buf = b;
        }
        stream.shutdown_write().unwrap();
        assert_eq!(echoed, b"hello, backend");
    });
    assert_eq!(peer.join().unwrap(), b"hello, backend");
}

/// A `read_ready` abandoned by a deadline loses nothing: the bytes that arrive afterwards are
/// all read by the next one. (An io_uring `read` dropped the same way would lose them.)
fn abandoned_read_ready_loses_nothing<R: Runtime>() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        go_rx.recv().unwrap();
        peer.write_all(b"after the deadline").unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
    });
    let go_tx = std::sync::Mutex::new(Some(go_tx));
    let go_tx = std::sync::Arc::new(go_tx);
    on_worker::<R, _, _, ()>(move || {
        let go_tx = go_tx.clone();
        async move {
            let stream = R::connect(addr).await.unwrap();
            let mut buf = Vec::with_capacity(64);
            let early = Instant::now() + Duration::from_millis(50);
            assert!(matches!(
                R::deadline(early, stream.read_ready(&mut buf)).await,
                Err(Elapsed)
            ));
            assert!(buf.is_empty());
            go_tx.lock().unwrap().take().unwrap().send(()).unwrap();
            let mut got = Vec::new();
            while got.len() < b"after the deadline".len() {
                buf.clear();
                let n = stream.read_ready(&mut buf).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf);
            }
            assert_eq!(got, b"after the deadline");
        }
    });
    peer.join().unwrap();
}

/// Vectored writes arrive whole and in order, also when they exceed the socket buffer (the
/// short-write path), and `shutdown_both` completes a read that is waiting on the socket.
fn vectored_writes_and_shutdown<R: Runtime>() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let expected = [b"head:".to_vec(), big.clone(), b":tail".to_vec()].concat();
    let peer = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        got
    });
    on_worker::<R, _, _, ()>(move || {
        let big = big.clone();
        async move {
            let stream = R::connect(addr).await.unwrap();
            let bufs = vec![b"head:".to_vec(), big, b":tail".to_vec()];
            let (r, bufs) = stream.write_all_vectored(bufs).await;
            r.unwrap();
            assert_eq!(bufs.len(), 3);
            // A read waits (the peer sends nothing); shutting the socket down ends it.
            let stream = std::rc::Rc::new(stream);
            let reader = stream.clone();
            let pending = tokio::task::spawn_local(async move {
                let (n, _) = reader.read(Vec::with_capacity(16)).await;
                n
            });
            tokio::task::yield_now().await;
            stream.shutdown_both().unwrap();
            let n = R::deadline(Instant::now() + Duration::from_secs(5), pending)
                .await
                .expect("a pending read must end when the socket is shut down")
                .unwrap();
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
    });
    assert_eq!(peer.join().unwrap(), expected);
}

#[test]
fn epoll_backend_relays_and_half_closes() {
    echo_roundtrip::<Epoll>();
}

#[test]
fn io_uring_backend_relays_and_half_closes() {
    if skip_unless_io_uring() {
        return;
    }
    echo_roundtrip::<Uring>();
}

#[test]
fn epoll_read_ready_is_cancel_safe() {
    abandoned_read_ready_loses_nothing::<Epoll>();
}

#[test]
fn io_uring_read_ready_is_cancel_safe() {
    if skip_unless_io_uring() {
        return;
    }
    abandoned_read_ready_loses_nothing::<Uring>();
}

#[test]
fn epoll_vectored_writes_and_shutdown() {
    vectored_writes_and_shutdown::<Epoll>();
}

#[test]
fn io_uring_vectored_writes_and_shutdown() {
    if skip_unless_io_uring() {
        return;
    }
    vectored_writes_and_shutdown::<Uring>();
}
