//! The tonic side: a thin adapter from the generated `Livesnapd` service to [`Daemon`], the
//! local unix socket (mode 0600, no token) and the TCP listener (TLS, bearer token checked on
//! every call by an interceptor).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use livesnap_proto::daemon as pb;
use livesnap_proto::daemon::livesnapd_server::{Livesnapd, LivesnapdServer};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};
use tracing::info;

use super::config::read_token;
use super::files::{FilesDone, FilesMsg, FilesRequest};
use super::model::{
    AgentState, Backup, BackupKind, BackupMode, Event, ImageFormat, JobView, LivePhase, QuiesceMode, RestoreProgress,
    RestoreRequest, SnapshotRequest, VmInfo,
};
use super::ports::{BackendError, Refusal};
use super::retention::{Keep, PruneRequest};
use super::state::JobResult;
use super::workflow::StopReason;
use super::{Daemon, Error as DaemonError};
use crate::files::{FileInfo, Item, Kind};
use livesnap_repo as repo;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen on the unix socket `{}`", path.display())]
    Unix {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read the TLS {what} `{}`", path.display())]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] super::config::Error),
    #[error("The gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("A server task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The adapter: each call goes to the daemon, its answer converted to the wire's messages, each
/// error through [`status`].
#[derive(Clone, Debug)]
pub struct Service(pub Arc<Daemon>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Livesnapd for Service {
    async fn list_vms(&self, _r: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsReply>, Status> {
        let vms = self.0.list_vms().await.map_err(status)?;
        Ok(Response::new(pb::ListVmsReply { vms: vms.into_iter().map(vm_pb).collect() }))
    }

    type CreateSnapshotStream = BoxStream<pb::SnapshotEvent>;

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<Self::CreateSnapshotStream>, Status> {
        let (id, rx) = self.0.create_snapshot(snapshot_request(r.into_inner())?).await.map_err(status)?;
        let events = ReceiverStream::new(rx).map(move |e| Ok(event_pb(&id, e)));
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_backups(&self, r: Request<pb::ListBackupsRequest>) -> Result<Response<pb::ListBackupsReply>, Status> {
        let vm = r.into_inner().vm;
        let backups = self.0.list_backups((!vm.is_empty()).then_some(vm)).await.map_err(status)?;
        Ok(Response::new(pb::ListBackupsReply { backups: backups.into_iter().map(backup_pb).collect() }))
    }

    async fn get_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::Backup>, Status> {
        let r = r.into_inner();
        Ok(Response::new(backup_pb(self.0.get_backup(r.vm, r.id).await.map_err(status)?)))
    }

    async fn verify_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::VerifyReply>, Status> {
        let r = r.into_inner();
        let rep = self.0.verify_backup(r.vm, r.id).await.map_err(status)?;
        Ok(Response::new(pb::VerifyReply {
            ok: rep.is_ok(),
            chunks_checked: rep.chunks_checked,
            problems: rep
                .problems
                .into_iter()
                .map(|p| pb::ChunkProblem {
                    disk: p.disk,
                    chunk_index: p.index as u64,
                    offset: p.offset,
                    hash: p.hash,
                    fault: match p.fault {
                        repo::ChunkFault::Missing => "missing".into(),
                        repo::ChunkFault::Corrupt(why) => format!("corrupt: {why}"),
                        repo::ChunkFault::Unreadable(why) => format!("unreadable: {why}"),
                    },
                })
                .collect(),
        }))
    }

    async fn delete_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::DeleteBackupReply>, Status> {
        let r = r.into_inner();
        self.0.delete_backup(r.vm, r.id).await.map_err(status)?;
        Ok(Response::new(pb::DeleteBackupReply {}))
    }

    type RestoreBackupStream = BoxStream<pb::RestoreProgress>;

    async fn restore_backup(
        &self,
        r: Request<pb::RestoreRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        let r = r.into_inner();
        let format = match pb::ImageFormat::try_from(r.format) {
            Ok(pb::ImageFormat::Raw) => ImageFormat::Raw,
            Ok(pb::ImageFormat::Qcow2) => ImageFormat::Qcow2,
            Err(_) => return Err(Status::invalid_argument(format!("Unknown image format {}", r.format))),
        };
        let req = RestoreRequest {
            vm: r.vm,
            id: r.id,
            disk: r.disk,
            target: PathBuf::from(r.target_path),
            format,
            live: r.live,
        };
        let rx = self.0.restore(req).await.map_err(status)?;
        let progress = ReceiverStream::new(rx).map(|r| r.map(restore_progress_pb).map_err(status));
        Ok(Response::new(Box::pin(progress)))
    }

    async fn prune(&self, r: Request<pb::PruneRequest>) -> Result<Response<pb::PruneReply>, Status> {
        let r = r.into_inner();
        let keep = Keep {
            last: r.keep_last,
            hourly: r.keep_hourly,
            daily: r.keep_daily,
            weekly: r.keep_weekly,
            monthly: r.keep_monthly,
            yearly: r.keep_yearly,
        };
        let req = PruneRequest { vm: r.vm, keep: (!keep.is_empty()).then_some(keep), dry_run: r.dry_run };
        let rep = self.0.prune(req).await.map_err(status)?;
        Ok(Response::new(pb::PruneReply {
            deleted: rep.deleted,
            chunks_removed: rep.gc.as_ref().map_or(0, |g| g.chunks_removed),
            bytes_freed: rep.gc.as_ref().map_or(0, |g| g.bytes_freed),
            backups: rep
                .decisions
                .into_iter()
                .map(|d| pb::PruneDecision {
                    id: d.id,
                    created_unix: d.created_unix_us / 1_000_000,
                    keep: d.kept.is_some(),
                    rule: d.kept.map(|k| k.to_string()).unwrap_or_default(),
                })
                .collect(),
            dry_run: rep.dry_run,
            keep: rep.keep.to_string(),
            gc_deferred: rep.gc_deferred.unwrap_or_default(),
        }))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsReply>, Status> {
        let r = r.into_inner();
        let vm = (!r.vm.is_empty()).then_some(r.vm);
        let last = (r.last != 0).then(|| usize::try_from(r.last).unwrap_or(usize::MAX));
        let jobs = self.0.list_jobs(vm, last).await.map_err(status)?;
        Ok(Response::new(pb::ListJobsReply { jobs: jobs.into_iter().map(job_pb).collect() }))
    }

    async fn get_job(&self, r: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(job_pb(self.0.get_job(&r.into_inner().id).await.map_err(status)?)))
    }

    async fn cancel_job(&self, r: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(job_pb(self.0.cancel_job(&r.into_inner().id).await.map_err(status)?)))
    }

    type ListFilesStream = BoxStream<pb::FileList>;

    async fn list_files(&self, r: Request<pb::FilesRequest>) -> Result<Response<Self::ListFilesStream>, Status> {
        let rx = self.0.list_files(files_request(r.into_inner())).await.map_err(status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| {
            Ok(match m.map_err(status)? {
                FilesMsg::List(entries) => {
                    pb::FileList { entries: entries.into_iter().map(file_info_pb).collect(), done: None }
                }
                FilesMsg::Done(d) => pb::FileList { entries: Vec::new(), done: Some(files_done_pb(d)) },
                FilesMsg::Data { .. } | FilesMsg::Item(_) => return Err(Status::internal("unexpected files message")),
            })
        }))))
    }

    type ReadFileStream = BoxStream<pb::FileData>;

    async fn read_file(&self, r: Request<pb::FilesRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        let rx = self.0.read_file(files_request(r.into_inner())).await.map_err(status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| {
            Ok(match m.map_err(status)? {
                FilesMsg::Data { offset, data } => pb::FileData { offset, data, done: None },
                FilesMsg::Done(d) => pb::FileData { offset: 0, data: Vec::new(), done: Some(files_done_pb(d)) },
                FilesMsg::List(_) | FilesMsg::Item(_) => return Err(Status::internal("unexpected files message")),
            })
        }))))
    }

    type GetFilesStream = BoxStream<pb::FileItem>;

    async fn get_files(&self, r: Request<pb::FilesRequest>) -> Result<Response<Self::GetFilesStream>, Status> {
        use pb::file_item::Item as I;
        let rx = self.0.get_files(files_request(r.into_inner())).await.map_err(status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| {
            let item = match m.map_err(status)? {
                FilesMsg::Item(Item::Entry { path, info }) => {
                    I::Entry(pb::FileEntry { path, info: Some(file_info_pb(info)) })
                }
                FilesMsg::Item(Item::Data { offset, data }) => I::Data(pb::FileData { offset, data, done: None }),
                FilesMsg::Done(d) => I::Done(files_done_pb(d)),
                FilesMsg::List(_) | FilesMsg::Data { .. } => return Err(Status::internal("unexpected files message")),
            };
            Ok(pb::FileItem { item: Some(item) })
        }))))
    }
}

fn files_request(r: pb::FilesRequest) -> FilesRequest {
    FilesRequest {
        vm: r.vm,
        id: r.id,
        disk: r.disk,
        partition: (r.partition != 0).then_some(r.partition),
        path: r.path,
    }
}

fn files_done_pb(d: FilesDone) -> pb::FilesDone {
    pb::FilesDone {
        chunks_fetched: d.stats.chunks_fetched,
        bytes_fetched: d.stats.bytes_fetched,
        disk_bytes_fetched: d.stats.disk_bytes_fetched,
        disk_size: d.disk_size,
        partition: d.partition.unwrap_or(0),
        entries: d.entries,
        data_bytes: d.data_bytes,
    }
}

/// A filesystem entry on the wire (see [`crate::files::FileInfo`] and its reverse in snapctl).
pub fn file_info_pb(i: FileInfo) -> pb::FileInfo {
    pb::FileInfo {
        name: i.name,
        kind: match i.kind {
            Kind::File => pb::FileKind::File,
            Kind::Dir => pb::FileKind::Directory,
            Kind::Symlink => pb::FileKind::Symlink,
            Kind::Fifo => pb::FileKind::Fifo,
            Kind::CharDev => pb::FileKind::CharDevice,
            Kind::BlockDev => pb::FileKind::BlockDevice,
            Kind::Socket => pb::FileKind::Socket,
        } as i32,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        mtime_sec: i.mtime.secs,
        mtime_nsec: i.mtime.nanos,
        atime_sec: i.atime.secs,
        atime_nsec: i.atime.nanos,
        target: i.target,
    }
}

fn restore_progress_pb(p: RestoreProgress) -> pb::RestoreProgress {
    let mut out = pb::RestoreProgress {
        bytes_written: p.bytes_written,
        bytes_total: p.bytes_total,
        done: p.done,
        ..pb::RestoreProgress::default()
    };
    if let Some(l) = p.live {
        out.job_id = l.job;
        out.state = match l.phase {
            LivePhase::Waiting => pb::LiveRestoreState::Waiting,
            LivePhase::Feeding => pb::LiveRestoreState::Feeding,
            LivePhase::Complete => pb::LiveRestoreState::Complete,
        } as i32;
        out.chunks_done = l.chunks_done;
        out.chunks_total = l.chunks_total;
        out.target_path = l.target.to_string_lossy().into_owned();
        out.map_path = l.map.to_string_lossy().into_owned();
    }
    out
}

fn job_pb(v: JobView) -> pb::Job {
    let j = v.job;
    let status = match (j.result, v.running) {
        (Some(JobResult::Ok), _) => pb::JobStatus::Ok,
        (Some(JobResult::Failed), _) => pb::JobStatus::Failed,
        (Some(JobResult::Cancelled), _) => pb::JobStatus::Cancelled,
        (None, true) => pb::JobStatus::Running,
        (None, false) => pb::JobStatus::Unfinished,
    };
    pb::Job {
        id: j.id,
        vm: j.vm,
        status: status as i32,
        stage: j.stage.to_string(),
        started_unix_us: j.started_unix_us,
        finished_unix_us: j.finished_unix_us.unwrap_or(0),
        reason: j.reason,
        snapshot_id: j.snapshot_id.unwrap_or(0),
        stopping: match v.stopping {
            None => pb::StopReason::None,
            Some(StopReason::Cancel) => pb::StopReason::Cancel,
            Some(StopReason::Shutdown) => pb::StopReason::Shutdown,
        } as i32,
        kind: j.kind.as_str().to_owned(),
    }
}

fn snapshot_request(r: pb::CreateSnapshotRequest) -> Result<SnapshotRequest, Status> {
    let mode = match pb::BackupMode::try_from(r.backup) {
        Ok(pb::BackupMode::Auto) => BackupMode::Auto,
        Ok(pb::BackupMode::Full) => BackupMode::Full,
        Ok(pb::BackupMode::Incremental) => BackupMode::Incremental,
        Err(_) => return Err(Status::invalid_argument(format!("Unknown backup mode {}", r.backup))),
    };
    let quiesce = match pb::QuiesceMode::try_from(r.quiesce) {
        Ok(pb::QuiesceMode::Preferred) => QuiesceMode::Preferred,
        Ok(pb::QuiesceMode::Required) => QuiesceMode::Required,
        Ok(pb::QuiesceMode::Off) => QuiesceMode::Off,
        Err(_) => return Err(Status::invalid_argument(format!("Unknown quiesce mode {}", r.quiesce))),
    };
    let freeze_timeout = (r.freeze_timeout_ms != 0).then(|| Duration::from_millis(u64::from(r.freeze_timeout_ms)));
    Ok(SnapshotRequest { vm: r.vm, mode, quiesce, freeze_timeout })
}

fn event_pb(job_id: &str, e: Event) -> pb::SnapshotEvent {
    use pb::snapshot_event::Event as E;
    let event = match e {
        Event::Quiescing => E::Quiescing(pb::Quiescing {}),
        Event::Frozen { filesystems } => {
            E::Frozen(pb::Frozen { filesystems: u32::try_from(filesystems).unwrap_or(u32::MAX) })
        }
        Event::Cut { snapshot_id, crash_consistent_reason, pause_us } => E::Cut(pb::Cut {
            snapshot_id,
            crash_consistent_reason: crash_consistent_reason.unwrap_or_default(),
            pause_us,
        }),
        Event::Thawed { freeze_window_us } => E::Thawed(pb::Thawed { freeze_window_us }),
        Event::BackingUp { disk, bytes_read, bytes_total } => {
            E::BackingUp(pb::DiskProgress { disk, bytes_read, bytes_total })
        }
        Event::Merging { merged_bytes, remaining_bytes } => E::Merging(pb::Merging { merged_bytes, remaining_bytes }),
        Event::Done(b) => E::Done(backup_pb(b)),
        Event::Failed { stage, error } => E::Failed(pb::Failed {
            code: code(&error) as i32,
            reason: livesnap_proto::error::chain(&error),
            stage: stage.to_string(),
        }),
    };
    pb::SnapshotEvent { job_id: job_id.to_owned(), event: Some(event) }
}

fn vm_pb(v: VmInfo) -> pb::Vm {
    pb::Vm {
        name: v.name,
        control_socket: v.control_socket.display().to_string(),
        disks: v.disks,
        backend_reachable: v.backend_reachable,
        agent: match v.agent {
            AgentState::None => pb::AgentState::None,
            AgentState::Reachable => pb::AgentState::Reachable,
            AgentState::Unreachable => pb::AgentState::Unreachable,
        } as i32,
        active_snapshot: v.active_snapshot.unwrap_or(0),
        last_backup: v.last_backup.unwrap_or_default(),
        running_job: v.running_job.unwrap_or_default(),
    }
}

fn backup_pb(b: Backup) -> pb::Backup {
    pb::Backup {
        vm: b.vm,
        id: b.id,
        created_unix: b.created_unix,
        kind: match b.kind {
            BackupKind::Full => pb::BackupKind::Full,
            BackupKind::Incremental => pb::BackupKind::Incremental,
        } as i32,
        consistency: match b.consistency {
            repo::Consistency::Application => pb::Consistency::Application,
            repo::Consistency::Crash => pb::Consistency::Crash,
        } as i32,
        note: b.note,
        freeze_window_us: b.freeze_window_us,
        snapshot_id: b.snapshot_id.unwrap_or(0),
        key_id: b.key.map(|k| k.to_string()).unwrap_or_default(),
        disks: b
            .disks
            .into_iter()
            .map(|d| pb::DiskBackup {
                disk: d.disk,
                size: d.size,
                bytes_read: d.bytes_read,
                bytes_changed: d.bytes_changed,
                bytes_stored: d.bytes_stored,
            })
            .collect(),
    }
}

/// The daemon's error as the API answers it: the fitting code, the whole chain.
pub fn status(e: DaemonError) -> Status {
    livesnap_proto::error::status(code(&e), &e)
}

/// The gRPC code of each of the daemon's errors.
pub fn code(e: &DaemonError) -> Code {
    match e {
        DaemonError::UnknownVm(_) => Code::NotFound,
        DaemonError::JobRunning { .. }
        | DaemonError::NoAgent { .. }
        | DaemonError::Quiesce(_)
        | DaemonError::NotIncremental { .. }
        | DaemonError::SnapshotActive { .. } => Code::FailedPrecondition,
        DaemonError::SnapshotLost { .. } => Code::Aborted,
        DaemonError::InvalidArgument(_) => Code::InvalidArgument,
        DaemonError::Backend { source, .. } => backend_code(source),
        DaemonError::Repo(e) | DaemonError::RepoOpen { source: e, .. } => repo_code(e),
        DaemonError::Restore(e) => restore_code(e),
        DaemonError::Files(e) => files_code(e),
        DaemonError::FilesPanic(_) => Code::Internal,
        DaemonError::Base { .. }
        | DaemonError::State(_)
        | DaemonError::RestoreDir { .. }
        | DaemonError::Kek(_)
        | DaemonError::Key { .. }
        | DaemonError::Task(_) => Code::Internal,
        DaemonError::Cancelled(_) => Code::Cancelled,
        DaemonError::Stopping => Code::Unavailable,
        DaemonError::UnknownJob(_) => Code::NotFound,
        DaemonError::NotRunning { .. } => Code::FailedPrecondition,
        DaemonError::LiveMap { .. } => Code::FailedPrecondition,
        DaemonError::LiveEnded { .. } => Code::Aborted,
        DaemonError::LiveRestoring { .. } | DaemonError::LiveRestoreLeft { .. } => Code::FailedPrecondition,
    }
}

fn backend_code(e: &BackendError) -> Code {
    match e {
        BackendError::Unavailable { .. }
        | BackendError::NoAnswer { .. }
        | BackendError::Timeout { .. }
        | BackendError::Ended { .. } => Code::Unavailable,
        BackendError::Refused { refusal, .. } => match refusal {
            Refusal::NotFound => Code::NotFound,
            Refusal::Invalid => Code::InvalidArgument,
            Refusal::State => Code::FailedPrecondition,
            Refusal::Unavailable => Code::Unavailable,
            Refusal::Exhausted => Code::ResourceExhausted,
            Refusal::Failed => Code::Internal,
        },
        BackendError::InvalidReply { .. } => Code::Internal,
    }
}

fn restore_code(e: &crate::restore::Error) -> Code {
    use crate::restore::Error as R;
    match e {
        R::Repo(e) => repo_code(e),
        R::DestinationExists(_) => Code::AlreadyExists,
        R::OutsideRestoreDir { .. } => Code::InvalidArgument,
        R::NoSuchDirectory(_) => Code::NotFound,
        R::NoOpenat2 => Code::FailedPrecondition,
        R::Io { .. } | R::QemuImgSpawn(_) | R::QemuImg { .. } => Code::Internal,
    }
}

/// A files call's error: what the disk holds that cannot be read is FAILED_PRECONDITION, a
/// damaged filesystem DATA_LOSS, a missing path or partition NOT_FOUND; a read of the
/// repository that failed answers as the repository's error does.
pub fn files_code(e: &crate::files::Error) -> Code {
    use crate::files::Error as F;
    match e {
        F::Read { source, .. } => match source.downcast_ref::<repo::Error>() {
            Some(e) => repo_code(e),
            None => Code::Internal,
        },
        F::PastEnd { .. } | F::TooDeep { .. } => Code::DataLoss,
        F::Table(_) | F::ChoosePartition { .. } | F::NotExt4 { .. } => Code::FailedPrecondition,
        F::NoTable { .. } | F::NoSuchPartition { .. } => Code::NotFound,
        F::Ext4 { source, .. } => ext4_code(source, Code::FailedPrecondition),
        F::Path { source, .. } => ext4_code(source, Code::InvalidArgument),
        F::BadPath(..) | F::NotAFile(..) => Code::InvalidArgument,
        F::Gone => Code::Cancelled,
        F::ReadLimit => Code::ResourceExhausted,
    }
}

/// ext4-view's error: `unusable` for what the reader refuses that is not damage (a path
/// that is not a directory, an incompatible feature, ...).
fn ext4_code(e: &ext4_view::Ext4Error, unusable: Code) -> Code {
    use ext4_view::Ext4Error as E;
    match e {
        E::NotFound => Code::NotFound,
        E::Corrupt(_) => Code::DataLoss,
        E::Io(inner) => match inner.downcast_ref::<crate::files::Error>() {
            Some(f) => files_code(f),
            None => Code::Internal,
        },
        E::Incompatible(_) | E::Encrypted => Code::FailedPrecondition,
        _ => unusable,
    }
}

fn repo_code(e: &repo::Error) -> Code {
    use repo::Error as R;
    match e {
        R::BackupNotFound { .. } | R::DiskNotFound { .. } => Code::NotFound,
        R::InvalidName { .. } | R::InvalidChunkSize(_) | R::InvalidLevel(_) => Code::InvalidArgument,
        R::BackupExists { .. } => Code::AlreadyExists,
        R::Busy => Code::Unavailable,
        R::Manifest { .. } | R::Inconsistent { .. } | R::ChunkMissing { .. } | R::ChunkCorrupt { .. } => Code::DataLoss,
        R::ParentMismatch { .. } => Code::FailedPrecondition,
        R::KeyMissing { .. } | R::WrongKey { .. } | R::NotEncrypted { .. } => Code::PermissionDenied,
        R::OutOfRange { .. } => Code::OutOfRange,
        R::Store(_)
        | R::ChunkRead { .. }
        | R::TargetResize { .. }
        | R::TargetWrite { .. }
        | R::TargetSync { .. }
        | R::Codec { .. }
        | R::Compress { .. }
        | R::Threads(_)
        | R::SourceRead { .. }
        | R::NotARepository { .. }
        | R::NotEmpty(_)
        | R::ConfigParse { .. }
        | R::ConfigInvalid { .. }
        | R::DuplicateDisk(_)
        | R::ChunksNotStored { .. }
        | R::EmptyBackup { .. }
        | R::InvalidFreezeWindow
        | R::InvalidExtents { .. }
        | R::Serialize(_)
        | R::Random(_) => Code::Internal,
    }
}

/// Checks `authorization: Bearer <token>` on every TCP call.
#[derive(Clone)]
pub struct TokenCheck(Arc<str>);

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(..)")
    }
}

impl TokenCheck {
    pub fn new(token: String) -> TokenCheck {
        TokenCheck(token.into())
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if same(t.trim().as_bytes(), self.0.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the bearer token is wrong")),
            None => Err(Status::unauthenticated("a bearer token is required (authorization: Bearer <token>)")),
        }
    }
}

/// Binds the unix socket with mode 0600 (a stale socket file is replaced). The socket is bound
/// and listening under a temporary name first and renamed into place, so that its path appears
/// only once a client can connect (a client started with the daemon otherwise finds the file
/// between bind and listen and is refused).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let err = |source| Error::Unix { path: path.to_owned(), source };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(err(std::io::Error::from(std::io::ErrorKind::AlreadyExists)));
        }
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // SAFETY: umask only changes the process's file mode mask; no memory is involved. The
    // mask makes the socket 0600 from its creation, before anyone can connect.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(&tmp);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(l)
}

/// Serves until `shutdown` resolves: the unix socket, and TCP if configured.
pub async fn serve(
    daemon: Arc<Daemon>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let cfg = daemon.config().clone();
    let unix = bind_unix(&cfg.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let svc = Service(daemon);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let svc = svc.clone();
        let rx = stop_rx.clone();
        info!(socket = %cfg.socket.display(), "serving on the unix socket");
        tasks.spawn(async move {
            Server::builder()
                .add_service(LivesnapdServer::new(svc))
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(rx))
                .await
        });
    }
    if let Some(tcp) = &cfg.tcp {
        let read =
            |what, p: &Path| std::fs::read(p).map_err(|source| Error::TlsFile { what, path: p.to_owned(), source });
        let identity = Identity::from_pem(read("certificate", &tcp.cert)?, read("key", &tcp.key)?);
        let token = read_token(&tcp.token_file)?;
        let mut server =
            Server::builder().tls_config(ServerTlsConfig::new().identity(identity)).map_err(Error::Serve)?;
        let addr = tcp.listen;
        let rx = stop_rx.clone();
        info!(%addr, "serving on TCP (TLS, bearer token)");
        tasks.spawn(async move {
            server
                .add_service(LivesnapdServer::with_interceptor(svc, TokenCheck::new(token)))
                .serve_with_shutdown(addr, stopped(rx))
                .await
        });
    }
    let mut shutdown = Box::pin(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Serve(e)),
            Err(e) => Err(Error::Task(e)),
        },
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::ports::Call;
    use crate::daemon::NoParent;

    fn refused(refusal: Refusal) -> DaemonError {
        DaemonError::Backend {
            vm: "x".into(),
            source: BackendError::Refused {
                call: Call::Begin,
                refusal,
                source: Box::new(crate::daemon::backend::Remote("busy".into())),
            },
        }
    }

    #[test]
    fn errors_map_to_the_codes_the_api_promises() {
        let cases: Vec<(DaemonError, Code)> = vec![
            (DaemonError::UnknownVm("x".into()), Code::NotFound),
            (DaemonError::JobRunning { vm: "x".into(), job: "j".into() }, Code::FailedPrecondition),
            (DaemonError::NoAgent { vm: "x".into() }, Code::FailedPrecondition),
            (
                DaemonError::NotIncremental { disk: "vda".into(), why: NoParent::NoEarlierBackup },
                Code::FailedPrecondition,
            ),
            (DaemonError::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                DaemonError::Backend {
                    vm: "x".into(),
                    source: BackendError::Unavailable {
                        socket: "/s".into(),
                        source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                    },
                },
                Code::Unavailable,
            ),
            (refused(Refusal::State), Code::FailedPrecondition),
            (refused(Refusal::Failed), Code::Internal),
            (refused(Refusal::Exhausted), Code::ResourceExhausted),
            (DaemonError::Repo(repo::Error::BackupNotFound { vm: "x".into(), id: "b".into() }), Code::NotFound),
            (DaemonError::Restore(crate::restore::Error::DestinationExists("/t".into())), Code::AlreadyExists),
            (DaemonError::Repo(repo::Error::Busy), Code::Unavailable),
            (
                DaemonError::Restore(crate::restore::Error::OutsideRestoreDir {
                    target: "../x".into(),
                    dir: "/r".into(),
                    why: "`..` is refused",
                }),
                Code::InvalidArgument,
            ),
            (DaemonError::Restore(crate::restore::Error::NoSuchDirectory("/r/d".into())), Code::NotFound),
            (DaemonError::Repo(repo::Error::ChunkMissing { hash: repo::ChunkHash([0; 32]) }), Code::DataLoss),
            (DaemonError::Repo(repo::Error::InvalidName { what: "VM", name: "..".into() }), Code::InvalidArgument),
            (
                DaemonError::Files(crate::files::Error::NotExt4 { region: "partition 1".into(), found: "xfs".into() }),
                Code::FailedPrecondition,
            ),
            (
                DaemonError::Files(crate::files::Error::Path {
                    path: "/x".into(),
                    source: ext4_view::Ext4Error::NotFound,
                }),
                Code::NotFound,
            ),
            (
                // A chunk the read needed is missing, seen through ext4-view's I/O error.
                DaemonError::Files(crate::files::Error::Path {
                    path: "/x".into(),
                    source: ext4_view::Ext4Error::Io(Box::new(crate::files::Error::Read {
                        offset: 0,
                        len: 1,
                        source: Box::new(repo::Error::ChunkMissing { hash: repo::ChunkHash([0; 32]) }),
                    })),
                }),
                Code::DataLoss,
            ),
            (DaemonError::Files(crate::files::Error::BadPath("x".into(), "why")), Code::InvalidArgument),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = status(e);
            assert_eq!(s.code(), code, "{msg}");
            assert!(s.message().starts_with(&msg), "{:?} does not start with {msg:?}", s.message());
        }
    }

    #[test]
    fn a_status_carries_every_cause() {
        let s = status(refused(Refusal::State));
        assert_eq!(s.message(), "VM x's backend failed: The backend refused Begin: busy");
    }
}
