//! The monitoring port: `/healthz` (the process answers), `/readyz` (200 once the watchers
//! synced and the first reconcile completed) and `/metrics` (Prometheus text). A few GETs a
//! minute from the kubelet and Prometheus: a minimal HTTP/1.1 responder, one request per
//! connection, no HTTP library.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Status;

pub(super) async fn serve(listener: TcpListener, status: Arc<Status>, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (status, registry) = (status.clone(), registry.clone());
        tokio::spawn(async move {
            let _ = respond(stream, &status, &registry).await;
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    status: &Status,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head only; a body (there should be none) is ignored.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/healthz") => (200, "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if status.ready() => (200, "text/plain", "ready\n".to_owned()),
        ("GET", "/readyz") => (
            503,
            "text/plain",
            "not ready: watchers not synced or first reconcile not done\n".to_owned(),
        ),
        ("GET", "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (500, "text/plain", "encoding metrics failed\n".to_owned()),
            }
        }
        _ => (
            404,
            "text/plain",
            "not found: /healthz /readyz /metrics\n".to_owned(),
        ),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
