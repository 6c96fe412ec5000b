//! The gRPC clients behind [`ports`](super::ports): a VM's livesnap-blk control service
//! ([`GrpcBackend`]), its agent ([`AgentClient`]), and the [`GrpcConnector`] that reaches them.
//! Protobuf stops here: the rest of the daemon sees the ports' types.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use tonic::transport::{Channel, Endpoint};

use super::config::{AgentEndpoint, VmConfig};
use super::ports::{
    Agent, AgentError, AgentStatus, Answer, AnswerBody, Backend, BackendError, Call, ChangeMap, Connector, DiskState,
    Feed, Frozen, MergeProgress, Phase, Refusal, RestoreState, Snapshot, Thawed, Timeouts, VmStatus, Want,
};
use crate::agent::{self, AgentClient, FsOutcome, Limits, Target};

/// Longest a merge's progress stream may stay silent (the backend reports several times a second).
const MERGE_SILENCE: Duration = Duration::from_secs(300);

/// The text of a status a peer answered with: its message, which holds its whole chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Remote(pub String);

/// Reaches backends and agents over their sockets.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcConnector;

#[async_trait]
impl Connector for GrpcConnector {
    async fn backend(&self, vm: &VmConfig, timeouts: Timeouts) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(GrpcBackend::connect(&vm.control, timeouts).await?))
    }

    async fn agent(&self, endpoint: &AgentEndpoint, timeouts: Timeouts) -> Result<Arc<dyn Agent>, AgentError> {
        let unreachable = |source| AgentError::Unreachable { endpoint: endpoint.clone(), source };
        let target = match endpoint {
            AgentEndpoint::Hybrid(a) => Target::HybridVsock(a.clone()),
            AgentEndpoint::Unix(p) => Target::Unix(p.clone()),
            AgentEndpoint::Vsock { cid, port } => Target::Vsock { cid: *cid, port: *port },
        };
        let limits = Limits { connect_timeout: timeouts.connect, call_timeout: timeouts.call, ..Limits::default() };
        let client = AgentClient::connect(target, limits).await.map_err(|e| unreachable(Box::new(e)))?;
        Ok(Arc::new(client))
    }
}

/// A connected control service client; each unary call is bounded by the call timeout.
#[derive(Clone, Debug)]
pub struct GrpcBackend {
    client: SnapshotControlClient<Channel>,
    timeout: Duration,
}

impl GrpcBackend {
    /// Connects to the backend's control socket within `timeouts.connect`.
    pub async fn connect(socket: &Path, timeouts: Timeouts) -> Result<GrpcBackend, BackendError> {
        let endpoint = Endpoint::from_static("http://livesnap-blk.invalid").connect_timeout(timeouts.connect);
        let socket: PathBuf = socket.to_owned();
        let channel = tokio::time::timeout(timeouts.connect, livesnap_proto::unix_channel(endpoint, socket.clone()))
            .await
            .map_err(|_| BackendError::NoAnswer { socket: socket.clone(), timeout: timeouts.connect })?
            .map_err(|e| BackendError::Unavailable { socket, source: Box::new(e) })?;
        Ok(GrpcBackend { client: SnapshotControlClient::new(channel), timeout: timeouts.call })
    }

    /// A unary call with the deadline.
    async fn unary<T>(
        &self,
        call: Call,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(BackendError::Timeout { call, timeout: self.timeout }),
            Ok(Err(status)) => Err(refused(call, status)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

/// A status the backend answered with, in the daemon's terms.
fn refused(call: Call, status: tonic::Status) -> BackendError {
    use tonic::Code;
    let refusal = match status.code() {
        Code::NotFound => Refusal::NotFound,
        Code::InvalidArgument | Code::OutOfRange => Refusal::Invalid,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => Refusal::State,
        Code::ResourceExhausted => Refusal::Exhausted,
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => Refusal::Unavailable,
        Code::Ok
        | Code::Unknown
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => Refusal::Failed,
    };
    BackendError::Refused { call, refusal, source: Box::new(Remote(status.message().to_owned())) }
}

fn snapshot(s: pb::Snapshot) -> Snapshot {
    Snapshot { id: s.id, disks: s.disks, pause_us: s.pause_us }
}

fn disk(d: pb::DiskState) -> Result<DiskState, BackendError> {
    let phase = match pb::Phase::try_from(d.phase) {
        Ok(pb::Phase::Direct) => Phase::Direct,
        Ok(pb::Phase::Active) => Phase::Active,
        Ok(pb::Phase::Merging) => Phase::Merging,
        Ok(pb::Phase::Unspecified) | Err(_) => {
            return Err(BackendError::InvalidReply {
                call: Call::Status,
                reason: format!("disk {} is in the unknown phase {}", d.id, d.phase),
            })
        }
    };
    Ok(DiskState {
        phase,
        snapshot: d.snapshot,
        size: d.size,
        base_path: PathBuf::from(d.base_path),
        base_format: d.base_format,
        abandoned: (!d.abandoned.is_empty()).then_some(d.abandoned),
        delta_bytes: d.delta_bytes,
        delta_extents: d.delta_extents,
        merged_bytes: d.merged_bytes,
        restore: d.restore.map(|r| RestoreState {
            vm: r.vm,
            backup_id: r.backup_id,
            disk: r.disk,
            chunk_size: r.chunk_size,
            chunks_total: r.chunks_total,
            chunks_done: r.chunks_done,
            complete: r.complete,
            map_path: PathBuf::from(r.map_path),
            fed: r.fed,
        }),
        id: d.id,
    })
}

/// The largest message of a feed: a chunk (at most 64 MiB, the map's bound) and its framing.
const FEED_MESSAGE_MAX: usize = (64 << 20) + (64 << 10);
/// Answers queued toward the backend (each holds a chunk: this bounds the memory).
const FEED_QUEUE: usize = 8;

#[async_trait]
impl Backend for GrpcBackend {
    async fn status(&self) -> Result<VmStatus, BackendError> {
        let mut c = self.client.clone();
        let st = self.unary(Call::Status, c.status(pb::StatusRequest {})).await?;
        Ok(VmStatus {
            snapshot: st.snapshot.map(snapshot),
            disks: st.disks.into_iter().map(disk).collect::<Result<_, _>>()?,
        })
    }

    async fn changes(&self, disk: &str) -> Result<ChangeMap, BackendError> {
        let mut c = self.client.clone();
        let fetch = async {
            let mut stream = c.changes(pb::ChangesRequest { disk: disk.to_owned() }).await?.into_inner();
            let mut head: Option<pb::ChangesPage> = None;
            while let Some(page) = stream.message().await? {
                match head.as_mut() {
                    Some(h) => h.extents.extend(page.extents),
                    None => head = Some(page),
                }
            }
            Ok::<_, tonic::Status>(head)
        };
        let page = match tokio::time::timeout(self.timeout, fetch).await {
            Err(_) => return Err(BackendError::Timeout { call: Call::Changes, timeout: self.timeout }),
            Ok(Err(status)) => return Err(refused(Call::Changes, status)),
            Ok(Ok(None)) => {
                return Err(BackendError::InvalidReply { call: Call::Changes, reason: "no change page".into() })
            }
            Ok(Ok(Some(page))) => page,
        };
        Ok(ChangeMap {
            since_checkpoint: page.since_checkpoint,
            until_snapshot: page.until_snapshot,
            untrusted: (!page.trusted).then_some(page.untrusted_reason),
            extents: page.extents.iter().map(|e| (e.offset, e.length)).collect(),
        })
    }

    async fn begin(&self) -> Result<Snapshot, BackendError> {
        let mut c = self.client.clone();
        let r = self.unary(Call::Begin, c.begin(pb::BeginRequest::default())).await?;
        r.snapshot
            .map(snapshot)
            .ok_or_else(|| BackendError::InvalidReply { call: Call::Begin, reason: "it carries no snapshot".into() })
    }

    async fn merge(
        &self,
        snapshot_id: u64,
        progress: &mut (dyn FnMut(MergeProgress) + Send),
    ) -> Result<(), BackendError> {
        let mut c = self.client.clone();
        let mut stream = self.unary(Call::Merge, c.merge(pb::MergeRequest { snapshot_id })).await?;
        loop {
            let next = tokio::time::timeout(MERGE_SILENCE, stream.message())
                .await
                .map_err(|_| BackendError::Timeout { call: Call::Merge, timeout: MERGE_SILENCE })?;
            let Some(m) = next.map_err(|status| refused(Call::Merge, status))? else {
                return Err(BackendError::Ended { call: Call::Merge });
            };
            progress(MergeProgress {
                merged_bytes: m.disks.iter().map(|d| d.merged_bytes).sum(),
                remaining_bytes: m.disks.iter().map(|d| d.remaining_bytes).sum(),
            });
            if m.done {
                return Ok(());
            }
        }
    }

    async fn abandon(&self, snapshot_id: u64, reason: &str) -> Result<(), BackendError> {
        let mut c = self.client.clone();
        let req = pb::AbandonRequest { snapshot_id, reason: reason.to_owned() };
        self.unary(Call::Abandon, c.abandon(req)).await.map(|_| ())
    }

    async fn checkpoint(&self, snapshot_id: u64) -> Result<(), BackendError> {
        let mut c = self.client.clone();
        self.unary(Call::Checkpoint, c.checkpoint(pb::CheckpointRequest { snapshot_id })).await.map(|_| ())
    }

    async fn restore_feed(&self, disk: &str) -> Result<Feed, BackendError> {
        let mut c =
            self.client.clone().max_decoding_message_size(FEED_MESSAGE_MAX).max_encoding_message_size(FEED_MESSAGE_MAX);
        let (answers, rx) = tokio::sync::mpsc::channel::<Answer>(FEED_QUEUE);
        let first = pb::RestoreData { disk: disk.to_owned(), ..pb::RestoreData::default() };
        let name = disk.to_owned();
        let outgoing = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |a| {
            let mut m = pb::RestoreData { disk: name.clone(), chunk: a.chunk, ..pb::RestoreData::default() };
            match a.body {
                AnswerBody::Data(d) => m.data = d,
                AnswerBody::Zero => m.zero = true,
                AnswerBody::Error(e) => m.error = e,
            }
            m
        });
        let outgoing = tokio_stream::StreamExt::chain(tokio_stream::iter([first]), outgoing);
        let mut stream = self.unary(Call::RestoreFeed, c.restore_feed(outgoing)).await?;
        let (tx, wants) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let next = match stream.message().await {
                    Ok(Some(w)) => Ok(Want { chunks: w.chunks, urgent: w.urgent, complete: w.complete }),
                    Ok(None) => Err(BackendError::Ended { call: Call::RestoreFeed }),
                    Err(status) => Err(refused(Call::RestoreFeed, status)),
                };
                let end = next.is_err();
                if tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Feed { wants, answers })
    }
}

fn failed(call: &'static str) -> impl Fn(agent::Error) -> AgentError {
    move |e| AgentError::Failed { call, source: Box::new(e) }
}

#[async_trait]
impl Agent for AgentClient {
    async fn ping(&self) -> Result<(), AgentError> {
        AgentClient::ping(self).await.map(|_| ()).map_err(failed("Ping"))
    }

    async fn freeze(&self, deadline: Duration, job: &str) -> Result<Frozen, AgentError> {
        let r = AgentClient::freeze(self, deadline, job).await.map_err(failed("Freeze"))?;
        Ok(Frozen { filesystems: r.filesystems.iter().filter(|f| f.outcome == FsOutcome::Frozen).count() })
    }

    async fn thaw(&self) -> Result<Thawed, AgentError> {
        let r = AgentClient::thaw(self).await.map_err(failed("Thaw"))?;
        Ok(Thawed { was_frozen: r.was_frozen })
    }

    async fn status(&self) -> Result<AgentStatus, AgentError> {
        let r = AgentClient::status(self).await.map_err(failed("Status"))?;
        Ok(AgentStatus { frozen: r.frozen })
    }
}
