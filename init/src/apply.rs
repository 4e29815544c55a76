//! The I/O step: read the nat table, build the restore text, feed it to
//! `iptables-restore --noflush`, read back and check. One restore
//! transaction per family, so a family is either fully installed or
//! untouched.
//!
//! Processes are run through the [`Exec`] trait so the failure handling
//! (IPv6 fallback, error mapping) can be tested without a kernel.

use std::io::{self, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::backend::{choose_backend, count_rules, Backend, BackendChoice};
use crate::plan::{Family, Plan};
use crate::rules::{
    cleanup_rules, install_rules, parse_existing, verify_installed, Existing, VerifyError,
};

/// Seconds `iptables-restore` waits for the xtables lock (legacy backend)
/// instead of failing at once when something else holds it.
const LOCK_WAIT_SECS: &str = "5";

/// What a finished process left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    pub success: bool,
    /// Exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs external programs. `Err` only when the program could not be started
/// (`io::ErrorKind::NotFound` meaning it is not installed).
pub trait Exec {
    fn run(&self, bin: &str, args: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput>;

    /// Whether the kernel has IPv6 at all; without it there is no ip6tables
    /// nat table and v6 is skipped before any tool is run.
    fn ipv6_enabled(&self) -> bool {
        Path::new("/proc/net/if_inet6").exists()
    }
}

/// Runs the real binaries found on `PATH`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemExec;

impl Exec for SystemExec {
    fn run(&self, bin: &str, args: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Write stdin from a separate thread so a chatty child cannot
        // deadlock us by filling its stdout pipe before reading its input.
        let writer = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => {
                let text = text.to_owned();
                Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
            }
            _ => None,
        };
        let out = child.wait_with_output()?;
        if let Some(w) = writer {
            // A write error (EPIPE) means the child exited early; its exit
            // status and stderr explain why, so they take precedence.
            let write_result = w
                .join()
                .map_err(|_| io::Error::other("stdin writer thread panicked"))?;
            if out.status.success() {
                write_result?;
            }
        }
        Ok(CmdOutput {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Why installing or removing rules failed, phrased so that the operator
/// knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "{bin} not found: install iptables in the init image (Debian: apt-get install iptables)"
    )]
    NotFound { bin: String },
    #[error("{bin} was refused access to the nat table: is NET_ADMIN granted to the init container? ({stderr})")]
    PermissionDenied { bin: String, stderr: String },
    #[error("{bin}: the nat table is not available in this kernel ({stderr})")]
    TableUnavailable { bin: String, stderr: String },
    #[error("{bin} failed ({status}): {stderr}")]
    Failed {
        bin: String,
        status: String,
        stderr: String,
    },
    #[error("could not run {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: io::Error,
    },
    #[error("post-install check failed for {family} ({bin}): {source}")]
    Verify {
        family: Family,
        bin: String,
        #[source]
        source: VerifyError,
    },
    #[error("cleanup left rules behind for {family} ({bin}): chains {chains:?}, jumps {jumps:?}")]
    CleanupIncomplete {
        family: Family,
        bin: String,
        chains: Vec<String>,
        jumps: Vec<String>,
    },
    #[error("IPv6 is required (--require-ipv6) but its nat table could not be used: {reason}")]
    Ipv6Required { reason: String },
}

/// Maps a failed run to an error. Pure, so the stderr patterns are tested.
pub fn classify_failure(bin: &str, out: &CmdOutput) -> ApplyError {
    let lower = out.stderr.to_ascii_lowercase();
    let stderr = out.stderr.clone();
    let bin = bin.to_string();
    let unavailable = [
        "address family not supported",
        "protocol not supported",
        "table does not exist",
    ];
    let denied = [
        "permission denied",
        "you must be root",
        "can't initialize",
        "cannot initialize",
        "operation not permitted",
    ];
    if unavailable.iter().any(|p| lower.contains(p)) {
        ApplyError::TableUnavailable { bin, stderr }
    } else if denied.iter().any(|p| lower.contains(p)) {
        ApplyError::PermissionDenied { bin, stderr }
    } else {
        let status = match out.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_string(),
        };
        ApplyError::Failed {
            bin,
            status,
            stderr,
        }
    }
}

/// Runs a tool and returns its stdout, mapping every failure to ApplyError.
fn run_ok(
    exec: &dyn Exec,
    bin: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ApplyError> {
    match exec.run(bin, args, stdin) {
        Ok(out) if out.success => Ok(out.stdout),
        Ok(out) => Err(classify_failure(bin, &out)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ApplyError::NotFound {
            bin: bin.to_string(),
        }),
        Err(source) => Err(ApplyError::Spawn {
            bin: bin.to_string(),
            source,
        }),
    }
}

fn save_nat(exec: &dyn Exec, backend: Backend, family: Family) -> Result<String, ApplyError> {
    run_ok(exec, backend.save_bin(family), &["-t", "nat"], None)
}

fn restore(
    exec: &dyn Exec,
    backend: Backend,
    family: Family,
    text: &str,
) -> Result<(), ApplyError> {
    run_ok(
        exec,
        backend.restore_bin(family),
        &["--noflush", "-w", LOCK_WAIT_SECS],
        Some(text),
    )
    .map(|_| ())
}

/// Rule count of one backend over both families; `None` when its binaries
/// are not installed. A tool that runs but fails (no NET_ADMIN) counts 0.
fn backend_rule_count(exec: &dyn Exec, backend: Backend) -> Option<usize> {
    let mut total = 0;
    for family in Family::ALL {
        match exec.run(backend.save_bin(family), &[], None) {
            Ok(out) if out.success => total += count_rules(&out.stdout),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && family == Family::V4 => return None,
            Err(_) => {}
        }
    }
    Some(total)
}

/// Detects the backend the node already uses (see [`choose_backend`]).
pub fn detect_backend(exec: &dyn Exec) -> Backend {
    choose_backend(
        backend_rule_count(exec, Backend::Legacy),
        backend_rule_count(exec, Backend::Nft),
    )
}

/// Applies `--iptables-backend`: a fixed choice wins, `auto` detects.
pub fn resolve_backend(exec: &dyn Exec, choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Fixed(b) => b,
        BackendChoice::Auto => detect_backend(exec),
    }
}

/// How to apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub backend: BackendChoice,
    /// Fail instead of warning when the IPv6 nat table cannot be used.
    pub require_ipv6: bool,
}

/// What was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub backend: Backend,
    /// Families that were installed (or cleaned).
    pub families: Vec<Family>,
    /// Non-fatal problems (a skipped IPv6), for the operator's log.
    pub warnings: Vec<String>,
}

fn install_family(
    exec: &dyn Exec,
    backend: Backend,
    plan: &Plan,
    family: Family,
) -> Result<(), ApplyError> {
    let existing = parse_existing(&save_nat(exec, backend, family)?);
    restore(
        exec,
        backend,
        family,
        &install_rules(plan, family, &existing),
    )?;
    let after = save_nat(exec, backend, family)?;
    verify_installed(plan, family, &after).map_err(|source| ApplyError::Verify {
        family,
        bin: backend.save_bin(family).to_string(),
        source,
    })
}

fn cleanup_family(exec: &dyn Exec, backend: Backend, family: Family) -> Result<(), ApplyError> {
    let existing = parse_existing(&save_nat(exec, backend, family)?);
    let text = cleanup_rules(&existing);
    if text.is_empty() {
        return Ok(());
    }
    restore(exec, backend, family, &text)?;
    let after = parse_existing(&save_nat(exec, backend, family)?);
    if after.is_empty() {
        Ok(())
    } else {
        Err(ApplyError::CleanupIncomplete {
            family,
            bin: backend.save_bin(family).to_string(),
            chains: after.chains.into_iter().collect(),
            jumps: after.jumps,
        })
    }
}

/// Runs `step` for v4 (failure fatal) then v6 (failure a warning unless
/// IPv6 is required). Errors found by our own checks are always fatal: they
/// mean the table is in a state we did not intend, not that v6 is missing.
fn for_families(
    exec: &dyn Exec,
    opts: &Options,
    step: impl Fn(Backend, Family) -> Result<(), ApplyError>,
) -> Result<Report, ApplyError> {
    let backend = resolve_backend(exec, opts.backend);
    let mut report = Report {
        backend,
        families: Vec::new(),
        warnings: Vec::new(),
    };
    step(backend, Family::V4)?;
    report.families.push(Family::V4);

    let v6 = if exec.ipv6_enabled() {
        step(backend, Family::V6)
    } else {
        Err(ApplyError::TableUnavailable {
            bin: backend.restore_bin(Family::V6).to_string(),
            stderr: "IPv6 is disabled in this kernel (/proc/net/if_inet6 is missing)".to_string(),
        })
    };
    match v6 {
        Ok(()) => report.families.push(Family::V6),
        Err(e @ (ApplyError::Verify { .. } | ApplyError::CleanupIncomplete { .. })) => {
            return Err(e)
        }
        Err(e) if opts.require_ipv6 => {
            return Err(ApplyError::Ipv6Required {
                reason: e.to_string(),
            })
        }
        Err(e) => report.warnings.push(format!(
            "skipping IPv6 (pass --require-ipv6 to make this fatal): {e}"
        )),
    }
    Ok(report)
}

/// Installs the plan in both families.
pub fn install(exec: &dyn Exec, plan: &Plan, opts: &Options) -> Result<Report, ApplyError> {
    for_families(exec, opts, |backend, family| {
        install_family(exec, backend, plan, family)
    })
}

/// Removes everything [`install`] added, in both families. Idempotent: with
/// nothing installed it runs no restore at all. With `auto`, detection finds
/// the backend holding our rules (they add to its count); a backend forced at
/// install time must be forced again here.
pub fn cleanup(exec: &dyn Exec, opts: &Options) -> Result<Report, ApplyError> {
    for_families(exec, opts, |backend, family| {
        cleanup_family(exec, backend, family)
    })
}

/// The restore input `install` (or `cleanup`) would send, per family, with a
/// header naming the tool. Changes nothing, and works without NET_ADMIN: if
/// the table cannot be read, it is assumed to hold nothing of ours.
pub fn dry_run(exec: &dyn Exec, plan: &Plan, backend: BackendChoice, cleanup: bool) -> String {
    let backend = resolve_backend(exec, backend);
    let mut out = String::new();
    for family in Family::ALL {
        let existing = save_nat(exec, backend, family)
            .map(|s| parse_existing(&s))
            .unwrap_or_else(|_| Existing::default());
        out.push_str(&format!(
            "# {} ({} --noflush)\n",
            family.name(),
            backend.restore_bin(family)
        ));
        if cleanup {
            let text = cleanup_rules(&existing);
            if text.is_empty() {
                out.push_str("# nothing to remove\n");
            }
            out.push_str(&text);
        } else {
            out.push_str(&install_rules(plan, family, &existing));
        }
    }
    out
}

#[cfg(test)]
mod tests;
