//! livesnapd's command line (in the library for the man pages and completions, `xtask`).

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

/// livesnap's host daemon: snapshots and backups of the host's VMs over gRPC.
#[derive(Debug, Parser)]
#[command(name = "livesnapd", version)]
pub struct Args {
    /// The configuration file.
    #[arg(long, default_value = "/etc/livesnap/livesnapd.toml", value_name = "PATH")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Check the configuration file and exit.
    CheckConfig,
    /// Print the recorded jobs, oldest first, one JSON object a line.
    Jobs,
}

/// The command's definition, for the man pages and the shell completions.
pub fn command() -> clap::Command {
    Args::command()
}
