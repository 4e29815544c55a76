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
mod tests;
