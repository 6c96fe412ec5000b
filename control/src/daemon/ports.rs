//! What the daemon needs of a VM, in its own types: the VM's backend (livesnap-blk's control
//! service) and its guest agent, each behind a trait, and the [`Connector`] that reaches them.
//!
//! [`super::backend`] implements them over gRPC; the workflow's unit tests implement them with
//! fakes. Nothing here knows of protobuf or tonic.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::config::{AgentEndpoint, VmConfig};

/// The cause of a backend's or an agent's failure, as its client reported it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bounds on reaching a backend or an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting (the handshakes included).
    pub connect: Duration,
    /// Each unary call (a freeze gets its deadline on top; a merge is bounded by its silence).
    pub call: Duration,
}

/// Reaches the backend and the agent of a VM: the daemon is built with one.
#[async_trait]
pub trait Connector: Send + Sync + fmt::Debug {
    async fn backend(&self, vm: &VmConfig, timeouts: Timeouts) -> Result<Arc<dyn Backend>, BackendError>;
    async fn agent(&self, endpoint: &AgentEndpoint, timeouts: Timeouts) -> Result<Arc<dyn Agent>, AgentError>;
}

/// A VM's livesnap-blk control service.
#[async_trait]
pub trait Backend: Send + Sync {
    async fn status(&self) -> Result<VmStatus, BackendError>;
    /// The whole change map of `disk` (every page joined).
    async fn changes(&self, disk: &str) -> Result<ChangeMap, BackendError>;
    /// Cuts a snapshot of every disk.
    async fn begin(&self) -> Result<Snapshot, BackendError>;
    /// Merges `snapshot`'s delta into its base, reporting progress, until the merge is done.
    async fn merge(&self, snapshot: u64, progress: &mut (dyn FnMut(MergeProgress) + Send)) -> Result<(), BackendError>;
    /// Gives `snapshot` up: its delta merges, and its changes stay in the change map.
    async fn abandon(&self, snapshot: u64, reason: &str) -> Result<(), BackendError>;
    /// Restarts the change maps at `snapshot`'s cut.
    async fn checkpoint(&self, snapshot: u64) -> Result<(), BackendError>;
    /// Opens the live-restore feed of `disk` (a disk whose [`DiskState::restore`] is set): the
    /// backend's wants come on [`Feed::wants`], the answers go on [`Feed::answers`]. A backend
    /// without the call refuses it.
    async fn restore_feed(&self, disk: &str) -> Result<Feed, BackendError> {
        let _ = disk;
        Err(BackendError::Refused {
            call: Call::RestoreFeed,
            refusal: Refusal::Failed,
            source: "this backend has no live restore".into(),
        })
    }
}

/// One open live-restore feed. Dropping it closes the stream.
#[derive(Debug)]
pub struct Feed {
    /// The backend's wants, in order; an error, or the end, when the stream breaks.
    pub wants: tokio::sync::mpsc::Receiver<Result<Want, BackendError>>,
    /// The answers to send (the first message, naming the disk, is sent by the opener).
    pub answers: tokio::sync::mpsc::Sender<Answer>,
}

/// Chunks the backend wants (`RestoreWant`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub chunks: Vec<u64>,
    /// A guest request waits for them.
    pub urgent: bool,
    /// Every chunk is in: the last message of the stream.
    pub complete: bool,
}

/// The answer for one chunk (`RestoreData`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub chunk: u64,
    pub body: AnswerBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerBody {
    Data(Vec<u8>),
    Zero,
    /// The chunk could not be read; the backend asks again later.
    Error(String),
}

/// A VM's guest agent.
#[async_trait]
pub trait Agent: Send + Sync {
    async fn ping(&self) -> Result<(), AgentError>;
    /// Freezes the guest's filesystems for at most `deadline` (the agent thaws by itself then).
    async fn freeze(&self, deadline: Duration, job: &str) -> Result<Frozen, AgentError>;
    async fn thaw(&self) -> Result<Thawed, AgentError>;
    async fn status(&self) -> Result<AgentStatus, AgentError>;
}

/// The backend's calls, as errors name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Status,
    Changes,
    Begin,
    Merge,
    Abandon,
    Checkpoint,
    RestoreFeed,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Call::Status => "Status",
            Call::Changes => "Changes",
            Call::Begin => "Begin",
            Call::Merge => "Merge",
            Call::Abandon => "Abandon",
            Call::Checkpoint => "Checkpoint",
            Call::RestoreFeed => "RestoreFeed",
        })
    }
}

/// Why a backend refused a call, as the daemon passes it on to its own clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No such snapshot or disk.
    NotFound,
    /// The request is malformed.
    Invalid,
    /// The backend's state does not allow it (a snapshot is active, or not active).
    State,
    /// The backend cannot take it now.
    Unavailable,
    /// The backend's state directory is full (the operator frees space and retries).
    Exhausted,
    /// The backend failed.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("The backend does not answer on `{}`", socket.display())]
    Unavailable {
        socket: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("The backend did not answer on `{}` within {timeout:?}", socket.display())]
    NoAnswer { socket: PathBuf, timeout: Duration },
    #[error("The backend did not answer {call} within {timeout:?}")]
    Timeout { call: Call, timeout: Duration },
    #[error("The backend refused {call}")]
    Refused {
        call: Call,
        refusal: Refusal,
        #[source]
        source: BoxError,
    },
    #[error("The backend ended {call} before it was complete")]
    Ended { call: Call },
    #[error("The backend's answer to {call} is invalid: {reason}")]
    InvalidReply { call: Call, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("The agent at {endpoint} is unreachable")]
    Unreachable {
        endpoint: AgentEndpoint,
        #[source]
        source: BoxError,
    },
    #[error("The agent's {call} failed")]
    Failed {
        call: &'static str,
        #[source]
        source: BoxError,
    },
}

/// A snapshot as the backend cut it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    pub disks: Vec<String>,
    /// How long the guest's I/O was held for the cut.
    pub pause_us: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No snapshot: writes go to the base.
    Direct,
    /// A snapshot is active: the base is frozen, writes go to the delta.
    Active,
    /// The delta merges into the base.
    Merging,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskState {
    pub id: String,
    pub phase: Phase,
    /// The snapshot the disk is in, if any.
    pub snapshot: Option<u64>,
    pub size: u64,
    pub base_path: PathBuf,
    /// `raw` or `qcow2`.
    pub base_format: String,
    /// Why the backend gave the disk's snapshot up, if it did.
    pub abandoned: Option<String>,
    /// Bytes of the virtual disk in the delta: written since the cut, or, while merging, still to
    /// merge.
    pub delta_bytes: u64,
    /// The extents of the delta's map.
    pub delta_extents: u64,
    /// While merging: bytes copied into the base so far.
    pub merged_bytes: u64,
    /// Set while the disk's image is being filled from a backup (live restore).
    pub restore: Option<RestoreState>,
}

/// A disk under live restore, as its backend reports it (`LiveRestore`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreState {
    /// The backup being restored: its VM, id and disk.
    pub vm: String,
    pub backup_id: String,
    pub disk: String,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub complete: bool,
    pub map_path: PathBuf,
    /// A feed is attached.
    pub fed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    pub snapshot: Option<Snapshot>,
    pub disks: Vec<DiskState>,
}

impl VmStatus {
    /// Whether `snapshot` is still active on every disk it holds, none given up.
    pub fn holds(&self, snapshot: u64) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.id == snapshot)
            && self
                .disks
                .iter()
                .filter(|d| d.snapshot == Some(snapshot))
                .all(|d| d.abandoned.is_none() && d.phase == Phase::Active)
    }

    /// Whether some disk is still active in `snapshot`, not given up: there is something to abandon.
    pub fn active_in(&self, snapshot: u64) -> bool {
        self.disks.iter().any(|d| d.snapshot == Some(snapshot) && d.phase == Phase::Active && d.abandoned.is_none())
    }
}

/// A disk's change map: the extents written since a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeMap {
    /// The snapshot whose cut the map starts at; `None`: never checkpointed.
    pub since_checkpoint: Option<u64>,
    /// The snapshot whose cut the map ends at; `None`: it runs to now.
    pub until_snapshot: Option<u64>,
    /// Why the map cannot be trusted (a crash lost bits); `None`: it can.
    pub untrusted: Option<String>,
    /// `(offset, length)` in bytes.
    pub extents: Vec<(u64, u64)>,
}

/// A merge's progress, summed over its disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeProgress {
    pub merged_bytes: u64,
    pub remaining_bytes: u64,
}

/// A freeze the agent made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frozen {
    /// The filesystems it froze.
    pub filesystems: usize,
}

/// What a thaw found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thawed {
    /// False when the agent had thawed by itself already (its lease ran out).
    pub was_frozen: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    pub frozen: bool,
}
