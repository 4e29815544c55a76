//! Inputs from the `init_plan` fuzz target (`fuzz/`), replayed on every `cargo test`.
//!
//! A crash found by `fuzz/run.sh` becomes a `#[test]` here: the minimized input (print it
//! with `cargo fuzz fmt init_plan <file>`) written out as flags and `iptables-save` text,
//! asserting a clean error or the right rules, never a panic. The edge cases below are the
//! shapes the fuzzer's invariants lean on, pinned so a change to the planner keeps them.

use isthmus_init::plan::{CidrList, PortList, PROXY_PORTS};
use isthmus_init::rules::{verify_installed, OUTPUT_CHAIN, REDIRECT_CHAIN};
use isthmus_init::{
    cleanup_rules, install_rules, parse_existing, Existing, Family, IpRanges, Plan, PlanError,
    PortSet,
};

/// `iptables-save` text the fuzzer mangles: NULs, lone CRs, a bare `-A`, a jump without a
/// target, tables never committed. Read as far as it makes sense, never a panic.
#[test]
fn mangled_save_output_is_read_without_panicking() {
    let save = "*nat\n-A\n-A PREROUTING -j\n-A \0PREROUTING -p tcp -j ISTHMUS_INBOUND\r\
                \n-A OUTPUT\r-j ISTHMUS_OUTPUT\n:ISTHMUS_REDIRECT\n:\n*filter\n-A ISTHMUS_INBOUND";
    let existing = parse_existing(save);
    assert!(existing.has_chain("ISTHMUS_REDIRECT"));
    assert!(!existing.has_chain("ISTHMUS_INBOUND"), "outside *nat");
    let cleanup = cleanup_rules(&existing);
    assert!(cleanup.starts_with("*nat\n") && cleanup.ends_with("COMMIT\n"));
    let plan = Plan::default();
    for family in Family::ALL {
        assert!(verify_installed(&plan, family, save).is_err());
        let _ = install_rules(&plan, family, &existing);
    }
    assert_eq!(cleanup_rules(&Existing::default()), "");
}

/// Extreme ids and ports, a proxy port listed for capture, and /0 everywhere: the proxy's
/// own traffic still returns first, and its ports still return before any redirect.
#[test]
fn extreme_flags_keep_the_proxy_out_of_capture() {
    let mut plan = Plan {
        proxy_uid: u32::MAX,
        proxy_gid: 0,
        inbound_capture_port: 65535,
        outbound_capture_port: 1,
        inbound_ports: "15006,65535,1".parse().unwrap(),
        outbound_ip_ranges: "0.0.0.0/0,::/0".parse().unwrap(),
        exclude_outbound_ip_ranges: "0.0.0.0/0".parse::<CidrList>().unwrap().0,
        exclude_outbound_ports: "65535".parse::<PortList>().unwrap().0,
        ..Plan::default()
    };
    plan.set_exclude_inbound_ports(&"1".parse::<PortList>().unwrap().0);
    plan.validate().unwrap();
    for family in Family::ALL {
        let text = install_rules(&plan, family, &Existing::default());
        let lines: Vec<&str> = text.lines().collect();
        let at = |rule: &str| lines.iter().position(|l| *l == rule).expect(rule);
        let out: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {OUTPUT_CHAIN} ")))
            .collect();
        assert_eq!(
            out[0],
            &format!("-A {OUTPUT_CHAIN} -m owner --uid-owner 4294967295 -j RETURN")
        );
        assert_eq!(
            out[1],
            &format!("-A {OUTPUT_CHAIN} -m owner --gid-owner 0 -j RETURN")
        );
        assert!(text.contains(&format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}\n")));
        for p in PROXY_PORTS.into_iter().chain([1]) {
            let ret = at(&format!(
                "-A ISTHMUS_INBOUND -p tcp -m tcp --dport {p} -j RETURN"
            ));
            let first_redirect = lines
                .iter()
                .position(|l| l.ends_with("-j ISTHMUS_IN_REDIRECT"))
                .unwrap();
            assert!(ret < first_redirect, "port {p} returns after a redirect");
        }
        assert_eq!(verify_installed(&plan, family, &text), Ok(()));
    }
}

/// Flag values the fuzzer found on the edge of the parsers: what is accepted and what is not.
#[test]
fn flag_values_on_the_parsers_edge() {
    assert_eq!(" * ".parse::<PortSet>(), Ok(PortSet::All));
    assert!("*,".parse::<PortSet>().is_err());
    assert!("*, 80".parse::<PortSet>().is_err());
    assert_eq!(" , ,".parse::<PortSet>(), Ok(PortSet::List(vec![])));
    assert!("*".parse::<PortList>().is_err());
    assert!("*".parse::<CidrList>().is_err());
    assert_eq!(" *".parse::<IpRanges>(), Ok(IpRanges::All));
    assert!(
        "８０".parse::<PortList>().is_err(),
        "fullwidth digits are not a port"
    );
    assert!(matches!(
        "10.0.0.0/4294967296".parse::<CidrList>(),
        Err(PlanError::PrefixTooLong { .. })
    ));
    let mapped = "::ffff:10.1.2.3/120".parse::<CidrList>().unwrap().0;
    assert_eq!(mapped[0].to_string(), "::ffff:10.1.2.0/120");
    assert_eq!(mapped[0].family(), Family::V6);
}
