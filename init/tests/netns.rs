//! End-to-end: run the real binary against real iptables inside a throwaway
//! network namespace (never the host's). Skipped unless root with `ip` and
//! `iptables-nft-restore` available.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-init");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether `bin` runs; `version_flag` differs (`ip` only knows `-V`).
fn have_with(bin: &str, version_flag: &str) -> bool {
    Command::new(bin)
        .arg(version_flag)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn have(bin: &str) -> bool {
    have_with(bin, "--version")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Returns why the test cannot run here, if it cannot.
fn skip_reason() -> Option<&'static str> {
    if !is_root() {
        return Some("not root");
    }
    if !have_with("ip", "-V") {
        return Some("`ip` (iproute2) is not installed");
    }
    if !have("iptables-nft-restore") {
        return Some("iptables-nft-restore is not installed");
    }
    None
}

use isthmus_tests::skip;

macro_rules! skip_unless_capable {
    () => {
        if let Some(reason) = skip_reason() {
            skip(reason);
            return;
        }
    };
}

/// A network namespace that is deleted when dropped, even if the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!(
            "isthinit-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    fn exec(&self, bin: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, bin])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs isthmus-init and asserts it succeeded.
    fn init(&self, args: &[&str]) -> String {
        let out = self.exec(BIN, args);
        assert!(
            out.status.success(),
            "isthmus-init {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `<save> -t nat`, without comment lines and with counters zeroed, so two
    /// dumps can be compared.
    fn save(&self, save_bin: &str) -> String {
        let out = self.exec(save_bin, &["-t", "nat"]);
        assert!(
            out.status.success(),
            "{save_bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(zero_counters)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn zero_counters(line: &str) -> String {
    match (line.starts_with(':'), line.rfind('[')) {
        (true, Some(i)) => format!("{}[0:0]", &line[..i]),
        _ => line.to_string(),
    }
}

const OUR_RULES_V4: [&str; 6] = [
    "-A PREROUTING -p tcp -j ISTHMUS_INBOUND",
    "-A OUTPUT -p tcp -j ISTHMUS_OUTPUT",
    "-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
    "-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A ISTHMUS_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];

/// Install, re-install, cleanup, cleanup again, for one backend.
fn lifecycle(backend: &str) {
    let (save4, save6) = match backend {
        "legacy" => ("iptables-legacy-save", "ip6tables-legacy-save"),
        _ => ("iptables-nft-save", "ip6tables-nft-save"),
    };
    let ns = Netns::new();
    let flags = [
        "--iptables-backend",
        backend,
        "--exclude-outbound-ip-ranges",
        "10.96.0.0/12,fd00::/8",
        "--exclude-inbound-ports",
        "22",
    ];

    ns.init(&flags);
    let first4 = ns.save(save4);
    let first6 = ns.save(save6);
    for rule in OUR_RULES_V4 {
        assert!(
            first4.lines().any(|l| l == rule),
            "missing {rule:?} in:\n{first4}"
        );
    }
    assert!(first4.contains("\n-A ISTHMUS_OUTPUT -d 10.96.0.0/12 -j RETURN\n"));
    assert!(first4.contains("\n-A ISTHMUS_INBOUND -p tcp -m tcp --dport 22 -j RETURN\n"));
    assert!(!first4.contains("fd00::"));
    assert!(first6.contains("\n-A ISTHMUS_OUTPUT -d ::1/128 -j RETURN\n"));
    assert!(first6.contains("\n-A ISTHMUS_OUTPUT -d fd00::/8 -j RETURN\n"));
    assert!(first6.contains("\n-A PREROUTING -p tcp -j ISTHMUS_INBOUND\n"));

    ns.init(&flags);
    assert_eq!(
        ns.save(save4),
        first4,
        "second install changed the v4 table"
    );
    assert_eq!(
        ns.save(save6),
        first6,
        "second install changed the v6 table"
    );

    ns.init(&["--iptables-backend", backend, "--cleanup"]);
    for dump in [ns.save(save4), ns.save(save6)] {
        assert!(!dump.contains("ISTHMUS"), "cleanup left rules:\n{dump}");
    }
    ns.init(&["--iptables-backend", backend, "--cleanup"]);
}

#[test]
fn nft_install_is_idempotent_and_cleanup_removes_everything() {
    skip_unless_capable!();
    lifecycle("nft");
}

#[test]
fn legacy_install_is_idempotent_and_cleanup_removes_everything() {
    skip_unless_capable!();
    if !have("iptables-legacy-restore") || !have("ip6tables-legacy-restore") {
        skip("iptables-legacy binaries are not installed");
        return;
    }
    lifecycle("legacy");
}

#[test]
fn dry_run_changes_nothing() {
    skip_unless_capable!();
    let ns = Netns::new();
    let before = ns.save("iptables-nft-save");
    let out = ns.init(&["--dry-run", "--iptables-backend", "nft"]);
    assert!(out.starts_with("# ipv4 (iptables-nft-restore --noflush)\n*nat\n"));
    assert!(out.contains("# ipv6 (ip6tables-nft-restore --noflush)\n*nat\n"));
    assert_eq!(ns.save("iptables-nft-save"), before);

    // With rules installed, a dry-run cleanup prints the removal and keeps them.
    ns.init(&["--iptables-backend", "nft"]);
    let installed = ns.save("iptables-nft-save");
    let out = ns.init(&["--dry-run", "--cleanup", "--iptables-backend", "nft"]);
    assert!(out.contains("-D PREROUTING -p tcp -j ISTHMUS_INBOUND\n"));
    assert!(out.contains("-X ISTHMUS_REDIRECT\n"));
    assert_eq!(ns.save("iptables-nft-save"), installed);
}

#[test]
fn auto_backend_follows_installed_rules_and_lists_are_honoured() {
    skip_unless_capable!();
    let ns = Netns::new();
    ns.init(&[
        "--inbound-ports",
        "80,8080",
        "--outbound-ip-ranges",
        "10.0.0.0/8",
        "--proxy-uid",
        "1500",
    ]);
    // An empty namespace ties, so auto must have picked nft.
    let v4 = ns.save("iptables-nft-save");
    assert!(v4.contains("\n-A ISTHMUS_INBOUND -p tcp -m tcp --dport 8080 -j ISTHMUS_IN_REDIRECT\n"));
    assert!(v4.contains("\n-A ISTHMUS_OUTPUT -d 10.0.0.0/8 -j ISTHMUS_REDIRECT\n"));
    assert!(v4.contains("\n-A ISTHMUS_OUTPUT -m owner --uid-owner 1500 -j RETURN\n"));
    assert!(!v4.contains("-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT"));
    // No v6 range listed: nothing of v6 is captured outbound.
    let v6 = ns.save("ip6tables-nft-save");
    assert!(!v6.contains("-j ISTHMUS_REDIRECT\n-A ISTHMUS_REDIRECT"));
    assert!(!v6
        .lines()
        .any(|l| l.starts_with("-A ISTHMUS_OUTPUT") && l.ends_with("-j ISTHMUS_REDIRECT")));
    ns.init(&["--cleanup"]);
    assert!(!ns.save("iptables-nft-save").contains("ISTHMUS"));
}

#[test]
fn bad_input_fails_with_message() {
    // Needs no privileges: parsing fails before any tool runs.
    let out = Command::new(BIN)
        .args(["--exclude-outbound-ip-ranges", "10.0.0.0/33"])
        .output()
        .expect("run isthmus-init");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prefix length 33 is longer than 32 bits"),
        "{err}"
    );
}
