use std::sync::Arc;

use clap::Parser;
use isthmus_proxy::{run, Args, Command};
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Wait(wait)) = &args.command {
        match isthmus_proxy::wait::wait(wait) {
            Ok(took) => {
                println!("isthmus-proxy is ready (waited {} ms)", took.as_millis());
                return Ok(());
            }
            Err(e) => {
                eprintln!("isthmus-proxy wait: {e}");
                std::process::exit(1);
            }
        }
    }
    let filter =
        EnvFilter::try_new(&args.log).map_err(|e| anyhow::anyhow!("--log `{}`: {e}", args.log))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        isthmus_proxy::LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .init(),
        isthmus_proxy::LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
    let set_level = Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    run(args, set_level)?;
    Ok(())
}
