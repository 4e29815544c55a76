use super::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// A fake that serves a nat table per binary family and records calls.
/// Restores replace the "table" with what a real save would print.
#[derive(Default)]
struct Fake {
    /// Binary name -> scripted result; binaries absent here are
    /// "not installed".
    results: HashMap<String, CmdOutput>,
    ipv6: bool,
    calls: RefCell<Vec<String>>,
}

impl Fake {
    fn ok(mut self, bin: &str, stdout: &str) -> Self {
        self.results.insert(
            bin.into(),
            CmdOutput {
                success: true,
                code: Some(0),
                stdout: stdout.into(),
                stderr: String::new(),
            },
        );
        self
    }
    fn fail(mut self, bin: &str, stderr: &str) -> Self {
        self.results.insert(
            bin.into(),
            CmdOutput {
                success: false,
                code: Some(1),
                stdout: String::new(),
                stderr: stderr.into(),
            },
        );
        self
    }
}

impl Exec for Fake {
    fn run(&self, bin: &str, args: &[&str], _stdin: Option<&str>) -> io::Result<CmdOutput> {
        self.calls
            .borrow_mut()
            .push(format!("{bin} {}", args.join(" ")).trim().to_string());
        self.results
            .get(bin)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn ipv6_enabled(&self) -> bool {
        self.ipv6
    }
}

const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

fn installed_nat(family: Family) -> String {
    // What a real save prints after our install: the restore text with
    // the built-in chain headers, which verify accepts.
    install_rules(&Plan::default(), family, &Existing::default())
}

#[test]
fn classify_messages() {
    let out = |stderr: &str| CmdOutput {
        success: false,
        code: Some(4),
        stdout: String::new(),
        stderr: stderr.into(),
    };
    let e = classify_failure(
        "iptables-nft-restore",
        &out("iptables-nft-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"),
    );
    assert!(matches!(e, ApplyError::PermissionDenied { .. }));
    assert!(e
        .to_string()
        .contains("is NET_ADMIN granted to the init container?"));
    assert!(e.to_string().contains("you must be root"));
    assert!(matches!(
        classify_failure(
            "x",
            &out("iptables v1.8: can't initialize iptables table `nat': Permission denied")
        ),
        ApplyError::PermissionDenied { .. }
    ));
    assert!(matches!(
        classify_failure(
            "x",
            &out("Fatal: can't open lock file /run/xtables.lock: Permission denied")
        ),
        ApplyError::PermissionDenied { .. }
    ));
    assert!(matches!(
        classify_failure("x", &out("ip6tables-restore: unable to initialize table 'nat': Address family not supported by protocol")),
        ApplyError::TableUnavailable { .. }
    ));
    let e = classify_failure("x", &out("iptables-restore: line 5 failed"));
    assert_eq!(
        e.to_string(),
        "x failed (exit code 4): iptables-restore: line 5 failed"
    );
}

#[test]
fn not_found_message() {
    let fake = Fake::default();
    let e = run_ok(&fake, "iptables-restore", &[], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "iptables-restore not found: install iptables in the init image (Debian: apt-get install iptables)"
    );
}

#[test]
fn detection_runs_both_backends() {
    let fake = Fake::default()
        .ok("iptables-legacy-save", "*nat\n-A A\n-A B\nCOMMIT\n")
        .ok("ip6tables-legacy-save", "")
        .ok("iptables-nft-save", "*nat\n-A A\nCOMMIT\n")
        .ok("ip6tables-nft-save", "");
    assert_eq!(detect_backend(&fake), Backend::Legacy);
    let only_legacy = Fake::default().ok("iptables-legacy-save", "");
    assert_eq!(detect_backend(&only_legacy), Backend::Legacy);
    let no_access = Fake::default()
        .fail("iptables-legacy-save", "Permission denied")
        .fail("iptables-nft-save", "Permission denied");
    assert_eq!(detect_backend(&no_access), Backend::Nft);
}

#[test]
fn v4_failure_is_fatal() {
    let fake = Fake::default().fail("iptables-nft-save", "Permission denied (you must be root)");
    let opts = Options {
        backend: BackendChoice::Fixed(Backend::Nft),
        require_ipv6: false,
    };
    let e = install(&fake, &Plan::default(), &opts).unwrap_err();
    assert!(matches!(e, ApplyError::PermissionDenied { .. }), "{e}");
}

#[test]
fn v6_failure_warns_unless_required() {
    // The fake's save always returns the installed v4 table, so v4
    // passes its post-install check; v6 save fails.
    let fake = Fake {
        ipv6: true,
        ..Fake::default()
    }
    .ok("iptables-nft-save", &installed_nat(Family::V4))
    .ok("iptables-nft-restore", "")
    .fail(
        "ip6tables-nft-save",
        "can't initialize ip6tables table `nat': Table does not exist",
    );
    let mut opts = Options {
        backend: BackendChoice::Fixed(Backend::Nft),
        require_ipv6: false,
    };
    let report = install(&fake, &Plan::default(), &opts).unwrap();
    assert_eq!(report.families, vec![Family::V4]);
    assert_eq!(report.warnings.len(), 1);
    assert!(report.warnings[0].contains("skipping IPv6"));

    opts.require_ipv6 = true;
    let e = install(&fake, &Plan::default(), &opts).unwrap_err();
    assert!(matches!(e, ApplyError::Ipv6Required { .. }), "{e}");
}

#[test]
fn v6_disabled_kernel_is_skipped_without_running_tools() {
    let fake = Fake::default()
        .ok("iptables-nft-save", &installed_nat(Family::V4))
        .ok("iptables-nft-restore", "");
    let opts = Options {
        backend: BackendChoice::Fixed(Backend::Nft),
        require_ipv6: false,
    };
    let report = install(&fake, &Plan::default(), &opts).unwrap();
    assert_eq!(report.families, vec![Family::V4]);
    assert!(fake
        .calls
        .borrow()
        .iter()
        .all(|c| !c.starts_with("ip6tables")));
}

#[test]
fn verify_failure_is_fatal_even_for_v6() {
    let fake = Fake {
        ipv6: true,
        ..Fake::default()
    }
    .ok("iptables-nft-save", &installed_nat(Family::V4))
    .ok("iptables-nft-restore", "")
    .ok("ip6tables-nft-save", EMPTY_NAT)
    .ok("ip6tables-nft-restore", "");
    let opts = Options {
        backend: BackendChoice::Fixed(Backend::Nft),
        require_ipv6: false,
    };
    let e = install(&fake, &Plan::default(), &opts).unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::Verify {
                family: Family::V6,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cleanup_with_nothing_installed_runs_no_restore() {
    let fake = Fake {
        ipv6: true,
        ..Fake::default()
    }
    .ok("iptables-nft-save", EMPTY_NAT)
    .ok("ip6tables-nft-save", EMPTY_NAT);
    let opts = Options {
        backend: BackendChoice::Fixed(Backend::Nft),
        require_ipv6: true,
    };
    let report = cleanup(&fake, &opts).unwrap();
    assert_eq!(report.families, vec![Family::V4, Family::V6]);
    assert!(fake.calls.borrow().iter().all(|c| !c.contains("restore")));
}

#[test]
fn dry_run_without_access_assumes_empty() {
    let fake = Fake::default()
        .fail("iptables-nft-save", "Permission denied (you must be root)")
        .fail("ip6tables-nft-save", "Permission denied (you must be root)")
        .fail(
            "iptables-legacy-save",
            "Permission denied (you must be root)",
        );
    let text = dry_run(&fake, &Plan::default(), BackendChoice::Auto, false);
    let v4 = install_rules(&Plan::default(), Family::V4, &Existing::default());
    let v6 = install_rules(&Plan::default(), Family::V6, &Existing::default());
    assert_eq!(
        text,
        format!(
            "# ipv4 (iptables-nft-restore --noflush)\n{v4}# ipv6 (ip6tables-nft-restore --noflush)\n{v6}"
        )
    );
    assert!(fake.calls.borrow().iter().all(|c| !c.contains("restore")));

    let text = dry_run(&fake, &Plan::default(), BackendChoice::Auto, true);
    assert_eq!(
        text,
        "# ipv4 (iptables-nft-restore --noflush)\n# nothing to remove\n\
         # ipv6 (ip6tables-nft-restore --noflush)\n# nothing to remove\n"
    );
}
