//! `livesnapd`: livesnap's host daemon (`proto/livesnapd.proto`). One per host.
//!
//! `livesnapd [--config PATH]` serves; `livesnapd check-config` checks the configuration and
//! exits; `livesnapd jobs` prints the job history as JSON lines (with the daemon stopped: the
//! state database is opened by one process at a time).
//!
//! SIGTERM or SIGINT stops serving and exits within about 2 s; a job running then is cut short
//! as by a kill, and the next start cleans it up: the guest thawed, the snapshot abandoned (its
//! delta merges), the job marked failed.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use livesnap_control::daemon::args::{Args, Command};
use livesnap_control::daemon::{service, Config, Daemon};
use tracing_subscriber::EnvFilter;

fn run() -> Result<()> {
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    match args.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("{}: {} VMs, configuration valid", args.config.display(), config.vms.len());
            Ok(())
        }
        Command::Jobs => {
            for j in Daemon::jobs(&config.state)? {
                println!("{}", serde_json::to_string(&j)?);
            }
            Ok(())
        }
        Command::Serve => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let rt =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("Cannot start the runtime")?;
            let served = rt.block_on(async {
                let daemon = Daemon::open(config)?;
                daemon.recover().await?;
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("Cannot handle SIGTERM")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping");
                };
                service::serve(daemon, shutdown).await?;
                Ok(())
            });
            // A job still running is cut short, as by a kill: the next start cleans it up
            // (thaw, abandon, job marked failed).
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            served
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livesnapd: {}", livesnap_proto::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
