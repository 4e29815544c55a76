//! Traffic mirroring (VirtualService `mirror`/`mirrors` with `mirrorPercentage`): a copy of the
//! request goes to another cluster, fire and forget — its own task on the worker, its response
//! read and dropped, never waited on by the request it copies. As Istio does, the copy's
//! `Host` gets `-shadow` appended, so the mirror's upstream can tell copies apart. Only
//! requests whose body is already in hand (none, or a replayable one) are mirrored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_config::{Cluster, Mirror};

use super::h1::{self, Header, RequestHead};
use super::upstream::{self, Up, Upstream};
use super::{retry, Settings};
use crate::balance;

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a copy of `head` (+ `body`) to each of `mirrors` that its percentage picks.
pub fn send(
    mirrors: &[Mirror],
    head: &RequestHead,
    body: &[u8],
    settings: &Settings,
    connect_timeout: Duration,
) {
    for mirror in mirrors {
        if !retry::chance(mirror.percent) {
            continue;
        }
        let Some(addr) = endpoint(&mirror.cluster) else {
            continue;
        };
        let mut copy = head.clone();
        for h in copy.headers.iter_mut().filter(|h| h.is("host")) {
            let host = String::from_utf8_lossy(&h.value).into_owned();
            h.value = shadow(&host).into_bytes().into();
        }
        if !copy.headers.iter().any(|h| h.is("host")) {
            copy.headers.push(Header {
                name: "host".into(),
                value: shadow(&mirror.cluster.host).into_bytes().into(),
            });
        }
        let mut bytes = Vec::with_capacity(512 + body.len());
        h1::encode_request_head(&copy, &mut bytes);
        bytes.extend_from_slice(body);
        let method = copy.method.to_string();
        let settings = settings.clone();
        let up = Upstream {
            addr,
            connect_timeout,
            pool_idle: settings.pool_idle,
            max_requests: 0,
            keepalive: None,
            max_duration: None,
        };
        tokio::task::spawn_local(async move {
            let sent =
                tokio::time::timeout(MIRROR_TIMEOUT, exchange(up, bytes, method, settings)).await;
            if !matches!(sent, Ok(true)) {
                tracing::debug!(%addr, "mirrored request failed or timed out");
            }
        });
    }
}

fn endpoint(cluster: &Arc<Cluster>) -> Option<SocketAddr> {
    balance::pick(cluster, None).map(|i| cluster.endpoints[i].addr)
}

/// `host[:port]` → `host-shadow[:port]`.
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']')) =>
        {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

async fn exchange(up: Upstream, request: Vec<u8>, method: String, settings: Settings) -> bool {
    let Ok((mut conn, reused, used)) = upstream::checkout(&up).await else {
        return false;
    };
    if conn.write_all(&request).await.is_err() {
        return false;
    }
    let Ok(response) = upstream::read_response(&mut conn, &method, reused, &settings).await else {
        return false;
    };
    let idle = up.pool_idle;
    upstream::finish_discarded(
        Up::new(conn, up.addr, used, 0),
        &response,
        &method,
        &settings,
        idle,
    )
    .await;
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn shadow_hosts() {
        assert_eq!(super::shadow("reviews"), "reviews-shadow");
        assert_eq!(super::shadow("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(super::shadow("[::1]:80"), "[::1]-shadow:80");
    }
}
