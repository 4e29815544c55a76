//! CLI edge of isthmus-init: parse flags, run the library, report.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use isthmus_init::plan::{CidrList, IpRanges, Plan, PortList, PortSet};
use isthmus_init::{apply, BackendChoice, Options, SystemExec};

/// Installs (or removes) the iptables rules that redirect a pod's TCP
/// traffic through the isthmus sidecar. Run as an init container with
/// NET_ADMIN in the pod's network namespace.
#[derive(Debug, Parser)]
#[command(name = "isthmus-init", version)]
struct Args {
    /// Uid the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// Gid the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Inbound ports to capture: `*` for all, or a comma list.
    #[arg(long, default_value = "*")]
    inbound_ports: PortSet,
    /// Inbound ports never captured (the proxy's own ports are always added).
    #[arg(long, default_value = "")]
    exclude_inbound_ports: PortList,
    /// Outbound destinations to capture: `*` for all, or a comma list of CIDRs.
    #[arg(long, default_value = "*")]
    outbound_ip_ranges: IpRanges,
    /// Outbound destinations never captured (comma list of CIDRs).
    #[arg(long, default_value = "")]
    exclude_outbound_ip_ranges: CidrList,
    /// Outbound destination ports never captured (comma list).
    #[arg(long, default_value = "")]
    exclude_outbound_ports: PortList,
    /// Port of the proxy's inbound listener.
    #[arg(long, default_value_t = 15006)]
    inbound_capture_port: u16,
    /// Port of the proxy's outbound listener.
    #[arg(long, default_value_t = 15001)]
    outbound_capture_port: u16,
    /// iptables backend: auto (use the one the node already uses), nft or legacy.
    #[arg(long, default_value = "auto")]
    iptables_backend: BackendChoice,
    /// Print the iptables-restore input for each family and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Remove everything isthmus-init installed (both families); pass the same
    /// --iptables-backend as at install if it was forced.
    #[arg(long)]
    cleanup: bool,
    /// Fail instead of warning when the IPv6 nat table cannot be used.
    #[arg(long)]
    require_ipv6: bool,
}

impl Args {
    fn plan(&self) -> anyhow::Result<Plan> {
        let mut plan = Plan {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_capture_port: self.inbound_capture_port,
            outbound_capture_port: self.outbound_capture_port,
            inbound_ports: self.inbound_ports.clone(),
            outbound_ip_ranges: self.outbound_ip_ranges.clone(),
            exclude_outbound_ip_ranges: self.exclude_outbound_ip_ranges.0.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.0.clone(),
            ..Plan::default()
        };
        plan.set_exclude_inbound_ports(&self.exclude_inbound_ports.0);
        plan.validate()?;
        Ok(plan)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, which is what
            // ends up in `kubectl logs` for a failed init container.
            eprintln!("isthmus-init: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let plan = args.plan().context("invalid options")?;
    let exec = SystemExec;

    if args.dry_run {
        print!(
            "{}",
            apply::dry_run(&exec, &plan, args.iptables_backend, args.cleanup)
        );
        return Ok(());
    }

    let opts = Options {
        backend: args.iptables_backend,
        require_ipv6: args.require_ipv6,
    };
    let (report, what) = if args.cleanup {
        (apply::cleanup(&exec, &opts)?, "removed isthmus rules")
    } else {
        (
            apply::install(&exec, &plan, &opts)?,
            "installed isthmus rules",
        )
    };
    for w in &report.warnings {
        eprintln!("isthmus-init: warning: {w}");
    }
    let families: Vec<&str> = report.families.iter().map(|f| f.name()).collect();
    eprintln!(
        "isthmus-init: {what} ({} backend, {})",
        report.backend,
        families.join(", ")
    );
    Ok(())
}
