//! livesnapd: the host daemon (`proto/livesnapd.proto`).
//!
//! - [`args`]: livesnapd's command line.
//! - [`config`]: the TOML configuration, checked whole at start.
//! - [`calendar`]: systemd calendar events (the schedules' `calendar`), in UTC.
//! - [`schedule`]: the `[[schedule]]` tables running: timers on an injectable clock, a random
//!   delay, the host's FIFO queue bounded by `max_jobs`, missed runs caught up once at start.
//! - [`retention`]: which backups a prune keeps (PBS's rules), and [`Daemon::prune`].
//! - [`model`]: the daemon's own types: requests, a job's events, backups, VMs.
//! - [`ports`]: what the daemon needs of a VM's backend and agent, as traits, and the
//!   [`ports::Connector`] that reaches them.
//! - [`backend`]: the gRPC clients that implement the ports (livesnap-blk's control service,
//!   the agent).
//! - [`state`]: jobs and the backup index in an embedded database (redb).
//! - [`files`]: file-level restore: ListFiles, ReadFile, GetFiles over one disk of a backup
//!   (userspace ext4 over the repository's disk reader, one blocking thread per call).
//! - [`live`]: live restore: the target and its map created, the job that feeds the VM's
//!   backend the chunks it asks for (urgent first), reconnecting, resumed after a restart.
//! - [`reader`]: reading a frozen base in place (raw, holes skipped; qcow2 through the
//!   repository's read-only `Qcow2Source`).
//! - [`workflow`]: CreateSnapshot, step by step — plan, quiesce + cut + thaw, back up, merge +
//!   checkpoint, record — and the clean-up of jobs a previous daemon left unfinished.
//! - [`metrics`]: the Prometheus metrics the workflow's hooks update, and their HTTP endpoint.
//! - [`service`]: the thin tonic adapter over [`Daemon`] (protobuf conversion and the errors'
//!   gRPC codes live there only), the unix socket and the TCP (TLS + bearer token) listeners.
//!
//! [`Daemon`] is the domain side: it knows nothing of protobuf or tonic.

pub mod args;
pub mod backend;
pub mod calendar;
pub mod config;
pub mod files;
pub mod live;
pub mod metrics;
pub mod model;
pub mod ports;
pub mod reader;
pub mod retention;
pub mod schedule;
pub mod service;
pub mod state;
pub mod workflow;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

pub use config::Config;
use livesnap_repo::{self as repo, Repository};
use model::{AgentState, Backup, ImageFormat, JobView, RestoreProgress, RestoreRequest, VmInfo};
use ports::{AgentError, BackendError, Connector, Timeouts};
use state::Store;
pub use workflow::{NoParent, Stop, StopReason};

/// How long ListVms waits for each backend and agent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest lease a request may ask the agent for.
const MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("There is no VM {0} in the configuration")]
    UnknownVm(String),
    #[error("VM {vm} has a job running: {job}")]
    JobRunning { vm: String, job: String },
    #[error("The guest cannot be quiesced: VM {vm} has no agent configured")]
    NoAgent { vm: String },
    #[error("The guest cannot be quiesced")]
    Quiesce(#[source] AgentError),
    #[error("The backup of disk {disk} cannot be incremental")]
    NotIncremental {
        disk: String,
        #[source]
        why: NoParent,
    },
    #[error("VM {vm}'s backend has snapshot {id} already")]
    SnapshotActive { vm: String, id: u64 },
    #[error("The snapshot was given up by the backend while it was being read: {why}")]
    SnapshotLost { why: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("VM {vm}'s backend failed")]
    Backend {
        vm: String,
        #[source]
        source: BackendError,
    },
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
    Files(#[from] crate::files::Error),
    #[error(transparent)]
    FilesPanic(#[from] files::ReaderPanic),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error("Cannot open the backup repository {location}")]
    RepoOpen {
        location: String,
        #[source]
        source: repo::Error,
    },
    #[error("Cannot load the key-encryption key")]
    Kek(#[source] repo::crypto::Error),
    #[error("Cannot load the key of VM {vm}")]
    Key {
        vm: String,
        #[source]
        source: repo::crypto::Error,
    },
    #[error("Cannot create the restore directory `{}`", path.display())]
    RestoreDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("An internal task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("The job was cancelled: {0}")]
    Cancelled(StopReason),
    #[error("Livesnapd is stopping: it starts no new job")]
    Stopping,
    #[error("There is no job {0}")]
    UnknownJob(String),
    #[error("Job {job} is not running: it ended {result}")]
    NotRunning { job: String, result: String },
    #[error("The restore map `{}` is unusable: {why}", path.display())]
    LiveMap { path: PathBuf, why: String },
    #[error("The live restore job {job} ended before it was complete (GetJob says why)")]
    LiveEnded { job: String },
    #[error("Backup {id} of {vm} is being live-restored by job {job}: it cannot be removed before the restore is complete or cancelled")]
    LiveRestoring { vm: String, id: String, job: String },
    #[error(
        "Backup {id} of {vm} is still needed by the target of live restore job {job}, which ended before it was complete: \
         remove the target and its restore map `{}` to give it up first",
        map.display()
    )]
    LiveRestoreLeft { vm: String, id: String, job: String, map: PathBuf },
}

impl Error {
    fn backend(vm: &str) -> impl Fn(BackendError) -> Error + '_ {
        move |source| Error::Backend { vm: vm.to_owned(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The daemon: configuration, repository, state, the connector to the VMs, and which VM runs
/// which job.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    repo: Arc<Repository>,
    store: Arc<Store>,
    connector: Arc<dyn Connector>,
    /// VM name → the job running on it (a job id, or `recovery`).
    running: Mutex<HashMap<String, String>>,
    /// Job id → its stop request, for every CreateSnapshot job running.
    stops: Mutex<HashMap<String, Arc<Stop>>>,
    /// Set once livesnapd is stopping: no new job starts.
    stopping: AtomicBool,
    /// Notified whenever a job ends.
    job_ended: Notify,
    metrics: Arc<metrics::Metrics>,
    /// Tests wrap a live restore's chunk source (to hold or fail reads).
    #[cfg(test)]
    live_wrap: std::sync::OnceLock<SourceWrap>,
}

/// How tests wrap a live restore's chunk source.
#[cfg(test)]
pub(crate) struct SourceWrap(pub Box<WrapFn>);

#[cfg(test)]
type WrapFn = dyn Fn(Arc<dyn live::ChunkSource>) -> Arc<dyn live::ChunkSource> + Send + Sync;

#[cfg(test)]
impl std::fmt::Debug for SourceWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceWrap")
    }
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

/// Opens the repository `r` names, creating it when there is nothing there. Blocks: call it
/// from a thread that is not in an async runtime (the object store runs its own).
fn open_repository(r: &config::RepositoryConfig) -> repo::Result<Repository> {
    let location = match r {
        config::RepositoryConfig::Dir(p) => repo::Location::Dir(p.clone()),
        config::RepositoryConfig::S3(s) => {
            let credentials = repo::Credentials::load(&s.credentials)?;
            let mut o = repo::S3Options::new(s.url.clone(), s.endpoint.clone(), s.region.clone(), credentials);
            o.grace = s.grace;
            o.timeout = s.request_timeout;
            o.retries = s.retries as usize;
            o.retry_timeout = s.retry_timeout;
            repo::Location::S3(o)
        }
    };
    Repository::open_or_create(&location, repo::CreateOptions::default())
}

impl Daemon {
    /// Opens the state database and the repository (creating an empty one if the directory
    /// does not exist or is empty); the VMs are reached over their sockets.
    pub fn open(config: Config) -> Result<Arc<Daemon>> {
        Daemon::open_with(config, Arc::new(backend::GrpcConnector))
    }

    /// As [`Daemon::open`], the VMs reached through `connector`.
    pub fn open_with(config: Config, connector: Arc<dyn Connector>) -> Result<Arc<Daemon>> {
        let store = Store::open(&config.state)?;
        let metrics = metrics::Metrics::new();
        metrics.restore(&config.vms, &store.jobs()?);
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&config.restore_dir)
            .map_err(|source| Error::RestoreDir { path: config.restore_dir.clone(), source })?;
        let keys = load_keys(&config)?;
        let location = config.repository.to_string();
        let mut repo = open_repository(&config.repository).map_err(|source| Error::RepoOpen { location, source })?;
        for (vm, key) in keys {
            tracing::info!(vm = %vm, key = %key.id(), "backups encrypted");
            repo.set_key(&vm, Some(key));
        }
        Ok(Arc::new(Daemon {
            config,
            repo: Arc::new(repo),
            store: Arc::new(store),
            connector,
            running: Mutex::new(HashMap::new()),
            stops: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            job_ended: Notify::new(),
            metrics: Arc::new(metrics),
            #[cfg(test)]
            live_wrap: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    fn running_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn stops_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Stop>>> {
        self.stops.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tracks a new job: its stop request, which [`Daemon::cancel_job`] and
    /// [`Daemon::stop_jobs`] reach.
    pub(crate) fn register_job(&self, id: &str) -> Arc<Stop> {
        let stop = Arc::new(Stop::default());
        self.stops_map().insert(id.to_owned(), stop.clone());
        stop
    }

    /// Called by a job once its outcome is recorded.
    pub(crate) fn unregister_job(&self, id: &str) {
        self.stops_map().remove(id);
        self.job_ended.notify_waiters();
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// livesnapd is stopping: no new job starts, and each running job finishes the step it is
    /// in, then ends as a cancelled job does (thawed, snapshot abandoned, nothing
    /// checkpointed, recorded). [`Daemon::wait_jobs`] waits for them.
    pub fn stop_jobs(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let stops: Vec<(String, Arc<Stop>)> = self.stops_map().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (id, stop) in stops {
            tracing::info!(job = %id, "livesnapd is stopping: the job ends after its current step");
            stop.request(StopReason::Shutdown);
        }
    }

    /// Waits until no job runs.
    pub async fn wait_jobs(&self) {
        loop {
            let ended = self.job_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.stops_map().is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Asks a running job to stop: the step under way is interrupted where it safely can be
    /// (the reading of the bases, the wait for the merge; never the freeze, cut and thaw),
    /// then the job ends as a failed one does and is recorded `cancelled`. Returns the job as
    /// it is now, without waiting for it to end.
    pub async fn cancel_job(&self, id: &str) -> Result<JobView> {
        let stop = self.stops_map().get(id).cloned();
        match stop {
            Some(stop) => {
                tracing::info!(job = %id, "cancel requested");
                stop.request(StopReason::Cancel);
                self.get_job(id).await
            }
            None => {
                let view = self.get_job(id).await?;
                let result = match view.job.result {
                    Some(r) => r.as_str().to_owned(),
                    None => "with a previous daemon, which left it unfinished".to_owned(),
                };
                Err(Error::NotRunning { job: id.to_owned(), result })
            }
        }
    }

    /// A job as recorded, and whether it runs now.
    pub async fn get_job(&self, id: &str) -> Result<JobView> {
        let key = id.to_owned();
        let job = self.blocking(move |_, s| Ok(s.job(&key)?)).await?.ok_or_else(|| Error::UnknownJob(id.to_owned()))?;
        Ok(self.view(job))
    }

    /// The recorded jobs, oldest first: of `vm` only if given, the `last` newest if given.
    pub async fn list_jobs(&self, vm: Option<String>, last: Option<usize>) -> Result<Vec<JobView>> {
        let mut jobs = self.blocking(|_, s| Ok(s.jobs()?)).await?;
        if let Some(vm) = vm {
            jobs.retain(|j| j.vm == vm);
        }
        if let Some(n) = last {
            jobs.drain(..jobs.len().saturating_sub(n));
        }
        Ok(jobs.into_iter().map(|j| self.view(j)).collect())
    }

    fn view(&self, job: state::JobState) -> JobView {
        let stop = self.stops_map().get(&job.id).map(|s| s.requested());
        JobView { running: stop.is_some(), stopping: stop.flatten(), job }
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
        tokio::task::spawn_blocking(move || f(&repo, &store)).await.map_err(Error::Task)?
    }

    /// Every configured VM, in the configuration's order, as its backend and agent answer now.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let names: Vec<String> = self.config.vms.iter().map(|v| v.name.clone()).collect();
        let last = self
            .blocking(move |repo, _| {
                let mut out = HashMap::new();
                for n in names {
                    // A VM whose backups do not open (a wrong key) is still listed.
                    match repo.list(Some(&n)) {
                        Ok(list) => {
                            if let Some(b) = list.last() {
                                out.insert(n, b.id.clone());
                            }
                        }
                        Err(e) => tracing::warn!(vm = %n, error = %livesnap_proto::error::chain(&e), "cannot list its backups"),
                    }
                }
                Ok(out)
            })
            .await?;
        let mut probes = tokio::task::JoinSet::new();
        for (i, v) in self.config.vms.iter().cloned().enumerate() {
            let connector = self.connector.clone();
            probes.spawn(async move { (i, probe(&*connector, v).await) });
        }
        let mut vms: Vec<Option<VmInfo>> = vec![None; self.config.vms.len()];
        while let Some(r) = probes.join_next().await {
            let (i, vm) = r.map_err(Error::Task)?;
            vms[i] = Some(vm);
        }
        let running = self.running_map().clone();
        let mut vms: Vec<VmInfo> = vms.into_iter().flatten().collect();
        for vm in &mut vms {
            vm.last_backup = last.get(&vm.name).cloned();
            vm.running_job = running.get(&vm.name).cloned();
        }
        Ok(vms)
    }

    /// The backups of `vm` (all VMs' if `None`), oldest first.
    pub async fn list_backups(&self, vm: Option<String>) -> Result<Vec<Backup>> {
        self.blocking(move |repo, store| {
            let infos = repo.list(vm.as_deref())?;
            let mut backups = Vec::with_capacity(infos.len());
            for i in infos {
                let s = store.backup(&i.vm, &i.id)?;
                backups.push(Backup::new(&i, s.as_ref()));
            }
            Ok(backups)
        })
        .await
    }

    pub async fn get_backup(&self, vm: String, id: String) -> Result<Backup> {
        self.blocking(move |repo, store| {
            let info = repo.info(&vm, &id)?;
            let s = store.backup(&vm, &id)?;
            Ok(Backup::new(&info, s.as_ref()))
        })
        .await
    }

    /// Damaged chunks are in the report; a damaged manifest is an error.
    pub async fn verify_backup(&self, vm: String, id: String) -> Result<repo::VerifyReport> {
        self.blocking(move |repo, _| Ok(repo.verify(&vm, &id)?)).await
    }

    pub async fn delete_backup(&self, vm: String, id: String) -> Result<()> {
        self.blocking(move |repo, store| {
            live::refuse_if_restoring(store, &vm, std::slice::from_ref(&id))?;
            repo.delete(&vm, &id)?;
            store.remove_backups(&vm, std::slice::from_ref(&id))?;
            tracing::info!(vm = %vm, backup = %id, "backup deleted");
            Ok(())
        })
        .await?;
        self.metrics.recount();
        Ok(())
    }

    /// Restores one disk to a new file beneath the restore directory; progress: one report at
    /// the start, one at the end. With `live`: [`Daemon::live_restore`].
    pub async fn restore(self: &Arc<Self>, r: RestoreRequest) -> Result<mpsc::Receiver<Result<RestoreProgress>>> {
        if r.live {
            return self.live_restore(r).await;
        }
        let dest = crate::restore::Destination::resolve(&self.config.restore_dir, &r.target)?;
        let total = {
            let (vm, id, disk) = (r.vm.clone(), r.id.clone(), r.disk.clone());
            self.blocking(move |repo, _| {
                let info = repo.info(&vm, &id)?;
                let d = info.disks.iter().find(|d| d.disk == disk).ok_or(repo::Error::DiskNotFound { vm, id, disk })?;
                Ok(d.size)
            })
            .await?
        };
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.try_send(Ok(RestoreProgress { bytes_written: 0, bytes_total: total, done: false, live: None }));
        let repo = self.repo.clone();
        tokio::spawn(async move {
            let res = tokio::task::spawn_blocking(move || match r.format {
                ImageFormat::Raw => crate::restore::raw(&repo, &r.vm, &r.id, &r.disk, &dest),
                ImageFormat::Qcow2 => crate::restore::qcow2(&repo, &r.vm, &r.id, &r.disk, &dest),
            })
            .await;
            let msg = match res {
                Ok(Ok(st)) => {
                    Ok(RestoreProgress { bytes_written: st.size, bytes_total: total, done: true, live: None })
                }
                Ok(Err(e)) => Err(Error::Restore(e)),
                Err(e) => Err(Error::Task(e)),
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

/// The keys of the configured VMs that have one, unwrapped by the config's KEK (key files
/// mode 0600, checked). The secrets never reach a log: a key shows as its id and file.
pub fn load_keys(config: &Config) -> Result<Vec<(String, Arc<repo::DataKey>)>> {
    let Some(kek_path) = &config.kek else { return Ok(Vec::new()) };
    if config.vms.iter().all(|v| v.key.is_none()) {
        return Ok(Vec::new());
    }
    let kek = repo::Kek::load(kek_path).map_err(Error::Kek)?;
    let mut keys = Vec::new();
    for v in &config.vms {
        if let Some(path) = &v.key {
            let key =
                repo::crypto::load_key_file(path, &kek).map_err(|source| Error::Key { vm: v.name.clone(), source })?;
            keys.push((v.name.clone(), Arc::new(key)));
        }
    }
    Ok(keys)
}

/// What a VM's backend and agent say now, each within [`PROBE_TIMEOUT`].
async fn probe(connector: &dyn Connector, v: config::VmConfig) -> VmInfo {
    let timeouts = Timeouts { connect: PROBE_TIMEOUT, call: PROBE_TIMEOUT };
    let backend = async { connector.backend(&v, timeouts).await?.status().await };
    let agent = async {
        match &v.agent {
            None => AgentState::None,
            Some(ep) => match connector.agent(ep, timeouts).await {
                Ok(a) if a.ping().await.is_ok() => AgentState::Reachable,
                _ => AgentState::Unreachable,
            },
        }
    };
    let (st, agent) = tokio::join!(backend, agent);
    let mut vm = VmInfo {
        name: v.name.clone(),
        control_socket: v.control.clone(),
        backend_reachable: false,
        disks: Vec::new(),
        active_snapshot: None,
        agent,
        last_backup: None,
        running_job: None,
    };
    if let Ok(st) = st {
        vm.backend_reachable = true;
        vm.disks = st.disks.into_iter().map(|d| d.id).collect();
        vm.active_snapshot = st.snapshot.map(|s| s.id);
    }
    vm
}
