//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::agent::{AgentAction, Conn};

/// livesnapd's unix socket when neither `--socket` nor `LIVESNAP_SOCKET` names another.
pub const DEFAULT_SOCKET: &str = "/run/livesnap/livesnapd.sock";
/// The environment variable that overrides [`DEFAULT_SOCKET`].
pub const SOCKET_ENV: &str = "LIVESNAP_SOCKET";
const HEADING: &str = "Reaching livesnapd";
const EXIT_CODES: &str = "Exit codes: 0 done; 1 the operation failed (a snapshot failed, verify found damage); \
2 usage error; 3 cannot reach livesnapd (or the token was refused); 4 no such VM, backup or disk; \
5 refused in the current state (a job is running, the target exists...); 130 Ctrl-C while following a \
snapshot or a live restore (the job goes on).";

/// livesnap's command line: snapshots and backups of the host's VMs through livesnapd.
#[derive(Debug, Parser)]
#[command(name = "snapctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub daemon: DaemonOpts,
    /// Print JSON instead of text (`vm snapshot`: one object per line, one line per event).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where livesnapd is.
#[derive(Debug, Args)]
pub struct DaemonOpts {
    /// livesnapd's unix socket [env: LIVESNAP_SOCKET] [default: /run/livesnap/livesnapd.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "addr", help_heading = HEADING)]
    pub socket: Option<PathBuf>,
    /// livesnapd's TCP endpoint instead, with TLS: https://HOST:PORT.
    #[arg(long, global = true, value_name = "URL", help_heading = HEADING)]
    pub addr: Option<String>,
    /// The bearer token for --addr: the file's first line.
    #[arg(long, global = true, value_name = "FILE", requires = "addr", help_heading = HEADING)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed livesnapd's certificate, for --addr; without it
    /// the system's roots.
    #[arg(long, global = true, value_name = "FILE", requires = "addr", help_heading = HEADING)]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The host's VMs: list them, snapshot one.
    Vm {
        #[command(subcommand)]
        action: VmAction,
    },
    /// Backups in the repository: list, show, verify, restore, delete, prune.
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
    /// livesnapd's jobs: list them, show one, cancel a running one.
    Job {
        #[command(subcommand)]
        action: JobAction,
    },
    /// Talk to one guest agent directly (debugging).
    Agent {
        #[command(subcommand)]
        action: AgentAction,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmAction {
    /// The VMs of livesnapd's configuration, with their backend, agent, last backup and job.
    List,
    /// Snapshot a VM, back it up and merge, with live progress; ends with the backup's summary.
    Snapshot(SnapshotArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's name in livesnapd's configuration.
    pub vm: String,
    /// A full backup, even if an incremental one is possible.
    #[arg(long, conflicts_with = "incremental")]
    pub full: bool,
    /// An incremental backup, or fail (exit 5) if there is no usable parent or change map.
    /// Without --full or --incremental: incremental when possible, else full.
    #[arg(long)]
    pub incremental: bool,
    /// Do not ask the guest agent to freeze: a crash-consistent snapshot.
    #[arg(long, conflicts_with = "require_quiesce")]
    pub no_quiesce: bool,
    /// Fail before cutting if the guest cannot be frozen. Without --no-quiesce or
    /// --require-quiesce: frozen if the agent answers, else crash-consistent.
    #[arg(long)]
    pub require_quiesce: bool,
    /// Longest the guest may stay frozen (e.g. 10s, 500ms); default: livesnapd's.
    #[arg(long, value_name = "DURATION", value_parser = parse_freeze_timeout)]
    pub freeze_timeout: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum BackupAction {
    /// The backups of one VM, or of every VM, oldest first.
    List {
        /// Only this VM's backups.
        vm: Option<String>,
    },
    /// One backup: kind, consistency and why, freeze window, encryption (key id), each disk's bytes.
    Show { vm: String, id: String },
    /// Re-read and re-hash every chunk of a backup; exit 1 if any is damaged.
    Verify { vm: String, id: String },
    /// Write one disk of a backup to a new image file on livesnapd's host.
    Restore {
        vm: String,
        id: String,
        /// The disk's id (`snapctl backup show VM ID` lists them).
        #[arg(long)]
        disk: String,
        /// The new image file, inside livesnapd's restore directory (`restore_dir` in its config,
        /// /var/lib/livesnap/restore by default): a path relative to it, or an absolute one
        /// inside it. Its directory must exist; `..`, symlinks and an existing file are refused.
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// The image format [default: qcow2 if PATH ends in .qcow2, else raw].
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Live restore: create PATH empty (with its map PATH.restore) and return at once; start
        /// the VM with PATH as disk DISK (its livesnap-blk config) and livesnapd feeds it from
        /// the backup while the guest runs, chunks the guest reads first. Progress follows until
        /// complete; Ctrl-C leaves the job running (`snapctl job show ID`, `job cancel ID`).
        #[arg(long)]
        live: bool,
    },
    /// Files of one disk of a backup, read by livesnapd without mounting anything (ext4, on
    /// the whole disk or a GPT/MBR partition): list a directory, print a file, or copy a file
    /// or tree here. Only the chunks the reads touch are fetched.
    Files {
        vm: String,
        id: String,
        /// The disk's id (`snapctl backup show VM ID` lists them).
        #[arg(long)]
        disk: String,
        /// The partition (1-based: GPT entry; MBR 1-4 primary, 5... logical) [default: the
        /// whole disk if it has no partition table, else its only partition, else its only
        /// ext4 one].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        partition: Option<u32>,
        #[command(subcommand)]
        action: FilesAction,
    },
    /// Delete one backup (chunks other backups use stay).
    Delete { vm: String, id: String },
    /// Apply retention to a VM's backups as Proxmox Backup Server's prune does: each rule, in
    /// the order last, hourly, daily, weekly, monthly, yearly, keeps the newest backup of each of
    /// its N most recent periods (UTC) that no earlier rule covered; the others are deleted,
    /// then their unused chunks. Without rules: the VM's configured retention. The newest
    /// backup is always kept.
    Prune {
        vm: String,
        #[command(flatten)]
        keep: KeepArgs,
        /// Show each backup with keep or remove and the rule that keeps it; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A prune's rules; none given: the VM's configured retention.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct KeepArgs {
    /// Keep the newest N backups (`--keep` is the same).
    #[arg(long = "keep-last", alias = "keep", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have one.
    #[arg(long = "keep-hourly", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days that have one.
    #[arg(long = "keep-daily", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks (Monday to Sunday) that have one.
    #[arg(long = "keep-weekly", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months that have one.
    #[arg(long = "keep-monthly", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years that have one.
    #[arg(long = "keep-yearly", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub yearly: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum FilesAction {
    /// The entries of a directory (or the entry itself): mode, owner, size, mtime, name.
    Ls {
        /// An absolute path in the disk's filesystem.
        #[arg(default_value = "/")]
        path: String,
    },
    /// A regular file's bytes on stdout.
    Cat { path: String },
    /// Copy a file or a directory tree into DIR (here, on the client's host), with modes,
    /// times, owners when run as root, and symlinks as symlinks; nothing is overwritten and
    /// nothing is written outside DIR. Fifos, devices and sockets are skipped with a warning;
    /// set-ID bits are dropped.
    Get {
        path: String,
        /// An existing directory; the entry is created inside it under its own name (the
        /// root's contents go straight into it).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// The recorded jobs, running or ended, oldest first.
    List {
        /// Only this VM's jobs.
        vm: Option<String>,
        /// Only the newest N jobs.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        last: Option<u32>,
    },
    /// One job: its VM, status, stage reached, times, snapshot and why it failed.
    Show { id: String },
    /// Stop a running job: the step under way is interrupted where it safely can be, then the
    /// guest is thawed, the snapshot abandoned (its delta merges) and nothing is checkpointed.
    /// Waits until the job has ended; exit 0 once it is cancelled, 5 if it ended otherwise.
    Cancel {
        id: String,
        /// Return once livesnapd has the request, without waiting for the job to end.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

/// A duration of at least 1 ms that fits the request's u32 of milliseconds.
fn parse_freeze_timeout(s: &str) -> Result<u32, String> {
    let d: Duration = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    let ms = d.as_millis();
    if ms == 0 {
        return Err("must be at least 1ms".into());
    }
    u32::try_from(ms).map_err(|_| format!("must be at most {}ms", u32::MAX))
}

/// snapctl's command line, for the man pages and the shell completions (`xtask`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
