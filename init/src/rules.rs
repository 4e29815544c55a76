//! Pure generation of `iptables-restore --noflush` input, and parsing of
//! `iptables-save` output. No I/O here: every byte we send to the kernel is
//! decided by these functions, so they are what the unit tests pin down.
//!
//! Rule text is written in the canonical form `iptables-save` prints back
//! (`-p tcp -m tcp --dport P`, `-d 127.0.0.1/32`, ...), so that what we
//! install can be compared line by line with what the kernel reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::plan::{Family, IpNet, IpRanges, Plan, PortSet, PROXY_PORTS};

/// Inbound entry chain, jumped to from PREROUTING.
pub const INBOUND_CHAIN: &str = "ISTHMUS_INBOUND";
/// Inbound REDIRECT to the proxy's inbound listener.
pub const IN_REDIRECT_CHAIN: &str = "ISTHMUS_IN_REDIRECT";
/// Outbound entry chain, jumped to from OUTPUT.
pub const OUTPUT_CHAIN: &str = "ISTHMUS_OUTPUT";
/// Outbound REDIRECT to the proxy's outbound listener.
pub const REDIRECT_CHAIN: &str = "ISTHMUS_REDIRECT";

/// Our chains, in the order they are declared and filled.
pub const OWN_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// The rule (without `-A `) that hooks inbound capture into the nat table.
pub const PREROUTING_JUMP: &str = "PREROUTING -p tcp -j ISTHMUS_INBOUND";
/// The rule (without `-A `) that hooks outbound capture into the nat table.
pub const OUTPUT_JUMP: &str = "OUTPUT -p tcp -j ISTHMUS_OUTPUT";

/// What of ours is already in a nat table, as read from `iptables-save`.
/// Needed because `--noflush` restores append: re-adding a jump would
/// duplicate it, and deleting a missing one fails the whole transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Our chains that exist.
    pub chains: BTreeSet<String>,
    /// Every rule outside our chains that jumps (or goes) to one of them,
    /// as `CHAIN rule-spec` (the `-A` line without `-A `). Kept in order and
    /// with duplicates, because each one needs its own `-D` before the chain
    /// can be deleted.
    pub jumps: Vec<String>,
}

impl Existing {
    pub fn has_chain(&self, chain: &str) -> bool {
        self.chains.contains(chain)
    }

    pub fn has_prerouting_jump(&self) -> bool {
        self.jumps.iter().any(|j| j == PREROUTING_JUMP)
    }

    pub fn has_output_jump(&self) -> bool {
        self.jumps.iter().any(|j| j == OUTPUT_JUMP)
    }

    /// True when nothing of ours is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// Iterates over the lines of the `*nat` section of `iptables-save` output.
/// Output without any table header is treated as nat (as `-t nat` prints).
fn nat_lines(save_output: &str) -> impl Iterator<Item = &str> {
    let has_tables = save_output.lines().any(|l| l.trim().starts_with('*'));
    let mut in_nat = !has_tables;
    save_output.lines().filter_map(move |raw| {
        let line = raw.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            return None;
        }
        if line == "COMMIT" {
            in_nat = in_nat && !has_tables;
            return None;
        }
        (in_nat && !line.is_empty() && !line.starts_with('#')).then_some(line)
    })
}

fn is_own(chain: &str) -> bool {
    OWN_CHAINS.contains(&chain)
}

/// Target of a rule spec (`-j X` or `-g X`), if any.
fn target(spec: &str) -> Option<&str> {
    let mut words = spec.split_whitespace();
    let mut found = None;
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            found = words.next();
        }
    }
    found
}

/// Records which of our chains and jump rules exist in `iptables-save -t nat`
/// output.
pub fn parse_existing(save_output: &str) -> Existing {
    let mut existing = Existing::default();
    for line in nat_lines(save_output) {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                if is_own(name) {
                    existing.chains.insert(name.to_string());
                }
            }
        } else if let Some(spec) = line.strip_prefix("-A ") {
            let spec = spec.trim();
            let chain = spec.split_whitespace().next().unwrap_or_default();
            if is_own(chain) {
                existing.chains.insert(chain.to_string());
            } else if target(spec).is_some_and(is_own) {
                existing.jumps.push(spec.to_string());
            }
        }
    }
    existing
}

/// `-d CIDR ` as iptables-save prints it: a /0 match is dropped entirely.
fn dest(net: &IpNet) -> String {
    if net.prefix() == 0 {
        String::new()
    } else {
        format!("-d {net} ")
    }
}

/// Inbound ports never captured: the operator's plus the proxy's own.
fn excluded_inbound(plan: &Plan) -> Vec<u16> {
    let mut ports: Vec<u16> = plan
        .exclude_inbound_ports
        .iter()
        .copied()
        .chain(PROXY_PORTS)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The `-A` lines of our own chains for one family, in install order.
fn chain_rules(plan: &Plan, family: Family) -> Vec<String> {
    let mut r = Vec::new();

    for p in excluded_inbound(plan) {
        r.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} -j RETURN"
        ));
    }
    match &plan.inbound_ports {
        PortSet::All => r.push(format!("-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}")),
        PortSet::List(ports) => {
            for p in ports {
                r.push(format!(
                    "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} -j {IN_REDIRECT_CHAIN}"
                ));
            }
        }
    }

    r.push(format!(
        "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        plan.inbound_capture_port
    ));

    r.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        plan.proxy_uid
    ));
    r.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --gid-owner {} -j RETURN",
        plan.proxy_gid
    ));
    r.push(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    r.push(format!(
        "-A {OUTPUT_CHAIN} {}-j RETURN",
        dest(&family.loopback())
    ));
    for p in &plan.exclude_outbound_ports {
        r.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {p} -j RETURN"
        ));
    }
    for net in plan
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|n| n.family() == family)
    {
        r.push(format!("-A {OUTPUT_CHAIN} {}-j RETURN", dest(net)));
    }
    match &plan.outbound_ip_ranges {
        IpRanges::All => r.push(format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")),
        IpRanges::List(nets) => {
            for net in nets.iter().filter(|n| n.family() == family) {
                r.push(format!(
                    "-A {OUTPUT_CHAIN} {}-j {REDIRECT_CHAIN}",
                    dest(net)
                ));
            }
        }
    }

    r.push(format!(
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        plan.outbound_capture_port
    ));
    r
}

/// The exact `iptables-restore --noflush` input that installs the plan for
/// one family. Declaring our chains flushes them if they exist, so running it
/// again replaces the contents instead of appending; the jumps from the
/// built-in chains are only added when `existing` does not already have them.
pub fn install_rules(plan: &Plan, family: Family, existing: &Existing) -> String {
    let mut out = String::from("*nat\n");
    for chain in OWN_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if !existing.has_prerouting_jump() {
        let _ = writeln!(out, "-A {PREROUTING_JUMP}");
    }
    if !existing.has_output_jump() {
        let _ = writeln!(out, "-A {OUTPUT_JUMP}");
    }
    for rule in chain_rules(plan, family) {
        out.push_str(&rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// The restore input that removes everything of ours that exists: first the
/// jumps into our chains, then a flush of every chain (declaring it) so that
/// references between our own chains are gone, then the deletes. Returns an
/// empty string when there is nothing to remove, so a second cleanup is a
/// no-op.
pub fn cleanup_rules(existing: &Existing) -> String {
    if existing.is_empty() {
        return String::new();
    }
    let mut out = String::from("*nat\n");
    for jump in &existing.jumps {
        let _ = writeln!(out, "-D {jump}");
    }
    let chains: Vec<&str> = OWN_CHAINS
        .into_iter()
        .filter(|c| existing.has_chain(c))
        .collect();
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for chain in &chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The installed state did not match the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("jump rule `-A {0}` is missing from the nat table")]
    MissingJump(&'static str),
    #[error("chain {chain} does not hold the expected rules:\n  expected:\n    {}\n  found:\n    {}", expected.join("\n    "), found.join("\n    "))]
    ChainMismatch {
        chain: &'static str,
        expected: Vec<String>,
        found: Vec<String>,
    },
}

/// Post-install check: the nat table (as read back with `iptables-save -t
/// nat`) must contain both jumps and exactly our rules in each of our chains.
/// Compared per chain because backends differ in the order they print chains.
pub fn verify_installed(plan: &Plan, family: Family, save_output: &str) -> Result<(), VerifyError> {
    let existing = parse_existing(save_output);
    if !existing.has_prerouting_jump() {
        return Err(VerifyError::MissingJump(PREROUTING_JUMP));
    }
    if !existing.has_output_jump() {
        return Err(VerifyError::MissingJump(OUTPUT_JUMP));
    }
    let group = |lines: Vec<String>| {
        let mut by_chain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for l in lines {
            let chain = l
                .strip_prefix("-A ")
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or_default()
                .to_string();
            by_chain.entry(chain).or_default().push(l);
        }
        by_chain
    };
    let expected = group(chain_rules(plan, family));
    let found = group(
        nat_lines(save_output)
            .filter(|l| l.starts_with("-A "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
    );
    for chain in OWN_CHAINS {
        let e = expected.get(chain).cloned().unwrap_or_default();
        let f = found.get(chain).cloned().unwrap_or_default();
        if e != f {
            return Err(VerifyError::ChainMismatch {
                chain,
                expected: e,
                found: f,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::IpNet;

    fn nets(s: &str) -> Vec<IpNet> {
        crate::plan::parse_cidr_list(s).expect("valid CIDRs in test")
    }

    const INBOUND_EXCLUDES: &str = "\
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
";

    const HEADER: &str = "\
*nat
:ISTHMUS_INBOUND - [0:0]
:ISTHMUS_IN_REDIRECT - [0:0]
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTHMUS_INBOUND
-A OUTPUT -p tcp -j ISTHMUS_OUTPUT
";

    #[test]
    fn default_plan_v4_exact() {
        let got = install_rules(&Plan::default(), Family::V4, &Existing::default());
        let want = format!(
            "{HEADER}{INBOUND_EXCLUDES}\
-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
        assert_eq!(got, want);
    }

    #[test]
    fn default_plan_v6_exact() {
        let got = install_rules(&Plan::default(), Family::V6, &Existing::default());
        let want = format!(
            "{HEADER}{INBOUND_EXCLUDES}\
-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -d ::1/128 -j RETURN
-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
        assert_eq!(got, want);
    }

    #[test]
    fn inbound_port_list_and_excludes() {
        let mut plan = Plan {
            inbound_ports: PortSet::List(vec![80, 8080]),
            inbound_capture_port: 16006,
            ..Plan::default()
        };
        plan.set_exclude_inbound_ports(&[22]);
        let got = install_rules(&plan, Family::V4, &Existing::default());
        let inbound: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("-A ISTHMUS_IN"))
            .collect();
        assert_eq!(
            inbound,
            vec![
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 80 -j ISTHMUS_IN_REDIRECT",
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 8080 -j ISTHMUS_IN_REDIRECT",
                "-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            ]
        );
    }

    #[test]
    fn proxy_ports_excluded_even_if_plan_field_was_overwritten() {
        let plan = Plan {
            exclude_inbound_ports: vec![],
            ..Plan::default()
        };
        let got = install_rules(&plan, Family::V4, &Existing::default());
        assert!(got.contains("-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15090 -j RETURN\n"));
    }

    #[test]
    fn empty_inbound_list_captures_nothing() {
        let plan = Plan {
            inbound_ports: PortSet::List(vec![]),
            ..Plan::default()
        };
        let got = install_rules(&plan, Family::V4, &Existing::default());
        assert!(!got.contains("-j ISTHMUS_IN_REDIRECT"));
        assert!(got.contains("-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n"));
    }

    fn output_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("-A ISTHMUS_OUTPUT"))
            .collect()
    }

    #[test]
    fn outbound_ranges_and_excludes_split_by_family() {
        let plan = Plan {
            proxy_uid: 1000,
            proxy_gid: 1001,
            outbound_ip_ranges: IpRanges::List(nets("10.0.0.0/8,fd00::/8,172.16.0.0/12")),
            exclude_outbound_ip_ranges: nets("10.96.0.1,2001:db8::/32"),
            exclude_outbound_ports: vec![22, 3306],
            ..Plan::default()
        };
        let v4 = install_rules(&plan, Family::V4, &Existing::default());
        assert_eq!(
            output_lines(&v4),
            vec![
                "-A ISTHMUS_OUTPUT -m owner --uid-owner 1000 -j RETURN",
                "-A ISTHMUS_OUTPUT -m owner --gid-owner 1001 -j RETURN",
                "-A ISTHMUS_OUTPUT -o lo -j RETURN",
                "-A ISTHMUS_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN",
                "-A ISTHMUS_OUTPUT -d 10.96.0.1/32 -j RETURN",
                "-A ISTHMUS_OUTPUT -d 10.0.0.0/8 -j ISTHMUS_REDIRECT",
                "-A ISTHMUS_OUTPUT -d 172.16.0.0/12 -j ISTHMUS_REDIRECT",
            ]
        );
        let v6 = install_rules(&plan, Family::V6, &Existing::default());
        assert_eq!(
            output_lines(&v6),
            vec![
                "-A ISTHMUS_OUTPUT -m owner --uid-owner 1000 -j RETURN",
                "-A ISTHMUS_OUTPUT -m owner --gid-owner 1001 -j RETURN",
                "-A ISTHMUS_OUTPUT -o lo -j RETURN",
                "-A ISTHMUS_OUTPUT -d ::1/128 -j RETURN",
                "-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN",
                "-A ISTHMUS_OUTPUT -d 2001:db8::/32 -j RETURN",
                "-A ISTHMUS_OUTPUT -d fd00::/8 -j ISTHMUS_REDIRECT",
            ]
        );
    }

    #[test]
    fn outbound_list_without_this_family_has_no_catch_all() {
        let plan = Plan {
            outbound_ip_ranges: IpRanges::List(nets("10.0.0.0/8")),
            ..Plan::default()
        };
        let v6 = install_rules(&plan, Family::V6, &Existing::default());
        assert!(!v6.contains("-j ISTHMUS_REDIRECT\n"));
        assert!(v6.contains("-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"));
    }

    #[test]
    fn zero_prefix_is_written_without_d_like_iptables_save() {
        let plan = Plan {
            outbound_ip_ranges: IpRanges::List(nets("0.0.0.0/0")),
            ..Plan::default()
        };
        let v4 = install_rules(&plan, Family::V4, &Existing::default());
        assert!(v4.contains("\n-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT\n"));
    }

    #[test]
    fn existing_jumps_are_not_added_again() {
        let existing = Existing {
            chains: OWN_CHAINS.iter().map(|c| c.to_string()).collect(),
            jumps: vec![PREROUTING_JUMP.into(), OUTPUT_JUMP.into()],
        };
        let got = install_rules(&Plan::default(), Family::V4, &existing);
        assert!(got.starts_with(
            "*nat\n:ISTHMUS_INBOUND - [0:0]\n:ISTHMUS_IN_REDIRECT - [0:0]\n\
             :ISTHMUS_OUTPUT - [0:0]\n:ISTHMUS_REDIRECT - [0:0]\n\
             -A ISTHMUS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN\n"
        ));
        assert!(!got.contains("-A PREROUTING"));
        assert!(!got.contains("-A OUTPUT"));

        let only_out = Existing {
            chains: BTreeSet::new(),
            jumps: vec![OUTPUT_JUMP.into()],
        };
        let got = install_rules(&Plan::default(), Family::V4, &only_out);
        assert!(got.contains("\n-A PREROUTING -p tcp -j ISTHMUS_INBOUND\n"));
        assert!(!got.contains("-A OUTPUT "));
    }

    const SAVE_INSTALLED: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Nov 22 02:06:04 2026
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:ISTHMUS_INBOUND - [0:0]
:ISTHMUS_IN_REDIRECT - [0:0]
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -p tcp -j ISTHMUS_INBOUND
-A OUTPUT -p tcp -j ISTHMUS_OUTPUT
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Sun Nov 22 02:06:04 2026
";

    #[test]
    fn parse_existing_full_install() {
        let e = parse_existing(SAVE_INSTALLED);
        assert_eq!(
            e.chains.iter().map(String::as_str).collect::<Vec<_>>(),
            vec![
                "ISTHMUS_INBOUND",
                "ISTHMUS_IN_REDIRECT",
                "ISTHMUS_OUTPUT",
                "ISTHMUS_REDIRECT"
            ]
        );
        assert_eq!(
            e.jumps,
            vec![PREROUTING_JUMP.to_string(), OUTPUT_JUMP.to_string()]
        );
        assert!(e.has_prerouting_jump());
        assert!(e.has_output_jump());
        assert!(!e.is_empty());
    }

    #[test]
    fn parse_existing_empty_and_foreign() {
        let fresh = "\
# Generated by iptables-save v1.8.9 on Sun Nov 22 02:06:04 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -p tcp -j OTHER_ISTHMUS_OUTPUT
COMMIT
";
        assert!(parse_existing(fresh).is_empty());
        assert!(parse_existing("").is_empty());
    }

    #[test]
    fn parse_existing_ignores_other_tables_and_finds_odd_jumps() {
        let save = "\
*filter
:ISTHMUS_OUTPUT - [0:0]
-A OUTPUT -j ISTHMUS_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:ISTHMUS_OUTPUT - [0:0]
-A OUTPUT -j ISTHMUS_OUTPUT
-A OUTPUT -p tcp -j ISTHMUS_OUTPUT
-A OUTPUT -p tcp -j ISTHMUS_OUTPUT
COMMIT
";
        let e = parse_existing(save);
        assert_eq!(e.chains.len(), 1);
        assert!(e.has_chain(OUTPUT_CHAIN));
        assert_eq!(
            e.jumps,
            vec![
                "OUTPUT -j ISTHMUS_OUTPUT".to_string(),
                OUTPUT_JUMP.to_string(),
                OUTPUT_JUMP.to_string()
            ]
        );
        assert!(!e.has_prerouting_jump());
    }

    #[test]
    fn cleanup_full() {
        let got = cleanup_rules(&parse_existing(SAVE_INSTALLED));
        assert_eq!(
            got,
            "\
*nat
-D PREROUTING -p tcp -j ISTHMUS_INBOUND
-D OUTPUT -p tcp -j ISTHMUS_OUTPUT
:ISTHMUS_INBOUND - [0:0]
:ISTHMUS_IN_REDIRECT - [0:0]
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-X ISTHMUS_INBOUND
-X ISTHMUS_IN_REDIRECT
-X ISTHMUS_OUTPUT
-X ISTHMUS_REDIRECT
COMMIT
"
        );
    }

    #[test]
    fn cleanup_partial_and_nothing() {
        assert_eq!(cleanup_rules(&Existing::default()), "");
        let partial = Existing {
            chains: [REDIRECT_CHAIN.to_string()].into_iter().collect(),
            jumps: vec![],
        };
        assert_eq!(
            cleanup_rules(&partial),
            "*nat\n:ISTHMUS_REDIRECT - [0:0]\n-X ISTHMUS_REDIRECT\nCOMMIT\n"
        );
        let dangling_jump = Existing {
            chains: BTreeSet::new(),
            jumps: vec![OUTPUT_JUMP.into()],
        };
        assert_eq!(
            cleanup_rules(&dangling_jump),
            "*nat\n-D OUTPUT -p tcp -j ISTHMUS_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn verify_accepts_round_trip_and_rejects_drift() {
        assert_eq!(
            verify_installed(&Plan::default(), Family::V4, SAVE_INSTALLED),
            Ok(())
        );
        let missing = SAVE_INSTALLED.replace("-A OUTPUT -p tcp -j ISTHMUS_OUTPUT\n", "");
        assert_eq!(
            verify_installed(&Plan::default(), Family::V4, &missing),
            Err(VerifyError::MissingJump(OUTPUT_JUMP))
        );
        let drift = SAVE_INSTALLED.replace("--to-ports 15001", "--to-ports 15999");
        assert!(matches!(
            verify_installed(&Plan::default(), Family::V4, &drift),
            Err(VerifyError::ChainMismatch {
                chain: REDIRECT_CHAIN,
                ..
            })
        ));
        // A v4 table is not a valid v6 install (loopback differs).
        assert!(verify_installed(&Plan::default(), Family::V6, SAVE_INSTALLED).is_err());
    }
}
