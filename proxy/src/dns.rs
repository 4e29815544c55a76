//! Endpoints of `resolution: DNS` ServiceEntries: names resolved with the pod's own resolver
//! (getaddrinfo: /etc/hosts, then the cluster DNS in /etc/resolv.conf), on a thread of their
//! own, never on a worker. Every name of the loaded config is resolved when the config
//! changes and again every refresh period (the system resolver gives no TTL; Istio's
//! `dnsRefreshRate` defaults to 60 s, ours to 30 s); the workers read the latest answers from
//! a lock-free map. A name that fails to resolve keeps its last good addresses.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use isthmus_config::{Cluster, DnsName};

use crate::state::ConfigStore;

type Answers = HashMap<DnsName, Arc<[SocketAddr]>>;

static ANSWERS: OnceLock<ArcSwap<Answers>> = OnceLock::new();

fn answers() -> &'static ArcSwap<Answers> {
    ANSWERS.get_or_init(|| ArcSwap::from_pointee(HashMap::new()))
}

/// The addresses of a DNS cluster now: every address of every name (`DNS`), or the first of
/// each (`DNS_ROUND_ROBIN`). Empty until the first resolution.
pub fn addresses(cluster: &Cluster) -> Vec<SocketAddr> {
    let answers = answers().load();
    let mut out = Vec::new();
    for name in &cluster.dns {
        if let Some(addrs) = answers.get(name) {
            let take = if name.first_only { 1 } else { addrs.len() };
            out.extend(addrs.iter().take(take).copied());
        }
    }
    out
}

/// The next address of a DNS cluster, round robin; `None` when nothing has resolved.
pub fn pick(cluster: &Cluster) -> Option<SocketAddr> {
    let addrs = addresses(cluster);
    (!addrs.is_empty()).then(|| addrs[cluster.next_ticket() % addrs.len()])
}

fn resolve(name: &DnsName) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = (name.name.as_ref(), name.port).to_socket_addrs()?.collect();
    addrs.dedup();
    Ok(addrs)
}

/// Resolves every name of the current config, now and then every `refresh`, and whenever the
/// config changes (checked every 200 ms). Runs until the process ends.
pub fn start(store: Arc<ConfigStore>, refresh: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("isthmus-dns".into())
        .spawn(move || {
            let mut version = String::new();
            let mut next = Instant::now();
            loop {
                let snapshot = store.load();
                let changed = snapshot.version() != version;
                if changed || Instant::now() >= next {
                    version = snapshot.version().to_string();
                    next = Instant::now() + refresh;
                    let names = snapshot.dns_names();
                    drop(snapshot);
                    if !names.is_empty() {
                        refresh_answers(names);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .map(drop)
}

fn refresh_answers(names: std::collections::BTreeSet<DnsName>) {
    let old = answers().load_full();
    let mut fresh = Answers::new();
    for name in names {
        match resolve(&name) {
            Ok(addrs) if !addrs.is_empty() => {
                fresh.insert(name, addrs.into());
            }
            result => {
                if let Some(last) = old.get(&name) {
                    fresh.insert(name.clone(), last.clone());
                }
                tracing::warn!(name = %name.name, "DNS resolution failed: {:?}", result.err());
            }
        }
    }
    answers().store(Arc::new(fresh));
}
