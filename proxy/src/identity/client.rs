//! The CA API client (`POST /v1/certificates`, see docs/SECURITY.md): one HTTP/1.1 request per
//! connection over TLS on the control runtime (not the data path). The CA's certificate must
//! chain to the configured root and carry the configured server name: an unverified CA is
//! never sent the token. The token and the root are read fresh for every request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Settings;

pub const PATH: &str = "/v1/certificates";
/// A whole request (connect, handshake, answer) must finish within this.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer read: a chain and a trust bundle are a few KiB.
const MAX_RESPONSE: usize = 1 << 20;

/// The CA's 200 answer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    pub cert_chain: Vec<String>,
    pub trust_bundle: String,
    #[serde(default)]
    pub not_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the CA root {path}: {why}")]
    Root { path: PathBuf, why: String },
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("cannot connect to the CA at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS with the CA failed (is its certificate signed by the configured root?): {0}")]
    Tls(std::io::Error),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA refused: {status} {error}")]
    Refused { status: u16, error: String },
    #[error("the CA's answer is malformed: {0}")]
    Malformed(String),
    #[error("cannot make the key or CSR: {0}")]
    Csr(String),
}

impl RequestError {
    /// The `result` label of `isthmus_proxy_certificate_requests_total`.
    pub fn result(&self) -> &'static str {
        match self {
            RequestError::Refused { status, .. } if *status < 500 => "denied",
            RequestError::Refused { .. }
            | RequestError::Connect { .. }
            | RequestError::Tls(_)
            | RequestError::Timeout(_) => "unavailable",
            RequestError::Malformed(_) => "invalid",
            RequestError::Token { .. }
            | RequestError::Root { .. }
            | RequestError::ServerName(_)
            | RequestError::Csr(_) => "local_error",
        }
    }
}

/// Sends `csr_pem` to the CA and returns its answer.
pub async fn request(settings: &Settings, csr_pem: &str) -> Result<Issued, RequestError> {
    match tokio::time::timeout(TIMEOUT, request_inner(settings, csr_pem)).await {
        Ok(result) => result,
        Err(_) => Err(RequestError::Timeout(TIMEOUT)),
    }
}

async fn request_inner(settings: &Settings, csr_pem: &str) -> Result<Issued, RequestError> {
    let token = read_token(&settings.token_file)?;
    let config = Arc::new(client_config(&settings.ca_root)?);
    let server_name = ServerName::try_from(settings.server_name.clone())
        .map_err(|_| RequestError::ServerName(settings.server_name.clone()))?;
    let tcp = TcpStream::connect(&settings.ca_address)
        .await
        .map_err(|source| RequestError::Connect {
            address: settings.ca_address.clone(),
            source,
        })?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(RequestError::Tls)?;
    let body = serde_json::json!({
        "csr": csr_pem,
        "validitySeconds": settings.validity.as_secs(),
    })
    .to_string();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        settings.server_name,
        body.len()
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(RequestError::Tls)?;
    tls.write_all(body.as_bytes())
        .await
        .map_err(RequestError::Tls)?;
    tls.flush().await.map_err(RequestError::Tls)?;
    let (status, body) = read_response(&mut tls).await?;
    if status != 200 {
        #[derive(Deserialize)]
        struct Failure {
            error: String,
        }
        let error = serde_json::from_slice::<Failure>(&body)
            .map(|f| f.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
        return Err(RequestError::Refused { status, error });
    }
    serde_json::from_slice(&body).map_err(|e| RequestError::Malformed(e.to_string()))
}

/// The token as the kubelet last wrote it (it rotates the file well before expiry).
fn read_token(path: &Path) -> Result<String, RequestError> {
    let token = std::fs::read_to_string(path).map_err(|source| RequestError::Token {
        path: path.to_path_buf(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(RequestError::Token {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "empty or not one line"),
        });
    }
    Ok(token.to_string())
}

/// TLS 1.3 or 1.2 to the CA, trusting only the roots in `root` (no system roots: the mesh
/// CA is private), on the process's one provider.
fn client_config(root: &Path) -> Result<rustls::ClientConfig, RequestError> {
    let root_error = |why: String| RequestError::Root {
        path: root.to_path_buf(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(root)
        .map_err(|e| root_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| root_error(e.to_string()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(root_error("no usable PEM certificate in it".into()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(super::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| root_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Reads one response: the head, then `Content-Length` bytes of body (or up to EOF without
/// it). Bounded by [`MAX_RESPONSE`].
async fn read_response(
    stream: &mut (impl AsyncReadExt + Unpin),
) -> Result<(u16, Vec<u8>), RequestError> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let mut head: Option<(u16, usize, Option<usize>)> = None;
    loop {
        if let Some((status, start, Some(len))) = head {
            if buf.len() >= start + len {
                return Ok((status, buf[start..start + len].to_vec()));
            }
        }
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A peer closing without close_notify after a delimited body is handled above;
            // here it ends an undelimited body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(RequestError::Tls(e)),
        };
        if n == 0 {
            return match head {
                Some((status, start, None)) => Ok((status, buf[start..].to_vec())),
                _ => Err(RequestError::Malformed(
                    "the connection closed before the whole answer arrived".into(),
                )),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(RequestError::Malformed(format!(
                "answer over {MAX_RESPONSE} bytes"
            )));
        }
        if head.is_none() {
            head = parse_head(&buf)?;
        }
    }
}

/// Status, body offset and `Content-Length` once the head is complete.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, Option<usize>)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(start)) => {
            let status = response.code.unwrap_or(0);
            let mut length = None;
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(RequestError::Malformed(
                        "chunked answers are not supported".into(),
                    ));
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok());
                }
            }
            Ok(Some((status, start, length)))
        }
        Err(e) => Err(RequestError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_status_body_offset_and_length() {
        let raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}";
        assert_eq!(parse_head(raw).unwrap(), Some((403, 46, Some(13))));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nConte").unwrap(), None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn refusals_and_outages_get_different_result_labels() {
        let refused = |status| RequestError::Refused {
            status,
            error: String::new(),
        };
        assert_eq!(refused(403).result(), "denied");
        assert_eq!(refused(401).result(), "denied");
        assert_eq!(refused(503).result(), "unavailable");
        assert_eq!(RequestError::Timeout(TIMEOUT).result(), "unavailable");
        assert_eq!(RequestError::Malformed(String::new()).result(), "invalid");
    }

    #[test]
    fn the_token_is_one_trimmed_line() {
        let dir = std::env::temp_dir().join(format!("isthmus-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "abc.def\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc.def");
        std::fs::write(&path, "").unwrap();
        assert!(read_token(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
