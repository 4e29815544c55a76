//! Which iptables implementation to drive. Rules must go into the backend the
//! node already uses (kube-proxy, CNI): nft and legacy tables coexist in the
//! kernel but are separate, and mixing them makes traffic bypass one of them.

use std::fmt;
use std::str::FromStr;

use crate::plan::Family;

/// An iptables backend, naming the binaries to run for each family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-restore`, ...
    pub fn restore_bin(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }

    /// `iptables-nft-save`, `ip6tables-legacy-save`, ...
    pub fn save_bin(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--iptables-backend` value: a fixed backend or detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Fixed(Backend),
}

/// `--iptables-backend` got something other than auto, nft or legacy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid iptables backend {0:?}: expected auto, nft or legacy")]
pub struct BadBackend(pub String);

impl FromStr for BackendChoice {
    type Err = BadBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "nft" => Ok(BackendChoice::Fixed(Backend::Nft)),
            "legacy" => Ok(BackendChoice::Fixed(Backend::Legacy)),
            _ => Err(BadBackend(s.to_string())),
        }
    }
}

/// Number of rules (`-A ` lines) in `iptables-save` output; the measure of
/// how much a backend is in use.
pub fn count_rules(save_output: &str) -> usize {
    save_output
        .lines()
        .filter(|l| l.trim_start().starts_with("-A "))
        .count()
}

/// Picks a backend from the rule counts of each (`None`: that backend's
/// binaries are not installed). Like Istio: the one with more rules wins,
/// a tie (including an empty node) goes to nft, and a backend whose binaries
/// are missing is never picked over one that exists.
pub fn choose_backend(legacy_rules: Option<usize>, nft_rules: Option<usize>) -> Backend {
    match (legacy_rules, nft_rules) {
        (Some(l), Some(n)) if l > n => Backend::Legacy,
        (Some(_), None) => Backend::Legacy,
        _ => Backend::Nft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names() {
        assert_eq!(Backend::Nft.restore_bin(Family::V4), "iptables-nft-restore");
        assert_eq!(
            Backend::Nft.restore_bin(Family::V6),
            "ip6tables-nft-restore"
        );
        assert_eq!(Backend::Nft.save_bin(Family::V6), "ip6tables-nft-save");
        assert_eq!(
            Backend::Legacy.restore_bin(Family::V4),
            "iptables-legacy-restore"
        );
        assert_eq!(Backend::Legacy.save_bin(Family::V4), "iptables-legacy-save");
        assert_eq!(
            Backend::Legacy.save_bin(Family::V6),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn parse_choice() {
        assert_eq!("auto".parse(), Ok(BackendChoice::Auto));
        assert_eq!("NFT".parse(), Ok(BackendChoice::Fixed(Backend::Nft)));
        assert_eq!("legacy".parse(), Ok(BackendChoice::Fixed(Backend::Legacy)));
        assert_eq!(
            "iptables".parse::<BackendChoice>(),
            Err(BadBackend("iptables".into()))
        );
    }

    #[test]
    fn detection() {
        assert_eq!(choose_backend(Some(10), Some(3)), Backend::Legacy);
        assert_eq!(choose_backend(Some(3), Some(10)), Backend::Nft);
        assert_eq!(choose_backend(Some(0), Some(0)), Backend::Nft);
        assert_eq!(choose_backend(Some(5), Some(5)), Backend::Nft);
        assert_eq!(choose_backend(Some(0), None), Backend::Legacy);
        assert_eq!(choose_backend(None, Some(0)), Backend::Nft);
        assert_eq!(choose_backend(None, None), Backend::Nft);
    }

    #[test]
    fn counts_rules() {
        let save =
            "# c\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j X\n-A OUTPUT -j Y\nCOMMIT\n";
        assert_eq!(count_rules(save), 2);
        assert_eq!(count_rules(""), 0);
    }
}
