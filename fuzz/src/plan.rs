//! The `init_plan` target: isthmus-init's flags, built the way its `main` builds them, turned
//! into the plan and the `iptables-restore` text, with the invariants an operator relies on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use isthmus_init::plan::{CidrList, IpNet, IpRanges, Plan, PlanError, PortList, PortSet};
use isthmus_init::rules::{
    self, INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, OUTPUT_JUMP, OWN_CHAINS, PREROUTING_JUMP,
    REDIRECT_CHAIN,
};
use isthmus_init::{cleanup_rules, install_rules, parse_existing, Existing, Family};

/// One comma-separated item of a list flag: mostly well-formed values (so the fuzzer reaches
/// the rule generator), sometimes arbitrary text (so it reaches the parsers' error paths).
#[derive(Arbitrary, Debug, Clone)]
pub enum Item {
    Port(u16),
    V4([u8; 4], u8),
    V6([u16; 8], u8),
    Host4([u8; 4]),
    Host6([u16; 8]),
    Blank,
    Star,
    Raw(String),
}

impl Item {
    fn render(&self) -> String {
        match self {
            Item::Port(p) => p.to_string(),
            Item::V4(a, p) => format!("{}/{p}", Ipv4Addr::from(*a)),
            Item::V6(a, p) => format!("{}/{p}", Ipv6Addr::from(*a)),
            Item::Host4(a) => Ipv4Addr::from(*a).to_string(),
            Item::Host6(a) => Ipv6Addr::from(*a).to_string(),
            Item::Blank => " ".to_string(),
            Item::Star => "*".to_string(),
            Item::Raw(s) => s.clone(),
        }
    }

    /// The port this item must parse to in a port list, `Err` if it must be rejected, `None`
    /// if no prediction is made (free text).
    fn expect_port(&self) -> Option<Result<Option<u16>, ()>> {
        match self {
            Item::Port(0) => Some(Err(())),
            Item::Port(p) => Some(Ok(Some(*p))),
            Item::Blank => Some(Ok(None)),
            Item::Raw(_) => None,
            _ => Some(Err(())),
        }
    }

    /// The network this item must parse to in a CIDR list (host bits cleared), as for
    /// [`Item::expect_port`].
    fn expect_net(&self) -> Option<Result<Option<(IpAddr, u8)>, ()>> {
        match self {
            Item::V4(a, p) if *p <= 32 => {
                let bits = u32::from_be_bytes(*a);
                let mask = if *p == 0 { 0 } else { u32::MAX << (32 - p) };
                Some(Ok(Some((Ipv4Addr::from(bits & mask).into(), *p))))
            }
            Item::V6(a, p) if *p <= 128 => {
                let bits = u128::from(Ipv6Addr::from(*a));
                let mask = if *p == 0 { 0 } else { u128::MAX << (128 - p) };
                Some(Ok(Some((Ipv6Addr::from(bits & mask).into(), *p))))
            }
            Item::Host4(a) => Some(Ok(Some((Ipv4Addr::from(*a).into(), 32)))),
            Item::Host6(a) => Some(Ok(Some((Ipv6Addr::from(*a).into(), 128)))),
            Item::Blank => Some(Ok(None)),
            Item::Raw(_) => None,
            _ => Some(Err(())),
        }
    }
}

/// One list flag's value: its items, joined with `", "` when `spaced`, else `","`.
#[derive(Arbitrary, Debug, Clone)]
pub struct List {
    pub items: Vec<Item>,
    pub spaced: bool,
}

impl List {
    pub fn render(&self) -> String {
        let sep = if self.spaced { ", " } else { "," };
        let items: Vec<String> = self.items.iter().map(Item::render).collect();
        items.join(sep)
    }

    /// `"*"` (after trimming) selects "all" for `--inbound-ports` and `--outbound-ip-ranges`.
    fn is_star(&self) -> bool {
        self.render().trim() == "*"
    }

    /// What the port list must parse to (sorted, deduplicated), if predictable.
    fn expect_ports(&self) -> Option<Result<Vec<u16>, ()>> {
        let mut out = Vec::new();
        for item in &self.items {
            match item.expect_port()? {
                Err(()) => return Some(Err(())),
                Ok(p) => out.extend(p),
            }
        }
        out.sort_unstable();
        out.dedup();
        Some(Ok(out))
    }

    /// What the CIDR list must parse to (first occurrence kept, in order), if predictable.
    fn expect_nets(&self) -> Option<Result<Vec<(IpAddr, u8)>, ()>> {
        let mut out = Vec::new();
        for item in &self.items {
            match item.expect_net()? {
                Err(()) => return Some(Err(())),
                Ok(Some(n)) if !out.contains(&n) => out.push(n),
                Ok(_) => {}
            }
        }
        Some(Ok(out))
    }
}

/// isthmus-init's command line, field for field, plus an `iptables-save` output to plan
/// against.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    pub inbound_ports: List,
    pub exclude_inbound_ports: List,
    pub outbound_ip_ranges: List,
    pub exclude_outbound_ip_ranges: List,
    pub exclude_outbound_ports: List,
    pub save_output: String,
}

/// The flags as strings, the way clap hands them to the `FromStr` impls.
pub struct Flags {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    pub inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub outbound_ip_ranges: String,
    pub exclude_outbound_ip_ranges: String,
    pub exclude_outbound_ports: String,
}

impl Input {
    pub fn flags(&self) -> Flags {
        Flags {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_capture_port: self.inbound_capture_port,
            outbound_capture_port: self.outbound_capture_port,
            inbound_ports: self.inbound_ports.render(),
            exclude_inbound_ports: self.exclude_inbound_ports.render(),
            outbound_ip_ranges: self.outbound_ip_ranges.render(),
            exclude_outbound_ip_ranges: self.exclude_outbound_ip_ranges.render(),
            exclude_outbound_ports: self.exclude_outbound_ports.render(),
        }
    }
}

/// Builds the plan exactly as `isthmus-init`'s `Args::plan` does.
pub fn build_plan(f: &Flags) -> Result<Plan, PlanError> {
    let inbound_ports: PortSet = f.inbound_ports.parse()?;
    let exclude_inbound_ports: PortList = f.exclude_inbound_ports.parse()?;
    let outbound_ip_ranges: IpRanges = f.outbound_ip_ranges.parse()?;
    let exclude_outbound_ip_ranges: CidrList = f.exclude_outbound_ip_ranges.parse()?;
    let exclude_outbound_ports: PortList = f.exclude_outbound_ports.parse()?;
    let mut plan = Plan {
        proxy_uid: f.proxy_uid,
        proxy_gid: f.proxy_gid,
        inbound_capture_port: f.inbound_capture_port,
        outbound_capture_port: f.outbound_capture_port,
        inbound_ports,
        outbound_ip_ranges,
        exclude_outbound_ip_ranges: exclude_outbound_ip_ranges.0,
        exclude_outbound_ports: exclude_outbound_ports.0,
        ..Plan::default()
    };
    plan.set_exclude_inbound_ports(&exclude_inbound_ports.0);
    plan.validate()?;
    Ok(plan)
}

/// The plan written back as flags: what `--dry-run` output lets an operator reconstruct.
fn plan_flags(plan: &Plan) -> Flags {
    let ports = |ps: &[u16]| {
        let v: Vec<String> = ps.iter().map(u16::to_string).collect();
        v.join(",")
    };
    let nets = |ns: &[IpNet]| {
        let v: Vec<String> = ns.iter().map(IpNet::to_string).collect();
        v.join(",")
    };
    Flags {
        proxy_uid: plan.proxy_uid,
        proxy_gid: plan.proxy_gid,
        inbound_capture_port: plan.inbound_capture_port,
        outbound_capture_port: plan.outbound_capture_port,
        inbound_ports: match &plan.inbound_ports {
            PortSet::All => "*".into(),
            PortSet::List(ps) => ports(ps),
        },
        exclude_inbound_ports: ports(&plan.exclude_inbound_ports),
        outbound_ip_ranges: match &plan.outbound_ip_ranges {
            IpRanges::All => "*".into(),
            IpRanges::List(ns) => nets(ns),
        },
        exclude_outbound_ip_ranges: nets(&plan.exclude_outbound_ip_ranges),
        exclude_outbound_ports: ports(&plan.exclude_outbound_ports),
    }
}

fn nets_of(ns: &[IpNet]) -> Vec<(IpAddr, u8)> {
    ns.iter().map(|n| (n.addr(), n.prefix())).collect()
}

/// Checks one input: never a panic; the accepted values are exactly the predicted ones; the
/// rules are deterministic, complete and keep the proxy's own traffic out of capture.
pub fn check(input: &Input) {
    let flags = input.flags();
    let plan = build_plan(&flags);
    check_prediction(input, &plan);

    // Whatever the flags, the save-output side must never panic.
    let existing = parse_existing(&input.save_output);
    let _ = cleanup_rules(&existing);
    if let Ok(plan) = &plan {
        for family in Family::ALL {
            let _ = install_rules(plan, family, &existing);
            let _ = rules::verify_installed(plan, family, &input.save_output);
        }
    }

    let Ok(plan) = plan else { return };
    // Written back as flags, the plan parses to itself.
    assert_eq!(build_plan(&plan_flags(&plan)).as_ref(), Ok(&plan));
    for family in Family::ALL {
        check_rules(&plan, family);
    }
}

/// A list flag's predicted value: `Some(Ok(None))` for "all" (a lone `*`, where `star` allows
/// it), `Some(Ok(Some(values)))`, `Some(Err(()))` for a rejection, `None` when unpredictable.
type Prediction<T> = Option<Result<Option<Vec<T>>, ()>>;

fn predict<T>(
    list: &List,
    star: bool,
    expect: impl Fn(&List) -> Option<Result<Vec<T>, ()>>,
) -> Prediction<T> {
    if star && list.is_star() {
        Some(Ok(None))
    } else {
        expect(list).map(|r| r.map(Some))
    }
}

/// The parsers' answer agrees with an independent reading of the items (where one is made).
fn check_prediction(input: &Input, plan: &Result<Plan, PlanError>) {
    let port_lists = [
        (&input.exclude_inbound_ports, false),
        (&input.exclude_outbound_ports, false),
        (&input.inbound_ports, true),
    ];
    let net_lists = [
        (&input.exclude_outbound_ip_ranges, false),
        (&input.outbound_ip_ranges, true),
    ];
    let ports: Vec<_> = port_lists
        .into_iter()
        .map(|(list, star)| predict(list, star, List::expect_ports))
        .collect();
    let nets: Vec<_> = net_lists
        .into_iter()
        .map(|(list, star)| predict(list, star, List::expect_nets))
        .collect();
    let capture_ok = input.inbound_capture_port != 0 && input.outbound_capture_port != 0;
    let any_err = ports.iter().any(|p| matches!(p, Some(Err(()))))
        || nets.iter().any(|n| matches!(n, Some(Err(()))));
    let all_known = ports.iter().all(Option::is_some) && nets.iter().all(Option::is_some);
    match plan {
        Err(e) => {
            assert!(
                any_err || !all_known || !capture_ok,
                "rejected valid flags: {e}"
            );
            let _ = e.to_string();
        }
        Ok(plan) => {
            assert!(!any_err && capture_ok, "accepted invalid flags: {plan:?}");
            let want_excluded_in = ports[0].clone().and_then(Result::ok).flatten();
            if let Some(mut want) = want_excluded_in {
                want.extend(isthmus_init::plan::PROXY_PORTS);
                want.sort_unstable();
                want.dedup();
                assert_eq!(plan.exclude_inbound_ports, want);
            }
            if let Some(Ok(Some(want))) = &ports[1] {
                assert_eq!(&plan.exclude_outbound_ports, want);
            }
            match (&ports[2], &plan.inbound_ports) {
                (Some(Ok(None)), got) => assert_eq!(got, &PortSet::All),
                (Some(Ok(Some(want))), got) => assert_eq!(got, &PortSet::List(want.clone())),
                _ => {}
            }
            if let Some(Ok(Some(want))) = &nets[0] {
                assert_eq!(&nets_of(&plan.exclude_outbound_ip_ranges), want);
            }
            match (&nets[1], &plan.outbound_ip_ranges) {
                (Some(Ok(None)), got) => assert_eq!(got, &IpRanges::All),
                (Some(Ok(Some(want))), IpRanges::List(got)) => assert_eq!(&nets_of(got), want),
                (Some(Ok(Some(_))), got) => panic!("expected a CIDR list, got {got:?}"),
                _ => {}
            }
        }
    }
}

/// `-d NET ` as the rules write it (nothing for a /0).
fn dest(net: &IpNet) -> String {
    if net.prefix() == 0 {
        String::new()
    } else {
        format!("-d {net} ")
    }
}

fn position(lines: &[&str], line: &str) -> usize {
    lines
        .iter()
        .position(|l| *l == line)
        .unwrap_or_else(|| panic!("missing rule {line:?} in\n{}", lines.join("\n")))
}

fn check_rules(plan: &Plan, family: Family) {
    let fresh = Existing::default();
    let text = install_rules(plan, family, &fresh);
    assert_eq!(
        text,
        install_rules(plan, family, &fresh),
        "rules not deterministic"
    );
    assert!(
        text.starts_with("*nat\n") && text.ends_with("\nCOMMIT\n"),
        "{text}"
    );
    assert!(
        text.bytes()
            .all(|b| b == b'\n' || (b' '..=b'~').contains(&b)),
        "non-printable byte in rules: {text:?}"
    );
    let lines: Vec<&str> = text.lines().collect();

    // The proxy's own traffic returns before anything in OUTPUT can redirect it.
    let uid = position(
        &lines,
        &format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
            plan.proxy_uid
        ),
    );
    let gid = position(
        &lines,
        &format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {} -j RETURN",
            plan.proxy_gid
        ),
    );
    let first_out = lines
        .iter()
        .position(|l| l.starts_with(&format!("-A {OUTPUT_CHAIN} ")))
        .expect("OUTPUT chain has rules");
    assert_eq!(
        (first_out, gid),
        (uid, uid + 1),
        "owner RETURNs must come first"
    );
    let redirect_jump = format!("-j {REDIRECT_CHAIN}");
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with(&format!("-A {OUTPUT_CHAIN} ")) && l.ends_with(&redirect_jump) {
            assert!(i > gid, "redirect before the proxy's RETURN: {l}");
        }
    }

    // Every excluded inbound port (the proxy's own always among them) returns before any
    // inbound redirect; every accepted value appears as its rule.
    let in_jump = format!("-j {IN_REDIRECT_CHAIN}");
    let first_in_redirect = lines
        .iter()
        .position(|l| l.starts_with(&format!("-A {INBOUND_CHAIN} ")) && l.ends_with(&in_jump));
    let mut expected = 4 + 2 + 2 + 4 + 2; // decls, jumps, redirects, owner/lo RETURNs, framing
    for p in &plan.exclude_inbound_ports {
        let i = position(
            &lines,
            &format!("-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} -j RETURN"),
        );
        assert!(
            first_in_redirect.is_none_or(|r| i < r),
            "port {p} excluded too late"
        );
    }
    for p in isthmus_init::plan::PROXY_PORTS {
        assert!(
            plan.exclude_inbound_ports.contains(&p),
            "proxy port {p} not excluded"
        );
    }
    expected += plan.exclude_inbound_ports.len();
    match &plan.inbound_ports {
        PortSet::All => {
            position(&lines, &format!("-A {INBOUND_CHAIN} -p tcp {in_jump}"));
            expected += 1;
        }
        PortSet::List(ports) => {
            for p in ports {
                position(
                    &lines,
                    &format!("-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} {in_jump}"),
                );
            }
            expected += ports.len();
        }
    }
    for p in &plan.exclude_outbound_ports {
        position(
            &lines,
            &format!("-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {p} -j RETURN"),
        );
    }
    expected += plan.exclude_outbound_ports.len();
    for net in plan
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|n| n.family() == family)
    {
        position(&lines, &format!("-A {OUTPUT_CHAIN} {}-j RETURN", dest(net)));
        expected += 1;
    }
    match &plan.outbound_ip_ranges {
        IpRanges::All => {
            position(&lines, &format!("-A {OUTPUT_CHAIN} {redirect_jump}"));
            expected += 1;
        }
        IpRanges::List(nets) => {
            for net in nets.iter().filter(|n| n.family() == family) {
                position(
                    &lines,
                    &format!("-A {OUTPUT_CHAIN} {}{redirect_jump}", dest(net)),
                );
                expected += 1;
            }
        }
    }
    position(
        &lines,
        &format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            plan.inbound_capture_port
        ),
    );
    position(
        &lines,
        &format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            plan.outbound_capture_port
        ),
    );
    assert_eq!(lines.len(), expected, "unexpected rules in\n{text}");

    // What was installed reads back as installed, verifies, re-installs without duplicating
    // the jumps, and cleans up completely.
    let existing = parse_existing(&text);
    assert!(existing.has_prerouting_jump() && existing.has_output_jump());
    assert!(OWN_CHAINS.iter().all(|c| existing.has_chain(c)));
    assert_eq!(rules::verify_installed(plan, family, &text), Ok(()));
    let again = install_rules(plan, family, &existing);
    let without_jumps: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| *l != format!("-A {PREROUTING_JUMP}") && *l != format!("-A {OUTPUT_JUMP}"))
        .collect();
    assert_eq!(again.lines().collect::<Vec<_>>(), without_jumps);
    let mut cleanup = format!("*nat\n-D {PREROUTING_JUMP}\n-D {OUTPUT_JUMP}\n");
    for c in OWN_CHAINS {
        cleanup.push_str(&format!(":{c} - [0:0]\n"));
    }
    for c in OWN_CHAINS {
        cleanup.push_str(&format!("-X {c}\n"));
    }
    cleanup.push_str("COMMIT\n");
    assert_eq!(cleanup_rules(&existing), cleanup);
    assert_eq!(cleanup_rules(&parse_existing("")), "");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: Vec<Item>) -> List {
        List {
            items,
            spaced: true,
        }
    }

    /// The checks pass on the flags isthmus-init is documented with, so a fuzz failure is the
    /// planner's, not the oracle's.
    #[test]
    fn documented_flags_pass_every_check() {
        let input = Input {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_capture_port: 15006,
            outbound_capture_port: 15001,
            inbound_ports: list(vec![Item::Port(9080), Item::Port(80), Item::Blank]),
            exclude_inbound_ports: list(vec![Item::Port(22), Item::Port(15020)]),
            outbound_ip_ranges: list(vec![
                Item::V4([10, 1, 2, 3], 8),
                Item::V6([0xfd00, 0, 0, 0, 0, 0, 0, 1], 8),
                Item::Host4([192, 168, 1, 1]),
            ]),
            exclude_outbound_ip_ranges: list(vec![Item::V4([0, 0, 0, 0], 0)]),
            exclude_outbound_ports: list(vec![Item::Port(5432)]),
            save_output: String::new(),
        };
        let plan = build_plan(&input.flags()).unwrap();
        assert_eq!(plan.inbound_ports, PortSet::List(vec![80, 9080]));
        check(&input);
        let star = Input {
            inbound_ports: list(vec![Item::Star]),
            outbound_ip_ranges: list(vec![Item::Star]),
            ..input.clone()
        };
        check(&star);
        let bad = Input {
            exclude_outbound_ports: list(vec![Item::Port(0)]),
            ..input
        };
        assert!(build_plan(&bad.flags()).is_err());
        check(&bad);
    }
}
