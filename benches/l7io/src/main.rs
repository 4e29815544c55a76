//! l7io: one HTTP reverse proxy (one route: listen address -> one upstream), built once per
//! candidate I/O model for L7, single-threaded, so the models can be measured side by side.
//! See README.md and docs/ARCHITECTURE.md ("L7 I/O model: the decision and its numbers").
//!
//! usage: l7io MODE LISTEN_ADDR UPSTREAM_ADDR
//! modes: uring-h1 tokio-h1 compio-h1 uring-h2 uring-h2-strict tokio-h2 compio-h2
//! uring-h2 / compio-h2: our adapter (src/adapter.rs), write-behind flush; uring-h2-strict: the
//! same adapter with a flush that waits for the write's completion; compio-h2-compat: compio's
//! own futures-io compat layer (compio::io::compat::AsyncStream) bridged to tokio's traits;
//! uring-epoll-h2: h2 on tokio's (epoll) TcpStream inside the tokio-uring runtime, which is a
//! tokio current-thread runtime: "tokio for L7 only" on the same worker thread.

mod adapter;
mod h1;
mod h2proxy;

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

const MODES: &[&str] = &[
    "uring-h1", "tokio-h1", "compio-h1",
    "uring-h2", "uring-h2-strict", "uring-epoll-h2", "tokio-h2", "compio-h2", "compio-h2-compat",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || !MODES.contains(&args[1].as_str()) {
        eprintln!("usage: l7io MODE LISTEN_ADDR UPSTREAM_ADDR\nmodes: {}", MODES.join(" "));
        std::process::exit(2);
    }
    let listen: SocketAddr = args[2].parse().expect("listen address");
    let upstream: SocketAddr = args[3].parse().expect("upstream address");
    let std_listener = std::net::TcpListener::bind(listen).expect("bind");
    let result = match args[1].as_str() {
        "uring-h1" | "uring-h2" | "uring-h2-strict" | "uring-epoll-h2" => uring::run(&args[1], std_listener, upstream),
        "tokio-h1" | "tokio-h2" => epoll::run(&args[1], std_listener, upstream),
        _ => completion::run(&args[1], std_listener, upstream),
    };
    if let Err(e) = result {
        eprintln!("l7io: {e}");
        std::process::exit(1);
    }
}

fn ready(mode: &str, listener: &std::net::TcpListener) {
    eprintln!("l7io {mode} listening on {}", listener.local_addr().unwrap());
}

// ---------------------------------------------------------------- tokio-uring (io_uring)

mod uring {
    use super::*;
    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::net::{TcpListener, TcpStream};

    /// The ring isthmus-proxy builds (proxy/src/runtime.rs): COOP_TASKRUN + SINGLE_ISSUER.
    fn builder() -> tokio_uring::Builder {
        let mut ring = tokio_uring::uring_builder();
        ring.setup_coop_taskrun().setup_single_issuer();
        let mut builder = tokio_uring::builder();
        builder.uring_builder(&ring);
        builder
    }

    impl h1::OwnedIo for TcpStream {
        async fn read_append(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            let len = buf.len();
            let (r, slice) = TcpStream::read(self, buf.slice(len..)).await;
            (r, slice.into_inner())
        }
        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            TcpStream::write_all(self, buf).await
        }
    }

    async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn spawn(task: h2proxy::LocalTask) {
        tokio_uring::spawn(task);
    }

    pub fn run(mode: &str, std_listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let rt = tokio_uring::Runtime::new(&builder())?;
        let h2 = mode.starts_with("uring-h2");
        let flush = if mode.ends_with("strict") { adapter::Flush::Strict } else { adapter::Flush::WriteBehind };
        ready(mode, &std_listener);
        if mode == "uring-epoll-h2" {
            return rt.block_on(async move {
                std_listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                loop {
                    let (stream, _) = listener.accept().await?;
                    stream.set_nodelay(true)?;
                    tokio_uring::spawn(async move {
                        let up = || async move {
                            let s = tokio::net::TcpStream::connect(upstream).await?;
                            s.set_nodelay(true)?;
                            Ok(s)
                        };
                        let _ = h2proxy::serve(stream, up, spawn).await;
                    });
                }
            });
        }
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener);
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                if h2 {
                    tokio_uring::spawn(async move {
                        let io = |s| adapter::CompletionIo::new(adapter::Uring(Rc::new(s)), flush);
                        let up = || async move { connect(upstream).await.map(io) };
                        let _ = h2proxy::serve(io(stream), up, spawn).await;
                    });
                } else {
                    tokio_uring::spawn(async move {
                        let _ = h1::serve(stream, || connect(upstream)).await;
                    });
                }
            }
        })
    }
}

// ---------------------------------------------------------------- tokio (epoll)

mod epoll {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    impl h1::OwnedIo for TcpStream {
        async fn read_append(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            let r = self.read_buf(&mut buf).await;
            (r, buf)
        }
        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            let r = AsyncWriteExt::write_all(self, &buf).await;
            (r, buf)
        }
    }

    async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn spawn(task: h2proxy::LocalTask) {
        tokio::task::spawn_local(task);
    }

    pub fn run(mode: &str, std_listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let h2 = mode.ends_with("h2");
        std_listener.set_nonblocking(true)?;
        ready(mode, &std_listener);
        tokio::task::LocalSet::new().block_on(&rt, async move {
            let listener = TcpListener::from_std(std_listener)?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                if h2 {
                    tokio::task::spawn_local(async move {
                        let _ = h2proxy::serve(stream, || connect(upstream), spawn).await;
                    });
                } else {
                    tokio::task::spawn_local(async move {
                        let _ = h1::serve(stream, || connect(upstream)).await;
                    });
                }
            }
        })
    }
}

// ---------------------------------------------------------------- compio (io_uring driver)

mod completion {
    use super::*;
    use compio::io::compat::AsyncStream;
    use compio::io::{AsyncReadExt, AsyncWriteExt};
    use compio::net::{TcpListener, TcpStream};
    use tokio_util::compat::FuturesAsyncReadCompatExt;

    impl h1::OwnedIo for TcpStream {
        async fn read_append(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            let compio::BufResult(r, buf) = self.append(buf).await;
            (r, buf)
        }
        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            let compio::BufResult(r, buf) = AsyncWriteExt::write_all(self, buf).await;
            (r, buf)
        }
    }

    async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn spawn(task: h2proxy::LocalTask) {
        compio::runtime::spawn(task).detach();
    }

    /// compio's own futures-io compat layer, then tokio-util's futures-io -> tokio bridge.
    fn compat(s: TcpStream) -> tokio_util::compat::Compat<std::pin::Pin<Box<AsyncStream<TcpStream>>>> {
        Box::pin(AsyncStream::new(s)).compat()
    }

    pub fn run(mode: &str, std_listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let mut proactor = compio::driver::ProactorBuilder::new();
        proactor.coop_taskrun(true).single_issuer(true);
        let rt = compio::runtime::RuntimeBuilder::new().with_proactor(proactor).build()?;
        let h2 = mode.starts_with("compio-h2");
        let compat_layer = mode.ends_with("compat");
        let upstream = Rc::new(upstream);
        ready(mode, &std_listener);
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener)?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let upstream = *upstream;
                if h2 && compat_layer {
                    spawn(Box::pin(async move {
                        let up = || async move { connect(upstream).await.map(compat) };
                        let _ = h2proxy::serve(compat(stream), up, spawn).await;
                    }));
                } else if h2 {
                    spawn(Box::pin(async move {
                        let io = |s| adapter::CompletionIo::new(s, adapter::Flush::WriteBehind);
                        let up = || async move { connect(upstream).await.map(io) };
                        let _ = h2proxy::serve(io(stream), up, spawn).await;
                    }));
                } else {
                    spawn(Box::pin(async move {
                        let _ = h1::serve(stream, || connect(upstream)).await;
                    }));
                }
            }
        })
    }
}
