//! What the snapshot engine offers its callers (the control service, the tests): plain Rust
//! types, no gRPC. `crate::control` adapts this to the wire.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::disk::Format;

/// Why a control call was refused. Each kind maps to one gRPC code in `crate::control`.
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
    /// Persisting or reading state failed. (`INTERNAL`)
    #[error("{message}")]
    Io {
        message: String,
        #[source]
        source: std::io::Error,
    },
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
