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
    /// Make and rewrap the keys that encrypt VMs' backups (needs no configuration, no daemon).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Make a new key-encryption key (KEK) file, mode 0600: 64 hex digits.
    CreateKek { path: PathBuf },
    /// Make a new data key for a VM, wrapped by the KEK, in a new file (mode 0600); name it in
    /// the VM's `key` setting.
    Create {
        /// The KEK file that wraps it.
        #[arg(long, value_name = "PATH")]
        kek: PathBuf,
        path: PathBuf,
    },
    /// Wrap key files by a new KEK instead of the old one. The data keys, and so every backup,
    /// stay as they are; only these files are rewritten.
    Rewrap {
        /// The KEK that wraps them now.
        #[arg(long, value_name = "PATH")]
        kek: PathBuf,
        /// The KEK to wrap them with.
        #[arg(long, value_name = "PATH")]
        new_kek: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print key files' key id, KEK id and creation time; with --kek, check that they open.
    Show {
        #[arg(long, value_name = "PATH")]
        kek: Option<PathBuf>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// The command's definition, for the man pages and the shell completions.
pub fn command() -> clap::Command {
    Args::command()
}
