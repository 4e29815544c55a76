//! The routing decision for one request, shared by HTTP/1 and h2: from one snapshot, the
//! VirtualService rule and destination (or a local answer), and what the attempts that follow
//! need from them — fault injection, header operations, the next endpoint by the cluster's
//! balancer, the connection-pool settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_config::{
    Cluster, HashKey, HttpAction, HttpDestination, HttpMatch, HttpRoute, LoadBalancer,
    OutboundPolicy, Snapshot,
};

use super::h1::Header;
use super::local::Local;
use super::record::Record;
use super::retry;
use super::router::{self, RequestView, Source};
use super::server::ConnInfo;
use super::upstream::Upstream;
use super::{filters, Settings};
use crate::balance;
use crate::dns;
use crate::outlier;
use crate::route::Target;
use crate::serve::{Context, Direction};
use crate::telemetry::ResponseFlag;

/// What to do with a request, decided from one snapshot.
pub(crate) enum Decision<'s> {
    Local(Local),
    Forward(Forward<'s>),
}

pub(crate) struct Forward<'s> {
    pub(crate) target: Target,
    /// `None`: the original destination.
    pub(crate) cluster: Option<&'s Arc<Cluster>>,
    pub(crate) route: Option<&'s HttpRoute>,
    pub(crate) matched: Option<&'s HttpMatch>,
    pub(crate) destination: Option<&'s HttpDestination>,
    /// The request's consistent-hash key, when the cluster's balancer hashes and the request
    /// carries the key.
    pub(crate) hash: Option<u64>,
    /// A hash cookie the request lacked, made up here: sent back as `set-cookie` so that the
    /// client's next requests stick to the same endpoint (Envoy does the same with `ttl`).
    pub(crate) set_cookie: Option<String>,
}

impl Forward<'_> {
    /// The route's fault, if it fires: a delay is waited out here (flagging `record` DI); an
    /// abort comes back as the answer to send.
    pub(crate) async fn inject_fault(&self, record: &mut Record) -> Option<Local> {
        let fault = self.route.and_then(|r| r.fault.as_ref())?;
        if let Some(delay) = &fault.delay {
            if retry::chance(delay.percent) {
                tokio::time::sleep(delay.fixed).await;
                record.flag = ResponseFlag::DelayInjected;
            }
        }
        let abort = fault.abort.as_ref()?;
        retry::chance(abort.percent).then(|| retry::abort_response(&abort.kind))
    }

    /// The route's, then the chosen destination's, request header operations.
    pub(crate) fn request_header_ops(&self, headers: &mut Vec<Header>) {
        if let Some(route) = self.route {
            filters::apply_header_ops(&route.request_headers, headers);
        }
        if let Some(d) = self.destination {
            filters::apply_header_ops(&d.request_headers, headers);
        }
    }

    /// The route's, then the chosen destination's, response header operations.
    pub(crate) fn response_header_ops(&self, headers: &mut Vec<Header>) {
        if let Some(route) = self.route {
            filters::apply_header_ops(&route.response_headers, headers);
        }
        if let Some(d) = self.destination {
            filters::apply_header_ops(&d.response_headers, headers);
        }
        if let Some(cookie) = &self.set_cookie {
            headers.push(super::local::header("set-cookie", cookie.as_bytes()));
        }
    }

    /// Where the next attempt goes: an endpoint of the cluster (with its index), or the
    /// original destination (inbound, passthrough). `None`: no healthy endpoint.
    pub(crate) fn next_endpoint(&self, dst: SocketAddr) -> Option<(SocketAddr, Option<usize>)> {
        match self.cluster {
            Some(cluster) if !cluster.dns.is_empty() => dns::pick(cluster).map(|a| (a, None)),
            Some(cluster)
                if !cluster.passthrough
                    && cluster.policy.load_balancer != LoadBalancer::Passthrough =>
            {
                balance::pick(cluster, self.hash).map(|i| (cluster.endpoints[i].addr, Some(i)))
            }
            _ => Some((dst, None)),
        }
    }

    /// Outlier detection's view of an attempt at one of the cluster's endpoints.
    pub(crate) fn observe(&self, endpoint: Option<usize>, outcome: outlier::Outcome) {
        if let (Some(cluster), Some(i)) = (self.cluster, endpoint) {
            outlier::record(cluster, i, outcome);
        }
    }

    /// The route's timeout from now.
    pub(crate) fn route_deadline(&self) -> Option<Instant> {
        self.route
            .and_then(|r| r.timeout)
            .map(|t| Instant::now() + t)
    }

    /// The upstream connection settings of the cluster's policy, defaults where unset.
    pub(crate) fn upstream(&self, addr: SocketAddr, ctx: &Context) -> Upstream {
        let pool = self.cluster.map(|c| &c.policy.connection_pool);
        Upstream {
            addr,
            connect_timeout: pool
                .and_then(|p| p.connect_timeout)
                .unwrap_or(ctx.connect.attempt_timeout),
            pool_idle: self.pool_idle(&ctx.http),
            max_requests: pool.map_or(0, |p| p.max_requests_per_connection),
            keepalive: pool.and_then(|p| p.tcp_keepalive),
            max_duration: pool.and_then(|p| p.max_connection_duration),
        }
    }

    /// How long an idle upstream connection is kept (`connectionPool.http.idleTimeout`).
    pub(crate) fn pool_idle(&self, settings: &Settings) -> Duration {
        self.cluster
            .and_then(|c| c.policy.connection_pool.http_idle_timeout)
            .unwrap_or(settings.pool_idle)
    }
}

/// Routes a request: inbound goes to the app; outbound by Host among the services on the
/// port (Istio's virtual hosts), else by the original destination's service.
pub(crate) fn decide<'s>(
    snapshot: &'s Snapshot,
    info: ConnInfo,
    target: &str,
    view: &RequestView<'_>,
    source: &Source<'_>,
) -> Decision<'s> {
    if info.direction == Direction::Inbound {
        return Decision::Forward(Forward {
            target: Target::Inbound,
            cluster: None,
            route: None,
            matched: None,
            destination: None,
            hash: None,
            set_cookie: None,
        });
    }
    let port = info.dst.port();
    let found = snapshot
        .http_service(view.authority, port, Some(source.namespace))
        .or_else(|| snapshot.service_port(info.dst));
    let Some((service, service_port)) = found else {
        return match snapshot.outbound_policy() {
            OutboundPolicy::AllowAny => Decision::Forward(Forward {
                target: Target::Unregistered("PassthroughCluster"),
                cluster: None,
                route: None,
                matched: None,
                destination: None,
                hash: None,
                set_cookie: None,
            }),
            OutboundPolicy::RegistryOnly => {
                Decision::Local(Local::new(502, Vec::new(), ResponseFlag::NoRoute))
            }
        };
    };
    let Some((route, matched)) = router::select(&service_port.http_routes, view, source) else {
        return Decision::Local(Local::failure(ResponseFlag::NoRoute));
    };
    let destinations = match &route.action {
        HttpAction::Route(d) => d,
        HttpAction::Redirect(rule) => {
            return Decision::Local(filters::redirect(rule, view.scheme, view.authority, target));
        }
        HttpAction::DirectResponse { status, body } => {
            let body = body.as_deref().unwrap_or_default().to_vec();
            let mut local = Local::new(*status, body, ResponseFlag::None);
            filters::apply_header_ops(&route.response_headers, &mut local.headers);
            return Decision::Local(local);
        }
    };
    // One destination (the common case) needs no ticket and no weights.
    let index = if destinations.len() == 1 {
        Some(0)
    } else {
        let weights: Vec<u32> = destinations.iter().map(|d| d.weight).collect();
        balance::pick_weighted(route.next_ticket(), &weights)
    };
    let Some(index) = index else {
        return Decision::Local(Local::failure(ResponseFlag::NoHealthyUpstream));
    };
    let destination = &destinations[index];
    let (hash, set_cookie) = request_hash(&destination.cluster, view, info.peer);
    Decision::Forward(Forward {
        target: Target::Service {
            service: service.clone(),
            cluster: destination.cluster.clone(),
        },
        cluster: Some(&destination.cluster),
        route: Some(route),
        matched,
        destination: Some(destination),
        hash,
        set_cookie,
    })
}

/// The consistent-hash key of a request for `cluster`'s balancer (DestinationRule
/// `consistentHash`), hashed; `None` when the balancer does not hash or the key is absent —
/// except a missing cookie with a `ttl`, which is made up here and returned as the
/// `set-cookie` value to send back.
fn request_hash(
    cluster: &Cluster,
    view: &RequestView<'_>,
    peer: SocketAddr,
) -> (Option<u64>, Option<String>) {
    let LoadBalancer::ConsistentHash(policy) = &cluster.policy.load_balancer else {
        return (None, None);
    };
    let key = match &policy.key {
        HashKey::Header(name) => view.header(name).map(str::to_string),
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => {
            let sent = view.header("cookie").and_then(|cookies| {
                cookies
                    .split(';')
                    .filter_map(|c| c.trim().split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.trim_matches('"').to_string())
            });
            match (sent, ttl) {
                (Some(value), _) => Some(value),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", (retry::random_unit() * u64::MAX as f64) as u64);
                    let mut cookie = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs());
                    cookie.push_str(&format!("; Path={}", path.as_deref().unwrap_or("/")));
                    for (k, v) in attributes {
                        match v {
                            Some(v) => cookie.push_str(&format!("; {k}={v}")),
                            None => cookie.push_str(&format!("; {k}")),
                        }
                    }
                    cookie.push_str("; HttpOnly");
                    return (Some(balance::key_hash(value.as_bytes())), Some(cookie));
                }
                (None, None) => None,
            }
        }
        HashKey::SourceIp => Some(peer.ip().to_string()),
        HashKey::QueryParameter(name) => view.query_param(name).map(str::to_string),
    };
    (key.map(|k| balance::key_hash(k.as_bytes())), None)
}
