//! Endpoint selection. Weighted round robin driven by a per-cluster ticket: deterministic, so
//! splits are exact over a cycle and testable, and lock-free across cores.

use isthmus_config::Cluster;

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

/// Indices into `cluster.endpoints` to try for one connection, in order: the balanced pick
/// first, then the following ones, so that a refused connect can move on (at most `attempts`).
pub fn candidates(cluster: &Cluster, attempts: usize) -> Vec<usize> {
    let endpoints = &cluster.endpoints;
    if endpoints.is_empty() {
        return Vec::new();
    }
    let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
    let first = pick_weighted(cluster.next_ticket(), &weights).unwrap_or(0);
    (0..attempts.min(endpoints.len()))
        .map(|i| (first + i) % endpoints.len())
        .collect()
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
