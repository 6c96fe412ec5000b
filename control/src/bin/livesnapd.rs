//! `livesnapd`: livesnap's host daemon (`proto/livesnapd.proto`). One per host.
//!
//! `livesnapd [--config PATH]` serves; `livesnapd check-config` checks the configuration and
//! exits; `livesnapd jobs` prints the job history as JSON lines (with the daemon stopped: the
//! state database is opened by one process at a time).
//!
//! SIGTERM or SIGINT stops serving new jobs; each job running then finishes the step it is in
//! and ends as a cancelled job does (the guest thawed, the snapshot abandoned — its delta
//! merges —, nothing checkpointed), recorded `cancelled`; then livesnapd exits. A daemon killed
//! outright leaves its jobs to the next start, which cleans them up the same way.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use livesnap_control::daemon::args::{Args, Command};
use livesnap_control::daemon::{service, Config, Daemon};
use tracing_subscriber::EnvFilter;

fn run() -> Result<()> {
    livesnap_control::install_tls_provider();
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
                // Opening the repository blocks (an object store runs its own runtime and blocks
                // on it), so it runs where blocking is allowed.
                let daemon = tokio::task::spawn_blocking(move || Daemon::open(config))
                    .await
                    .context("The task that opens the daemon failed")??;
                daemon.recover().await?;
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("Cannot handle SIGTERM")?;
                let d = daemon.clone();
                let shutdown = async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping: running jobs end after their current step");
                    // Before the server stops: a job's stream ends only with the job.
                    d.stop_jobs();
                };
                service::serve(daemon.clone(), shutdown).await?;
                daemon.wait_jobs().await;
                tracing::info!("stopped");
                Ok(())
            });
            // Every job has ended and is recorded; what is left (a probe, a restore's qemu-img)
            // gets 2 s.
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
