//! Endpoint selection by the cluster's DestinationRule `loadBalancer`, around endpoints that
//! outlier detection has ejected. Round robin is driven by a per-cluster ticket (deterministic,
//! exact over a cycle, lock-free across cores); least request is power of two choices over
//! requests in flight (Istio's default); random; consistent hash by ring or Maglev table.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

use isthmus_config::{now_ms, Cluster, ClusterLoad, HashAlgorithm, LoadBalancer};

use crate::http::retry::random_unit;

/// Index into `weights` for ticket `ticket`: each index owns a run of `weight` consecutive
/// tickets in every cycle of `sum(weights)`. `None` when every weight is zero or there are none.
pub fn pick_weighted(ticket: usize, weights: &[u32]) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut slot = ticket as u64 % total;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if slot < w {
            return Some(i);
        }
        slot -= w;
    }
    None
}

/// The endpoints' weights with ejected ones at zero — unless outlier detection is suspended
/// because too few are healthy (`minHealthPercent`), then every endpoint counts.
fn healthy_weights(cluster: &Cluster) -> Vec<u32> {
    let load = cluster.load();
    let now = now_ms();
    let weights: Vec<u32> = cluster
        .endpoints
        .iter()
        .zip(load.endpoints.iter())
        .map(|(e, l)| {
            if l.is_ejected(now) {
                0
            } else {
                e.weight.max(1)
            }
        })
        .collect();
    let healthy = weights.iter().filter(|w| **w > 0).count();
    let min_health = cluster
        .policy
        .outlier_detection
        .as_ref()
        .map_or(0, |o| o.min_health_percent as usize);
    if healthy * 100 < min_health * weights.len() {
        return cluster.endpoints.iter().map(|e| e.weight.max(1)).collect();
    }
    weights
}

/// The endpoint for one request or connection. `hash`: the request's consistent-hash key,
/// when the policy hashes and the request carries the key (else a random endpoint, as Envoy).
pub fn pick(cluster: &Cluster, hash: Option<u64>) -> Option<usize> {
    let n = cluster.endpoints.len();
    if n == 0 {
        return None;
    }
    // The common case — equal weights, no outlier detection — needs no weight list.
    let uniform = cluster.policy.outlier_detection.is_none()
        && cluster.endpoints.iter().all(|e| e.weight <= 1);
    if uniform {
        let random = || ((random_unit() * n as f64) as usize).min(n - 1);
        match &cluster.policy.load_balancer {
            LoadBalancer::RoundRobin | LoadBalancer::Passthrough => {
                return Some(cluster.next_ticket() % n)
            }
            LoadBalancer::Random => return Some(random()),
            LoadBalancer::LeastRequest => {
                let (a, b) = (random(), random());
                let active = |i: usize| {
                    cluster.load().endpoints[i]
                        .active_requests
                        .load(Ordering::Relaxed)
                };
                return Some(if active(b) < active(a) { b } else { a });
            }
            LoadBalancer::ConsistentHash(_) => {}
        }
    }
    let weights = healthy_weights(cluster);
    match &cluster.policy.load_balancer {
        LoadBalancer::RoundRobin | LoadBalancer::Passthrough => {
            pick_weighted(cluster.next_ticket(), &weights)
        }
        LoadBalancer::Random => random_weighted(&weights),
        LoadBalancer::LeastRequest => least_request(cluster.load(), &weights),
        LoadBalancer::ConsistentHash(policy) => match hash {
            Some(h) => by_hash(cluster, &policy.algorithm, h, &weights),
            None => random_weighted(&weights),
        },
    }
}

fn random_weighted(weights: &[u32]) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    pick_weighted((random_unit() * total as f64) as usize, weights)
}

/// Power of two choices: two random endpoints (by weight), the one with fewer requests in
/// flight.
fn least_request(load: &ClusterLoad, weights: &[u32]) -> Option<usize> {
    let a = random_weighted(weights)?;
    let b = random_weighted(weights)?;
    let active = |i: usize| load.endpoints[i].active_requests.load(Ordering::Relaxed);
    Some(if active(b) < active(a) { b } else { a })
}

/// Consistent hashing: the ring (or Maglev table) position of `hash`, moving on past ejected
/// endpoints so that only their share of keys moves.
fn by_hash(
    cluster: &Cluster,
    algorithm: &HashAlgorithm,
    hash: u64,
    weights: &[u32],
) -> Option<usize> {
    if weights.iter().all(|w| *w == 0) {
        return None;
    }
    let table = cluster
        .load()
        .hash_table
        .get_or_init(|| build_table(cluster, algorithm));
    if table.is_empty() {
        return None;
    }
    let start = match algorithm {
        HashAlgorithm::RingHash { .. } => table.partition_point(|(h, _)| *h < hash) % table.len(),
        HashAlgorithm::Maglev { .. } => (hash % table.len() as u64) as usize,
    };
    (0..table.len())
        .map(|k| table[(start + k) % table.len()].1 as usize)
        .find(|&i| weights[i] > 0)
}

fn hash_of(value: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The hash of a request's key (a header value, cookie, source address or query parameter).
pub fn key_hash(key: &[u8]) -> u64 {
    hash_of(key)
}

fn build_table(cluster: &Cluster, algorithm: &HashAlgorithm) -> Box<[(u64, u32)]> {
    let n = cluster.endpoints.len();
    let total: u64 = cluster
        .endpoints
        .iter()
        .map(|e| u64::from(e.weight.max(1)))
        .sum();
    match *algorithm {
        HashAlgorithm::RingHash { minimum_ring_size } => {
            // Each endpoint gets a share of the ring's points by weight (Envoy's ring hash).
            let size = minimum_ring_size.max(n as u64);
            let mut ring = Vec::with_capacity(size as usize + n);
            for (i, e) in cluster.endpoints.iter().enumerate() {
                let points = (size * u64::from(e.weight.max(1))).div_ceil(total);
                for k in 0..points {
                    ring.push((hash_of((e.addr, k)), i as u32));
                }
            }
            ring.sort_unstable();
            ring.into_boxed_slice()
        }
        HashAlgorithm::Maglev { table_size } => {
            // Maglev (Eisenbud et al., NSDI '16): each endpoint fills the table through its own
            // permutation, in turns weighted by its weight.
            let m = table_size.max(n as u64 + 1) as usize;
            let perms: Vec<(usize, usize)> = cluster
                .endpoints
                .iter()
                .map(|e| {
                    let offset = (hash_of((e.addr, "offset")) % m as u64) as usize;
                    let skip = (hash_of((e.addr, "skip")) % (m as u64 - 1)) as usize + 1;
                    (offset, skip)
                })
                .collect();
            let mut next = vec![0usize; n];
            let mut table: Vec<Option<u32>> = vec![None; m];
            let mut filled = 0;
            let max_weight = cluster
                .endpoints
                .iter()
                .map(|e| e.weight.max(1))
                .max()
                .unwrap_or(1);
            let mut credit = vec![0u64; n];
            'fill: loop {
                for i in 0..n {
                    credit[i] += u64::from(cluster.endpoints[i].weight.max(1));
                    if credit[i] < u64::from(max_weight) {
                        continue;
                    }
                    credit[i] -= u64::from(max_weight);
                    let (offset, skip) = perms[i];
                    loop {
                        let slot = (offset + next[i] * skip) % m;
                        next[i] += 1;
                        if table[slot].is_none() {
                            table[slot] = Some(i as u32);
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        break 'fill;
                    }
                }
            }
            table
                .into_iter()
                .map(|e| (0, e.expect("every slot filled")))
                .collect()
        }
    }
}

/// Indices into `cluster.endpoints` to try for one connection, in order: the balanced pick
/// first, then the following healthy ones, so that a refused connect can move on (at most
/// `attempts`).
pub fn candidates(cluster: &Cluster, attempts: usize, hash: Option<u64>) -> Vec<usize> {
    let Some(first) = pick(cluster, hash) else {
        return Vec::new();
    };
    let n = cluster.endpoints.len();
    let now = now_ms();
    let load = cluster.load();
    let mut out = vec![first];
    out.extend(
        (1..n)
            .map(|k| (first + k) % n)
            .filter(|&i| !load.endpoints[i].is_ejected(now))
            .take(attempts.saturating_sub(1)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_exactly() {
        let picks: Vec<usize> = (0..6)
            .map(|t| pick_weighted(t, &[1, 2, 3]).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 1, 2, 2, 2]);
        assert_eq!(pick_weighted(7, &[1, 2, 3]), Some(1));
        assert_eq!(pick_weighted(0, &[0, 5]), Some(1));
        assert_eq!(pick_weighted(3, &[]), None);
        assert_eq!(pick_weighted(3, &[0, 0]), None);
    }

    #[test]
    fn round_robin_with_equal_weights() {
        let picks: Vec<usize> = (0..6)
            .map(|t| pick_weighted(t, &[1, 1, 1]).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
