//! When to ask the CA: renewal at half of the remaining lifetime (Istio's default grace ratio,
//! 0.5), pulled earlier by up to a tenth of it so sidecars started together do not renew
//! together; failed requests retried with capped exponential backoff.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// The largest share of the half-life by which jitter brings a renewal forward.
pub const JITTER: f64 = 0.1;

/// How long after `now` to renew a certificate valid until `not_after`. Counted from when it
/// arrived, not from its `notBefore` (which the CA backdates for clock skew). `jitter` in
/// `[0, 1)` picks the point within the jitter window.
pub fn renew_delay(now: SystemTime, not_after: SystemTime, jitter: f64) -> Duration {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let half = remaining / 2;
    half.saturating_sub(half.mul_f64(JITTER * jitter.clamp(0.0, 1.0)))
}

/// Retry delays after failed requests: `initial`, doubling, at most `max`, each shortened by
/// up to a tenth (jitter).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before retry number `failures` (1 after the first failure).
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let full = self.initial.saturating_mul(1 << doublings).min(self.max);
        full.saturating_sub(full.mul_f64(JITTER * jitter.clamp(0.0, 1.0)))
    }
}

/// A number in `[0, 1)` that differs between processes and calls (std's per-process random
/// hash keys; no RNG crate needed for jitter).
pub fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_the_remaining_life_brought_forward_by_at_most_a_tenth() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = now + Duration::from_secs(86_400);
        assert_eq!(renew_delay(now, day, 0.0), Duration::from_secs(43_200));
        assert_eq!(renew_delay(now, day, 1.0), Duration::from_secs(38_880));
        let mid = renew_delay(now, day, 0.5);
        assert!(mid > Duration::from_secs(38_880) && mid < Duration::from_secs(43_200));
        assert_eq!(
            renew_delay(now, now + Duration::from_secs(4), 0.0),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn an_expired_certificate_is_renewed_at_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            renew_delay(now, now - Duration::from_secs(1), 0.3),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_from_initial_and_stops_at_the_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=9).map(|n| b.delay(n, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(60));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(900));
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let values: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(values.iter().all(|j| (0.0..1.0).contains(j)));
        assert!(values.windows(2).any(|w| w[0] != w[1]));
    }
}
