//! CreateSnapshot: quiesce → cut → thaw → back up → merge → checkpoint → record; and the clean-up
//! of the jobs a previous daemon left unfinished.
//!
//! The freeze window (the agent's freeze request to its thaw reply) holds only the freeze, the
//! backend's Begin and the thaw: both connections are open before, the job's state is written
//! before and after, and events are queued without waiting for the client.
//!
//! After the cut, any failure abandons the snapshot (the backend merges its delta) and skips
//! the checkpoint, so the changes it froze stay in the change map for the next backup.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap_proto::daemon as pb;
use livesnap_proto::snapshot as spb;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::backend::{self, error_chain, Backend};
use super::config::VmConfig;
use super::reader::Base;
use super::state::{BackupState, JobResult, JobState};
use super::{backup_pb, Claim, Daemon, Error, Result};
use crate::agent::{AgentClient, FsOutcome, Limits};
use crate::repo::{self, BackupSpec, FreezeWindow, Manifest};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the merge stream may stay silent (the backend reports several times a second).
const MERGE_SILENCE: Duration = Duration::from_secs(300);
/// Agent limits for the freeze path: short, the guest is waiting.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
const EVENTS: usize = 256;
/// Retries of the clean-up of a job left unfinished, while its backend does not answer.
const RECOVERY_RETRY: Duration = Duration::from_secs(5);
const RECOVERY_ATTEMPTS: u32 = 120;

/// A failure: the stage it happened in and why.
#[derive(Debug)]
struct Failure {
    stage: &'static str,
    error: Error,
}

fn at(stage: &'static str) -> impl Fn(Error) -> Failure {
    move |error| Failure { stage, error }
}

/// How each disk is backed up.
enum Plan {
    Full,
    Incremental { parent: Box<Manifest>, extents: Vec<(u64, u64)> },
}

struct DiskPlan {
    disk: String,
    base_path: String,
    base_format: String,
    size: u64,
    plan: Plan,
}

struct Job {
    d: Arc<Daemon>,
    vm: VmConfig,
    state: JobState,
    tx: mpsc::Sender<pb::SnapshotEvent>,
    mode: pb::BackupMode,
    quiesce: pb::QuiesceMode,
    freeze_timeout: Duration,
}

fn now_unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Daemon {
    /// Starts a job on `req.vm`; its events come on the receiver, the last one Done or Failed.
    /// Refused at once (no job) for an unknown VM, a VM with a job running, invalid options, or
    /// quiesce=required on a VM without an agent.
    pub async fn create_snapshot(
        self: &Arc<Self>,
        req: pb::CreateSnapshotRequest,
    ) -> Result<(String, mpsc::Receiver<pb::SnapshotEvent>)> {
        let vm = self.vm_config(&req.vm)?.clone();
        let mode = pb::BackupMode::try_from(req.backup)
            .map_err(|_| Error::InvalidArgument(format!("unknown backup mode {}", req.backup)))?;
        let quiesce = pb::QuiesceMode::try_from(req.quiesce)
            .map_err(|_| Error::InvalidArgument(format!("unknown quiesce mode {}", req.quiesce)))?;
        let freeze_timeout = match req.freeze_timeout_ms {
            0 => self.config.freeze_timeout,
            ms if ms > 600_000 => {
                return Err(Error::InvalidArgument(format!("freeze_timeout_ms {ms} is more than 10 minutes")))
            }
            ms => Duration::from_millis(u64::from(ms)),
        };
        if quiesce == pb::QuiesceMode::Required && vm.agent.is_none() {
            return Err(Error::QuiesceImpossible(format!("VM {} has no agent configured", vm.name)));
        }
        // Claimed before anything is written, so that a second request is refused at once.
        let claim = self.claim(&vm.name, "starting")?;
        let seq = self.blocking(|_, s| Ok(s.next_job_seq()?)).await?;
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
        let id = format!("{stamp}-{seq}");
        self.running_map().insert(vm.name.clone(), id.clone());
        let state = JobState::new(id.clone(), vm.name.clone(), now_unix_us());
        let st = state.clone();
        self.blocking(move |_, s| Ok(s.put_job(&st)?)).await?;
        let (tx, rx) = mpsc::channel(EVENTS);
        let job = Job { d: self.clone(), vm, state, tx, mode, quiesce, freeze_timeout };
        tokio::spawn(job.run(claim));
        Ok((id, rx))
    }

    /// Cleans up after the jobs a previous daemon left unfinished: thaws the guest, abandons a
    /// snapshot left on the backend (its delta merges), marks the job failed. Never checkpoints.
    /// A first attempt is made before returning; a VM whose backend does not answer is retried
    /// in the background, held (no new job) until it is clean.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let jobs = self.blocking(|_, s| Ok(s.jobs()?)).await?;
        for job in jobs.into_iter().filter(|j| j.result.is_none()) {
            warn!(job = %job.id, vm = %job.vm, stage = %job.stage, "a job was left unfinished by a previous daemon: cleaning up");
            let Some(vm) = self.config.vm(&job.vm).cloned() else {
                self.finish_recovered(
                    job,
                    "daemon restarted; the VM is no longer configured, nothing was cleaned up".into(),
                )
                .await;
                continue;
            };
            let claim = match self.claim(&vm.name, &format!("recovery of {}", job.id)) {
                Ok(c) => c,
                Err(_) => {
                    // Two unfinished jobs of one VM: the first one's clean-up covers both.
                    self.finish_recovered(job, "daemon restarted".into()).await;
                    continue;
                }
            };
            match cleanup(&vm, &job).await {
                Ok(what) => {
                    self.finish_recovered(job, format!("daemon restarted during stage {what}")).await;
                    drop(claim);
                }
                Err(e) => {
                    warn!(vm = %vm.name, job = %job.id, error = %error_chain(&e), "clean-up failed; retrying in the background");
                    let d = self.clone();
                    tokio::spawn(async move {
                        for _ in 0..RECOVERY_ATTEMPTS {
                            tokio::time::sleep(RECOVERY_RETRY).await;
                            match cleanup(&vm, &job).await {
                                Ok(what) => {
                                    d.finish_recovered(job, format!("daemon restarted during stage {what}")).await;
                                    drop(claim);
                                    return;
                                }
                                Err(e) => {
                                    warn!(vm = %vm.name, job = %job.id, error = %error_chain(&e), "clean-up failed")
                                }
                            }
                        }
                        error!(vm = %vm.name, job = %job.id, "giving up cleaning up; check the backend by hand");
                        d.finish_recovered(job, "daemon restarted; the clean-up failed: check the backend".into())
                            .await;
                        drop(claim);
                    });
                }
            }
        }
        Ok(())
    }

    async fn finish_recovered(&self, mut job: JobState, reason: String) {
        job.reason = format!("{reason} (stage {})", job.stage);
        job.result = Some(JobResult::Failed);
        job.finished_unix_us = Some(now_unix_us());
        info!(job = %job.id, vm = %job.vm, reason = %job.reason, "unfinished job marked failed");
        if let Err(e) = self.blocking(move |_, s| Ok(s.put_job(&job)?)).await {
            error!(error = %error_chain(&e), "cannot record a recovered job");
        }
    }
}

/// Thaws the guest and abandons the job's snapshot if the backend still has it active.
/// Returns the job's stage for the record.
async fn cleanup(vm: &VmConfig, job: &JobState) -> Result<String> {
    if let Some(ep) = &vm.agent {
        let limits =
            Limits { connect_timeout: AGENT_CONNECT_TIMEOUT, call_timeout: AGENT_CALL_TIMEOUT, ..Limits::default() };
        // An agent that does not answer thaws by itself at its deadline (its watchdog).
        match backend::connect_agent(ep, limits).await {
            Ok(a) => match a.thaw().await {
                Ok(r) => info!(vm = %vm.name, was_frozen = r.was_frozen, "guest thawed"),
                Err(e) => {
                    warn!(vm = %vm.name, error = %error_chain(&e), "thaw failed; the agent's watchdog thaws at its deadline")
                }
            },
            Err(e) => warn!(vm = %vm.name, error = %e, "agent unreachable; its watchdog thaws at its deadline"),
        }
    }
    let b = backend::connect_backend(&vm.name, &vm.control, CONNECT_TIMEOUT).await?;
    let st = backend::status(&vm.name, &b, CALL_TIMEOUT).await?;
    if let Some(s) = &st.snapshot {
        let active = st
            .disks
            .iter()
            .any(|d| d.snapshot == Some(s.id) && d.phase == spb::Phase::Active as i32 && d.abandoned.is_empty());
        let ours = job.snapshot_id.is_none_or(|id| id == s.id);
        if active && ours {
            let reason = format!("livesnapd restarted during job {}", job.id);
            let mut c = b.clone();
            backend::call(
                &vm.name,
                "Abandon",
                CALL_TIMEOUT,
                c.abandon(spb::AbandonRequest { snapshot_id: s.id, reason }),
            )
            .await?;
            info!(vm = %vm.name, snapshot = s.id, "snapshot of an unfinished job abandoned; its delta merges");
        } else if active {
            warn!(vm = %vm.name, snapshot = s.id, "the backend has a snapshot this job did not cut; left alone");
        }
    }
    Ok(job.stage.clone())
}

impl Job {
    /// Queues an event; a client that went away or reads slowly does not hold the job.
    fn emit(&self, e: pb::snapshot_event::Event) {
        let _ = self.tx.try_send(pb::SnapshotEvent { job_id: self.state.id.clone(), event: Some(e) });
    }

    /// Sends an event the client must see (Done, Failed), waiting for room.
    async fn emit_wait(&self, e: pb::snapshot_event::Event) {
        let _ = self.tx.send(pb::SnapshotEvent { job_id: self.state.id.clone(), event: Some(e) }).await;
    }

    async fn save(&self) {
        let st = self.state.clone();
        if let Err(e) = self.d.blocking(move |_, s| Ok(s.put_job(&st)?)).await {
            error!(job = %self.state.id, error = %error_chain(&e), "cannot record the job's state");
        }
    }

    async fn stage(&mut self, stage: &str) {
        self.state.stage = stage.to_owned();
        self.save().await;
    }

    async fn run(mut self, claim: Claim) {
        let vm = self.vm.name.clone();
        let started = Instant::now();
        let outcome = self.snapshot().await;
        self.state.finished_unix_us = Some(now_unix_us());
        match outcome {
            Ok(backup) => {
                self.state.stage = "done".into();
                self.state.result = Some(JobResult::Ok);
                self.save().await;
                info!(vm = %vm, job = %self.state.id, secs = started.elapsed().as_secs_f64(), "snapshot job done");
                drop(claim);
                self.emit_wait(pb::snapshot_event::Event::Done(backup)).await;
            }
            Err(f) => {
                let reason = error_chain(&f.error);
                error!(vm = %vm, job = %self.state.id, stage = f.stage, reason = %reason, "snapshot job failed");
                self.state.stage = f.stage.to_owned();
                self.state.result = Some(JobResult::Failed);
                self.state.reason = reason.clone();
                self.save().await;
                drop(claim);
                self.emit_wait(pb::snapshot_event::Event::Failed(pb::Failed {
                    code: f.error.code() as i32,
                    reason,
                    stage: f.stage.into(),
                }))
                .await;
            }
        }
    }

    async fn snapshot(&mut self) -> std::result::Result<pb::Backup, Failure> {
        let name = self.vm.name.clone();
        let backend = backend::connect_backend(&name, &self.vm.control, CONNECT_TIMEOUT).await.map_err(at("cut"))?;
        let st = backend::status(&name, &backend, CALL_TIMEOUT).await.map_err(at("cut"))?;
        if let Some(s) = &st.snapshot {
            return Err(Failure { stage: "cut", error: Error::SnapshotActive { vm: name, id: s.id } });
        }
        if self.mode == pb::BackupMode::Incremental {
            // Checked before the cut too, so that a backup that cannot be incremental does not
            // freeze the guest for nothing.
            for d in &st.disks {
                let ch = backend::changes(&name, &backend, &d.id, CALL_TIMEOUT).await.map_err(at("backup"))?;
                if let Err(reason) = self.parent_for(&d.id, &ch, None).await.map_err(at("backup"))? {
                    return Err(Failure {
                        stage: "backup",
                        error: Error::NotIncremental { disk: d.id.clone(), reason },
                    });
                }
            }
        }

        // Quiesce: the agent's connection is opened before the freeze.
        let mut crash_reason = String::new();
        let mut agent: Option<AgentClient> = None;
        match (self.quiesce, &self.vm.agent) {
            (pb::QuiesceMode::Off, _) => crash_reason = "quiesce=off".into(),
            (_, None) => crash_reason = "no agent is configured for the VM".into(),
            (q, Some(ep)) => {
                let limits = Limits {
                    connect_timeout: AGENT_CONNECT_TIMEOUT,
                    call_timeout: AGENT_CALL_TIMEOUT,
                    ..Limits::default()
                };
                match backend::connect_agent(ep, limits).await {
                    Ok(a) => agent = Some(a),
                    Err(e) if q == pb::QuiesceMode::Required => {
                        return Err(Failure {
                            stage: "quiesce",
                            error: Error::QuiesceImpossible(format!("the agent is unreachable: {e}")),
                        })
                    }
                    Err(e) => crash_reason = format!("the agent is unreachable: {e}"),
                }
            }
        }
        self.stage("quiesce").await;
        let mut frozen: Option<(Instant, u64)> = None;
        if let Some(a) = &agent {
            self.emit(pb::snapshot_event::Event::Quiescing(pb::Quiescing {}));
            let t0 = (Instant::now(), now_unix_us());
            match a.freeze(self.freeze_timeout, &self.state.id).await {
                Ok(r) => {
                    frozen = Some(t0);
                    let n = r.filesystems.iter().filter(|f| f.outcome == FsOutcome::Frozen).count();
                    self.emit(pb::snapshot_event::Event::Frozen(pb::Frozen {
                        filesystems: u32::try_from(n).unwrap_or(u32::MAX),
                    }));
                }
                Err(e) => {
                    let reason = error_chain(&e);
                    // Whatever the agent managed before failing is undone.
                    if let Err(t) = a.thaw().await {
                        warn!(vm = %name, error = %error_chain(&t), "thaw after a failed freeze failed");
                    }
                    if self.quiesce == pb::QuiesceMode::Required {
                        return Err(Failure { stage: "quiesce", error: Error::QuiesceImpossible(reason) });
                    }
                    crash_reason = format!("the freeze failed: {reason}");
                }
            }
        }

        // The cut, then the thaw at once, whether the cut worked or not.
        let mut c = backend.clone();
        let t_cut = Instant::now();
        let begin = backend::call(&name, "Begin", CALL_TIMEOUT, c.begin(spb::BeginRequest::default())).await;
        let cut_rtt = t_cut.elapsed();
        let mut window = None;
        let mut thaw_note = String::new();
        if let (Some(a), Some((t0, t0_unix))) = (&agent, frozen) {
            let r = a.thaw().await;
            let w = t0.elapsed();
            match r {
                Ok(r) if !r.was_frozen => {
                    // The agent's lease ran out before the thaw: it may have thawed before the cut.
                    crash_reason = format!(
                        "the agent thawed by itself (its {:?} lease ran out) before the thaw",
                        self.freeze_timeout
                    );
                    warn!(vm = %name, reason = %crash_reason);
                }
                Ok(_) => window = Some(FreezeWindow { frozen_unix_us: t0_unix, thawed_unix_us: t0_unix + us(w) }),
                Err(e) => {
                    window = Some(FreezeWindow { frozen_unix_us: t0_unix, thawed_unix_us: t0_unix + us(w) });
                    thaw_note =
                        format!("the thaw failed ({}); the agent's watchdog thaws at its deadline", error_chain(&e));
                    error!(vm = %name, note = %thaw_note);
                }
            }
        }
        let begin = match begin {
            Ok(b) => b,
            Err(e) => {
                // A Begin that timed out may still have cut: a snapshot that appeared is given up.
                if let Ok(st) = backend::status(&name, &backend, CALL_TIMEOUT).await {
                    if let Some(s) = st.snapshot {
                        let mut c = backend.clone();
                        let reason = format!("job {}: the cut failed: {}", self.state.id, error_chain(&e));
                        let r = backend::call(
                            &name,
                            "Abandon",
                            CALL_TIMEOUT,
                            c.abandon(spb::AbandonRequest { snapshot_id: s.id, reason }),
                        )
                        .await;
                        warn!(vm = %name, snapshot = s.id, abandoned = r.is_ok(), "a snapshot appeared although Begin failed");
                    }
                }
                return Err(Failure { stage: "cut", error: e });
            }
        };
        let snap = begin.snapshot.ok_or_else(|| Failure {
            stage: "cut",
            error: Error::Backend {
                vm: name.clone(),
                what: "Begin",
                status: tonic::Status::internal("the reply carries no snapshot"),
            },
        })?;
        let window_us = window.map_or(0, |w| w.duration_us());
        info!(vm = %name, snapshot = snap.id, pause_us = snap.pause_us, cut_rtt_us = us(cut_rtt), freeze_window_us = window_us, "cut");
        self.emit_wait(pb::snapshot_event::Event::Cut(pb::Cut {
            snapshot_id: snap.id,
            crash_consistent_reason: crash_reason.clone(),
            pause_us: snap.pause_us,
        }))
        .await;
        self.emit_wait(pb::snapshot_event::Event::Thawed(pb::Thawed { freeze_window_us: window_us })).await;
        self.state.snapshot_id = Some(snap.id);
        self.stage("backup").await;

        let consistency = if window.is_some() { repo::Consistency::Application } else { repo::Consistency::Crash };
        let mut notes = Vec::new();
        if !crash_reason.is_empty() {
            notes.push(format!("crash-consistent: {crash_reason}"));
        }
        if !thaw_note.is_empty() {
            notes.push(thaw_note);
        }
        match self.after_cut(&backend, &snap, consistency, window, notes).await {
            Ok(b) => Ok(b),
            Err(f) => {
                let reason = format!("job {} failed at {}: {}", self.state.id, f.stage, error_chain(&f.error));
                let mut c = backend.clone();
                match backend::call(
                    &name,
                    "Abandon",
                    CALL_TIMEOUT,
                    c.abandon(spb::AbandonRequest { snapshot_id: snap.id, reason }),
                )
                .await
                {
                    Ok(_) => info!(vm = %name, snapshot = snap.id, "snapshot abandoned; its delta merges"),
                    Err(e) => warn!(vm = %name, snapshot = snap.id, error = %error_chain(&e), "abandon failed"),
                }
                Err(f)
            }
        }
    }

    /// The parent manifest of an incremental backup of `disk`, or why there is none: the
    /// change map must be trusted, end at `snapshot` (if given), and start at the checkpoint of
    /// the snapshot the VM's latest backup of the disk was cut from.
    async fn parent_for(
        &self,
        disk: &str,
        ch: &spb::ChangesPage,
        snapshot: Option<u64>,
    ) -> Result<std::result::Result<Manifest, String>> {
        // The first backup of a disk says so, rather than why its change map is untrusted.
        let Some(since) = ch.since_checkpoint else {
            return Ok(Err("no earlier backup of it was checkpointed (the first backup of a disk is full)".into()));
        };
        if !ch.trusted {
            return Ok(Err(format!("its change map is not trusted: {}", ch.untrusted_reason)));
        }
        if let Some(id) = snapshot {
            if ch.until_snapshot != Some(id) {
                return Ok(Err(format!("its change map does not end at the cut of snapshot {id}")));
            }
        }
        let (vm, disk) = (self.vm.name.clone(), disk.to_owned());
        self.d
            .blocking(move |repo, store| {
                let Some(m) = repo.latest_manifest(&vm, &disk)? else {
                    return Ok(Err("the repository has no earlier backup of it".into()));
                };
                match store.backup(&vm, &m.meta.backup)? {
                    Some(b) if b.snapshot_id == since => Ok(Ok(m)),
                    Some(b) => Ok(Err(format!(
                        "the latest backup {} was cut from snapshot {}, the change map starts at checkpoint {since}",
                        m.meta.backup, b.snapshot_id
                    ))),
                    None => Ok(Err(format!("the latest backup {} was not made by this daemon", m.meta.backup))),
                }
            })
            .await
    }

    async fn after_cut(
        &mut self,
        backend: &Backend,
        snap: &spb::Snapshot,
        consistency: repo::Consistency,
        window: Option<FreezeWindow>,
        mut notes: Vec<String>,
    ) -> std::result::Result<pb::Backup, Failure> {
        let name = self.vm.name.clone();
        let st = backend::status(&name, backend, CALL_TIMEOUT).await.map_err(at("backup"))?;
        let mut plans = Vec::new();
        for disk in &snap.disks {
            let d = st.disks.iter().find(|d| &d.id == disk).ok_or_else(|| Failure {
                stage: "backup",
                error: Error::Backend {
                    vm: name.clone(),
                    what: "Status",
                    status: tonic::Status::internal(format!("no disk {disk}")),
                },
            })?;
            let plan = if self.mode == pb::BackupMode::Full {
                Plan::Full
            } else {
                let ch = backend::changes(&name, backend, disk, CALL_TIMEOUT).await.map_err(at("backup"))?;
                match self.parent_for(disk, &ch, Some(snap.id)).await.map_err(at("backup"))? {
                    Ok(parent) => Plan::Incremental {
                        parent: Box::new(parent),
                        extents: ch.extents.iter().map(|e| (e.offset, e.length)).collect(),
                    },
                    Err(reason) if self.mode == pb::BackupMode::Incremental => {
                        return Err(Failure {
                            stage: "backup",
                            error: Error::NotIncremental { disk: disk.clone(), reason },
                        })
                    }
                    Err(reason) => {
                        notes.push(format!("disk {disk} full: {reason}"));
                        Plan::Full
                    }
                }
            };
            plans.push(DiskPlan {
                disk: disk.clone(),
                base_path: d.base_path.clone(),
                base_format: d.base_format.clone(),
                size: d.size,
                plan,
            });
        }

        // The reading, hashing and writing happen on a blocking thread; progress comes back as
        // events. Before the commit, the backend must still hold every base frozen.
        let spec = BackupSpec {
            vm: name.clone(),
            id: self.state.id.clone(),
            consistency,
            freeze_window: window,
            created_unix_us: None,
        };
        let (repo, scratch, rate) =
            (self.d.repo.clone(), self.d.config.scratch.clone(), self.d.config.read_bytes_per_sec);
        let (tx, job_id, snap_id, b2) = (self.tx.clone(), self.state.id.clone(), snap.id, backend.clone());
        let rt = tokio::runtime::Handle::current();
        let vm2 = name.clone();
        let write = tokio::task::spawn_blocking(move || -> std::result::Result<repo::BackupInfo, Failure> {
            let mut w = repo.begin_backup(spec).map_err(|e| Failure { stage: "backup", error: e.into() })?;
            let ptx = tx.clone();
            let pjob = job_id.clone();
            w.set_progress(Box::new(move |disk, done, total| {
                let e = pb::snapshot_event::Event::BackingUp(pb::DiskProgress {
                    disk: disk.to_owned(),
                    bytes_read: done,
                    bytes_total: total,
                });
                let _ = ptx.try_send(pb::SnapshotEvent { job_id: pjob.clone(), event: Some(e) });
            }));
            for p in &plans {
                // An incremental's first report comes from the writer, which knows how much it
                // will read (whole chunks where most changed); a full one reads the disk.
                if matches!(p.plan, Plan::Full) {
                    let e = pb::snapshot_event::Event::BackingUp(pb::DiskProgress {
                        disk: p.disk.clone(),
                        bytes_read: 0,
                        bytes_total: p.size,
                    });
                    let _ = tx.try_send(pb::SnapshotEvent { job_id: job_id.clone(), event: Some(e) });
                }
                let base =
                    Base::open(std::path::Path::new(&p.base_path), &p.base_format, p.size, &scratch, rate).map_err(
                        |source| Failure { stage: "backup", error: Error::Base { disk: p.disk.clone(), source } },
                    )?;
                let r = match &p.plan {
                    Plan::Full => w.full(&p.disk, &base),
                    Plan::Incremental { parent, extents } => w.incremental(&p.disk, &base, parent, extents),
                };
                let stats = r.map_err(|e| Failure { stage: "backup", error: e.into() })?;
                info!(vm = %vm2, disk = %p.disk, bytes_read = stats.bytes_read, bytes_changed = stats.bytes_changed, "disk backed up");
            }
            let st = rt.block_on(backend::status(&vm2, &b2, CALL_TIMEOUT)).map_err(at("backup"))?;
            let lost = st.snapshot.as_ref().is_none_or(|s| s.id != snap_id)
                || st.disks.iter().any(|d| {
                    d.snapshot == Some(snap_id) && (!d.abandoned.is_empty() || d.phase != spb::Phase::Active as i32)
                });
            if lost {
                let why: Vec<String> = st
                    .disks
                    .iter()
                    .filter(|d| !d.abandoned.is_empty())
                    .map(|d| format!("{}: {}", d.id, d.abandoned))
                    .collect();
                let why = if why.is_empty() { "the snapshot is no longer active".to_owned() } else { why.join("; ") };
                return Err(Failure { stage: "backup", error: Error::SnapshotLost(why) });
            }
            w.commit().map_err(|e| Failure { stage: "backup", error: e.into() })
        });
        let info = write.await.map_err(|e| Failure { stage: "backup", error: Error::Task(e.to_string()) })??;

        // The backup is in the repository: index it now, whatever happens to the merge.
        let all_incremental = info.disks.iter().all(|d| d.kind == repo::Kind::Incremental);
        let record = BackupState {
            version: BackupState::current_version(),
            vm: name.clone(),
            id: info.id.clone(),
            job: self.state.id.clone(),
            snapshot_id: snap.id,
            kind: if all_incremental { "incremental" } else { "full" }.into(),
            consistency: match consistency {
                repo::Consistency::Application => "application",
                repo::Consistency::Crash => "crash",
            }
            .into(),
            freeze_window_us: window.map_or(0, |w| w.duration_us()),
            note: notes.join("; "),
        };
        let r2 = record.clone();
        self.d.blocking(move |_, s| Ok(s.put_backup(&r2)?)).await.map_err(at("record"))?;

        self.stage("merge").await;
        self.merge(backend, snap.id).await?;

        // Only now, with the backup committed: the changes up to this cut are safe.
        let mut c = backend.clone();
        let mut record = record;
        if let Err(e) = backend::call(
            &name,
            "Checkpoint",
            CALL_TIMEOUT,
            c.checkpoint(spb::CheckpointRequest { snapshot_id: snap.id }),
        )
        .await
        {
            let note = format!("the checkpoint failed, the next backup will be full: {}", error_chain(&e));
            warn!(vm = %name, snapshot = snap.id, note = %note);
            record.note = if record.note.is_empty() { note } else { format!("{}; {note}", record.note) };
            let r2 = record.clone();
            self.d.blocking(move |_, s| Ok(s.put_backup(&r2)?)).await.map_err(at("record"))?;
        }
        self.stage("record").await;
        Ok(backup_pb(&info, Some(&record)))
    }

    async fn merge(&self, backend: &Backend, snapshot_id: u64) -> std::result::Result<(), Failure> {
        let name = &self.vm.name;
        let mut c = backend.clone();
        let mut stream = backend::call(name, "Merge", CALL_TIMEOUT, c.merge(spb::MergeRequest { snapshot_id }))
            .await
            .map_err(at("merge"))?;
        loop {
            let next = tokio::time::timeout(MERGE_SILENCE, stream.message()).await.map_err(|_| Failure {
                stage: "merge",
                error: Error::BackendTimeout { vm: name.clone(), what: "Merge", timeout: MERGE_SILENCE },
            })?;
            let m = next.map_err(|status| Failure {
                stage: "merge",
                error: Error::Backend { vm: name.clone(), what: "Merge", status },
            })?;
            let Some(m) = m else {
                return Err(Failure {
                    stage: "merge",
                    error: Error::Backend {
                        vm: name.clone(),
                        what: "Merge",
                        status: tonic::Status::unavailable("the merge stream ended before the merge was complete"),
                    },
                });
            };
            let merged_bytes = m.disks.iter().map(|d| d.merged_bytes).sum();
            let remaining_bytes = m.disks.iter().map(|d| d.remaining_bytes).sum();
            self.emit(pb::snapshot_event::Event::Merging(pb::Merging { merged_bytes, remaining_bytes }));
            if m.done {
                return Ok(());
            }
        }
    }
}
