//! The HTTP/2 reverse proxy of one route with the h2 crate, generic over the byte stream (any
//! tokio `AsyncRead + AsyncWrite`): per downstream connection one upstream h2 connection;
//! each request stream is forwarded as a stream on it, the response streamed back.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

pub type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

fn h2_io(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

pub async fn serve<IO, C, F>(down: IO, connect: C, spawn: fn(LocalTask)) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
    C: FnOnce() -> F,
    F: Future<Output = io::Result<IO>>,
{
    let mut conn = h2::server::handshake(down).await.map_err(h2_io)?;
    let up = connect().await?;
    let (sender, up_conn) = h2::client::handshake(up).await.map_err(h2_io)?;
    spawn(Box::pin(async move {
        let _ = up_conn.await;
    }));
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted.map_err(h2_io)?;
        let sender = sender.clone();
        spawn(Box::pin(async move {
            let _ = forward(sender, req, respond).await;
        }));
    }
    Ok(())
}

async fn forward(
    sender: SendRequest<Bytes>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let (parts, mut body) = req.into_parts();
    let end = body.is_end_stream();
    let mut sender = sender.ready().await?;
    let (response, mut up_body) = sender.send_request(Request::from_parts(parts, ()), end)?;
    if !end {
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let n = chunk.len();
            up_body.send_data(chunk, body.is_end_stream())?;
            body.flow_control().release_capacity(n)?;
        }
    }
    let (parts, mut rbody) = response.await?.into_parts();
    let end = rbody.is_end_stream();
    let mut down_body = respond.send_response(Response::from_parts(parts, ()), end)?;
    if !end {
        let mut ended = false;
        while let Some(chunk) = rbody.data().await {
            let chunk = chunk?;
            let n = chunk.len();
            ended = rbody.is_end_stream();
            down_body.send_data(chunk, ended)?;
            rbody.flow_control().release_capacity(n)?;
        }
        if !ended {
            down_body.send_data(Bytes::new(), true)?;
        }
    }
    Ok(())
}
