//! CreateSnapshot, one file a step:
//!
//! | step | file | |
//! |---|---|---|
//! | plan | `plan.rs` | before the cut, whether an incremental backup can be made; after it, each disk's plan |
//! | quiesce, cut, thaw | `cut.rs` | the agent's freeze, the backend's Begin, the thaw, whatever Begin answered |
//! | back up | `backup.rs` | the frozen bases read into the repository, committed while the snapshot holds |
//! | merge, checkpoint | `merge.rs` | the delta merged; the change maps restarted at the cut, only now |
//! | record | `record.rs` | the backup indexed, the job's outcome written and sent |
//!
//! and `recover.rs`: the clean-up of the jobs a previous daemon left unfinished; `stop.rs`: a
//! job stopped early, by CancelJob or by livesnapd stopping (between steps, or within the
//! backup and the merge for a cancel).
//!
//! The freeze window (the agent's freeze request to its thaw reply) holds only the freeze, the
//! backend's Begin and the thaw: both connections are open before, the job's state is written
//! before and after (the stages inside the window are queued, not waited for), and events are
//! queued without waiting for the client.
//!
//! After the cut, any failure abandons the snapshot (the backend merges its delta) and skips
//! the checkpoint, so the changes it froze stay in the change map for the next backup.

mod backup;
mod cut;
mod merge;
mod plan;
mod record;
mod recover;
mod stop;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::config::VmConfig;
use super::model::{Backup, BackupMode, Event, QuiesceMode, SnapshotRequest};
use super::ports::{Backend, BackendError, Timeouts};
use super::state::{JobState, Stage};
use super::{Claim, Daemon, Error, Result, MAX_FREEZE_TIMEOUT};
pub use plan::NoParent;
pub use stop::{Stop, StopReason};

/// The backend, from the workflow: the call timeout is long, Begin's reply may wait for a
/// flush of the guest's in-flight writes.
const BACKEND_TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(5), call: Duration::from_secs(30) };
/// The agent, on the freeze path: short, the guest is waiting.
const AGENT_TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(3), call: Duration::from_secs(5) };
const EVENTS: usize = 256;

/// A failure: the stage it happened in and why.
#[derive(Debug)]
struct Failure {
    stage: Stage,
    error: Error,
}

fn at(stage: Stage) -> impl Fn(Error) -> Failure {
    move |error| Failure { stage, error }
}

fn now_unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One running CreateSnapshot job.
struct Job {
    d: Arc<Daemon>,
    vm: VmConfig,
    state: JobState,
    tx: mpsc::Sender<Event>,
    mode: BackupMode,
    quiesce: QuiesceMode,
    freeze_timeout: Duration,
    /// The last state write queued by [`Job::enter_soon`], not waited for yet.
    pending: Option<JoinHandle<()>>,
    /// Whether the job was asked to stop early.
    stop: Arc<Stop>,
}

impl Daemon {
    /// Starts a job on `req.vm`; its events come on the receiver, the last one Done or Failed.
    /// Refused at once (no job) for an unknown VM, a VM with a job running, a lease longer than
    /// ten minutes, or quiesce=required on a VM without an agent.
    pub async fn create_snapshot(self: &Arc<Self>, req: SnapshotRequest) -> Result<(String, mpsc::Receiver<Event>)> {
        let vm = self.vm_config(&req.vm)?.clone();
        let freeze_timeout = match req.freeze_timeout {
            None => self.config.freeze_timeout,
            Some(t) if t > MAX_FREEZE_TIMEOUT => {
                return Err(Error::InvalidArgument(format!(
                    "The freeze timeout of {} ms is more than 10 minutes",
                    t.as_millis()
                )))
            }
            Some(t) => t,
        };
        if req.quiesce == QuiesceMode::Required && vm.agent.is_none() {
            return Err(Error::NoAgent { vm: vm.name });
        }
        if self.stopping() {
            return Err(Error::Stopping);
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
        let stop = self.register_job(&id);
        let job = Job {
            d: self.clone(),
            vm,
            state,
            tx,
            mode: req.mode,
            quiesce: req.quiesce,
            freeze_timeout,
            pending: None,
            stop,
        };
        tokio::spawn(job.run(claim));
        Ok((id, rx))
    }
}

impl Job {
    /// Queues an event; a client that went away or reads slowly does not hold the job.
    fn emit(&self, e: Event) {
        let _ = self.tx.try_send(e);
    }

    /// Sends an event the client must see (Cut, Done, Failed), waiting for room.
    async fn emit_wait(&self, e: Event) {
        let _ = self.tx.send(e).await;
    }

    /// Fails with [`Error::Cancelled`] at `stage` if the job was asked to stop.
    fn check_stop(&self, stage: Stage) -> std::result::Result<(), Failure> {
        match self.stop.requested() {
            None => Ok(()),
            Some(reason) => Err(Failure { stage, error: Error::Cancelled(reason) }),
        }
    }

    fn backend_failed(&self, stage: Stage) -> impl Fn(BackendError) -> Failure + '_ {
        move |e| Failure { stage, error: Error::backend(&self.vm.name)(e) }
    }

    /// Records `stage` without waiting for the write (inside the freeze window). Writes stay in
    /// order: each waits for the one queued before it.
    fn enter_soon(&mut self, stage: Stage) {
        self.state.stage = stage;
        let (d, st, before) = (self.d.clone(), self.state.clone(), self.pending.take());
        self.pending = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            save(&d, st).await;
        }));
    }

    /// Records `stage`, the writes queued before it first.
    async fn enter(&mut self, stage: Stage) {
        self.state.stage = stage;
        self.save().await;
    }

    async fn save(&mut self) {
        if let Some(before) = self.pending.take() {
            let _ = before.await;
        }
        save(&self.d, self.state.clone()).await;
    }

    async fn run(mut self, claim: Claim) {
        let started = std::time::Instant::now();
        let outcome = self.snapshot().await;
        self.finish(outcome, started, claim).await;
    }

    /// The steps, and the abandon of the snapshot if any fails after the cut.
    async fn snapshot(&mut self) -> std::result::Result<Backup, Failure> {
        let name = self.vm.name.clone();
        let backend =
            self.d.connector.backend(&self.vm, BACKEND_TIMEOUTS).await.map_err(self.backend_failed(Stage::Cut))?;
        let st = backend.status().await.map_err(self.backend_failed(Stage::Cut))?;
        if let Some(s) = &st.snapshot {
            return Err(Failure { stage: Stage::Cut, error: Error::SnapshotActive { vm: name, id: s.id } });
        }
        self.check_key().await?;
        if self.mode == BackupMode::Incremental {
            self.check_incremental(&*backend, &st).await?;
        }
        // The last moment to stop with nothing asked of the guest.
        self.check_stop(Stage::Starting)?;
        let cut = self.quiesce_and_cut(&*backend).await?;
        self.state.snapshot_id = Some(cut.snapshot.id);
        self.enter(Stage::Backup).await;
        match self.after_cut(&backend, cut.clone()).await {
            Ok(b) => Ok(b),
            Err(f) => {
                let reason =
                    format!("job {} failed at {}: {}", self.state.id, f.stage, livesnap_proto::error::chain(&f.error));
                match backend.abandon(cut.snapshot.id, &reason).await {
                    Ok(()) => info!(vm = %name, snapshot = cut.snapshot.id, "snapshot abandoned; its delta merges"),
                    Err(e) => {
                        warn!(vm = %name, snapshot = cut.snapshot.id, error = %livesnap_proto::error::chain(&e), "abandon failed")
                    }
                }
                Err(f)
            }
        }
    }

    /// Back up, index, merge, checkpoint.
    async fn after_cut(&mut self, backend: &Arc<dyn Backend>, cut: cut::Cut) -> std::result::Result<Backup, Failure> {
        let mut notes = cut.notes.clone();
        self.check_stop(Stage::Backup)?;
        let plans = self.plan(&**backend, &cut.snapshot, &mut notes).await?;
        let info = self.back_up(backend, &cut, plans).await?;
        self.d.metrics.backup_committed(&info);
        let record = self.record_backup(&info, &cut, notes).await?;
        // A stop for shutdown let the backup finish; it ends the job here, before the merge.
        self.check_stop(Stage::Backup)?;
        self.enter(Stage::Merge).await;
        let stop = self.stop.clone();
        tokio::select! {
            merged = self.merge(&**backend, cut.snapshot.id) => merged?,
            () = stop.cancelled() => {
                return Err(Failure { stage: Stage::Merge, error: Error::Cancelled(StopReason::Cancel) })
            }
        }
        let record = self.checkpoint(&**backend, cut.snapshot.id, record).await?;
        self.enter(Stage::Record).await;
        Ok(Backup::new(&info, Some(&record)))
    }
}

/// Writes a job's state; a failure is logged (the job goes on).
async fn save(d: &Daemon, st: JobState) {
    let id = st.id.clone();
    if let Err(e) = d.blocking(move |_, s| Ok(s.put_job(&st)?)).await {
        error!(job = %id, error = %livesnap_proto::error::chain(&e), "cannot record the job's state");
    }
}
