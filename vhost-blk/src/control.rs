//! The snapshot control service (`livesnap.snapshot.v1`) on a unix socket: a thin adapter from
//! tonic to [`SnapshotControl`]. Engine calls block (they sync files), so each runs on tokio's
//! blocking pool; the service has its own thread and runtime, apart from the queue threads.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_server::{SnapshotControl as PbService, SnapshotControlServer};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::{error, info, warn};

use crate::disk::DiskFile;
use crate::restore::disk::{warn_refused, AnswerError, RestoreStatus};
use crate::restore::{Answer, FeedMsg, RestoreDisk};
use crate::snap::{self, BeginOptions, ControlError, Phase, SnapshotControl};

/// Extents per [`pb::ChangesPage`]: about 1 MiB of message at most.
const EXTENTS_PER_PAGE: usize = 32 * 1024;
/// How long a stop waits for connected clients to go before closing their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often a merge stream reports progress.
const MERGE_REPORT_EVERY: Duration = Duration::from_millis(200);
/// A feed idle this long gets its pending fills committed and failed chunks asked again.
const FEED_IDLE_COMMIT: Duration = Duration::from_millis(100);
/// The largest message the service decodes: a 64 MiB chunk (the map's limit) and its framing.
const MAX_MESSAGE: usize = (64 << 20) + (1 << 20);
/// Answers of one feed taken at once (each holds its chunk in memory): a fill, or the commit a
/// fill runs, never holds up the next answer, an urgent one above all.
const FEED_FILLS: usize = 4;
/// HTTP/2 flow control of the control socket: a feed's 4 MiB chunks flow without waiting for
/// window updates (h2's default stream window is 64 KiB, hyper's 1 MiB), in large frames.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// The disks under live restore, by id.
pub type Restores = Arc<HashMap<String, Arc<RestoreDisk>>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start the control service's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("The control call's task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// `RESOURCE_EXHAUSTED` when the state directory's filesystem is full (the operator frees
/// space and retries), `INTERNAL` for any other failure of the state directory.
fn storage_code(io: Option<&std::io::Error>) -> Code {
    match io.and_then(std::io::Error::raw_os_error) {
        Some(libc::ENOSPC | libc::EDQUOT) => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

/// The whole chain, so that the operator reads "Cannot write the snapshot record: No space
/// left on device", not only its first part.
impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        let code = match &e {
            ControlError::NotFound(_) => Code::NotFound,
            ControlError::State(_) => Code::FailedPrecondition,
            ControlError::Invalid(_) => Code::InvalidArgument,
            ControlError::Record(_)
            | ControlError::Create { .. }
            | ControlError::SyncDir(_)
            | ControlError::DeltaMap { .. }
            | ControlError::ChangeMap { .. }
            | ControlError::AbsorbChanges { .. }
            | ControlError::Merge { .. } => storage_code(e.io()),
        };
        livesnap_proto::error::status(code, &e)
    }
}

/// The running service; [`ControlServer::stop`] ends it and removes the socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Binds `path` (replacing a stale socket; only root may connect) and serves `ctl` on it.
pub fn serve(path: &Path, ctl: Arc<dyn SnapshotControl>) -> Result<ControlServer, Error> {
    Bound::bind(path, ctl)?.start()
}

/// A control socket bound and listening, not yet served: livesnap-blk binds it before it
/// confines itself and starts serving after, so that the service's thread starts confined.
pub struct Bound {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
    listener: tokio::net::UnixListener,
    ctl: Arc<dyn SnapshotControl>,
    restores: Restores,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound").field("path", &self.path).finish()
    }
}

impl Bound {
    /// Binds `path` (replacing a stale socket; only root may connect); starts no thread.
    pub fn bind(path: &Path, ctl: Arc<dyn SnapshotControl>) -> Result<Bound, Error> {
        let listen_err = |source| Error::Listen { path: path.to_owned(), source };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen_err(e)),
            _ => {}
        }
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(path).map_err(listen_err)?
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
        Ok(Bound { path: path.to_owned(), rt, listener, ctl, restores: Restores::default() })
    }

    /// Serves the live-restore feeds of `restores` as well.
    pub fn with_restores(mut self, restores: Restores) -> Bound {
        self.restores = restores;
        self
    }

    /// Serves the control service on its own thread.
    pub fn start(self) -> Result<ControlServer, Error> {
        let Bound { path, rt, listener, ctl, restores } = self;
        let (tx, rx) = watch::channel(false);
        let service = SnapshotControlServer::new(Service { ctl, restores }).max_decoding_message_size(MAX_MESSAGE);
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let stopping = |mut rx: watch::Receiver<bool>| async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                };
                let server = tonic::transport::Server::builder()
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_frame_size(MAX_FRAME)
                    .add_service(service)
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopping(rx.clone()));
                // A graceful stop waits for every client to hang up; one that never does
                // (stalled, or hostile) must not keep the backend from exiting.
                let deadline = async {
                    stopping(rx).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                };
                rt.block_on(async {
                    tokio::select! {
                        served = server => if let Err(e) = served {
                            error!(socket = %shown, error = %livesnap_proto::error::chain(&e), "control service failed");
                        },
                        () = deadline => warn!(socket = %shown, "control clients still connected at the stop; closing them"),
                    }
                });
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .map_err(Error::Runtime)?;
        info!(socket = %path.display(), "control service listening");
        Ok(ControlServer { path, shutdown: Some(tx), thread: Some(thread) })
    }
}

struct Service {
    ctl: Arc<dyn SnapshotControl>,
    restores: Restores,
}

impl Service {
    /// Runs a blocking engine call off the runtime's thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn SnapshotControl) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let ctl = self.ctl.clone();
        tokio::task::spawn_blocking(move || f(&*ctl))
            .await
            .map_err(|e| livesnap_proto::error::status(Code::Internal, &Error::Task(e)))
    }
}

fn snapshot_pb(s: &snap::SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id,
        disks: s.disks.clone(),
        created_unix: s.created_unix,
        pause_us: u64::try_from(s.pause.as_micros()).unwrap_or(u64::MAX),
    }
}

fn restore_pb(r: &RestoreStatus) -> pb::LiveRestore {
    pb::LiveRestore {
        vm: r.info.id.vm.clone(),
        backup_id: r.info.id.backup_id.clone(),
        disk: r.info.id.disk.clone(),
        chunk_size: r.info.chunk_size,
        chunks_total: r.info.chunks_total,
        chunks_done: r.info.chunks_done,
        complete: r.info.complete,
        map_path: r.map_path.display().to_string(),
        fed: r.fed,
    }
}

fn status_pb(st: &snap::VmStatus, restores: &Restores) -> pb::VmStatus {
    let mut disks: Vec<pb::DiskState> = st
        .disks
        .iter()
        .map(|d| pb::DiskState {
            id: d.id.clone(),
            phase: match d.phase {
                Phase::Direct => pb::Phase::Direct,
                Phase::Active => pb::Phase::Active,
                Phase::Merging => pb::Phase::Merging,
            } as i32,
            snapshot: d.snapshot,
            size: d.size,
            base_path: d.base_path.display().to_string(),
            base_format: d.base_format.to_string(),
            delta_path: d.delta_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            delta_bytes: d.delta_bytes,
            delta_extents: d.delta_extents,
            merged_bytes: d.merge.map_or(0, |m| m.done_bytes),
            abandoned: d.abandoned.clone().unwrap_or_default(),
            restore: restores.get(&d.id).map(|r| restore_pb(&r.status())),
        })
        .collect();
    // An engine that does not list a disk (the tests' stand-ins): its restore still shows.
    let mut restored: Vec<_> = restores.iter().filter(|(id, _)| !disks.iter().any(|d| &d.id == *id)).collect();
    restored.sort_by(|a, b| a.0.cmp(b.0));
    for (id, r) in restored {
        let status = r.status();
        let image = status.map_path.with_extension("");
        disks.push(pb::DiskState {
            id: id.clone(),
            phase: pb::Phase::Direct as i32,
            size: r.size(),
            base_path: image.display().to_string(),
            base_format: r.format().to_string(),
            restore: Some(restore_pb(&status)),
            ..pb::DiskState::default()
        });
    }
    pb::VmStatus { vm: st.vm.clone(), snapshot: st.snapshot.as_ref().map(snapshot_pb), disks }
}

/// One report of a merge: the disks cut with snapshot `id`, each done once it left the delta.
fn merge_report(id: u64, disks: &[String], st: &snap::VmStatus) -> pb::MergeProgress {
    let all_done = st.snapshot.as_ref().is_none_or(|s| s.id != id);
    let disks = disks
        .iter()
        .filter_map(|name| st.disks.iter().find(|d| &d.id == name))
        .map(|d| {
            let mine = d.snapshot == Some(id);
            let merged = match d.last_merge {
                Some((snap, bytes)) if !mine && snap == id => bytes,
                _ => d.merge.map_or(0, |m| m.done_bytes),
            };
            pb::DiskMerge {
                id: d.id.clone(),
                merged_bytes: merged,
                remaining_bytes: if mine { d.delta_bytes } else { 0 },
                done: !mine,
            }
        })
        .collect();
    pb::MergeProgress { snapshot_id: id, disks, done: all_done }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PbService for Service {
    async fn begin(&self, req: Request<pb::BeginRequest>) -> Result<Response<pb::BeginReply>, Status> {
        let req = req.into_inner();
        // The backup reads a frozen base from its file: one still being filled would be read
        // as zeros where the backup's chunks have not arrived.
        let mut restoring: Vec<_> = self
            .restores
            .iter()
            .filter(|(id, r)| !r.is_complete() && (req.disks.is_empty() || req.disks.contains(id)))
            .map(|(id, _)| id.clone())
            .collect();
        restoring.sort();
        if let Some(id) = restoring.first() {
            return Err(Status::failed_precondition(format!("disk {id} is being live-restored")));
        }
        let opts = BeginOptions { disks: req.disks, delta_limit: (req.delta_limit > 0).then_some(req.delta_limit) };
        let info = self.run(move |c| c.begin(opts)).await??;
        Ok(Response::new(pb::BeginReply { snapshot: Some(snapshot_pb(&info)) }))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::VmStatus>, Status> {
        let st = self.run(|c| c.status()).await?;
        Ok(Response::new(status_pb(&st, &self.restores)))
    }

    type ChangesStream = BoxStream<pb::ChangesPage>;

    async fn changes(&self, req: Request<pb::ChangesRequest>) -> Result<Response<Self::ChangesStream>, Status> {
        let disk = req.into_inner().disk;
        let ch = self.run(move |c| c.changes(&disk)).await??;
        let changed_bytes = ch.extents.iter().map(|&(_, len)| len).sum();
        let page = |extents: &[(u64, u64)]| pb::ChangesPage {
            disk: ch.disk.clone(),
            since_checkpoint: ch.since_checkpoint,
            until_snapshot: ch.until_snapshot,
            granularity: ch.granularity,
            trusted: ch.trusted,
            untrusted_reason: ch.untrusted_reason.clone().unwrap_or_default(),
            extents: extents.iter().map(|&(offset, length)| pb::Extent { offset, length }).collect(),
            changed_bytes,
        };
        // An empty map still gets one page: it carries the header.
        let pages: Vec<_> = if ch.extents.is_empty() {
            vec![Ok(page(&[]))]
        } else {
            ch.extents.chunks(EXTENTS_PER_PAGE).map(|c| Ok(page(c))).collect()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(pages))))
    }

    type MergeStream = BoxStream<pb::MergeProgress>;
    type RestoreFeedStream = BoxStream<pb::RestoreWant>;

    async fn merge(&self, req: Request<pb::MergeRequest>) -> Result<Response<Self::MergeStream>, Status> {
        let id = req.into_inner().snapshot_id;
        let (disks, first) = self
            .run(move |c| {
                c.merge(id)?;
                let st = c.status();
                let disks = st.snapshot.as_ref().filter(|s| s.id == id).map(|s| s.disks.clone()).unwrap_or_default();
                Ok::<_, ControlError>((disks, st))
            })
            .await??;
        let ctl = self.ctl.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut report = merge_report(id, &disks, &first);
            loop {
                let done = report.done;
                if tx.send(Ok(report)).await.is_err() || done {
                    return;
                }
                tokio::time::sleep(MERGE_REPORT_EVERY).await;
                let c = ctl.clone();
                match tokio::task::spawn_blocking(move || c.status()).await {
                    Ok(st) => report = merge_report(id, &disks, &st),
                    Err(e) => {
                        let _ = tx.send(Err(livesnap_proto::error::status(Code::Internal, &Error::Task(e)))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn abandon(&self, req: Request<pb::AbandonRequest>) -> Result<Response<pb::AbandonReply>, Status> {
        let req = req.into_inner();
        self.run(move |c| c.abandon(req.snapshot_id, &req.reason)).await??;
        Ok(Response::new(pb::AbandonReply {}))
    }

    async fn checkpoint(&self, req: Request<pb::CheckpointRequest>) -> Result<Response<pb::CheckpointReply>, Status> {
        let id = req.into_inner().snapshot_id;
        self.run(move |c| c.checkpoint(id)).await??;
        Ok(Response::new(pb::CheckpointReply {}))
    }

    async fn restore_feed(
        &self,
        req: Request<tonic::Streaming<pb::RestoreData>>,
    ) -> Result<Response<Self::RestoreFeedStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the feed ended before naming its disk"))?;
        if first.chunk != 0 || !first.data.is_empty() || first.zero || !first.error.is_empty() {
            return Err(Status::invalid_argument(
                "the first message of a feed names its disk and carries nothing else",
            ));
        }
        let name = first.disk;
        let disk = match self.restores.get(&name) {
            Some(d) if !d.is_complete() => d.clone(),
            Some(_) => return Err(Status::failed_precondition(format!("disk {name} is restored completely"))),
            None => return Err(Status::failed_precondition(format!("disk {name} is not being live-restored"))),
        };
        let (gen, mut wants) = disk.attach();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // Answers being taken, each on a blocking thread (the fill, and a commit when due).
            let mut fills: tokio::task::JoinSet<Result<(), AnswerError>> = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    want = wants.recv() => {
                        let msg = match want {
                            Some(FeedMsg::Want { chunks, urgent }) =>
                                pb::RestoreWant { disk: name.clone(), chunks, urgent, complete: false },
                            Some(FeedMsg::Complete) =>
                                pb::RestoreWant { disk: name.clone(), complete: true, ..Default::default() },
                            // Replaced by a newer feed.
                            None => break,
                        };
                        let last = msg.complete;
                        if tx.send(Ok(msg)).await.is_err() || last {
                            break;
                        }
                    }
                    Some(done) = fills.join_next(), if !fills.is_empty() => {
                        match joined(done) {
                            Ok(()) => {}
                            Err(e @ (AnswerError::Fill { .. } | AnswerError::Commit(_))) => {
                                error!(disk = %name, error = %livesnap_proto::error::chain(&e), "live restore cannot write its image");
                                let _ = tx.send(Err(livesnap_proto::error::status(Code::Internal, &e))).await;
                                break;
                            }
                            Err(e) => warn_refused(&name, &e),
                        }
                    }
                    data = tokio::time::timeout(FEED_IDLE_COMMIT, inbound.message()), if fills.len() < FEED_FILLS => {
                        let d = match data {
                            Err(_idle) => {
                                let disk = disk.clone();
                                let r = tokio::task::spawn_blocking(move || disk.tick().map_err(AnswerError::Commit)).await;
                                if let Err(e) = joined(r) {
                                    let _ = tx.send(Err(Status::internal(livesnap_proto::error::chain(&e)))).await;
                                    break;
                                }
                                continue;
                            }
                            Ok(Ok(Some(d))) => d,
                            Ok(Ok(None)) => break,
                            Ok(Err(e)) => {
                                info!(disk = %name, status = %e, "restore feed failed");
                                break;
                            }
                        };
                        if d.disk != name {
                            warn!(disk = %name, other = %d.disk, "restore feed answer for another disk ignored");
                            continue;
                        }
                        let answer = if !d.error.is_empty() {
                            Answer::Error(d.error)
                        } else if d.zero {
                            Answer::Zero
                        } else {
                            Answer::Data(d.data)
                        };
                        let (disk2, chunk) = (disk.clone(), d.chunk);
                        fills.spawn_blocking(move || disk2.answer(gen, chunk, answer));
                    }
                }
            }
            // The fills under way finish before the feed lets go of the disk.
            while fills.join_next().await.is_some() {}
            disk.detach(gen);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsReply>, Status> {
        let stats = self.run(|c| c.stats()).await?;
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::StatsReply {
            disks: stats
                .into_iter()
                .map(|s| pb::DiskStats {
                    id: s.id,
                    reads: s.reads,
                    writes: s.writes,
                    read_bytes: s.read_bytes,
                    written_bytes: s.written_bytes,
                    flushes: s.flushes,
                    cuts: s.cuts,
                    max_cut_pause_us: us(s.max_cut_pause),
                    merged_bytes: s.merged_bytes,
                })
                .collect(),
        }))
    }
}

/// The outcome of a feed's blocking task; one that panicked counts as a failed commit.
fn joined(r: Result<Result<(), AnswerError>, tokio::task::JoinError>) -> Result<(), AnswerError> {
    r.unwrap_or_else(|e| Err(AnswerError::Commit(crate::disk::Error::Io(std::io::Error::other(e.to_string())))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{self, Buf, Format};
    use crate::snap::store::FsDir;
    use crate::snap::{DiskSpec, Options, Vm};
    use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
    use tonic::transport::{Channel, Endpoint};

    const SIZE: u64 = 16 << 20;

    struct Fixture {
        dir: tempfile::TempDir,
        vm: Vm,
        server: Option<ControlServer>,
    }

    impl Fixture {
        fn new(disks: &[&str], granularity: u64, size: u64) -> Fixture {
            Self::with(disks, Options { granularity, ..Options::default() }, size)
        }

        fn with(disks: &[&str], opts: Options, size: u64) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let specs = disks
                .iter()
                .map(|id| {
                    let path = dir.path().join(format!("{id}.raw"));
                    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
                    DiskSpec {
                        id: (*id).into(),
                        base: disk::open(&path, Some(Format::Raw), false).unwrap(),
                        base_path: path,
                    }
                })
                .collect();
            let store = Arc::new(FsDir::new(&dir.path().join("state")).unwrap());
            let vm = Vm::open("vm1", store, specs, opts).unwrap();
            let server = serve(&dir.path().join("ctl.sock"), Arc::new(vm.clone())).unwrap();
            Fixture { dir, vm, server: Some(server) }
        }

        async fn client(&self) -> SnapshotControlClient<Channel> {
            let ch = livesnap_proto::unix_channel(
                Endpoint::from_static("http://t.invalid"),
                self.dir.path().join("ctl.sock"),
            )
            .await
            .unwrap();
            SnapshotControlClient::new(ch)
        }

        fn write(&self, disk: &str, offset: u64, byte: u8, len: usize) {
            let mut data = vec![byte; len];
            self.vm.disk(disk).unwrap().write_vectored_at(&[Buf::from(&mut data[..])], offset).unwrap();
        }

        fn base(&self, disk: &str, offset: u64, len: usize) -> Vec<u8> {
            let f = std::fs::File::open(self.dir.path().join(format!("{disk}.raw"))).unwrap();
            let mut buf = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).unwrap();
            buf
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if let Some(s) = self.server.take() {
                s.stop();
            }
            self.vm.shutdown();
        }
    }

    fn code<T>(r: Result<T, Status>) -> tonic::Code {
        r.map(|_| ()).unwrap_err().code()
    }

    fn phases(st: &pb::VmStatus) -> Vec<i32> {
        st.disks.iter().map(|d| d.phase).collect()
    }

    #[tokio::test]
    async fn begin_freezes_every_disk_and_merge_streams_to_completion() {
        let fx = Fixture::new(&["vda", "vdb"], 64 << 10, SIZE);
        let mut c = fx.client().await;
        fx.write("vda", 0, 1, 4096);
        let snap = c.begin(pb::BeginRequest::default()).await.unwrap().into_inner().snapshot.unwrap();
        assert_eq!(snap.disks, vec!["vda", "vdb"]);
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(phases(&st), vec![pb::Phase::Active as i32; 2]);
        assert_eq!(st.snapshot.as_ref().map(|s| s.id), Some(snap.id));

        // Writes after the cut reach the delta, not the base.
        fx.write("vda", 0, 2, 4096);
        fx.write("vdb", 1 << 20, 3, 8192);
        assert_eq!(fx.base("vda", 0, 4096), vec![1; 4096]);
        assert_eq!(fx.base("vdb", 1 << 20, 8192), vec![0; 8192]);
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.disks.iter().map(|d| d.delta_bytes).collect::<Vec<_>>(), vec![4096, 8192]);
        assert!(st.disks.iter().all(|d| d.abandoned.is_empty() && !d.delta_path.is_empty()));

        let mut stream = c.merge(pb::MergeRequest { snapshot_id: snap.id }).await.unwrap().into_inner();
        let mut last = None;
        while let Some(m) = stream.message().await.unwrap() {
            last = Some(m);
        }
        let last = last.unwrap();
        assert!(last.done && last.disks.iter().all(|d| d.done), "{last:?}");
        // Done disks still say what they copied, however fast they were.
        assert_eq!(last.disks.iter().map(|d| d.merged_bytes).collect::<Vec<_>>(), vec![4096, 8192]);
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.snapshot, None);
        assert_eq!(phases(&st), vec![pb::Phase::Direct as i32; 2]);
        assert_eq!(fx.base("vda", 0, 4096), vec![2; 4096]);
        assert_eq!(fx.base("vdb", 1 << 20, 8192), vec![3; 8192]);
    }

    #[tokio::test]
    async fn calls_that_do_not_fit_get_precise_codes() {
        // Merges are driven by hand here, so an abandoned snapshot stays to be looked at.
        let fx = Fixture::with(&["vda"], Options { background_merge: false, ..Options::default() }, SIZE);
        let mut c = fx.client().await;
        let unknown = pb::BeginRequest { disks: vec!["nope".into()], delta_limit: 0 };
        assert_eq!(code(c.begin(unknown).await), tonic::Code::NotFound);
        assert_eq!(code(c.merge(pb::MergeRequest { snapshot_id: 7 }).await), tonic::Code::NotFound);
        assert_eq!(code(c.checkpoint(pb::CheckpointRequest { snapshot_id: 7 }).await), tonic::Code::NotFound);
        assert_eq!(code(c.changes(pb::ChangesRequest { disk: "nope".into() }).await), tonic::Code::NotFound);

        let snap = c.begin(pb::BeginRequest::default()).await.unwrap().into_inner().snapshot.unwrap();
        assert_eq!(code(c.begin(pb::BeginRequest::default()).await), tonic::Code::FailedPrecondition);
        fx.write("vda", 0, 5, 4096);
        c.abandon(pb::AbandonRequest { snapshot_id: snap.id, reason: "backup target offline".into() }).await.unwrap();
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(phases(&st), vec![pb::Phase::Merging as i32]);
        assert_eq!(st.disks[0].abandoned, "backup target offline");
        // The base of an abandoned snapshot was not kept frozen: its backup cannot be acknowledged.
        assert_eq!(
            code(c.checkpoint(pb::CheckpointRequest { snapshot_id: snap.id }).await),
            tonic::Code::FailedPrecondition
        );
        // Nor can a new snapshot be cut before the merge is complete.
        assert_eq!(code(c.begin(pb::BeginRequest::default()).await), tonic::Code::FailedPrecondition);
        while fx.vm.merge_some(16).unwrap() {}
        assert_eq!(fx.base("vda", 0, 4096), vec![5; 4096]);
        assert!(c.begin(pb::BeginRequest::default()).await.is_ok());
    }

    #[test]
    fn stop_returns_while_a_stalled_client_keeps_its_connection() {
        let mut fx = Fixture::new(&["vda"], 64 << 10, SIZE);
        // A client that made a call and then stopped being driven: its runtime stays alive, so
        // the connection stays open, but nothing answers the server's goodbye.
        let stalled = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = stalled.block_on(async {
            let mut c = fx.client().await;
            c.status(pb::StatusRequest {}).await.unwrap();
            c
        });
        let server = fx.server.take().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            server.stop();
            let _ = done_tx.send(());
        });
        // Generous: this catches a hang, it does not time the stop.
        assert!(done_rx.recv_timeout(Duration::from_secs(60)).is_ok(), "the stop waited for the stalled client");
        drop(client);
    }

    #[tokio::test]
    async fn changes_come_in_pages_that_add_up_to_the_engine_map() {
        // Blocks of 256 bytes on a 32 MiB disk, every other one written: 64 Ki extents, more
        // than one page holds.
        let (granularity, size) = (256, 2 * SIZE);
        let fx = Fixture::new(&["vda"], granularity, size);
        let blocks = size / granularity;
        let written: Vec<u64> = (0..blocks).step_by(2).collect();
        assert!(written.len() > EXTENTS_PER_PAGE);
        for &b in &written {
            fx.write("vda", b * granularity, 9, 512.min(granularity as usize));
        }
        let mut c = fx.client().await;
        let mut stream = c.changes(pb::ChangesRequest { disk: "vda".into() }).await.unwrap().into_inner();
        let mut pages = Vec::new();
        while let Some(p) = stream.message().await.unwrap() {
            pages.push(p);
        }
        assert!(pages.len() >= 2, "{} pages", pages.len());
        let extents: Vec<(u64, u64)> =
            pages.iter().flat_map(|p| p.extents.iter().map(|e| (e.offset, e.length))).collect();
        let expected: Vec<(u64, u64)> = written.iter().map(|&b| (b * granularity, granularity)).collect();
        assert_eq!(extents, expected);
        assert!(pages
            .iter()
            .all(|p| p.changed_bytes == written.len() as u64 * granularity && p.granularity == granularity));
        // The first generation of a disk cannot know what was written before tracking began.
        assert!(!pages[0].trusted && !pages[0].untrusted_reason.is_empty());
    }

    mod restore_feed {
        use super::*;
        use crate::restore::{self, disk::Options, map::Identity};
        use std::os::unix::fs::FileExt;

        const CHUNK: u64 = 64 << 10;
        const SIZE: u64 = 32 * CHUNK;

        struct Rig {
            dir: tempfile::TempDir,
            disk: Arc<RestoreDisk>,
            vm: Vm,
            reference: Vec<u8>,
            _server: ControlServer,
        }

        impl Rig {
            fn new(wait: Duration) -> Rig {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("vda.raw");
                std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
                let id = Identity { vm: "web01".into(), backup_id: "b7".into(), disk: "vda".into() };
                restore::create_map(&path, &id, SIZE, CHUNK).unwrap();
                let image = disk::open(&path, Some(Format::Raw), false).unwrap();
                let opts = Options { wait, ..Options::default() };
                let disk = Arc::new(restore::disk::open(&path, image, opts).unwrap().unwrap());
                let spec = DiskSpec { id: "vda".into(), base: disk.clone(), base_path: path };
                let store = Arc::new(FsDir::new(&dir.path().join("state")).unwrap());
                let vm = Vm::open("web01", store, vec![spec], crate::snap::Options::default()).unwrap();
                let restores: Restores = Arc::new([("vda".to_string(), disk.clone())].into_iter().collect());
                let server = Bound::bind(&dir.path().join("ctl.sock"), Arc::new(vm.clone()))
                    .unwrap()
                    .with_restores(restores)
                    .start()
                    .unwrap();
                let mut reference = vec![0u8; SIZE as usize];
                fastrand::Rng::with_seed(5).fill(&mut reference);
                Rig { dir, disk, vm, reference, _server: server }
            }

            async fn client(&self) -> SnapshotControlClient<Channel> {
                let ch = livesnap_proto::unix_channel(
                    Endpoint::from_static("http://t.invalid"),
                    self.dir.path().join("ctl.sock"),
                )
                .await
                .unwrap();
                SnapshotControlClient::new(ch)
            }

            /// Opens a feed of `disk`: the sender for answers, the stream of wants.
            async fn feed(
                &self,
                disk: &str,
            ) -> Result<(tokio::sync::mpsc::Sender<pb::RestoreData>, tonic::Streaming<pb::RestoreWant>), Status>
            {
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tx.send(pb::RestoreData { disk: disk.into(), ..Default::default() }).await.unwrap();
                let wants = self
                    .client()
                    .await
                    .restore_feed(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                Ok((tx, wants))
            }

            fn data(&self, chunk: u64) -> pb::RestoreData {
                let s = (chunk * CHUNK) as usize;
                pb::RestoreData {
                    disk: "vda".into(),
                    chunk,
                    data: self.reference[s..s + CHUNK as usize].to_vec(),
                    ..Default::default()
                }
            }

            /// A guest read of one block of `chunk`, on its own thread (it may wait).
            fn read(&self, chunk: u64) -> std::thread::JoinHandle<crate::disk::Result<Vec<u8>>> {
                let disk = self.vm.disk("vda").unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    disk.read_vectored_at(&[Buf::from(&mut buf[..])], chunk * CHUNK + 8192)?;
                    Ok(buf)
                })
            }

            fn image(&self, offset: u64, len: usize) -> Vec<u8> {
                let f = std::fs::File::open(self.dir.path().join("vda.raw")).unwrap();
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset).unwrap();
                buf
            }
        }

        /// The next want for `chunk`, skipping background wants for others.
        async fn want_of(wants: &mut tonic::Streaming<pb::RestoreWant>, chunk: u64) -> pb::RestoreWant {
            loop {
                let w = wants.message().await.unwrap().unwrap();
                if w.chunks.contains(&chunk) {
                    return w;
                }
            }
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn hostile_answers_are_ignored_and_an_error_answer_fails_the_waiting_read() {
            let rig = Rig::new(Duration::from_secs(600));
            assert_eq!(code(rig.feed("vdb").await), tonic::Code::FailedPrecondition);
            let (tx, mut wants) = rig.feed("vda").await.unwrap();
            let first = wants.message().await.unwrap().unwrap();
            let window = Options::default().window as u64;
            assert_eq!((first.chunks.clone(), first.urgent), ((0..window).collect::<Vec<_>>(), false));

            let reader = rig.read(20);
            let w = want_of(&mut wants, 20).await;
            assert!(w.urgent && w.disk == "vda", "{w:?}");
            // Another disk, a short chunk, a chunk outside the disk, a chunk nobody asked for.
            let mut other = rig.data(20);
            other.disk = "vdb".into();
            tx.send(other).await.unwrap();
            let mut short = rig.data(20);
            short.data.truncate(4096);
            tx.send(short).await.unwrap();
            tx.send(pb::RestoreData { chunk: 32, ..rig.data(0) }).await.unwrap();
            tx.send(rig.data(25)).await.unwrap();
            // The error answer fails the waiting read at once (its bound is ten minutes).
            tx.send(pb::RestoreData {
                disk: "vda".into(),
                chunk: 20,
                error: "repository gone".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let err = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap().unwrap_err();
            assert_ne!(err.io().map(std::io::Error::kind), Some(std::io::ErrorKind::TimedOut), "{err}");
            assert_eq!(rig.image(20 * CHUNK, CHUNK as usize), vec![0; CHUNK as usize]);
            assert_eq!(rig.image(25 * CHUNK, CHUNK as usize), vec![0; CHUNK as usize]);

            // The guest asks again: the chunk is wanted again, and served.
            let reader = rig.read(20);
            want_of(&mut wants, 20).await;
            tx.send(rig.data(20)).await.unwrap();
            let got = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap().unwrap();
            let at = (20 * CHUNK + 8192) as usize;
            assert_eq!(got, rig.reference[at..at + 4096]);
            let st = rig.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
            let r = st.disks[0].restore.clone().unwrap();
            assert!(r.fed && !r.complete && r.chunks_total == 32 && r.backup_id == "b7", "{r:?}");
            // No snapshot of a disk still being filled.
            let begin = rig.client().await.begin(pb::BeginRequest::default()).await;
            assert_eq!(code(begin), tonic::Code::FailedPrecondition);
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn without_a_feed_reads_fail_in_bound_and_a_new_feed_completes_the_restore() {
            let rig = Rig::new(Duration::from_millis(300));
            // Chunk 0 arrives, then the feed goes away.
            let (tx, mut wants) = rig.feed("vda").await.unwrap();
            want_of(&mut wants, 0).await;
            tx.send(rig.data(0)).await.unwrap();
            while rig.disk.status().info.chunks_done == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop((tx, wants));
            while rig.disk.status().fed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let err = tokio::task::spawn_blocking({
                let r = rig.read(3);
                move || r.join().unwrap()
            })
            .await
            .unwrap()
            .unwrap_err();
            assert_eq!(err.io().map(std::io::Error::kind), Some(std::io::ErrorKind::TimedOut), "{err}");
            // What is restored keeps being served.
            let got = tokio::task::spawn_blocking({
                let r = rig.read(0);
                move || r.join().unwrap()
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(got, rig.reference[8192..8192 + 4096]);

            // A feed, replaced by another: the first one's stream ends.
            let (_old_tx, mut old) = rig.feed("vda").await.unwrap();
            old.message().await.unwrap().unwrap();
            let (tx, mut wants) = rig.feed("vda").await.unwrap();
            while old.message().await.ok().flatten().is_some() {}
            let mut last = None;
            while let Some(w) = wants.message().await.unwrap() {
                for c in &w.chunks {
                    tx.send(rig.data(*c)).await.unwrap();
                }
                last = Some(w);
            }
            assert!(last.is_some_and(|w| w.complete));
            assert!(rig.disk.is_complete());
            assert_eq!(rig.image(0, SIZE as usize), rig.reference);
            let st = rig.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
            assert!(st.disks[0].restore.as_ref().is_some_and(|r| r.complete && r.chunks_done == 32));
            assert!(restore::read_map(&rig.dir.path().join("vda.raw.restore")).unwrap().complete);
            // A complete disk takes no feed, and can be snapshotted.
            assert_eq!(code(rig.feed("vda").await), tonic::Code::FailedPrecondition);
            assert!(rig.client().await.begin(pb::BeginRequest::default()).await.is_ok());
        }
    }
}
