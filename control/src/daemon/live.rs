//! Live restore, livesnapd's side (docs/live-restore.md): RestoreBackup with `live` creates the
//! target image empty and its restore map, then a job ("live-restore") feeds the VM's
//! livesnap-blk once it serves the target, until every chunk is in.
//!
//! The job, in a loop until the map says complete:
//! - **waiting**: every [`WAIT_POLL`] the VM's backend is asked for its Status; a disk whose
//!   `restore` names this backup and this map (the same file) is the one to feed. The map is
//!   read too: complete already (the backend finished while no feed was attached, or livesnapd
//!   died before it recorded the end) ends the job.
//! - **feeding**: `RestoreFeed` opened for that disk; each want answered from the repository's
//!   random-access reader (chunks checked and decrypted there), zero chunks of the manifest
//!   answered `zero` without a read. Urgent wants go before every queued background want and
//!   have fetch slots of their own ([`URGENT_FETCHES`]), so a guest request never waits behind
//!   the background copy, which keeps to [`FETCHES_BESIDE_GUEST`] reads while the guest
//!   fetches; a read that fails is answered `error` (the backend fails the guest's request and
//!   asks again later). The stream breaking (backend killed or restarted) goes back
//!   to waiting after a short backoff.
//! - **complete** (`RestoreWant{complete}`, or a complete map): the map read back complete is
//!   removed, the job ends ok.
//!
//! The job is recorded in the state database ([`LiveRestoreState`]) at creation: a livesnapd
//! stopped or killed resumes it at its next start. CancelJob stops the feeding and leaves the
//! target and its map in place; the backup stays safe from delete and prune while the map is
//! there ([`refuse_if_restoring`]), since the chunks not in yet exist nowhere else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use livesnap_blk::restore as map;
use livesnap_proto::error::chain;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::config::VmConfig;
use super::model::{ImageFormat, LivePhase, LiveProgress, RestoreProgress, RestoreRequest};
use super::ports::{Answer, AnswerBody, Backend, BackendError, Feed, Timeouts};
use super::state::{JobKind, JobResult, JobState, LiveRestoreState, Stage};
use super::workflow::{Stop, StopReason};
use super::{Daemon, Error, Result};
use livesnap_repo::DiskReader;

/// How often progress is reported.
pub const POLL: Duration = Duration::from_millis(500);
/// How often the backend is asked whether it serves the target yet: the guest's first reads
/// wait for the feed, so this is short (a Status call on a local socket is cheap).
pub const WAIT_POLL: Duration = Duration::from_millis(50);
/// Background chunks read from the repository at once (an object store has latency).
pub const FETCHES: usize = 4;
/// Further reads for urgent wants only: a guest request never waits for a background slot.
pub const URGENT_FETCHES: usize = 4;
/// Background reads while the guest is fetching (an urgent read queued or under way, or one
/// ended less than [`GUEST_ACTIVE`] ago): a checked chunk read is CPU-bound, and the guest and
/// its urgent reads need the CPU more than the copy does.
pub const FETCHES_BESIDE_GUEST: usize = 1;
const GUEST_ACTIVE: Duration = Duration::from_secs(1);
/// The longest wait before a broken feed is opened again.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The backend, from a live restore: a waiting job asks often, it must not hang on one that
/// does not answer.
const TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(2), call: Duration::from_secs(5) };

/// Where a live restore reads its chunks: the repository's reader of the backup's disk (a
/// trait so that tests can hold or fail reads).
pub trait ChunkSource: Send + Sync + 'static {
    fn chunks(&self) -> u64;
    /// A chunk of zeros in the backup: answered without a read.
    fn is_zero(&self, chunk: u64) -> bool;
    /// Reads chunk `chunk` (blocking). Its error's whole chain is what the backend logs.
    fn read(&self, chunk: u64) -> std::result::Result<Vec<u8>, String>;
}

impl ChunkSource for DiskReader {
    fn chunks(&self) -> u64 {
        self.manifest().chunks.len() as u64
    }

    fn is_zero(&self, chunk: u64) -> bool {
        usize::try_from(chunk).ok().and_then(|i| self.manifest().chunks.get(i)).is_some_and(|c| c.is_none())
    }

    fn read(&self, chunk: u64) -> std::result::Result<Vec<u8>, String> {
        let m = self.manifest();
        let i = usize::try_from(chunk).map_err(|_| format!("chunk {chunk} is out of range"))?;
        if i >= m.chunks.len() {
            return Err(format!("chunk {chunk} is out of range: the disk has {} chunks", m.chunks.len()));
        }
        let mut buf = vec![0u8; m.chunk_len(i)];
        self.read_at(&mut buf, chunk * m.meta.chunk_size).map_err(|e| chain(&e).to_string())?;
        Ok(buf)
    }
}

/// How a job's loop ended.
enum End {
    Complete,
    Stopped(StopReason),
}

/// How a feed ended.
enum Session {
    /// The backend said every chunk is in.
    Complete,
    Stopped(StopReason),
    Broken {
        fed: bool,
        error: BackendError,
    },
}

/// The `.restore` file of `target`.
fn map_of(target: &Path) -> PathBuf {
    map::map_path(target)
}

impl Daemon {
    /// RestoreBackup with `live`: the target and its map are created here (an existing target:
    /// ALREADY_EXISTS), then a job feeds the backend that serves them. The receiver gets the
    /// job's progress about every [`POLL`] until it is complete; dropping it leaves the job
    /// running.
    pub async fn live_restore(self: &Arc<Self>, r: RestoreRequest) -> Result<mpsc::Receiver<Result<RestoreProgress>>> {
        let vm = self.vm_config(&r.vm)?.clone();
        if self.stopping() {
            return Err(Error::Stopping);
        }
        let dest = crate::restore::Destination::resolve(&self.config.restore_dir, &r.target)?;
        let (id, disk) = (r.id.clone(), r.disk.clone());
        let vm_name = vm.name.clone();
        let format = r.format;
        // Checked as a plain restore is (backup, disk, key) before anything is created.
        let (size, chunk_size, chunks) = self
            .blocking(move |repo, _| {
                let reader = repo.open_disk(&vm_name, &id, &disk, 0)?;
                let m = reader.manifest();
                Ok((m.meta.size, m.meta.chunk_size, m.chunks.len() as u64))
            })
            .await?;
        let target = dest.path().to_owned();
        let ident = map::Identity { vm: r.vm.clone(), backup_id: r.id.clone(), disk: r.disk.clone() };
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::restore::empty(&dest, format, size)?;
            if let Err(e) = map::create_map(dest.path(), &ident, size, chunk_size) {
                dest.remove_target();
                return Err(Error::LiveMap { path: map_of(dest.path()), why: chain(&e).to_string() });
            }
            Ok(())
        })
        .await
        .map_err(Error::Task)??;
        let seq = self.blocking(|_, s| Ok(s.next_job_seq()?)).await?;
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
        let job_id = format!("{stamp}-{seq}");
        let mut state = JobState::new(job_id.clone(), vm.name.clone(), now_unix_us());
        state.kind = JobKind::LiveRestore;
        state.stage = Stage::Waiting;
        state.live = Some(LiveRestoreState {
            backup_id: r.id.clone(),
            disk: r.disk.clone(),
            map: map_of(&target),
            target: target.clone(),
            format: match format {
                ImageFormat::Raw => "raw".into(),
                ImageFormat::Qcow2 => "qcow2".into(),
            },
            size,
            chunk_size,
            chunks_total: chunks,
        });
        let st = state.clone();
        self.blocking(move |_, s| Ok(s.put_job(&st)?)).await?;
        info!(job = %job_id, vm = %vm.name, backup = %r.id, disk = %r.disk, target = %target.display(),
              "live restore: target and map created; start the VM with the target as its disk");
        let progress = self.start_live(vm, state);
        Ok(progress_stream(progress))
    }

    /// Resumes the live restores a previous daemon left unfinished (called at start).
    pub(crate) async fn resume_live_restores(self: &Arc<Self>) -> Result<()> {
        let jobs = self.blocking(|_, s| Ok(s.jobs()?)).await?;
        for job in jobs.into_iter().filter(|j| j.result.is_none() && j.kind == JobKind::LiveRestore) {
            let Some(vm) = self.config.vm(&job.vm).cloned() else {
                let mut job = job;
                let reason = "daemon restarted; the VM is no longer configured: the live restore stopped, its target and map are left in place".to_owned();
                self.finish_live(&mut job, JobResult::Failed, reason).await;
                continue;
            };
            if job.live.is_none() {
                let mut job = job;
                self.finish_live(&mut job, JobResult::Failed, "the job's record has no live-restore state".into())
                    .await;
                continue;
            }
            info!(job = %job.id, vm = %job.vm, "resuming a live restore left unfinished by a previous daemon");
            drop(self.start_live(vm, job));
        }
        Ok(())
    }

    /// Starts the job's task; its progress on the receiver.
    fn start_live(self: &Arc<Self>, vm: VmConfig, state: JobState) -> watch::Receiver<RestoreProgress> {
        let stop = self.register_job(&state.id);
        let (tx, rx) = watch::channel(progress_of(&state, LivePhase::Waiting, 0));
        let job = LiveJob { d: self.clone(), vm, state, stop, progress: tx };
        tokio::spawn(job.run());
        rx
    }

    async fn finish_live(&self, job: &mut JobState, result: JobResult, reason: String) {
        job.result = Some(result);
        job.reason = reason;
        job.finished_unix_us = Some(now_unix_us());
        let j = job.clone();
        match result {
            JobResult::Ok => info!(job = %job.id, vm = %job.vm, "live restore complete"),
            _ => {
                warn!(job = %job.id, vm = %job.vm, result = result.as_str(), reason = %job.reason, "live restore ended")
            }
        }
        if let Err(e) = self.blocking(move |_, s| Ok(s.put_job(&j)?)).await {
            tracing::error!(job = %job.id, error = %chain(&e), "cannot record the live restore's end");
        }
        self.metrics.live_restore_finished(&job.vm, result);
    }
}

fn now_unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn progress_of(state: &JobState, phase: LivePhase, chunks_done: u64) -> RestoreProgress {
    let (total, size, chunk_size, target, map) = match &state.live {
        Some(l) => (l.chunks_total, l.size, l.chunk_size, l.target.clone(), l.map.clone()),
        None => (0, 0, 0, PathBuf::new(), PathBuf::new()),
    };
    let chunks_done = if phase == LivePhase::Complete { total } else { chunks_done.min(total) };
    RestoreProgress {
        bytes_written: chunks_done.saturating_mul(chunk_size).min(size),
        bytes_total: size,
        done: phase == LivePhase::Complete,
        live: Some(LiveProgress { job: state.id.clone(), phase, chunks_done, chunks_total: total, target, map }),
    }
}

/// The client's stream: the progress about every [`POLL`] (and at each change of phase) until
/// complete, or an error if the job ends otherwise. The client going away ends only this.
fn progress_stream(mut rx: watch::Receiver<RestoreProgress>) -> mpsc::Receiver<Result<RestoreProgress>> {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_phase = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The job ended without completing.
                        let p = rx.borrow().clone();
                        let why = p.live.as_ref().map(|l| l.job.clone()).unwrap_or_default();
                        let _ = tx.send(Err(Error::LiveEnded { job: why })).await;
                        return;
                    }
                    let phase = rx.borrow().live.as_ref().map(|l| l.phase);
                    if phase == last_phase {
                        continue;
                    }
                }
            }
            let p = rx.borrow_and_update().clone();
            last_phase = p.live.as_ref().map(|l| l.phase);
            let done = p.done;
            if tx.send(Ok(p)).await.is_err() || done {
                return;
            }
        }
    });
    out
}

/// One running live restore.
struct LiveJob {
    d: Arc<Daemon>,
    vm: VmConfig,
    state: JobState,
    stop: Arc<Stop>,
    progress: watch::Sender<RestoreProgress>,
}

impl LiveJob {
    fn live(&self) -> &LiveRestoreState {
        // Set by every constructor of a live job (checked by resume_live_restores).
        #[allow(clippy::expect_used)]
        self.state.live.as_ref().expect("a live-restore job has its state")
    }

    fn report(&self, phase: LivePhase, chunks_done: u64) {
        self.progress.send_replace(progress_of(&self.state, phase, chunks_done));
    }

    async fn enter(&mut self, stage: Stage) {
        if self.state.stage == stage {
            return;
        }
        self.state.stage = stage;
        let st = self.state.clone();
        if let Err(e) = self.d.blocking(move |_, s| Ok(s.put_job(&st)?)).await {
            warn!(job = %self.state.id, error = %chain(&e), "cannot record the live restore's stage");
        }
    }

    async fn run(mut self) {
        let id = self.state.id.clone();
        let end = self.until_complete().await;
        let live = self.live().clone();
        match end {
            Ok(End::Complete) => {
                self.report(LivePhase::Complete, live.chunks_total);
                let mut st = self.state.clone();
                self.d.finish_live(&mut st, JobResult::Ok, String::new()).await;
            }
            Ok(End::Stopped(StopReason::Cancel)) => {
                let reason = format!(
                    "cancelled by a client (CancelJob): feeding stopped; the target `{}` and its map `{}` are left in place (the backend serves what is in, reads of the rest fail)",
                    live.target.display(),
                    live.map.display()
                );
                let mut st = self.state.clone();
                self.d.finish_live(&mut st, JobResult::Cancelled, reason).await;
            }
            Ok(End::Stopped(StopReason::Shutdown)) => {
                info!(job = %id, "livesnapd is stopping: the live restore resumes at its next start");
            }
            Err(e) => {
                let mut st = self.state.clone();
                self.d.finish_live(&mut st, JobResult::Failed, chain(&e).to_string()).await;
            }
        }
        self.d.unregister_job(&id);
        // Dropping the sender ends the clients' streams.
    }

    /// Waits for the backend, feeds it, reconnects, until the map is complete.
    async fn until_complete(&mut self) -> Result<End> {
        let live = self.live().clone();
        let vm_name = self.vm.name.clone();
        let (backup, disk) = (live.backup_id.clone(), live.disk.clone());
        let source: Arc<dyn ChunkSource> = {
            let reader = self.d.blocking(move |repo, _| Ok(repo.open_disk(&vm_name, &backup, &disk, 0)?)).await?;
            let reader: Arc<dyn ChunkSource> = Arc::new(reader);
            self.d.wrap_source(reader)
        };
        if source.chunks() != live.chunks_total {
            return Err(Error::InvalidArgument(format!(
                "the backup's disk has {} chunks, the restore was created for {}",
                source.chunks(),
                live.chunks_total
            )));
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some(r) = self.stop.requested() {
                return Ok(End::Stopped(r));
            }
            // The map first: complete (or gone after this job removed it) ends the job.
            match self.check_map().await? {
                MapNow::Complete => return self.complete().await,
                MapNow::Done(n) => self.report(self.phase(), n),
            }
            let fed_at = self.progress.borrow().live.as_ref().map_or(0, |l| l.chunks_done);
            match self.find_disk().await {
                Some((backend, disk_id, done)) => {
                    self.report(LivePhase::Feeding, done);
                    self.enter(Stage::Feeding).await;
                    let session = match self.feed(&backend, &disk_id, &source, done).await {
                        Session::Complete => match self.check_map().await? {
                            MapNow::Complete => return self.complete().await,
                            MapNow::Done(n) => Session::Broken {
                                fed: false,
                                error: BackendError::InvalidReply {
                                    call: super::ports::Call::RestoreFeed,
                                    reason: format!(
                                        "it said complete, the map has {n} of {} chunks",
                                        live.chunks_total
                                    ),
                                },
                            },
                        },
                        other => other,
                    };
                    match session {
                        Session::Complete => return self.complete().await,
                        Session::Stopped(r) => return Ok(End::Stopped(r)),
                        Session::Broken { fed, error } => {
                            if fed {
                                backoff = BACKOFF_MIN;
                            }
                            warn!(job = %self.state.id, error = %chain(&error), "the restore feed broke; reconnecting");
                            self.report(LivePhase::Waiting, fed_at.max(done));
                            self.enter(Stage::Waiting).await;
                            self.sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                None => {
                    self.report(LivePhase::Waiting, fed_at);
                    self.enter(Stage::Waiting).await;
                    self.sleep(WAIT_POLL).await;
                }
            }
        }
    }

    fn phase(&self) -> LivePhase {
        self.progress.borrow().live.as_ref().map_or(LivePhase::Waiting, |l| l.phase)
    }

    /// Sleeps, or less if the job is asked to stop.
    async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.stopped() => {}
        }
    }

    /// What the map says now.
    async fn check_map(&mut self) -> Result<MapNow> {
        let live = self.live().clone();
        let finished = self.state.stage == Stage::Done;
        let ident = (self.state.vm.clone(), live.backup_id.clone(), live.disk.clone());
        tokio::task::spawn_blocking(move || -> Result<MapNow> {
            match live.map.try_exists() {
                Ok(false) if finished => return Ok(MapNow::Complete),
                Ok(false) => return Err(Error::LiveMap {
                    path: live.map.clone(),
                    why: "it is gone before the restore completed (removed by hand?): the target is no longer a live restore".into(),
                }),
                Ok(true) => {}
                Err(e) => return Err(Error::LiveMap { path: live.map.clone(), why: e.to_string() }),
            }
            let info = map::read_map(&live.map).map_err(|e| Error::LiveMap { path: live.map.clone(), why: chain(&e).to_string() })?;
            if (info.id.vm.as_str(), info.id.backup_id.as_str(), info.id.disk.as_str())
                != (ident.0.as_str(), ident.1.as_str(), ident.2.as_str())
            {
                return Err(Error::LiveMap {
                    path: live.map.clone(),
                    why: format!("it restores {}/{} disk {}, not this job's backup", info.id.vm, info.id.backup_id, info.id.disk),
                });
            }
            Ok(if info.complete { MapNow::Complete } else { MapNow::Done(info.chunks_done) })
        })
        .await
        .map_err(Error::Task)?
    }

    /// The map read back complete: recorded (stage done), removed, its directory synced.
    async fn complete(&mut self) -> Result<End> {
        match self.check_map().await? {
            MapNow::Complete => {}
            MapNow::Done(n) => {
                return Err(Error::LiveMap {
                    path: self.live().map.clone(),
                    why: format!("the backend said complete, the map has {n} of {} chunks", self.live().chunks_total),
                })
            }
        }
        self.enter(Stage::Done).await;
        let map = self.live().map.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            match std::fs::remove_file(&map) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::LiveMap { path: map.clone(), why: format!("cannot remove it: {e}") }),
            }
            if let Some(dir) = map.parent() {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::LiveMap {
                    path: map.clone(),
                    why: format!("cannot sync its directory: {e}"),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(Error::Task)??;
        Ok(End::Complete)
    }

    /// The VM's backend and its disk that serves this restore's target, if one does now, with
    /// the chunks it has in.
    async fn find_disk(&self) -> Option<(Arc<dyn Backend>, String, u64)> {
        let backend = self.d.connector.backend(&self.vm, TIMEOUTS).await.ok()?;
        let st = backend.status().await.ok()?;
        let live = self.live();
        let d = st.disks.into_iter().find(|d| {
            d.restore.as_ref().is_some_and(|r| {
                r.vm == self.state.vm
                    && r.backup_id == live.backup_id
                    && r.disk == live.disk
                    && same_file(&r.map_path, &live.map)
            })
        })?;
        let done = d.restore.as_ref().map_or(0, |r| r.chunks_done);
        Some((backend, d.id, done))
    }

    /// One feed, until it ends.
    async fn feed(
        &mut self,
        backend: &Arc<dyn Backend>,
        disk: &str,
        source: &Arc<dyn ChunkSource>,
        done: u64,
    ) -> Session {
        let Feed { mut wants, answers } = match backend.restore_feed(disk).await {
            Ok(f) => f,
            Err(error) => return Session::Broken { fed: false, error },
        };
        info!(job = %self.state.id, disk, "feeding the backend");
        let total = source.chunks();
        let mut urgent: VecDeque<u64> = VecDeque::new();
        let mut background: VecDeque<u64> = VecDeque::new();
        // Queued or being read: wanted again, it is not read twice.
        let mut busy: HashSet<u64> = HashSet::new();
        // Being read, and whether in an urgent slot.
        let mut reading: HashMap<u64, bool> = HashMap::new();
        let mut reads: JoinSet<(u64, AnswerBody)> = JoinSet::new();
        let mut fed = false;
        let mut answered = 0u64;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The progress's Status call, in a task of its own: a slow answer never holds a want.
        let mut status: Option<tokio::task::JoinHandle<Option<u64>>> = None;
        // `restore_bytes_per_sec`: the earliest the next background read may start. Each one
        // read pushes it on by its length at that rate; urgent reads are never held.
        let pace = self.d.config.restore_bytes_per_sec;
        let mut next_background = tokio::time::Instant::now();
        // When the guest last fetched (an urgent want came, or an urgent read ended).
        let mut guest_fetched: Option<tokio::time::Instant> = None;
        let broken = |fed, error| Session::Broken { fed, error };
        let closed = || BackendError::Ended { call: super::ports::Call::RestoreFeed };
        loop {
            // Urgent first, in slots of their own; then the background copy.
            loop {
                let urgent_reads = reading.values().filter(|u| **u).count();
                let background_reads = reading.len() - urgent_reads;
                let background_slots = background_slots(urgent_reads, urgent.len(), guest_fetched);
                let (c, slot) =
                    if !urgent.is_empty() && urgent_reads < URGENT_FETCHES + FETCHES.saturating_sub(background_reads) {
                        (urgent.pop_front(), true)
                    } else if urgent.is_empty()
                        && background_reads < background_slots
                        && (pace.is_none() || tokio::time::Instant::now() >= next_background)
                    {
                        (background.pop_front(), false)
                    } else {
                        (None, false)
                    };
                let Some(c) = c else { break };
                if source.is_zero(c) {
                    busy.remove(&c);
                    if answers.send(Answer { chunk: c, body: AnswerBody::Zero }).await.is_err() {
                        return broken(fed, closed());
                    }
                    answered += 1;
                    continue;
                }
                reading.insert(c, slot);
                let src = source.clone();
                reads.spawn(async move {
                    let body = match tokio::task::spawn_blocking(move || src.read(c)).await {
                        Ok(Ok(data)) => AnswerBody::Data(data),
                        Ok(Err(e)) => AnswerBody::Error(e),
                        Err(e) => AnswerBody::Error(format!("the read failed: {e}")),
                    };
                    (c, body)
                });
            }
            // The background copy held back by its pace: wake when it may go on.
            let urgent_reads = reading.values().filter(|u| **u).count();
            let held = pace.is_some()
                && urgent.is_empty()
                && !background.is_empty()
                && reading.len() - urgent_reads < background_slots(urgent_reads, urgent.len(), guest_fetched);
            tokio::select! {
                biased;
                _ = self.stop.stopped() => {
                    return Session::Stopped(self.stop.requested().unwrap_or(StopReason::Cancel));
                }
                w = wants.recv() => {
                    let mut next = w;
                    // Every want already queued, before any read starts: urgent ones jump the queue.
                    loop {
                        match next {
                            None => return broken(fed, closed()),
                            Some(Err(error)) => return broken(fed, error),
                            Some(Ok(w)) => {
                                fed = true;
                                if w.complete {
                                    return Session::Complete;
                                }
                                for c in w.chunks {
                                    if c >= total {
                                        let body = AnswerBody::Error(format!("chunk {c} is out of range: the backup's disk has {total} chunks"));
                                        if answers.send(Answer { chunk: c, body }).await.is_err() {
                                            return broken(fed, closed());
                                        }
                                        continue;
                                    }
                                    if w.urgent {
                                        guest_fetched = Some(tokio::time::Instant::now());
                                        if let Some(p) = background.iter().position(|&b| b == c) {
                                            background.remove(p);
                                            urgent.push_back(c);
                                        } else if busy.insert(c) {
                                            urgent.push_back(c);
                                        }
                                    } else if busy.insert(c) {
                                        background.push_back(c);
                                    }
                                }
                            }
                        }
                        match wants.try_recv() {
                            Ok(w) => next = Some(w),
                            Err(_) => break,
                        }
                    }
                }
                Some(r) = reads.join_next(), if !reads.is_empty() => {
                    let (c, body) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(job = %self.state.id, error = %e, "a chunk read task failed");
                            continue;
                        }
                    };
                    let was_urgent = reading.remove(&c).unwrap_or(true);
                    busy.remove(&c);
                    if was_urgent {
                        guest_fetched = Some(tokio::time::Instant::now());
                    }
                    if let (Some(rate), false, AnswerBody::Data(d)) = (pace, was_urgent, &body) {
                        let due = Duration::from_secs_f64(d.len() as f64 / rate as f64);
                        next_background = next_background.max(tokio::time::Instant::now()) + due;
                    }
                    if let AnswerBody::Error(e) = &body {
                        warn!(job = %self.state.id, chunk = c, error = %e, "cannot read a chunk: answered with the error");
                    } else {
                        answered += 1;
                    }
                    if answers.send(Answer { chunk: c, body }).await.is_err() {
                        return broken(fed, closed());
                    }
                }
                () = tokio::time::sleep_until(next_background), if held => {}
                _ = tick.tick(), if status.is_none() => {
                    let (b, disk) = (backend.clone(), disk.to_owned());
                    status = Some(tokio::spawn(async move {
                        let st = b.status().await.ok()?;
                        st.disks.into_iter().find(|d| d.id == disk).and_then(|d| d.restore).map(|r| r.chunks_done)
                    }));
                }
                now = async {
                    match status.as_mut() {
                        Some(h) => h.await.ok().flatten(),
                        None => std::future::pending().await,
                    }
                }, if status.is_some() => {
                    status = None;
                    self.report(LivePhase::Feeding, now.unwrap_or(done + answered));
                }
            }
        }
    }
}

/// Background reads allowed now: [`FETCHES`], or [`FETCHES_BESIDE_GUEST`] while the guest is
/// fetching (urgent reads under way or queued, or one ended less than [`GUEST_ACTIVE`] ago).
fn background_slots(urgent_reads: usize, urgent_queued: usize, guest_fetched: Option<tokio::time::Instant>) -> usize {
    if urgent_reads > 0 || urgent_queued > 0 || guest_fetched.is_some_and(|t| t.elapsed() < GUEST_ACTIVE) {
        FETCHES_BESIDE_GUEST
    } else {
        FETCHES
    }
}

enum MapNow {
    Complete,
    /// Not complete: the chunks in.
    Done(u64),
}

/// Refuses to remove any of `ids` (backups of `vm`) that a live restore target still needs
/// (delete, prune): one whose job is running, and one whose job ended before it was complete
/// (cancelled, failed) while the target's restore map is still there. The chunks not in yet
/// exist nowhere else; only removing the target and its map gives them up.
pub(crate) fn refuse_if_restoring(store: &super::state::Store, vm: &str, ids: &[String]) -> Result<()> {
    for j in store.jobs()? {
        if j.kind != JobKind::LiveRestore || j.vm != vm || j.result == Some(JobResult::Ok) {
            continue;
        }
        let Some(l) = j.live.as_ref().filter(|l| ids.contains(&l.backup_id)) else { continue };
        let (vm, id) = (vm.to_owned(), l.backup_id.clone());
        match j.result {
            None => return Err(Error::LiveRestoring { vm, id, job: j.id }),
            Some(_) if std::fs::symlink_metadata(&l.map).is_ok() => {
                return Err(Error::LiveRestoreLeft { vm, id, job: j.id, map: l.map.clone() })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether two paths name one file (the backend may spell the map's path differently).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

impl Daemon {
    /// The chunk source of a live restore, as tests wrap it.
    fn wrap_source(&self, s: Arc<dyn ChunkSource>) -> Arc<dyn ChunkSource> {
        #[cfg(test)]
        if let Some(w) = self.live_wrap.get() {
            return (w.0)(s);
        }
        s
    }
}

#[cfg(test)]
mod tests;
