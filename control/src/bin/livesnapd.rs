//! `livesnapd`: livesnap's host daemon (`proto/livesnapd.proto`). One per host.
//!
//! `livesnapd [--config PATH]` serves; `livesnapd check-config` checks the configuration and
//! exits; `livesnapd jobs` prints the job history as JSON lines (with the daemon stopped: the
//! state database is opened by one process at a time); `livesnapd key ...` makes key-encryption
//! keys and the VMs' keys and rewraps keys under a new KEK (on the host, no daemon needed: the
//! key material never crosses the API).
//!
//! SIGTERM or SIGINT stops serving new jobs; each job running then finishes the step it is in
//! and ends as a cancelled job does (the guest thawed, the snapshot abandoned — its delta
//! merges —, nothing checkpointed), recorded `cancelled`; then livesnapd exits. A daemon killed
//! outright leaves its jobs to the next start, which cleans them up the same way.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use livesnap_control::daemon::args::{Args, Command, KeyAction};
use livesnap_control::daemon::{metrics, service, Config, Daemon};
use tracing_subscriber::EnvFilter;

fn key(action: KeyAction) -> Result<()> {
    use livesnap_repo::crypto;
    use livesnap_repo::Kek;
    match action {
        KeyAction::CreateKek { path } => {
            let kek = Kek::create(&path)?;
            println!("{}: KEK {}", path.display(), kek.id());
        }
        KeyAction::Create { kek, path } => {
            let kek = Kek::load(&kek)?;
            let key = crypto::create_key_file(&path, &kek)?;
            println!("{}: key {}, wrapped by KEK {}", path.display(), key.id(), kek.id());
        }
        KeyAction::Rewrap { kek, new_kek, paths } => {
            let (old, new) = (Kek::load(&kek)?, Kek::load(&new_kek)?);
            // Every file opens under the old KEK before any is rewritten.
            for p in &paths {
                crypto::load_key_file(p, &old)?;
            }
            for p in &paths {
                let info = crypto::rewrap_key_file(p, &old, &new)?;
                println!("{}: key {}, wrapped by KEK {} (was {})", p.display(), info.key, info.kek, old.id());
            }
        }
        KeyAction::Show { kek, paths } => {
            let kek = kek.map(|k| Kek::load(&k)).transpose()?;
            for p in &paths {
                let info = crypto::key_file_info(p)?;
                if let Some(kek) = &kek {
                    crypto::load_key_file(p, kek)?;
                }
                let created = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(info.created_unix_s),
                );
                let opens = if kek.is_some() { ", opens under it" } else { "" };
                println!("{}: key {}, wrapped by KEK {}{opens}, created {created}", p.display(), info.key, info.kek);
            }
        }
    }
    Ok(())
}

fn run() -> Result<()> {
    livesnap_control::install_tls_provider();
    let args = Args::parse();
    let command = args.command.unwrap_or(Command::Serve);
    if let Command::Key { action } = command {
        return key(action);
    }
    let config = Config::load(&args.config)?;
    match command {
        Command::Key { .. } => Ok(()),
        Command::CheckConfig => {
            for (vm, key) in livesnap_control::daemon::load_keys(&config)? {
                println!("vm {vm}: backups encrypted under key {} ({})", key.id(), key.origin());
            }
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
                // Bound before the API's socket appears: a taken port stops the start.
                if let Some(m) = &daemon.config().metrics {
                    let listener = metrics::bind(m.listen).await?;
                    metrics::serve(daemon.clone(), listener, m.repository_count);
                }
                let scheduler = daemon.start_scheduler();
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("Cannot handle SIGTERM")?;
                let d = daemon.clone();
                let shutdown = async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping: running jobs end after their current step");
                    // No scheduled job starts from here on.
                    scheduler.stop().await;
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
