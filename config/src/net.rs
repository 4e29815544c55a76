//! A minimal IP prefix type: enough for `destinationSubnets`, `addresses` and capture ranges,
//! without a crate for twenty lines.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address with a prefix length, e.g. `10.96.0.0/12` or `fd00::/8`. A bare address is a
/// host prefix (/32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("`{0}` is not an IP address or CIDR")]
    Address(String),
    #[error("`{0}`: prefix length must be at most {1}")]
    Prefix(String, u8),
}

impl IpNet {
    pub fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    pub fn is_host(&self) -> bool {
        self.prefix == Self::max_prefix(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = prefix % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| IpNetError::Address(s.to_string()))?;
        let max = Self::max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| IpNetError::Address(s.to_string()))?,
        };
        if prefix > max {
            return Err(IpNetError::Prefix(s.to_string(), max));
        }
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let net: IpNet = "10.96.0.0/12".parse().unwrap();
        assert!(net.contains("10.100.1.2".parse().unwrap()));
        assert!(!net.contains("10.112.0.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let host: IpNet = "fd00::5".parse().unwrap();
        assert!(host.is_host());
        assert_eq!(host.to_string(), "fd00::5/128");
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "10.0.0.0/33".parse::<IpNet>(),
            Err(IpNetError::Prefix(..))
        ));
        assert!(matches!(
            "nope".parse::<IpNet>(),
            Err(IpNetError::Address(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<IpNet>(),
            Err(IpNetError::Address(_))
        ));
    }
}
