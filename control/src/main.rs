//! `snapctl`: livesnap's CLI. `snapctl vm ...` and `snapctl backup ...` talk to livesnapd
//! (its unix socket, or its TCP endpoint with TLS and a token); `snapctl agent ...` talks to one
//! guest agent directly, to debug a VM by hand. The exit codes are in control/README.md.
//!
//! The pieces are under `src/cli/` (module map in `cli/mod.rs`).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use livesnap_proto::error::chain;

use cli::args::{BackupAction, Command, DaemonOpts, VmAction};
use cli::error::{Error, Exit};

/// A command for livesnapd.
enum DaemonCommand {
    Vm(VmAction),
    Backup(BackupAction),
}

async fn run_daemon(opts: &DaemonOpts, command: DaemonCommand, json: bool) -> Result<(), Error> {
    let mut d = cli::connect::connect(opts).await?;
    match command {
        DaemonCommand::Vm(VmAction::List) => cli::commands::vm_list(&mut d, json).await,
        DaemonCommand::Vm(VmAction::Snapshot(args)) => cli::snapshot::run(&mut d, args, json).await,
        DaemonCommand::Backup(action) => cli::commands::backup(&mut d, action, json).await,
    }
}

fn main() -> ExitCode {
    livesnap_control::install_tls_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVESNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::args::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapctl: {}", chain(&cli::error::Error::Runtime(e)));
            return ExitCode::FAILURE;
        }
    };
    let command = match cli.command {
        Command::Agent { action, conn } => {
            return match rt.block_on(cli::agent::run(action, conn, cli.json)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("snapctl: {}", chain(&*e));
                    ExitCode::FAILURE
                }
            };
        }
        Command::Vm { action } => DaemonCommand::Vm(action),
        Command::Backup { action } => DaemonCommand::Backup(action),
    };
    match rt.block_on(run_daemon(&cli.daemon, command, cli.json)) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("snapctl: {}", chain(&e));
            e.exit().into()
        }
    }
}
