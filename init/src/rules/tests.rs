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
