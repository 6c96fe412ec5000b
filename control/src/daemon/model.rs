//! The daemon's own types: what [`Daemon`](super::Daemon) takes and returns. The tonic adapter
//! ([`super::service`]) converts them to and from the wire's messages.

use std::path::PathBuf;
use std::time::Duration;

use super::state::{BackupState, JobState, Stage};
use super::workflow::StopReason;
use super::Error;
use livesnap_repo as repo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupMode {
    /// Incremental where a disk's change map allows it, full otherwise.
    Auto,
    Full,
    /// Incremental or nothing: the job fails rather than back a disk up whole.
    Incremental,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuiesceMode {
    /// Freeze if the agent answers; crash-consistent otherwise.
    Preferred,
    /// Freeze, or fail before the cut.
    Required,
    Off,
}

/// A CreateSnapshot request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub vm: String,
    pub mode: BackupMode,
    pub quiesce: QuiesceMode,
    /// The agent's lease; `None`: the configured default.
    pub freeze_timeout: Option<Duration>,
}

/// A job's progress, as its client sees it; the last one is [`Event::Done`] or [`Event::Failed`].
#[derive(Debug)]
pub enum Event {
    /// The freeze was asked for.
    Quiescing,
    Frozen {
        filesystems: usize,
    },
    Cut {
        snapshot_id: u64,
        /// Why the backup is only crash-consistent; `None`: it is application-consistent.
        crash_consistent_reason: Option<String>,
        pause_us: u64,
    },
    Thawed {
        freeze_window_us: u64,
    },
    BackingUp {
        disk: String,
        bytes_read: u64,
        bytes_total: u64,
    },
    Merging {
        merged_bytes: u64,
        remaining_bytes: u64,
    },
    Done(Backup),
    Failed {
        stage: Stage,
        error: Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupKind {
    Full,
    /// Every disk incremental.
    Incremental,
}

/// A backup: the repository's record, with what the daemon adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    pub vm: String,
    pub id: String,
    pub created_unix: u64,
    pub kind: BackupKind,
    pub consistency: repo::Consistency,
    pub note: String,
    pub freeze_window_us: u64,
    /// The snapshot it was cut from, when this daemon made it.
    pub snapshot_id: Option<u64>,
    pub disks: Vec<DiskBackup>,
    /// The key it is encrypted under; `None`: not encrypted.
    pub key: Option<repo::KeyId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskBackup {
    pub disk: String,
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_changed: u64,
    pub bytes_stored: u64,
}

impl Backup {
    pub fn new(i: &repo::BackupInfo, s: Option<&BackupState>) -> Backup {
        let all_incremental = !i.disks.is_empty() && i.disks.iter().all(|d| d.kind == repo::Kind::Incremental);
        Backup {
            vm: i.vm.clone(),
            id: i.id.clone(),
            created_unix: i.created_unix_us / 1_000_000,
            kind: if all_incremental { BackupKind::Incremental } else { BackupKind::Full },
            consistency: i.consistency,
            note: s.map(|s| s.note.clone()).unwrap_or_default(),
            freeze_window_us: i.freeze_window.map_or(0, |w| w.duration_us()),
            snapshot_id: s.map(|s| s.snapshot_id),
            key: i.key,
            disks: i
                .disks
                .iter()
                .map(|d| DiskBackup {
                    disk: d.disk.clone(),
                    size: d.size,
                    bytes_read: d.stats.bytes_read,
                    bytes_changed: d.stats.bytes_changed,
                    bytes_stored: d.stats.bytes_stored,
                })
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// No agent configured.
    None,
    Reachable,
    Unreachable,
}

/// A configured VM, as its backend and agent answer now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub control_socket: PathBuf,
    pub backend_reachable: bool,
    pub disks: Vec<String>,
    pub active_snapshot: Option<u64>,
    pub agent: AgentState,
    pub last_backup: Option<String>,
    pub running_job: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreRequest {
    pub vm: String,
    pub id: String,
    pub disk: String,
    /// A new file; must be absolute.
    pub target: PathBuf,
    pub format: ImageFormat,
    /// Live restore ([`super::live`]): the target created empty, fed to the VM's backend.
    pub live: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreProgress {
    pub bytes_written: u64,
    pub bytes_total: u64,
    pub done: bool,
    /// A live restore's job and where it is.
    pub live: Option<LiveProgress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivePhase {
    /// No backend serves the target yet.
    Waiting,
    /// A backend serves it: its wants are answered.
    Feeding,
    /// Every chunk in, the map removed.
    Complete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveProgress {
    pub job: String,
    pub phase: LivePhase,
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub target: PathBuf,
    pub map: PathBuf,
}

/// A job as recorded, and what this daemon knows of it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    pub job: JobState,
    /// The job runs in this daemon now.
    pub running: bool,
    /// It was asked to stop, and why.
    pub stopping: Option<StopReason>,
}
