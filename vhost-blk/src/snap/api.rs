//! What the snapshot engine offers its callers (the control service, the tests): plain Rust
//! types, no gRPC. `crate::control` adapts this to the wire.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::{cbt, journal, record};
use crate::disk::{self, Format};

/// Why a control call was refused. Each kind maps to one gRPC code in `crate::control`; the
/// state directory's failures carry their cause, which the control service sends along.
#[derive(Debug, Error)]
pub enum ControlError {
    /// A named disk or snapshot does not exist. (`NOT_FOUND`)
    #[error("{0}")]
    NotFound(String),
    /// The call does not fit the current state, e.g. a snapshot is already active.
    /// (`FAILED_PRECONDITION`)
    #[error("{0}")]
    State(String),
    /// An argument is malformed or out of range. (`INVALID_ARGUMENT`)
    #[error("{0}")]
    Invalid(String),
    /// Writing `snapshot.state` failed: the step did not happen. (`INTERNAL`, or
    /// `RESOURCE_EXHAUSTED` when its filesystem is full, as for every variant below)
    #[error("Cannot write the snapshot record")]
    Record(#[source] record::Error),
    /// Creating a file of the state directory failed.
    #[error("Cannot create {name}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Making the state directory's creations durable failed.
    #[error("Cannot sync the state directory")]
    SyncDir(#[source] io::Error),
    /// Writing a new delta's map failed.
    #[error("Cannot write {name}")]
    DeltaMap {
        name: String,
        #[source]
        source: journal::Error,
    },
    /// Writing a new change map failed.
    #[error("Cannot write {name}")]
    ChangeMap {
        name: String,
        #[source]
        source: cbt::Error,
    },
    /// Folding an unacknowledged change-map generation into the current one failed.
    #[error("Cannot merge the change maps of disk {disk}")]
    AbsorbChanges {
        disk: String,
        #[source]
        source: cbt::Error,
    },
    /// Copying a delta into its base, or recording that progress, failed.
    #[error("Cannot merge the delta of disk {disk}")]
    Merge {
        disk: String,
        #[source]
        source: disk::Error,
    },
}

impl ControlError {
    /// The state directory failed (rather than the call not fitting).
    pub fn is_storage(&self) -> bool {
        match self {
            ControlError::NotFound(_) | ControlError::State(_) | ControlError::Invalid(_) => false,
            ControlError::Record(_)
            | ControlError::Create { .. }
            | ControlError::SyncDir(_)
            | ControlError::DeltaMap { .. }
            | ControlError::ChangeMap { .. }
            | ControlError::AbsorbChanges { .. }
            | ControlError::Merge { .. } => true,
        }
    }

    /// The I/O error at the bottom of a state-directory failure, if there is one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            ControlError::NotFound(_) | ControlError::State(_) | ControlError::Invalid(_) => None,
            ControlError::Record(e) => match e {
                record::Error::Io(e) => Some(e),
                record::Error::TooLarge(_)
                | record::Error::Version(_)
                | record::Error::NoValidSlot(_)
                | record::Error::Decode(_) => None,
            },
            ControlError::Create { source, .. } | ControlError::SyncDir(source) => Some(source),
            ControlError::DeltaMap { source, .. } => match source {
                journal::Error::Io(e) => Some(e),
                journal::Error::BadHeader
                | journal::Error::WrongSnapshot { .. }
                | journal::Error::WrongSize { .. }
                | journal::Error::BadRange { .. } => None,
            },
            ControlError::ChangeMap { source, .. } | ControlError::AbsorbChanges { source, .. } => match source {
                cbt::Error::Io(e) => Some(e),
                cbt::Error::BadHeader | cbt::Error::WrongGeneration { .. } | cbt::Error::WrongSize { .. } => None,
            },
            ControlError::Merge { source, .. } => source.io(),
        }
    }
}

/// Options of [`SnapshotControl::begin`].
#[derive(Clone, Debug, Default)]
pub struct BeginOptions {
    /// Disks to include; empty means every disk of the VM.
    pub disks: Vec<String>,
    /// Most bytes the snapshot's deltas may hold per disk before it is abandoned
    /// (None: the backend's `--delta-limit`, if any).
    pub delta_limit: Option<u64>,
}

/// A snapshot just cut.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub id: u64,
    pub disks: Vec<String>,
    /// Seconds since the Unix epoch at the cut.
    pub created_unix: u64,
    /// How long the guest's requests were held for the cut.
    pub pause: Duration,
}

/// Where a disk stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No snapshot: writes go to the base image.
    Direct,
    /// A snapshot is active: the base is frozen, writes go to the delta.
    Active,
    /// The delta is being folded back into the base.
    Merging,
}

/// Progress of a merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeProgress {
    /// Bytes copied from the delta into the base so far.
    pub done_bytes: u64,
    /// Bytes still in the delta.
    pub remaining_bytes: u64,
}

/// State of one disk.
#[derive(Clone, Debug)]
pub struct DiskState {
    pub id: String,
    pub phase: Phase,
    /// The snapshot this disk belongs to, if any.
    pub snapshot: Option<u64>,
    pub size: u64,
    pub base_path: PathBuf,
    pub base_format: Format,
    /// The delta's data file while a snapshot or merge is running.
    pub delta_path: Option<PathBuf>,
    /// Bytes of the virtual disk that currently live in the delta.
    pub delta_bytes: u64,
    /// Extents (contiguous ranges) in the delta's map.
    pub delta_extents: u64,
    /// Set while merging.
    pub merge: Option<MergeProgress>,
    /// The last merge completed since the backend started: its snapshot and the bytes it copied.
    pub last_merge: Option<(u64, u64)>,
    /// Why the snapshot was abandoned, if it was (its base is then no longer frozen).
    pub abandoned: Option<String>,
}

/// State of the whole VM.
#[derive(Clone, Debug)]
pub struct VmStatus {
    pub vm: String,
    /// The current snapshot, from its cut until its merge is recorded complete.
    pub snapshot: Option<SnapshotInfo>,
    pub disks: Vec<DiskState>,
}

/// Blocks of one disk changed between the last acknowledged checkpoint and `until`.
#[derive(Clone, Debug)]
pub struct Changes {
    pub disk: String,
    /// The checkpoint the changes start from (None: since change tracking began).
    pub since_checkpoint: Option<u64>,
    /// The snapshot whose cut ends the range (None: up to now).
    pub until_snapshot: Option<u64>,
    /// Size of a tracked block in bytes; every extent is a multiple of it (but the last one
    /// may stop at the end of the disk).
    pub granularity: u64,
    /// False when the map may miss writes; the next backup must then be full.
    pub trusted: bool,
    /// Why the map cannot be trusted.
    pub untrusted_reason: Option<String>,
    /// Changed ranges, `(offset, length)` in bytes, sorted, not overlapping.
    pub extents: Vec<(u64, u64)>,
}

/// Counters of one disk since the backend started.
#[derive(Clone, Debug, Default)]
pub struct DiskStats {
    pub id: String,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    /// Cuts this disk took part in, and the longest pause among them.
    pub cuts: u64,
    pub max_cut_pause: Duration,
    pub merged_bytes: u64,
}

/// The engine's operations, one per control call.
pub trait SnapshotControl: Send + Sync + 'static {
    /// Cuts a snapshot of the chosen disks at one instant.
    fn begin(&self, opts: BeginOptions) -> Result<SnapshotInfo, ControlError>;
    fn status(&self) -> VmStatus;
    /// Changed blocks of `disk`: up to the current snapshot's cut while there is one, else up
    /// to now.
    fn changes(&self, disk: &str) -> Result<Changes, ControlError>;
    /// Starts folding snapshot `id`'s deltas back into the bases; returns at once. Progress
    /// shows in [`SnapshotControl::status`]; the snapshot disappears from it when done.
    fn merge(&self, id: u64) -> Result<(), ControlError>;
    /// Gives snapshot `id` up: its base stops being frozen and the delta is merged.
    fn abandon(&self, id: u64, reason: &str) -> Result<(), ControlError>;
    /// The backup of snapshot `id` is safe: forget the changes up to its cut.
    fn checkpoint(&self, id: u64) -> Result<(), ControlError>;
    fn stats(&self) -> Vec<DiskStats>;
}
