//! The capture plan: which traffic goes through the sidecar, and the small
//! parsers (ports, CIDRs) that turn operator input into it.
//!
//! Everything here is pure so that the rule generator can be tested without
//! touching the kernel.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Ports the sidecar itself listens on. Inbound traffic to them must never be
/// redirected, or the proxy's admin, health and metrics endpoints would loop
/// back into the inbound listener.
pub const PROXY_PORTS: [u16; 6] = [15000, 15001, 15006, 15020, 15021, 15090];

/// Invalid operator input, reported before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid port {0:?}: expected a number between 1 and 65535")]
    BadPort(String),
    #[error("invalid CIDR {0:?}: expected an address like 10.0.0.0/8, fd00::/8 or 192.168.1.1")]
    BadCidr(String),
    #[error("invalid CIDR {input:?}: prefix length {prefix} is longer than {max} bits")]
    PrefixTooLong { input: String, prefix: u32, max: u8 },
    #[error("{name} must not be 0")]
    ZeroCapturePort { name: &'static str },
}

/// IP family; iptables and ip6tables are separate tables, so every rule set is
/// generated and installed once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, in the order they are installed (v4 first: it is the
    /// one whose failure is fatal).
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// Human name used in headers and messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The loopback host route, as iptables-save prints it.
    pub fn loopback(self) -> IpNet {
        match self {
            Family::V4 => IpNet::host(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Family::V6 => IpNet::host(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        }
    }

    fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address block. Host bits are cleared on construction, because that is
/// what iptables stores and prints back (`10.1.2.3/8` is saved as
/// `10.0.0.0/8`); keeping the canonical form makes our rules round-trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Builds a network, masking host bits. Fails if the prefix is too long
    /// for the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PlanError> {
        let family = family_of(&addr);
        if prefix > family.max_prefix() {
            return Err(PlanError::PrefixTooLong {
                input: format!("{addr}/{prefix}"),
                prefix: u32::from(prefix),
                max: family.max_prefix(),
            });
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// A single-address network (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = family_of(&addr).max_prefix();
        Self { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn family(&self) -> Family {
        family_of(&self.addr)
    }
}

fn family_of(addr: &IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for IpNet {
    type Err = PlanError;

    /// Accepts `addr/prefix` or a bare address (a host route).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || PlanError::BadCidr(s.to_string());
        match s.split_once('/') {
            None => s.parse::<IpAddr>().map(IpNet::host).map_err(|_| bad()),
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let max = family_of(&addr).max_prefix();
                let prefix: u32 = p.parse().map_err(|_| PlanError::PrefixTooLong {
                    input: s.to_string(),
                    prefix: u32::MAX,
                    max,
                })?;
                if prefix > u32::from(max) {
                    return Err(PlanError::PrefixTooLong {
                        input: s.to_string(),
                        prefix,
                        max,
                    });
                }
                // prefix <= 128 here, so the conversion cannot fail.
                IpNet::new(addr, u8::try_from(prefix).map_err(|_| bad())?)
            }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses one port; 0 is rejected because it can never be a destination.
pub fn parse_port(s: &str) -> Result<u16, PlanError> {
    let t = s.trim();
    match t.parse::<u16>() {
        Ok(p) if p != 0 && t.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(PlanError::BadPort(t.to_string())),
    }
}

/// Parses a comma-separated port list (`80,8080`); empty input is an empty
/// list. The result is sorted and deduplicated so the rules are stable.
pub fn parse_port_list(s: &str) -> Result<Vec<u16>, PlanError> {
    let mut ports = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_port)
        .collect::<Result<Vec<_>, _>>()?;
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Parses a comma-separated CIDR list; empty input is an empty list.
/// Duplicates are dropped, order is kept (it is the operator's rule order).
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, PlanError> {
    let mut out: Vec<IpNet> = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let net: IpNet = part.parse()?;
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// Inbound ports to capture: every port, or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortSet {
    #[default]
    All,
    List(Vec<u16>),
}

impl FromStr for PortSet {
    type Err = PlanError;

    /// `*` means all ports; otherwise a comma list (empty: capture none).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            Ok(PortSet::All)
        } else {
            parse_port_list(s).map(PortSet::List)
        }
    }
}

/// Outbound destinations to capture: everything, or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IpRanges {
    #[default]
    All,
    List(Vec<IpNet>),
}

impl FromStr for IpRanges {
    type Err = PlanError;

    /// `*` means all destinations; otherwise a comma list of CIDRs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            Ok(IpRanges::All)
        } else {
            parse_cidr_list(s).map(IpRanges::List)
        }
    }
}

/// A comma-separated port list as one CLI value (so `""` is accepted, as
/// istio-iptables users pass it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortList(pub Vec<u16>);

impl FromStr for PortList {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_port_list(s).map(PortList)
    }
}

/// A comma-separated CIDR list as one CLI value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CidrList(pub Vec<IpNet>);

impl FromStr for CidrList {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cidr_list(s).map(CidrList)
    }
}

/// Everything the rule generator needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Traffic from this uid is the proxy's own and must not be re-captured.
    pub proxy_uid: u32,
    /// Same, by gid (covers helpers running under the proxy's group).
    pub proxy_gid: u32,
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    pub inbound_ports: PortSet,
    /// Always a superset of [`PROXY_PORTS`], sorted and deduplicated.
    pub exclude_inbound_ports: Vec<u16>,
    pub outbound_ip_ranges: IpRanges,
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    pub exclude_outbound_ports: Vec<u16>,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_capture_port: 15006,
            outbound_capture_port: 15001,
            inbound_ports: PortSet::All,
            exclude_inbound_ports: with_proxy_ports(&[]),
            outbound_ip_ranges: IpRanges::All,
            exclude_outbound_ip_ranges: Vec::new(),
            exclude_outbound_ports: Vec::new(),
        }
    }
}

impl Plan {
    /// Sets the excluded inbound ports, always keeping the proxy's own.
    pub fn set_exclude_inbound_ports(&mut self, ports: &[u16]) {
        self.exclude_inbound_ports = with_proxy_ports(ports);
    }

    /// Checks the fields that the parsers cannot check on their own.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.inbound_capture_port == 0 {
            return Err(PlanError::ZeroCapturePort {
                name: "inbound capture port",
            });
        }
        if self.outbound_capture_port == 0 {
            return Err(PlanError::ZeroCapturePort {
                name: "outbound capture port",
            });
        }
        Ok(())
    }
}

/// `ports` plus [`PROXY_PORTS`], sorted and deduplicated.
pub fn with_proxy_ports(ports: &[u16]) -> Vec<u16> {
    let mut all: Vec<u16> = ports.iter().copied().chain(PROXY_PORTS).collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("valid CIDR in test")
    }

    #[test]
    fn defaults() {
        let p = Plan::default();
        assert_eq!(p.proxy_uid, 1337);
        assert_eq!(p.proxy_gid, 1337);
        assert_eq!(p.inbound_capture_port, 15006);
        assert_eq!(p.outbound_capture_port, 15001);
        assert_eq!(p.inbound_ports, PortSet::All);
        assert_eq!(
            p.exclude_inbound_ports,
            vec![15000, 15001, 15006, 15020, 15021, 15090]
        );
        assert_eq!(p.outbound_ip_ranges, IpRanges::All);
        assert!(p.exclude_outbound_ip_ranges.is_empty());
        assert!(p.exclude_outbound_ports.is_empty());
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn exclude_inbound_keeps_proxy_ports_sorted_deduped() {
        let mut p = Plan::default();
        p.set_exclude_inbound_ports(&[22, 15020, 9000, 22]);
        assert_eq!(
            p.exclude_inbound_ports,
            vec![22, 9000, 15000, 15001, 15006, 15020, 15021, 15090]
        );
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list("80,8080").unwrap(), vec![80, 8080]);
        assert_eq!(parse_port_list(" 8080 , 80,80 ").unwrap(), vec![80, 8080]);
        assert_eq!(parse_port_list("").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_port_list("80,,").unwrap(), vec![80]);
        assert_eq!(
            parse_port_list("80,http"),
            Err(PlanError::BadPort("http".into()))
        );
        assert_eq!(
            parse_port_list("65536"),
            Err(PlanError::BadPort("65536".into()))
        );
        assert_eq!(parse_port_list("0"), Err(PlanError::BadPort("0".into())));
        assert_eq!(parse_port_list("-1"), Err(PlanError::BadPort("-1".into())));
        assert_eq!(
            parse_port_list("+80"),
            Err(PlanError::BadPort("+80".into()))
        );
    }

    #[test]
    fn port_set() {
        assert_eq!("*".parse::<PortSet>().unwrap(), PortSet::All);
        assert_eq!(" * ".parse::<PortSet>().unwrap(), PortSet::All);
        assert_eq!(
            "9080,80".parse::<PortSet>().unwrap(),
            PortSet::List(vec![80, 9080])
        );
        assert_eq!("".parse::<PortSet>().unwrap(), PortSet::List(vec![]));
        assert!("*,80".parse::<PortSet>().is_err());
    }

    #[test]
    fn cidr_parse() {
        let n = net("10.0.0.0/8");
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert_eq!(n.family(), Family::V4);
        assert_eq!(n.prefix(), 8);
        assert_eq!(net("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(net("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("1.2.3.4/0").to_string(), "0.0.0.0/0");
        let v6 = net("fd00::1/8");
        assert_eq!(v6.to_string(), "fd00::/8");
        assert_eq!(v6.family(), Family::V6);
        assert_eq!(net("::1").to_string(), "::1/128");
        assert_eq!(net("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(net("::/0").to_string(), "::/0");
    }

    #[test]
    fn cidr_errors() {
        assert_eq!(
            "10.0.0.0/33".parse::<IpNet>(),
            Err(PlanError::PrefixTooLong {
                input: "10.0.0.0/33".into(),
                prefix: 33,
                max: 32
            })
        );
        assert!(matches!(
            "fd00::/129".parse::<IpNet>(),
            Err(PlanError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            "10.0.0.0/99999999999".parse::<IpNet>(),
            Err(PlanError::PrefixTooLong { .. })
        ));
        for bad in [
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/-1",
            "host",
            "",
        ] {
            assert_eq!(
                bad.parse::<IpNet>(),
                Err(PlanError::BadCidr(bad.into())),
                "{bad}"
            );
        }
        assert!(IpNet::new("10.0.0.0".parse().unwrap(), 40).is_err());
    }

    #[test]
    fn cidr_lists_and_ranges() {
        assert_eq!(
            parse_cidr_list("10.0.0.0/8, fd00::/8,10.0.0.0/8").unwrap(),
            vec![net("10.0.0.0/8"), net("fd00::/8")]
        );
        assert_eq!("*".parse::<IpRanges>().unwrap(), IpRanges::All);
        assert_eq!("".parse::<IpRanges>().unwrap(), IpRanges::List(vec![]));
        assert!("10.0.0.0/8,bogus".parse::<IpRanges>().is_err());
        assert_eq!("".parse::<CidrList>().unwrap(), CidrList(vec![]));
        assert_eq!(
            "22, 80".parse::<PortList>().unwrap(),
            PortList(vec![22, 80])
        );
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(
            PlanError::BadPort("x".into()).to_string(),
            "invalid port \"x\": expected a number between 1 and 65535"
        );
        assert_eq!(
            "10.0.0.0/40".parse::<IpNet>().unwrap_err().to_string(),
            "invalid CIDR \"10.0.0.0/40\": prefix length 40 is longer than 32 bits"
        );
    }

    #[test]
    fn validate_rejects_zero_capture_port() {
        let p = Plan {
            outbound_capture_port: 0,
            ..Plan::default()
        };
        assert!(p.validate().is_err());
    }
}
