use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "isthmus-ctl", version, about = "isthmus controller and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A mesh on this machine, pods as network namespaces (needs root and iptables).
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Validate a config directory (or files) as a sidecar would; prints every problem.
    Validate {
        /// Directories or YAML files.
        paths: Vec<PathBuf>,
    },
    /// The built-in app the local mesh runs in each pod.
    #[command(hide = true)]
    App {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "[::]:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "[::]:9000")]
        echo: SocketAddr,
    },
    /// Holds a pod's network namespace and nothing else, as the kubelet's pause container
    /// does (the container tests run it as each pod's infra container): waits for SIGTERM or
    /// SIGINT, then exits 0.
    #[command(hide = true)]
    Pause,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start a mesh, send traffic, change routing live, show metrics, tear down.
    Demo {
        /// Keep the mesh up after the demo until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local {
            command: LocalCommand::Demo { keep },
        } => isthmus_ctl::local::demo::run(keep).map_err(anyhow::Error::from),
        Command::Validate { paths } => return validate(&paths),
        Command::App { name, http, echo } => {
            isthmus_ctl::app::serve(&name, http, echo).map_err(anyhow::Error::from)
        }
        Command::Pause => pause().map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGTERM and SIGINT and waits for one. As PID 1 in a container a signal without a
/// handler is ignored, so waiting for it synchronously is what lets `docker stop` end us at once.
fn pause() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    signals.wait()?;
    Ok(())
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let mut files = Vec::new();
    for path in paths {
        let read = if path.is_dir() {
            isthmus_config::SourceFile::read_dir(path)
        } else {
            std::fs::read_to_string(path)
                .map(|text| {
                    vec![isthmus_config::SourceFile::new(
                        path.display().to_string(),
                        text,
                    )]
                })
                .map_err(|source| isthmus_config::ConfigError::ReadFile {
                    file: path.display().to_string(),
                    source,
                })
        };
        match read {
            Ok(mut f) => files.append(&mut f),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match isthmus_config::load(&files) {
        Ok(snapshot) => {
            println!(
                "ok: {} file(s), {} service(s), version {}",
                files.len(),
                snapshot.services().len(),
                snapshot.version()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for issue in e.issues() {
                eprintln!("error: {issue}");
            }
            ExitCode::FAILURE
        }
    }
}
