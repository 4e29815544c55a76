//! The sidecar's workload identity (issue 9): an ECDSA P-256 key made in memory at start and
//! never written anywhere, a CSR for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` sent to the mesh
//! CA (`POST /v1/certificates` on the controller, authenticated with the pod's projected
//! service-account token), and the issued certificate kept in an [`IdentityStore`] that is
//! swapped whole, so the data path (the mTLS slice, next) can load it per handshake without a
//! lock. Renewed at half-life with jitter, retried with capped exponential backoff, the old
//! certificate kept until a new one arrives; an expired one is dropped and reported, never used.
//!
//! [`csr`] makes the key and the request, [`client`] speaks the CA API over TLS, [`cert`] checks
//! and describes what the CA returned, [`schedule`] holds the timing rules and [`rotate`] is
//! the loop on the control runtime.

mod cert;
pub mod client;
mod csr;
mod rotate;
pub mod schedule;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::{json, Value};

pub use cert::{CertInfo, Certified};
pub use rotate::spawn;

use crate::http::access_log::rfc3339;

/// Where the sidecar's identity comes from; built from the flags once.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `host:port` of the CA (the controller's `--ca-listen`).
    pub ca_address: String,
    /// The name the CA's serving certificate must carry.
    pub server_name: String,
    /// PEM roots the CA's TLS certificate must chain to; read on every request, so a trust
    /// bundle the controller republishes is picked up.
    pub ca_root: PathBuf,
    /// The projected service-account token; read on every request (the kubelet rotates it).
    pub token_file: PathBuf,
    pub spiffe_id: String,
    /// The validity asked for (the CA caps it).
    pub validity: Duration,
    pub retry: schedule::Backoff,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the {what} `{value}` cannot be part of a SPIFFE id (empty, or contains `/`)")]
    BadSegment { what: &'static str, value: String },
}

/// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, Istio's workload identity.
pub fn spiffe_id(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<String, IdentityError> {
    for (what, value) in [
        ("trust domain", trust_domain),
        ("namespace", namespace),
        ("service account", service_account),
    ] {
        if value.is_empty() || value.contains('/') {
            return Err(IdentityError::BadSegment {
                what,
                value: value.to_string(),
            });
        }
    }
    Ok(format!(
        "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
    ))
}

/// Where issuance stands, for `/config_dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No certificate yet (first request under way or being retried).
    Pending,
    /// A certificate is held and valid.
    Issued,
    /// The held certificate expired before a renewal succeeded: it was dropped.
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Issued => "ISSUED",
            State::Expired => "EXPIRED",
        }
    }
}

/// What the issuance loop last did; replaced whole on every change.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub last_error: Option<String>,
    pub last_attempt: Option<SystemTime>,
    pub next_attempt: Option<SystemTime>,
}

/// The identity the data path loads: the current certificate (if any) and the loop's status.
pub struct IdentityStore {
    spiffe_id: String,
    certified: ArcSwapOption<Certified>,
    status: ArcSwap<Status>,
}

impl IdentityStore {
    pub fn new(spiffe_id: String) -> Arc<Self> {
        Arc::new(IdentityStore {
            spiffe_id,
            certified: ArcSwapOption::empty(),
            status: ArcSwap::from_pointee(Status {
                state: State::Pending,
                last_error: None,
                last_attempt: None,
                next_attempt: None,
            }),
        })
    }

    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The certificate to present now, or `None`: never one past its `notAfter`, even in the
    /// moment before the loop drops it.
    pub fn current(&self) -> Option<Arc<Certified>> {
        self.certified
            .load_full()
            .filter(|c| SystemTime::now() < c.info.not_after)
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.load_full()
    }

    fn set_certified(&self, certified: Option<Arc<Certified>>) {
        self.certified.store(certified);
    }

    fn update_status(&self, change: impl Fn(&mut Status)) {
        self.status.rcu(|old| {
            let mut new = Status::clone(old);
            change(&mut new);
            new
        });
    }

    /// The identity's section of `/config_dump`: never the key.
    pub fn dump(&self) -> Value {
        let status = self.status();
        let certificate = self.certified.load_full().map(|c| {
            json!({
                "spiffeId": c.info.spiffe_id,
                "serial": c.info.serial,
                "issuer": c.info.issuer,
                "notBefore": rfc3339(c.info.not_before),
                "notAfter": rfc3339(c.info.not_after),
                "chainLength": c.chain.len(),
                "trustBundleRoots": c.trust_bundle.len(),
            })
        });
        json!({
            "spiffeId": self.spiffe_id,
            "state": status.state.as_str(),
            "certificate": certificate,
            "lastError": status.last_error,
            "lastAttempt": status.last_attempt.map(rfc3339),
            "nextAttempt": status.next_attempt.map(rfc3339),
        })
    }
}

/// The identity as the rest of the proxy sees it: off (and why), or the store the loop fills.
pub enum Workload {
    Disabled(String),
    Enabled(Arc<IdentityStore>),
}

impl Workload {
    pub fn store(&self) -> Option<&Arc<IdentityStore>> {
        match self {
            Workload::Enabled(store) => Some(store),
            Workload::Disabled(_) => None,
        }
    }

    pub fn dump(&self) -> Value {
        match self {
            Workload::Enabled(store) => store.dump(),
            Workload::Disabled(why) => json!({"state": "DISABLED", "reason": why}),
        }
    }
}

/// Turns the identity on when `--ca-address` is set and the token file exists, and starts
/// its loop on the current (control) runtime. Off is not an error: outside Kubernetes, or
/// before the mTLS data path is configured, a sidecar runs without an identity.
pub fn start(args: &crate::args::Args, metrics: Arc<crate::metrics::Metrics>) -> Workload {
    let Some(ca_address) = args.ca_address.clone() else {
        return Workload::Disabled("no --ca-address (ISTHMUS_CA_ADDRESS)".into());
    };
    if !args.ca_token.exists() {
        tracing::warn!(
            token = %args.ca_token.display(),
            "workload identity off: --ca-address is set but the service-account token file \
             does not exist (is the injector's isthmus-token volume mounted?)"
        );
        return Workload::Disabled(format!("no token file {}", args.ca_token.display()));
    }
    let spiffe_id = match spiffe_id(&args.trust_domain, &args.namespace, &args.service_account) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("workload identity off: {e}");
            return Workload::Disabled(e.to_string());
        }
    };
    let settings = Settings {
        ca_address,
        server_name: args.ca_server_name.clone(),
        ca_root: args
            .ca_root
            .clone()
            .unwrap_or_else(|| args.config_dir.join(TRUST_BUNDLE_FILE)),
        token_file: args.ca_token.clone(),
        spiffe_id: spiffe_id.clone(),
        validity: Duration::from_secs(args.cert_validity_secs.max(1)),
        retry: schedule::Backoff {
            initial: Duration::from_millis(args.ca_retry_initial_ms.max(1)),
            max: Duration::from_secs(args.ca_retry_max_secs.max(1)),
        },
    };
    tracing::info!(
        %spiffe_id,
        ca = %settings.ca_address,
        root = %settings.ca_root.display(),
        "workload identity: requesting a certificate"
    );
    let store = IdentityStore::new(spiffe_id);
    spawn(settings, store.clone(), metrics);
    Workload::Enabled(store)
}

/// The trust bundle's file in the config directory (the default `--ca-root`).
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// The process's one rustls CryptoProvider: *ring*, as isthmus-ctl's kube client and CA use.
/// It builds without a C toolchain or cmake (aws-lc-rs needs both), adds less to the binary
/// than aws-lc-rs, and has the P-256 and TLS 1.3 suites the mesh needs. Installed as the
/// process default on first use so every later rustls config (the data path's too) agrees.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    if let Some(p) = rustls::crypto::CryptoProvider::get_default() {
        return p.clone();
    }
    // A concurrent install wins the race; either way the default is ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_istios_spiffe_form() {
        assert_eq!(
            spiffe_id("cluster.local", "shop", "cart").unwrap(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
    }

    #[test]
    fn segments_that_would_change_the_path_are_refused() {
        assert_eq!(
            spiffe_id("cluster.local", "shop/x", "cart"),
            Err(IdentityError::BadSegment {
                what: "namespace",
                value: "shop/x".into()
            })
        );
        assert!(spiffe_id("cluster.local", "shop", "").is_err());
        assert!(spiffe_id("", "shop", "cart").is_err());
    }

    #[test]
    fn a_fresh_store_is_pending_and_dumps_no_certificate() {
        let store = IdentityStore::new("spiffe://td/ns/a/sa/b".into());
        assert!(store.current().is_none());
        let dump = store.dump();
        assert_eq!(dump["state"], "PENDING");
        assert_eq!(dump["spiffeId"], "spiffe://td/ns/a/sa/b");
        assert!(dump["certificate"].is_null());
    }
}
