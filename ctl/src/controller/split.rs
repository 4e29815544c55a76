//! A namespace's registry as one to [`MAX_SHARDS`] files that each fit a ConfigMap. Pure.
//!
//! The registry (one ServiceEntry JSON per line, [`super::registry`]) is scoped first
//! ([`super::scope`]); what remains is split into shard files `registry.json`,
//! `registry-1.json` … `registry-15.json`, one per ConfigMap (`isthmus-registry`,
//! `isthmus-registry-1` …), all mounted into one projected directory the sidecar reads whole.
//!
//! The assignment is stable under churn: a service goes to shard `hash(ns/name) mod N`, so an
//! endpoint change rewrites the one shard holding the service. `N` is a power of two chosen
//! from the total size with room to grow (shards half full on average), kept while it still
//! fits, and doubled only when a shard overflows; so it changes when the registry doubles or
//! shrinks far, not with everyday churn. A grown `N` splits each shard in two (its services go
//! to shard `k` or `k + N/2`), which the write path orders so that no service is ever missing
//! from the directory the kubelet projects.

use isthmus_config::SourceFile;
use serde::Deserialize;

use super::scope::Scope;

/// The most ConfigMaps one registry may span (the injector mounts exactly these).
pub const MAX_SHARDS: usize = 16;

/// One line of the registry: the service it describes, for assigning and scoping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub hosts: Vec<String>,
    /// The line, without its newline.
    pub line: &'a str,
    /// Where it goes: [`service_hash`] of namespace and name.
    hash: u64,
}

impl<'a> Entry<'a> {
    pub fn new(namespace: &'a str, name: &'a str, hosts: Vec<String>, line: &'a str) -> Self {
        Entry {
            namespace,
            name,
            hosts,
            line: line.trim_end_matches('\n'),
            hash: service_hash(namespace, name),
        }
    }

    /// A Kubernetes Service's entry: its one host is `<name>.<namespace>.svc.cluster.local`.
    pub fn of_service(namespace: &'a str, name: &'a str, line: &'a str) -> Self {
        let host = format!("{name}.{namespace}.{}", isthmus_config::CLUSTER_DOMAIN);
        Entry::new(namespace, name, vec![host], line)
    }

    /// Whether `scope` holds this service.
    pub fn in_scope(&self, scope: &Scope) -> bool {
        scope.admits(self.namespace, self.hosts.iter().map(String::as_str))
    }
}

/// A namespace's registry, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Shard `k`'s file, `k` from 0 (`registry.json`); one per shard, possibly empty.
    pub files: Vec<SourceFile>,
    pub services: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("registry line {line} is not a ServiceEntry with metadata.name, metadata.namespace and spec.hosts: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("the registry ({bytes} bytes, {services} services) does not fit in {MAX_SHARDS} ConfigMaps of {budget} bytes; scope it with a Sidecar's egress hosts")]
    TooLarge {
        bytes: usize,
        services: usize,
        budget: usize,
    },
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    metadata: Meta<'a>,
    #[serde(borrow)]
    spec: Hosts<'a>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    name: &'a str,
    namespace: &'a str,
}

#[derive(Deserialize)]
struct Hosts<'a> {
    #[serde(borrow)]
    hosts: Vec<&'a str>,
}

/// Reads the registry's lines: the service each describes.
pub fn entries(registry: &str) -> Result<Vec<Entry<'_>>, SplitError> {
    registry
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let head: Head = serde_json::from_str(line).map_err(|e| SplitError::Malformed {
                line: n + 1,
                reason: e.to_string(),
            })?;
            let hosts = head.spec.hosts.into_iter().map(str::to_owned).collect();
            Ok(Entry::new(
                head.metadata.namespace,
                head.metadata.name,
                hosts,
                line,
            ))
        })
        .collect()
}

/// The file name of shard `k` (shard 0 is the unsplit registry's own `registry.json`).
pub fn shard_key(k: usize) -> String {
    match k {
        0 => "registry.json".to_owned(),
        k => format!("registry-{k}.json"),
    }
}

/// The ConfigMap holding shard `k` of the registry ConfigMap `base`.
pub fn shard_config_map(base: &str, k: usize) -> String {
    match k {
        0 => base.to_owned(),
        k => format!("{base}-{k}"),
    }
}

/// Every ConfigMap a registry may span, shard 0 first: what the injector mounts.
pub fn shard_config_maps(base: &str) -> impl Iterator<Item = String> + '_ {
    (0..MAX_SHARDS).map(move |k| shard_config_map(base, k))
}

/// The shard number of a ConfigMap named `name`, if it is one of `base`'s shards.
pub fn shard_of(base: &str, name: &str) -> Option<usize> {
    if name == base {
        return Some(0);
    }
    let k: usize = name.strip_prefix(base)?.strip_prefix('-')?.parse().ok()?;
    (1..MAX_SHARDS)
        .contains(&k)
        .then_some(k)
        .filter(|k| shard_config_map(base, *k) == name)
}

/// The shard number of a file named `name`, if it is a shard's (`registry.json`,
/// `registry-K.json`).
pub fn shard_of_key(name: &str) -> Option<usize> {
    let k = if name == "registry.json" {
        0
    } else {
        name.strip_prefix("registry-")?
            .strip_suffix(".json")?
            .parse()
            .ok()?
    };
    (k < MAX_SHARDS && shard_key(k) == name).then_some(k)
}

/// Splits `entries` (in registry order, already scoped) into shards of at most `budget` bytes
/// each. `previous` is the shard count last written for this namespace (kept when it still
/// fits, so churn near a threshold does not re-split back and forth). Equal inputs give equal
/// bytes.
pub fn split<'e, 'a: 'e>(
    entries: impl IntoIterator<Item = &'e Entry<'a>>,
    budget: usize,
    previous: Option<usize>,
) -> Result<Split, SplitError> {
    let chosen: Vec<&Entry> = entries.into_iter().collect();
    let bytes: usize = chosen.iter().map(|e| e.line.len() + 1).sum();
    let too_large = || SplitError::TooLarge {
        bytes,
        services: chosen.len(),
        budget,
    };
    let mut shards = initial_shards(bytes, budget, previous);
    loop {
        let mut sizes = vec![0usize; shards];
        for entry in &chosen {
            sizes[shard_index(entry.hash, shards)] += entry.line.len() + 1;
        }
        if sizes.iter().all(|s| *s <= budget) {
            break;
        }
        if shards == MAX_SHARDS {
            return Err(too_large());
        }
        shards *= 2;
    }
    // Each shard keeps the registry's order (sorted by namespace and name): its bytes depend
    // on its services only.
    let mut texts = vec![String::new(); shards];
    for entry in &chosen {
        let text = &mut texts[shard_index(entry.hash, shards)];
        text.push_str(entry.line);
        text.push('\n');
    }
    Ok(Split {
        files: texts
            .into_iter()
            .enumerate()
            .map(|(k, text)| SourceFile::new(shard_key(k), text))
            .collect(),
        services: chosen.len(),
    })
}

/// The first shard count to try: the previous one while the shards stay between an eighth full
/// and half full on average, else the smallest power of two that makes them half full at most.
fn initial_shards(bytes: usize, budget: usize, previous: Option<usize>) -> usize {
    let budget = budget.max(1);
    let mut natural = 1;
    while natural < MAX_SHARDS && bytes.saturating_mul(2) > natural * budget {
        natural *= 2;
    }
    match previous {
        Some(p)
            if p.is_power_of_two()
                && (natural..=MAX_SHARDS).contains(&p)
                && bytes.saturating_mul(8) > p * budget =>
        {
            p
        }
        _ => natural,
    }
}

/// Shard of a service among `shards` (a power of two): doubling the count splits shard `k`
/// into `k` and `k + shards`, and moves no service between the old shards.
fn shard_index(hash: u64, shards: usize) -> usize {
    (hash % shards as u64) as usize
}

/// A stable hash of `namespace/name` (FNV-1a, finalised with splitmix64's mixer): the same in
/// every controller version and run, unlike std's.
fn service_hash(namespace: &str, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests;
