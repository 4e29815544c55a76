//! Retries (Istio's `retries`, and its default policy when a route has none), fault
//! injection's dice, and gRPC status reading — the per-request decisions around attempts.

use std::time::{Duration, Instant};

use isthmus_config::{Abort, HttpRoute, RetryOn, RetryPolicy};

use super::h1::Header;
use super::local::{header, Local};
use super::upstream::Failure;
use crate::telemetry::ResponseFlag;

/// Envoy's retry back-off: a random wait up to base × 2^retry, capped at 10 × base; the base
/// is the route's `retries.backoff`, else 25 ms.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The attempts of one request.
pub struct Attempts<'r> {
    policy: Option<&'r RetryPolicy>,
    /// Retries left.
    left: u32,
    retries: u32,
    replayable: bool,
    /// The per-try timeout was the earlier deadline of the current attempt.
    per_try_binding: bool,
    /// One free retry on a new connection when a pooled one turned out closed.
    stale_retried: bool,
}

impl<'r> Attempts<'r> {
    /// `replayable`: the request body can be sent again. Protocol switches are never retried.
    pub fn new(route: Option<&'r HttpRoute>, replayable: bool, upgrade: bool) -> Self {
        let policy = route.map(|r| &r.retries);
        Attempts {
            policy,
            left: if upgrade {
                0
            } else {
                policy.map_or(0, |p| p.attempts)
            },
            retries: 0,
            replayable,
            per_try_binding: false,
            stale_retried: false,
        }
    }

    /// The deadline of the next attempt: the per-try timeout, or the route's, whichever comes
    /// first.
    pub fn deadline(&mut self, route: Option<Instant>) -> Option<Instant> {
        let per_try = self
            .policy
            .and_then(|p| p.per_try_timeout)
            .map(|t| Instant::now() + t);
        self.per_try_binding = match (per_try, route) {
            (Some(p), Some(r)) => p < r,
            (Some(_), None) => true,
            _ => false,
        };
        match (per_try, route) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        }
    }

    pub fn retried(&self) -> bool {
        self.retries > 0
    }

    fn on(&self) -> Option<&RetryOn> {
        self.policy.map(|p| &p.retry_on)
    }

    /// Whether a response with this status (and gRPC status, for trailers-only responses)
    /// is one the policy retries.
    pub fn was_retriable_status(&self, status: u16, grpc: Option<u32>) -> bool {
        self.on()
            .is_some_and(|on| retriable_status(on, status, grpc))
    }

    /// Counts a retry if the policy allows one after this response.
    pub fn retry_on_status(&mut self, status: u16, grpc: Option<u32>) -> bool {
        if self.left == 0 || !self.replayable || !self.was_retriable_status(status, grpc) {
            return false;
        }
        self.take()
    }

    /// Counts a retry if the policy allows one after this failure.
    pub fn retry_on_failure(&mut self, failure: &Failure) -> bool {
        if let Failure::Closed { reused: true } = failure {
            if self.replayable && !self.stale_retried {
                self.stale_retried = true;
                return true;
            }
        }
        if self.left == 0 {
            return false;
        }
        let Some(on) = self.on() else {
            return false;
        };
        let allowed = match failure {
            Failure::Connect => {
                on.connect_failure || on.reset_before_request || on.five_xx || on.gateway_error
            }
            Failure::Closed { .. } | Failure::Reset => {
                self.replayable && (on.reset || on.five_xx || on.gateway_error)
            }
            Failure::Timeout { .. } => {
                self.per_try_binding
                    && self.replayable
                    && (on.five_xx || on.gateway_error || on.reset)
            }
            Failure::Malformed => self.replayable && (on.five_xx || on.gateway_error || on.reset),
            Failure::RefusedStream => self.replayable && (on.refused_stream || on.reset),
            Failure::Downstream | Failure::BadRequestBody | Failure::NoHealthyUpstream => false,
        };
        allowed && self.take()
    }

    fn take(&mut self) -> bool {
        self.left -= 1;
        self.retries += 1;
        true
    }

    /// Waits before the next attempt.
    pub async fn backoff(&self) {
        let base = self.policy.and_then(|p| p.backoff).unwrap_or(BACKOFF_BASE);
        let cap = base
            .saturating_mul(1 << self.retries.min(8))
            .min(base.saturating_mul(10));
        let wait = cap.mul_f64(random_unit());
        tokio::time::sleep(wait).await;
    }
}

/// gRPC status codes a `retryOn` can name.
const GRPC_CANCELLED: u32 = 1;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;

/// Envoy's `retry_on` conditions applied to a response.
pub fn retriable_status(on: &RetryOn, status: u16, grpc: Option<u32>) -> bool {
    (on.five_xx && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (on.retriable_4xx && status == 409)
        || (on.retriable_status_codes && on.status_codes.contains(&status))
        || (on.envoy_ratelimited && status == 429)
        || grpc.is_some_and(|code| {
            (on.grpc_cancelled && code == GRPC_CANCELLED)
                || (on.grpc_deadline_exceeded && code == GRPC_DEADLINE_EXCEEDED)
                || (on.grpc_resource_exhausted && code == GRPC_RESOURCE_EXHAUSTED)
                || (on.grpc_internal && code == GRPC_INTERNAL)
                || (on.grpc_unavailable && code == GRPC_UNAVAILABLE)
        })
}

/// The `grpc-status` of a response head (a trailers-only gRPC response carries it there).
pub fn grpc_status_of(headers: &[Header]) -> Option<u32> {
    headers
        .iter()
        .find(|h| h.is("grpc-status"))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// True with probability `percent` / 100.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && random_unit() * 100.0 < percent)
}

/// The response a fault abort answers with.
pub fn abort_response(kind: &Abort) -> Local {
    match kind {
        Abort::Http(status) => {
            Local::new(*status, "fault filter abort", ResponseFlag::FaultInjected)
        }
        Abort::Grpc(code) => {
            let mut local = Local::new(200, Vec::new(), ResponseFlag::FaultInjected);
            local
                .headers
                .push(header("content-type", b"application/grpc"));
            local
                .headers
                .push(header("grpc-status", code.to_string().as_bytes()));
            local
                .headers
                .push(header("grpc-message", b"fault filter abort"));
            local
        }
    }
}

/// A uniform number in [0, 1) from a per-thread xorshift generator seeded from the clock and
/// the thread: fault injection and back-off need spread, not cryptography.
pub fn random_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let here = &nanos as *const u64 as u64;
            (nanos ^ here.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}
