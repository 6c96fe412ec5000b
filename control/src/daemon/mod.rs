//! livesnapd: the host daemon (`proto/livesnapd.proto`).
//!
//! - [`config`]: the TOML configuration, checked whole at start.
//! - [`state`]: jobs and the backup index in an embedded database (redb).
//! - [`backend`]: the clients of a VM's livesnap-blk control service and of its agent.
//! - [`reader`]: reading a frozen base (raw directly, qcow2 through `qemu-img convert -U`).
//! - [`workflow`]: CreateSnapshot — quiesce, cut, thaw, back up, merge, checkpoint, record —
//!   and the clean-up of jobs a previous daemon left unfinished.
//! - [`service`]: the thin tonic adapter over [`Daemon`], the unix socket and the TCP (TLS +
//!   bearer token) listeners.
//!
//! [`Daemon`] is the domain side: it knows nothing of tonic except the generated messages it
//! answers with and [`Error`]'s mapping to a `tonic::Status`.

pub mod backend;
pub mod config;
pub mod reader;
pub mod service;
pub mod state;
pub mod workflow;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_proto::daemon as pb;
use tokio::sync::mpsc;

use crate::agent::Limits;
use crate::repo::{self, Repository};
pub use config::Config;
use state::{BackupState, Store};

/// How long ListVms waits for each backend and agent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("There is no VM {0} in the configuration")]
    UnknownVm(String),
    #[error("VM {vm} has a job running: {job}")]
    JobRunning { vm: String, job: String },
    #[error("The guest cannot be quiesced: {0}")]
    QuiesceImpossible(String),
    #[error("The backup of disk {disk} cannot be incremental: {reason}")]
    NotIncremental { disk: String, reason: String },
    #[error("VM {vm}'s backend has snapshot {id} already")]
    SnapshotActive { vm: String, id: u64 },
    #[error("The snapshot was given up by the backend while it was being read: {0}")]
    SnapshotLost(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("VM {vm}'s backend does not answer on `{}`: {reason}", socket.display())]
    BackendUnavailable { vm: String, socket: PathBuf, reason: String },
    #[error("VM {vm}'s backend did not answer {what} within {timeout:?}")]
    BackendTimeout { vm: String, what: &'static str, timeout: Duration },
    #[error("VM {vm}'s backend refused {what}: {}", status.message())]
    Backend { vm: String, what: &'static str, status: tonic::Status },
    #[error("Cannot read the base of disk {disk}")]
    Base {
        disk: String,
        #[source]
        source: reader::Error,
    },
    #[error(transparent)]
    Repo(#[from] repo::Error),
    #[error(transparent)]
    Restore(#[from] crate::restore::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error("Cannot open the backup repository `{}`", path.display())]
    RepoOpen {
        path: PathBuf,
        #[source]
        source: repo::Error,
    },
    #[error("An internal task failed: {0}")]
    Task(String),
}

impl Error {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::UnknownVm(_) => Code::NotFound,
            Error::JobRunning { .. }
            | Error::QuiesceImpossible(_)
            | Error::NotIncremental { .. }
            | Error::SnapshotActive { .. } => Code::FailedPrecondition,
            Error::SnapshotLost(_) => Code::Aborted,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::BackendUnavailable { .. } | Error::BackendTimeout { .. } => Code::Unavailable,
            Error::Backend { status, .. } => match status.code() {
                Code::Unknown | Code::Ok => Code::Internal,
                c => c,
            },
            Error::Repo(e) | Error::RepoOpen { source: e, .. } => repo_code(e),
            Error::Restore(e) => match e {
                crate::restore::Error::Repo(e) => repo_code(e),
                crate::restore::Error::DestinationExists(_) => Code::AlreadyExists,
                crate::restore::Error::Io { .. }
                | crate::restore::Error::QemuImgSpawn(_)
                | crate::restore::Error::QemuImg { .. } => Code::Internal,
            },
            Error::Base { .. } | Error::State(_) | Error::Task(_) => Code::Internal,
        }
    }
}

fn repo_code(e: &repo::Error) -> tonic::Code {
    use repo::Error as R;
    use tonic::Code;
    match e {
        R::BackupNotFound { .. } | R::DiskNotFound { .. } => Code::NotFound,
        R::InvalidName { .. } | R::InvalidChunkSize(_) | R::InvalidLevel(_) => Code::InvalidArgument,
        R::BackupExists { .. } | R::DestinationExists(_) => Code::AlreadyExists,
        R::Busy => Code::Unavailable,
        R::Manifest { .. } | R::Inconsistent { .. } | R::ChunkMissing { .. } | R::ChunkCorrupt { .. } => Code::DataLoss,
        R::ParentMismatch { .. } => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        tonic::Status::new(e.code(), backend::error_chain(&e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The daemon: configuration, repository, state, and which VM runs which job.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    repo: Arc<Repository>,
    store: Arc<Store>,
    /// VM name → the job running on it (a job id, or `recovery`).
    running: Mutex<HashMap<String, String>>,
}

/// Holds a VM for one job; released when dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    daemon: Arc<Daemon>,
    vm: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.daemon.running_map().remove(&self.vm);
    }
}

impl Daemon {
    /// Opens the state database and the repository (creating an empty one if the directory
    /// does not exist or is empty).
    pub fn open(config: Config) -> Result<Arc<Daemon>> {
        let store = Store::open(&config.state)?;
        let path = config.repository.clone();
        let fresh = match std::fs::read_dir(&path) {
            Ok(mut rd) => rd.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(_) => false,
        };
        let repo =
            if fresh { Repository::create(&path, repo::CreateOptions::default()) } else { Repository::open(&path) }
                .map_err(|source| Error::RepoOpen { path, source })?;
        Ok(Arc::new(Daemon {
            config,
            repo: Arc::new(repo),
            store: Arc::new(store),
            running: Mutex::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn running_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Claims `vm` for `job`, or says which job has it.
    pub(crate) fn claim(self: &Arc<Self>, vm: &str, job: &str) -> Result<Claim> {
        let mut m = self.running_map();
        if let Some(other) = m.get(vm) {
            return Err(Error::JobRunning { vm: vm.to_owned(), job: other.clone() });
        }
        m.insert(vm.to_owned(), job.to_owned());
        Ok(Claim { daemon: self.clone(), vm: vm.to_owned() })
    }

    fn vm_config(&self, name: &str) -> Result<&config::VmConfig> {
        self.config.vm(name).ok_or_else(|| Error::UnknownVm(name.to_owned()))
    }

    /// Runs `f` on the repository and the state on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Repository, &Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (repo, store) = (self.repo.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || f(&repo, &store)).await.map_err(|e| Error::Task(e.to_string()))?
    }

    pub async fn list_vms(&self) -> Result<pb::ListVmsReply> {
        let names: Vec<String> = self.config.vms.iter().map(|v| v.name.clone()).collect();
        let last = self
            .blocking(move |repo, _| {
                let mut out = HashMap::new();
                for n in names {
                    if let Some(b) = repo.list(Some(&n))?.last() {
                        out.insert(n, b.id.clone());
                    }
                }
                Ok(out)
            })
            .await?;
        let mut probes = tokio::task::JoinSet::new();
        for (i, v) in self.config.vms.iter().cloned().enumerate() {
            probes.spawn(async move { (i, probe(v).await) });
        }
        let mut vms = vec![pb::Vm::default(); self.config.vms.len()];
        while let Some(r) = probes.join_next().await {
            let (i, vm) = r.map_err(|e| Error::Task(e.to_string()))?;
            vms[i] = vm;
        }
        let running = self.running_map().clone();
        for vm in &mut vms {
            vm.last_backup = last.get(&vm.name).cloned().unwrap_or_default();
            vm.running_job = running.get(&vm.name).cloned().unwrap_or_default();
        }
        Ok(pb::ListVmsReply { vms })
    }

    pub async fn list_backups(&self, vm: String) -> Result<pb::ListBackupsReply> {
        self.blocking(move |repo, store| {
            let infos = repo.list((!vm.is_empty()).then_some(vm.as_str()))?;
            let mut backups = Vec::with_capacity(infos.len());
            for i in infos {
                let s = store.backup(&i.vm, &i.id)?;
                backups.push(backup_pb(&i, s.as_ref()));
            }
            Ok(pb::ListBackupsReply { backups })
        })
        .await
    }

    pub async fn get_backup(&self, r: pb::BackupRef) -> Result<pb::Backup> {
        self.blocking(move |repo, store| {
            let info = repo.info(&r.vm, &r.id)?;
            let s = store.backup(&r.vm, &r.id)?;
            Ok(backup_pb(&info, s.as_ref()))
        })
        .await
    }

    /// Damaged chunks are reported in the reply (`ok` false); a damaged manifest is DATA_LOSS.
    pub async fn verify_backup(&self, r: pb::BackupRef) -> Result<pb::VerifyReply> {
        self.blocking(move |repo, _| {
            let rep = repo.verify(&r.vm, &r.id)?;
            Ok(pb::VerifyReply {
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
            })
        })
        .await
    }

    pub async fn delete_backup(&self, r: pb::BackupRef) -> Result<pb::DeleteBackupReply> {
        self.blocking(move |repo, store| {
            repo.delete(&r.vm, &r.id)?;
            store.remove_backups(&r.vm, std::slice::from_ref(&r.id))?;
            tracing::info!(vm = %r.vm, backup = %r.id, "backup deleted");
            Ok(pb::DeleteBackupReply {})
        })
        .await
    }

    pub async fn prune(&self, r: pb::PruneRequest) -> Result<pb::PruneReply> {
        let keep = usize::try_from(r.keep_last)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| Error::InvalidArgument("keep_last must be at least 1".into()))?;
        self.blocking(move |repo, store| {
            let rep = repo.prune(&r.vm, keep)?;
            store.remove_backups(&r.vm, &rep.deleted)?;
            tracing::info!(vm = %r.vm, deleted = rep.deleted.len(), chunks_removed = rep.gc.chunks_removed, "pruned");
            Ok(pb::PruneReply {
                deleted: rep.deleted,
                chunks_removed: rep.gc.chunks_removed,
                bytes_freed: rep.gc.bytes_freed,
            })
        })
        .await
    }

    /// Restores one disk to a new file; progress: one report at the start, one at the end.
    pub async fn restore(&self, r: pb::RestoreRequest) -> Result<mpsc::Receiver<Result<pb::RestoreProgress>>> {
        let target = PathBuf::from(&r.target_path);
        if !target.is_absolute() {
            return Err(Error::InvalidArgument(format!("the target path {:?} must be absolute", r.target_path)));
        }
        let format = pb::ImageFormat::try_from(r.format)
            .map_err(|_| Error::InvalidArgument(format!("unknown image format {}", r.format)))?;
        let total = {
            let (vm, id, disk) = (r.vm.clone(), r.id.clone(), r.disk.clone());
            self.blocking(move |repo, _| {
                let info = repo.info(&vm, &id)?;
                let d = info.disks.iter().find(|d| d.disk == disk).ok_or(repo::Error::DiskNotFound { vm, id, disk })?;
                Ok(d.size)
            })
            .await?
        };
        if target.exists() {
            return Err(Error::Repo(repo::Error::DestinationExists(target)));
        }
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.try_send(Ok(pb::RestoreProgress { bytes_written: 0, bytes_total: total, done: false }));
        let repo = self.repo.clone();
        tokio::spawn(async move {
            let res = tokio::task::spawn_blocking(move || match format {
                pb::ImageFormat::Raw => crate::restore::raw(&repo, &r.vm, &r.id, &r.disk, &target),
                pb::ImageFormat::Qcow2 => crate::restore::qcow2(&repo, &r.vm, &r.id, &r.disk, &target),
            })
            .await;
            let msg = match res {
                Ok(Ok(st)) => Ok(pb::RestoreProgress { bytes_written: st.size, bytes_total: total, done: true }),
                Ok(Err(e)) => Err(Error::Restore(e)),
                Err(e) => Err(Error::Task(e.to_string())),
            };
            let _ = tx.send(msg).await;
        });
        Ok(rx)
    }

    /// The jobs in the state database, oldest first (for `livesnapd jobs`).
    pub fn jobs(state: &Path) -> Result<Vec<state::JobState>> {
        Ok(Store::open(state)?.jobs()?)
    }
}

/// What a VM's backend and agent say now, each within [`PROBE_TIMEOUT`].
async fn probe(v: config::VmConfig) -> pb::Vm {
    let mut vm = pb::Vm { name: v.name.clone(), control_socket: v.control.display().to_string(), ..Default::default() };
    let backend = async {
        let b = backend::connect_backend(&v.name, &v.control, PROBE_TIMEOUT).await?;
        backend::status(&v.name, &b, PROBE_TIMEOUT).await
    };
    let agent = async {
        match &v.agent {
            None => pb::AgentState::None,
            Some(ep) => {
                let limits =
                    Limits { connect_timeout: PROBE_TIMEOUT, call_timeout: PROBE_TIMEOUT, ..Limits::default() };
                match backend::connect_agent(ep, limits).await {
                    Ok(a) if a.ping().await.is_ok() => pb::AgentState::Reachable,
                    _ => pb::AgentState::Unreachable,
                }
            }
        }
    };
    let (st, agent) = tokio::join!(backend, agent);
    if let Ok(st) = st {
        vm.backend_reachable = true;
        vm.disks = st.disks.iter().map(|d| d.id.clone()).collect();
        vm.active_snapshot = st.snapshot.map_or(0, |s| s.id);
    }
    vm.agent = agent as i32;
    vm
}

/// A backup as the API shows it: the repository's record, with what the daemon adds.
pub(crate) fn backup_pb(i: &repo::BackupInfo, s: Option<&BackupState>) -> pb::Backup {
    let all_incremental = !i.disks.is_empty() && i.disks.iter().all(|d| d.kind == repo::Kind::Incremental);
    pb::Backup {
        vm: i.vm.clone(),
        id: i.id.clone(),
        created_unix: i.created_unix_us / 1_000_000,
        kind: if all_incremental { pb::BackupKind::Incremental } else { pb::BackupKind::Full } as i32,
        consistency: match i.consistency {
            repo::Consistency::Application => pb::Consistency::Application,
            repo::Consistency::Crash => pb::Consistency::Crash,
        } as i32,
        note: s.map(|s| s.note.clone()).unwrap_or_default(),
        freeze_window_us: i.freeze_window.map_or(0, |w| w.duration_us()),
        snapshot_id: s.map_or(0, |s| s.snapshot_id),
        disks: i
            .disks
            .iter()
            .map(|d| pb::DiskBackup {
                disk: d.disk.clone(),
                size: d.size,
                bytes_read: d.stats.bytes_read,
                bytes_changed: d.stats.bytes_changed,
                bytes_stored: d.stats.bytes_stored,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_the_codes_the_api_promises() {
        let cases: Vec<(Error, Code)> = vec![
            (Error::UnknownVm("x".into()), Code::NotFound),
            (Error::JobRunning { vm: "x".into(), job: "j".into() }, Code::FailedPrecondition),
            (Error::QuiesceImpossible("no agent".into()), Code::FailedPrecondition),
            (Error::NotIncremental { disk: "vda".into(), reason: "r".into() }, Code::FailedPrecondition),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::BackendUnavailable { vm: "x".into(), socket: "/s".into(), reason: "r".into() }, Code::Unavailable),
            (
                Error::Backend { vm: "x".into(), what: "Begin", status: tonic::Status::failed_precondition("busy") },
                Code::FailedPrecondition,
            ),
            (Error::Backend { vm: "x".into(), what: "Begin", status: tonic::Status::unknown("?") }, Code::Internal),
            (Error::Repo(repo::Error::BackupNotFound { vm: "x".into(), id: "b".into() }), Code::NotFound),
            (Error::Repo(repo::Error::DestinationExists("/t".into())), Code::AlreadyExists),
            (Error::Repo(repo::Error::Busy), Code::Unavailable),
            (Error::Repo(repo::Error::ChunkMissing { hash: repo::ChunkHash([0; 32]) }), Code::DataLoss),
            (Error::Repo(repo::Error::InvalidName { what: "VM", name: "..".into() }), Code::InvalidArgument),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = tonic::Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            assert!(s.message().starts_with(&msg), "{:?} does not start with {msg:?}", s.message());
        }
    }
}
