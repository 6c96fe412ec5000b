//! The snapshot control service (`livesnap.snapshot.v1`) on a unix socket: a thin adapter from
//! tonic to [`SnapshotControl`]. Engine calls block (they sync files), so each runs on tokio's
//! blocking pool; the service has its own thread and runtime, apart from the queue threads.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_server::{SnapshotControl as PbService, SnapshotControlServer};
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::snap::{self, BeginOptions, ControlError, Phase, SnapshotControl};

/// Extents per [`pb::ChangesPage`]: about 1 MiB of message at most.
const EXTENTS_PER_PAGE: usize = 32 * 1024;
/// How often a merge stream reports progress.
const MERGE_REPORT_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the control service's runtime")]
    Runtime(#[source] std::io::Error),
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        match &e {
            ControlError::NotFound(m) => Status::not_found(m.clone()),
            ControlError::State(m) => Status::failed_precondition(m.clone()),
            ControlError::Invalid(m) => Status::invalid_argument(m.clone()),
            ControlError::Io { message, source } => Status::internal(format!("{message}: {source}")),
        }
    }
}

/// The running service; [`ControlServer::stop`] ends it and removes the socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
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
    let (tx, rx) = oneshot::channel::<()>();
    let service = SnapshotControlServer::new(Service { ctl });
    let shown = path.display().to_string();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let served = rt.block_on(
                tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                ),
            );
            if let Err(e) = served {
                error!(socket = %shown, error = %e, "control service failed");
            }
        })
        .map_err(Error::Runtime)?;
    info!(socket = %path.display(), "control service listening");
    Ok(ControlServer { path: path.to_owned(), shutdown: Some(tx), thread: Some(thread) })
}

struct Service {
    ctl: Arc<dyn SnapshotControl>,
}

impl Service {
    /// Runs a blocking engine call off the runtime's thread.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&dyn SnapshotControl) -> T + Send + 'static) -> Result<T, Status> {
        let ctl = self.ctl.clone();
        tokio::task::spawn_blocking(move || f(&*ctl)).await.map_err(|e| Status::internal(format!("control call failed: {e}")))
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

fn status_pb(st: &snap::VmStatus) -> pb::VmStatus {
    pb::VmStatus {
        vm: st.vm.clone(),
        snapshot: st.snapshot.as_ref().map(snapshot_pb),
        disks: st
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
            })
            .collect(),
    }
}

/// One report of a merge: the disks cut with snapshot `id`, each done once it left the delta.
fn merge_report(id: u64, disks: &[String], st: &snap::VmStatus) -> pb::MergeProgress {
    let all_done = st.snapshot.as_ref().is_none_or(|s| s.id != id);
    let disks = disks
        .iter()
        .filter_map(|name| st.disks.iter().find(|d| &d.id == name))
        .map(|d| {
            let mine = d.snapshot == Some(id);
            pb::DiskMerge {
                id: d.id.clone(),
                merged_bytes: if mine { d.merge.map_or(0, |m| m.done_bytes) } else { 0 },
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
        let opts = BeginOptions { disks: req.disks, delta_limit: (req.delta_limit > 0).then_some(req.delta_limit) };
        let info = self.run(move |c| c.begin(opts)).await??;
        Ok(Response::new(pb::BeginReply { snapshot: Some(snapshot_pb(&info)) }))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::VmStatus>, Status> {
        let st = self.run(|c| c.status()).await?;
        Ok(Response::new(status_pb(&st)))
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
                        let _ = tx.send(Err(Status::internal(format!("control call failed: {e}")))).await;
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
