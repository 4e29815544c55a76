//! The policy stage: whether a connection may proceed, before anything is dialled. Today it
//! enforces fail-closed (no config loaded: the policy is unknown); authorization
//! (AuthorizationPolicy, PeerAuthentication) plugs in here with the peer's identity.

use std::net::SocketAddr;

use isthmus_config::Text;

use crate::serve::Direction;
use crate::telemetry::ResponseFlag;

/// Who connected: the downstream peer. `identity` is the SPIFFE identity proven by mutual TLS
/// (empty until mTLS lands), which authorization and telemetry will read.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Text>,
}

/// What outbound traffic does before the first config has loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BeforeConfig {
    /// Refuse it, as Istio does (no listener until the first push): a `REGISTRY_ONLY`
    /// policy the proxy has not read yet must not be bypassed.
    Deny,
    /// Pass it to its original destination, for pods whose app must reach the network
    /// while the sidecar waits for a missing ConfigMap.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no config loaded yet: {0} traffic is refused until one is (fail closed)")]
    NoConfig(&'static str),
}

impl PolicyError {
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::NoConfig(_) => "no_config",
        }
    }

    pub fn flag(&self) -> ResponseFlag {
        match self {
            PolicyError::NoConfig(_) => ResponseFlag::NoRoute,
        }
    }
}

/// Admits or refuses a connection. Inbound is always refused without a config: the policy
/// that protects this workload cannot be known.
pub fn admit(
    direction: Direction,
    config_loaded: bool,
    before_config: BeforeConfig,
    _peer: &Peer,
) -> Result<(), PolicyError> {
    if config_loaded {
        return Ok(());
    }
    match (direction, before_config) {
        (Direction::Outbound, BeforeConfig::Passthrough) => Ok(()),
        _ => Err(PolicyError::NoConfig(direction.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_closed_until_a_config_loads() {
        let peer = Peer {
            addr: "10.0.0.1:1234".parse().unwrap(),
            identity: None,
        };
        use BeforeConfig::*;
        use Direction::*;
        assert!(admit(Inbound, false, Deny, &peer).is_err());
        assert!(admit(Inbound, false, Passthrough, &peer).is_err());
        assert!(admit(Outbound, false, Deny, &peer).is_err());
        assert!(admit(Outbound, false, Passthrough, &peer).is_ok());
        for d in [Inbound, Outbound] {
            assert!(admit(d, true, Deny, &peer).is_ok());
        }
    }
}
