//! The workflow's rules, in-process: fakes of the backend and the agent that log their calls in
//! one list (so their order shows), a real repository and a real state database in a temp dir.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::daemon::config::{AgentEndpoint, Config, VmConfig};
use crate::daemon::model::{Backup, BackupMode, Event, QuiesceMode, SnapshotRequest};
use crate::daemon::ports::{
    Agent, AgentError, AgentStatus, Backend, BackendError, Call as BackendCall, ChangeMap, Connector, DiskState,
    Frozen, MergeProgress, Phase, Refusal, Snapshot, Thawed, Timeouts, VmStatus,
};
use crate::daemon::state::{JobResult, JobState, Stage, Store};
use crate::daemon::{Daemon, Error, StopReason};
use livesnap_repo::{Consistency, Repository};

const VM: &str = "vm1";
const DISK: &str = "vda";
const SIZE: u64 = 64 << 10;

/// What the fakes were asked, in order (Status and Changes, which change nothing, left out).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Freeze,
    Thaw,
    Begin,
    Merge(u64),
    Abandon(u64),
    Checkpoint(u64),
}

/// How the fakes behave.
#[derive(Clone, Debug)]
struct Script {
    agent_reachable: bool,
    freeze_fails: bool,
    /// What the thaw reports; false: the agent's lease had thawed the guest already.
    thaw_was_frozen: bool,
    begin_fails: bool,
    merge_fails: bool,
    /// Each call checks that the job's recorded stage reaches the one it belongs to.
    watch_stages: bool,
    /// Where the backend holds the job until the test releases it.
    hold: Option<Hold>,
}

/// A point where the fake backend holds the job, once, until the test releases it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    /// The status asked for by the plan, after the cut: the stream's reads then fail.
    BackupPlan,
    /// The status asked for after every base was read, before the commit: the end of the
    /// stream into the repository.
    BackupCommit,
    /// The merge.
    Merge,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            agent_reachable: true,
            freeze_fails: false,
            thaw_was_frozen: true,
            begin_fails: false,
            merge_fails: false,
            watch_stages: false,
            hold: None,
        }
    }
}

/// The VM the fakes play: its backend's snapshot and checkpoint, and the calls made.
#[derive(Debug)]
struct World {
    script: Script,
    base: PathBuf,
    repo: PathBuf,
    log: Mutex<Vec<Call>>,
    active: Mutex<Option<u64>>,
    checkpoint: Mutex<Option<u64>>,
    next_id: Mutex<u64>,
    /// The backups the repository held at each Checkpoint.
    backups_at_checkpoint: Mutex<Vec<usize>>,
    /// The daemon's state, for `watch_stages`.
    store: OnceLock<Arc<Store>>,
    /// The calls at which the job's recorded stage was not (within a second) the expected one.
    stage_misses: Mutex<Vec<(Call, Stage, Option<Stage>)>>,
    /// A permit once the job is held at `script.hold`.
    reached: tokio::sync::Semaphore,
    /// A permit lets the held job go on.
    release: tokio::sync::Semaphore,
    held: std::sync::atomic::AtomicBool,
    /// Status calls while a snapshot is active.
    active_status_calls: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    async fn log(&self, c: Call) {
        if self.script.watch_stages {
            self.expect_stage(&c).await;
        }
        lock(&self.log).push(c);
    }

    /// Waits for the job's record to reach the stage `c` belongs to (writes inside the freeze
    /// window are queued, not waited for), noting a miss.
    async fn expect_stage(&self, c: &Call) {
        let want = match c {
            Call::Freeze => Stage::Quiesce,
            Call::Begin => Stage::Cut,
            Call::Thaw => Stage::Thaw,
            Call::Merge(_) | Call::Checkpoint(_) => Stage::Merge,
            Call::Abandon(_) => return,
        };
        let Some(store) = self.store.get() else { return };
        let stage = || store.jobs().ok().and_then(|j| j.last().map(|j| j.stage));
        let start = std::time::Instant::now();
        while stage() != Some(want) && start.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if stage() != Some(want) {
            lock(&self.stage_misses).push((c.clone(), want, stage()));
        }
    }

    fn calls(&self) -> Vec<Call> {
        lock(&self.log).clone()
    }

    /// Holds the job here if the script says so (once).
    async fn hold(&self, at: Hold) {
        if self.script.hold == Some(at) && !self.held.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.reached.add_permits(1);
            if let Ok(p) = self.release.acquire().await {
                p.forget();
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Fake(Arc<World>);

#[async_trait]
impl Connector for Fake {
    async fn backend(&self, _vm: &VmConfig, _t: Timeouts) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(self.clone()))
    }

    async fn agent(&self, endpoint: &AgentEndpoint, _t: Timeouts) -> Result<Arc<dyn Agent>, AgentError> {
        if !self.0.script.agent_reachable {
            let source = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
            return Err(AgentError::Unreachable { endpoint: endpoint.clone(), source });
        }
        Ok(Arc::new(FakeAgent(self.0.clone())))
    }
}

#[async_trait]
impl Backend for Fake {
    async fn status(&self) -> Result<VmStatus, BackendError> {
        if lock(&self.0.active).is_some() {
            match self.0.active_status_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => self.0.hold(Hold::BackupPlan).await,
                1 => self.0.hold(Hold::BackupCommit).await,
                _ => {}
            }
        }
        let active = *lock(&self.0.active);
        Ok(VmStatus {
            snapshot: active.map(|id| Snapshot { id, disks: vec![DISK.into()], pause_us: 7 }),
            disks: vec![DiskState {
                id: DISK.into(),
                phase: if active.is_some() { Phase::Active } else { Phase::Direct },
                snapshot: active,
                size: SIZE,
                base_path: self.0.base.clone(),
                base_format: "raw".into(),
                abandoned: None,
                delta_bytes: 0,
                delta_extents: 0,
                merged_bytes: 0,
                restore: None,
            }],
        })
    }

    async fn changes(&self, _disk: &str) -> Result<ChangeMap, BackendError> {
        Ok(ChangeMap {
            since_checkpoint: *lock(&self.0.checkpoint),
            until_snapshot: *lock(&self.0.active),
            untrusted: None,
            extents: vec![(0, 4096)],
        })
    }

    async fn begin(&self) -> Result<Snapshot, BackendError> {
        self.0.log(Call::Begin).await;
        if self.0.script.begin_fails {
            let source = Box::new(crate::daemon::backend::Remote("the disk is busy".into()));
            return Err(BackendError::Refused { call: BackendCall::Begin, refusal: Refusal::State, source });
        }
        let id = {
            let mut n = lock(&self.0.next_id);
            *n += 1;
            *n
        };
        *lock(&self.0.active) = Some(id);
        Ok(Snapshot { id, disks: vec![DISK.into()], pause_us: 7 })
    }

    async fn merge(&self, snapshot: u64, progress: &mut (dyn FnMut(MergeProgress) + Send)) -> Result<(), BackendError> {
        self.0.log(Call::Merge(snapshot)).await;
        self.0.hold(Hold::Merge).await;
        if self.0.script.merge_fails {
            return Err(BackendError::Ended { call: BackendCall::Merge });
        }
        progress(MergeProgress { merged_bytes: 0, remaining_bytes: 4096 });
        progress(MergeProgress { merged_bytes: 4096, remaining_bytes: 0 });
        *lock(&self.0.active) = None;
        Ok(())
    }

    async fn abandon(&self, snapshot: u64, _reason: &str) -> Result<(), BackendError> {
        self.0.log(Call::Abandon(snapshot)).await;
        *lock(&self.0.active) = None;
        Ok(())
    }

    async fn checkpoint(&self, snapshot: u64) -> Result<(), BackendError> {
        self.0.log(Call::Checkpoint(snapshot)).await;
        let backups = Repository::open(&self.0.repo).and_then(|r| r.list(Some(VM))).map_or(0, |l| l.len());
        lock(&self.0.backups_at_checkpoint).push(backups);
        *lock(&self.0.checkpoint) = Some(snapshot);
        Ok(())
    }
}

struct FakeAgent(Arc<World>);

#[async_trait]
impl Agent for FakeAgent {
    async fn ping(&self) -> Result<(), AgentError> {
        Ok(())
    }

    async fn freeze(&self, _deadline: Duration, _job: &str) -> Result<Frozen, AgentError> {
        self.0.log(Call::Freeze).await;
        if self.0.script.freeze_fails {
            let source = Box::new(std::io::Error::other("the fsfreeze hook failed"));
            return Err(AgentError::Failed { call: "Freeze", source });
        }
        Ok(Frozen { filesystems: 2 })
    }

    async fn thaw(&self) -> Result<Thawed, AgentError> {
        self.0.log(Call::Thaw).await;
        Ok(Thawed { was_frozen: self.0.script.thaw_was_frozen })
    }

    async fn status(&self) -> Result<AgentStatus, AgentError> {
        Ok(AgentStatus { frozen: false })
    }
}

/// A temp dir with a base to back up, the config of one VM, and the fakes.
struct Rig {
    /// Removed with the rig.
    _dir: tempfile::TempDir,
    config: Config,
    world: Arc<World>,
}

impl Rig {
    fn new(script: Script, agent: bool) -> Rig {
        Rig::with_config(script, agent, "")
    }

    /// With `extra` appended to the configuration (after the VM's table).
    fn with_config(script: Script, agent: bool, extra: &str) -> Rig {
        // On tmpfs where there is one: the state's and the repository's syncs cost nothing there.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let base = dir.path().join("base.raw");
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, data).unwrap();
        let agent = if agent { "agent = { unix = \"/fake/agent.sock\" }\n" } else { "" };
        let text = format!(
            "repository = \"{0}/repo\"\nsocket = \"{0}/d.sock\"\nstate = \"{0}/state.redb\"\nrestore_dir = \"{0}/restore\"\n\
             [[vm]]\nname = \"{VM}\"\ncontrol = \"/fake/control.sock\"\n{agent}{extra}",
            dir.path().display()
        );
        let config = Config::parse(Path::new("/test.toml"), &text).unwrap();
        let world = Arc::new(World {
            script,
            base,
            repo: dir.path().join("repo"),
            log: Mutex::new(Vec::new()),
            active: Mutex::new(None),
            checkpoint: Mutex::new(None),
            next_id: Mutex::new(0),
            backups_at_checkpoint: Mutex::new(Vec::new()),
            store: OnceLock::new(),
            stage_misses: Mutex::new(Vec::new()),
            reached: tokio::sync::Semaphore::new(0),
            release: tokio::sync::Semaphore::new(0),
            held: std::sync::atomic::AtomicBool::new(false),
            active_status_calls: std::sync::atomic::AtomicUsize::new(0),
        });
        Rig { _dir: dir, config, world }
    }

    fn daemon(&self) -> Arc<Daemon> {
        let d = Daemon::open_with(self.config.clone(), Arc::new(Fake(self.world.clone()))).unwrap();
        let _ = self.world.store.set(d.store.clone());
        d
    }

    /// Runs a job to its end; its events.
    async fn snapshot(&self, d: &Arc<Daemon>, mode: BackupMode, quiesce: QuiesceMode) -> Vec<Event> {
        let req = SnapshotRequest { vm: VM.into(), mode, quiesce, freeze_timeout: None };
        let (_, mut rx) = d.create_snapshot(req).await.unwrap();
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    }
}

impl Rig {
    /// Starts a job that the backend holds at `script.hold`; returns once it is held.
    async fn start_held(&self, d: &Arc<Daemon>) -> (String, tokio::sync::mpsc::Receiver<Event>) {
        let req = SnapshotRequest {
            vm: VM.into(),
            mode: BackupMode::Full,
            quiesce: QuiesceMode::Preferred,
            freeze_timeout: None,
        };
        let started = d.create_snapshot(req).await.unwrap();
        if let Ok(p) = self.world.reached.acquire().await {
            p.forget();
        }
        started
    }

    fn release(&self) {
        self.world.release.add_permits(1);
    }
}

async fn events_of(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

fn done(events: &[Event]) -> &Backup {
    match events.last() {
        Some(Event::Done(b)) => b,
        other => panic!("the job did not succeed: {other:?}"),
    }
}

fn failed(events: &[Event]) -> (Stage, &Error) {
    match events.last() {
        Some(Event::Failed { stage, error }) => (*stage, error),
        other => panic!("the job did not fail: {other:?}"),
    }
}

fn job(d: &Daemon) -> JobState {
    let jobs = d.store.jobs().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs[0].clone()
}

fn backups(d: &Daemon) -> usize {
    d.repo.list(Some(VM)).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_freezes_cuts_thaws_then_backs_up_merges_and_checkpoints() {
    let rig = Rig::new(Script::default(), true);
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await;
    let b = done(&events);
    assert_eq!(rig.world.calls(), [Call::Freeze, Call::Begin, Call::Thaw, Call::Merge(1), Call::Checkpoint(1)]);
    assert_eq!(b.consistency, Consistency::Application);
    assert_eq!(b.snapshot_id, Some(1));
    assert_eq!(backups(&d), 1);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::Quiescing => "quiescing",
            Event::Frozen { .. } => "frozen",
            Event::Cut { .. } => "cut",
            Event::Thawed { .. } => "thawed",
            Event::BackingUp { .. } => "backing-up",
            Event::Merging { .. } => "merging",
            Event::Done(_) => "done",
            Event::Failed { .. } => "failed",
        })
        .collect();
    let mut order = kinds.clone();
    order.dedup();
    assert_eq!(order, ["quiescing", "frozen", "cut", "thawed", "backing-up", "merging", "done"]);
    let j = job(&d);
    assert_eq!((j.result, j.stage, j.snapshot_id), (Some(JobResult::Ok), Stage::Done, Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_the_job_passes_is_recorded_the_freeze_window_included() {
    let rig = Rig::new(Script { watch_stages: true, ..Script::default() }, true);
    let d = rig.daemon();
    done(&rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await);
    assert_eq!(rig.world.calls().len(), 5);
    assert_eq!(*lock(&rig.world.stage_misses), [], "(call, stage expected, stage recorded)");
    assert_eq!(job(&d).stage, Stage::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_is_always_followed_by_a_thaw_even_when_the_cut_fails() {
    let rig = Rig::new(Script { begin_fails: true, ..Script::default() }, true);
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await;
    let (stage, error) = failed(&events);
    assert_eq!(stage, Stage::Cut, "{error}");
    assert_eq!(rig.world.calls(), [Call::Freeze, Call::Begin, Call::Thaw]);
    assert_eq!(backups(&d), 0);
    let j = job(&d);
    assert_eq!((j.result, j.stage), (Some(JobResult::Failed), Stage::Cut));
    assert!(j.reason.contains("the disk is busy"), "the cause is lost: {}", j.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_cut_abandons_the_snapshot_and_checkpoints_nothing() {
    // The backup fails: its base is gone.
    let rig = Rig::new(Script::default(), true);
    std::fs::remove_file(&rig.world.base).unwrap();
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Full, QuiesceMode::Off).await;
    let (stage, error) = failed(&events);
    assert_eq!(stage, Stage::Backup, "{error}");
    assert!(matches!(error, Error::Base { .. }), "{error:?}");
    assert_eq!(rig.world.calls(), [Call::Begin, Call::Abandon(1)]);
    assert_eq!(backups(&d), 0);

    // The merge fails, the backup committed.
    let rig = Rig::new(Script { merge_fails: true, ..Script::default() }, true);
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Full, QuiesceMode::Off).await;
    assert_eq!(failed(&events).0, Stage::Merge);
    assert_eq!(rig.world.calls(), [Call::Begin, Call::Merge(1), Call::Abandon(1)]);
    assert_eq!(*lock(&rig.world.checkpoint), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_comes_only_once_the_backup_is_in_the_repository() {
    let rig = Rig::new(Script::default(), false);
    let d = rig.daemon();
    done(&rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await);
    assert_eq!(*lock(&rig.world.backups_at_checkpoint), [1], "checkpointed before the backup was committed");
    // The next one starts at that checkpoint: incremental, on top of the first.
    done(&rig.snapshot(&d, BackupMode::Incremental, QuiesceMode::Preferred).await);
    assert_eq!(*lock(&rig.world.backups_at_checkpoint), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_required_without_a_reachable_agent_fails_before_any_cut() {
    // No agent configured: refused at once, no job.
    let rig = Rig::new(Script::default(), false);
    let d = rig.daemon();
    let req =
        SnapshotRequest { vm: VM.into(), mode: BackupMode::Auto, quiesce: QuiesceMode::Required, freeze_timeout: None };
    let e = d.create_snapshot(req).await.expect_err("a job started");
    assert!(matches!(e, Error::NoAgent { .. }), "{e:?}");
    assert!(d.store.jobs().unwrap().is_empty());

    // An agent configured but unreachable.
    let rig = Rig::new(Script { agent_reachable: false, ..Script::default() }, true);
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Required).await;
    let (stage, error) = failed(&events);
    assert_eq!(stage, Stage::Quiesce);
    assert!(matches!(error, Error::Quiesce(AgentError::Unreachable { .. })), "{error:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Cut { .. })));

    // An agent that cannot freeze: thawed (undoing what it froze), nothing cut.
    let rig2 = Rig::new(Script { freeze_fails: true, ..Script::default() }, true);
    let d2 = rig2.daemon();
    let events = rig2.snapshot(&d2, BackupMode::Auto, QuiesceMode::Required).await;
    assert_eq!(failed(&events).0, Stage::Quiesce);

    assert_eq!(rig.world.calls(), [], "the unreachable agent's VM was cut");
    assert_eq!(rig2.world.calls(), [Call::Freeze, Call::Thaw], "the unfrozen VM was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_thawed_by_its_lease_makes_the_backup_crash_consistent() {
    let rig = Rig::new(Script { thaw_was_frozen: false, ..Script::default() }, true);
    let d = rig.daemon();
    let events = rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await;
    let b = done(&events);
    assert_eq!(b.consistency, Consistency::Crash);
    assert!(b.note.contains("lease ran out"), "{}", b.note);
    let reason = events.iter().find_map(|e| match e {
        Event::Cut { crash_consistent_reason, .. } => Some(crash_consistent_reason.clone()),
        _ => None,
    });
    assert!(reason.flatten().is_some_and(|r| r.contains("lease")), "the Cut event does not say why");
    assert_eq!(d.repo.info(VM, &b.id).unwrap().consistency, Consistency::Crash);
    assert_eq!(d.store.backup(VM, &b.id).unwrap().map(|s| s.consistency), Some("crash".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_running_by_a_killed_daemon_is_cleaned_up_at_start() {
    let rig = Rig::new(Script::default(), true);
    {
        // What a daemon killed mid-backup left: its job running, its snapshot active.
        let store = Store::open(&rig.config.state).unwrap();
        let mut j = JobState::new("killed-1".into(), VM.into(), 1);
        j.stage = Stage::Backup;
        j.snapshot_id = Some(5);
        store.put_job(&j).unwrap();
    }
    *lock(&rig.world.active) = Some(5);
    let d = rig.daemon();
    d.recover().await.unwrap();
    assert_eq!(rig.world.calls(), [Call::Thaw, Call::Abandon(5)]);
    let j = job(&d);
    assert_eq!(j.result, Some(JobResult::Failed));
    assert!(j.reason.contains("daemon restarted during stage backup"), "{}", j.reason);
    assert!(j.finished_unix_us.is_some());
    assert!(d.running_map().is_empty(), "the VM is still held");
    // Not ours: a snapshot the job did not cut is left alone.
    drop(d);
    let rig = Rig::new(Script::default(), false);
    {
        let store = Store::open(&rig.config.state).unwrap();
        let mut j = JobState::new("killed-2".into(), VM.into(), 1);
        j.snapshot_id = Some(4);
        store.put_job(&j).unwrap();
    }
    *lock(&rig.world.active) = Some(5);
    let d = rig.daemon();
    d.recover().await.unwrap();
    assert_eq!(rig.world.calls(), []);
    assert_eq!(job(&d).result, Some(JobResult::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_stream_abandons_the_snapshot_commits_and_checkpoints_nothing() {
    // Cancelled before the first read (the reads fail), and after the last one (no commit).
    for hold in [Hold::BackupPlan, Hold::BackupCommit] {
        cancel_during_the_stream(hold).await;
    }
}

async fn cancel_during_the_stream(hold: Hold) {
    let rig = Rig::new(Script { hold: Some(hold), ..Script::default() }, true);
    let d = rig.daemon();
    let (id, rx) = rig.start_held(&d).await;
    let view = d.cancel_job(&id).await.unwrap();
    assert!(view.running, "{view:?}");
    assert_eq!(view.stopping, Some(StopReason::Cancel));
    rig.release();
    let events = events_of(rx).await;
    let (stage, error) = failed(&events);
    assert_eq!(stage, Stage::Backup, "{hold:?}: {error}");
    assert!(matches!(error, Error::Cancelled(StopReason::Cancel)), "{hold:?}: {error:?}");
    // Thawed at once as always; the snapshot abandoned (its delta merges), never checkpointed.
    assert_eq!(rig.world.calls(), [Call::Freeze, Call::Begin, Call::Thaw, Call::Abandon(1)]);
    assert_eq!(*lock(&rig.world.checkpoint), None);
    assert_eq!(backups(&d), 0, "{hold:?}: a cancelled stream must not be committed");
    if hold == Hold::BackupPlan {
        let read = events
            .iter()
            .filter_map(|e| match e {
                Event::BackingUp { bytes_read, .. } => Some(*bytes_read),
                _ => None,
            })
            .max();
        assert_eq!(read, Some(0), "the stream read the base after the cancel");
    }
    let j = job(&d);
    assert_eq!((j.result, j.stage, j.snapshot_id), (Some(JobResult::Cancelled), Stage::Backup, Some(1)));
    assert!(j.reason.contains("cancelled"), "{}", j.reason);
    // Ended: no longer running, and a second cancel is refused; an unknown job is not found.
    let view = d.get_job(&id).await.unwrap();
    assert!(!view.running && view.stopping.is_none(), "{view:?}");
    assert!(matches!(d.cancel_job(&id).await, Err(Error::NotRunning { .. })));
    assert!(matches!(d.cancel_job("nosuchjob").await, Err(Error::UnknownJob(_))));
    // The VM is free again, and the changes the snapshot froze are still there to back up.
    done(&rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Off).await);
    assert_eq!(backups(&d), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_merge_stops_waiting_abandons_and_checkpoints_nothing() {
    let rig = Rig::new(Script { hold: Some(Hold::Merge), ..Script::default() }, false);
    let d = rig.daemon();
    let (id, rx) = rig.start_held(&d).await;
    d.cancel_job(&id).await.unwrap();
    // Not released: the job must stop waiting for the merge by itself.
    let events = events_of(rx).await;
    let (stage, error) = failed(&events);
    assert_eq!(stage, Stage::Merge, "{error}");
    assert!(matches!(error, Error::Cancelled(StopReason::Cancel)), "{error:?}");
    assert_eq!(rig.world.calls(), [Call::Begin, Call::Merge(1), Call::Abandon(1)]);
    assert_eq!(*lock(&rig.world.checkpoint), None);
    // The backup was committed before the merge began: it stays, the job says cancelled.
    assert_eq!(backups(&d), 1);
    assert_eq!(job(&d).result, Some(JobResult::Cancelled));
    rig.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopping_lets_the_job_finish_its_step_then_ends_it_and_starts_no_other() {
    let rig = Rig::new(Script { hold: Some(Hold::BackupCommit), ..Script::default() }, true);
    let d = rig.daemon();
    let (id, rx) = rig.start_held(&d).await;
    d.stop_jobs();
    assert_eq!(d.get_job(&id).await.unwrap().stopping, Some(StopReason::Shutdown));
    let req =
        SnapshotRequest { vm: VM.into(), mode: BackupMode::Full, quiesce: QuiesceMode::Off, freeze_timeout: None };
    assert!(matches!(d.create_snapshot(req).await, Err(Error::Stopping)));
    rig.release();
    d.wait_jobs().await;
    let events = events_of(rx).await;
    let (stage, error) = failed(&events);
    assert!(matches!(error, Error::Cancelled(StopReason::Shutdown)), "{error:?}");
    assert_eq!(stage, Stage::Backup);
    // The backup step finished (committed); the job stopped before the merge: abandoned, no
    // checkpoint, recorded, not left to the next start.
    assert_eq!(backups(&d), 1);
    assert_eq!(rig.world.calls(), [Call::Freeze, Call::Begin, Call::Thaw, Call::Abandon(1)]);
    assert_eq!(*lock(&rig.world.checkpoint), None);
    let j = job(&d);
    assert_eq!(j.result, Some(JobResult::Cancelled));
    assert!(j.reason.contains("livesnapd is stopping"), "{}", j.reason);
}

/// The value of sample `key` (`name{labels}`) in a text exposition.
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_count_a_job_that_succeeds_and_one_that_fails_each_by_its_result() {
    let rig = Rig::new(Script::default(), true);
    let d = rig.daemon();
    done(&rig.snapshot(&d, BackupMode::Full, QuiesceMode::Preferred).await);
    let text = d.metrics().encode();
    let finished = job(&d).finished_unix_us.unwrap() as f64 / 1e6;
    for (key, want) in [
        (format!("livesnap_jobs_total{{vm=\"{VM}\",kind=\"full\",result=\"ok\"}}"), 1.0),
        (format!("livesnap_job_duration_seconds_count{{vm=\"{VM}\",result=\"ok\"}}"), 1.0),
        (format!("livesnap_freeze_duration_seconds_count{{vm=\"{VM}\"}}"), 1.0),
        (format!("livesnap_backup_read_bytes_total{{vm=\"{VM}\"}}"), SIZE as f64),
        (format!("livesnap_last_success_timestamp_seconds{{vm=\"{VM}\"}}"), finished),
        ("livesnap_repository_backups".to_owned(), 1.0),
    ] {
        assert_eq!(sample(&text, &key), Some(want), "{key} in\n{text}");
    }
    assert!(!text.contains("result=\"failed\""), "{text}");

    // A job that fails after the cut (its backup committed, its merge failed): counted failed,
    // and no success to show.
    let rig = Rig::new(Script { merge_fails: true, ..Script::default() }, false);
    let d = rig.daemon();
    failed(&rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Off).await);
    let text = d.metrics().encode();
    for (key, want) in [
        (format!("livesnap_jobs_total{{vm=\"{VM}\",kind=\"auto\",result=\"failed\"}}"), 1.0),
        (format!("livesnap_job_duration_seconds_count{{vm=\"{VM}\",result=\"failed\"}}"), 1.0),
        (format!("livesnap_last_success_timestamp_seconds{{vm=\"{VM}\"}}"), 0.0),
    ] {
        assert_eq!(sample(&text, &key), Some(want), "{key} in\n{text}");
    }
    assert!(!text.contains("result=\"ok\""), "{text}");
    assert!(!text.contains("livesnap_freeze_duration_seconds_count{"), "no freeze, no window: {text}");
}

// ---- retention after a backup ------------------------------------------------------------

const KEEP_LAST_2: &str = "[[schedule]]\nname = \"keep\"\nvms = [\"vm1\"]\nkeep = { last = 2 }\n";

fn backup_ids(d: &Daemon) -> Vec<String> {
    d.repo.list(Some(VM)).unwrap().into_iter().map(|b| b.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_backup_applies_its_vms_retention_and_the_next_incremental_still_works() {
    let rig = Rig::with_config(Script::default(), false, KEEP_LAST_2);
    let d = rig.daemon();
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(done(&rig.snapshot(&d, BackupMode::Auto, QuiesceMode::Preferred).await).id.clone());
    }
    assert_eq!(backup_ids(&d), made[1..], "keep-last 2 after the third backup");
    assert_eq!(d.store.backup(VM, &made[0]).unwrap(), None, "the pruned backup's record stays behind");
    // The newest is the parent of the next incremental: kept.
    let b = done(&rig.snapshot(&d, BackupMode::Incremental, QuiesceMode::Preferred).await).clone();
    assert_eq!(b.kind, crate::daemon::model::BackupKind::Incremental);
    assert_eq!(backup_ids(&d), [made[2].clone(), b.id.clone()]);
    let v = d.repo.verify(VM, &b.id).unwrap();
    assert!(v.problems.is_empty() && v.chunks_checked > 0, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_never_prunes() {
    // The merge fails after the backup was committed: the job fails, the backups stay.
    let rig =
        Rig::with_config(Script { merge_fails: true, ..Script::default() }, false, &KEEP_LAST_2.replace("2", "1"));
    let d = rig.daemon();
    for n in 1..=2 {
        let events = rig.snapshot(&d, BackupMode::Full, QuiesceMode::Off).await;
        assert_eq!(failed(&events).0, Stage::Merge);
        assert_eq!(backups(&d), n, "a failed job pruned");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_decides_and_changes_nothing_then_the_prune_deletes_what_it_said() {
    use crate::daemon::retention::{Keep, PruneRequest, Rule};
    let rig = Rig::new(Script::default(), false);
    let d = rig.daemon();
    for _ in 0..3 {
        done(&rig.snapshot(&d, BackupMode::Full, QuiesceMode::Off).await);
    }
    let before = backup_ids(&d);
    let records: Vec<_> = before.iter().map(|id| d.store.backup(VM, id).unwrap()).collect();
    let keep = Keep { last: 1, ..Keep::default() };
    let dry = d.prune(PruneRequest { vm: VM.into(), keep: Some(keep), dry_run: true }).await.unwrap();
    assert!(dry.dry_run && dry.deleted.is_empty() && dry.gc.is_none());
    assert_eq!(dry.decisions.iter().map(|x| x.id.clone()).collect::<Vec<_>>(), before);
    assert_eq!(
        dry.decisions.iter().map(|x| x.kept.map(|k| k.to_string())).collect::<Vec<_>>(),
        [None, None, Some("keep-last 1/1".into())]
    );
    assert_eq!(dry.decisions[2].kept.map(|k| k.rule), Some(Rule::Last));
    assert_eq!(backup_ids(&d), before, "a dry run deleted backups");
    let after: Vec<_> = before.iter().map(|id| d.store.backup(VM, id).unwrap()).collect();
    assert_eq!(after, records, "a dry run changed the state");
    let gc = d.repo.gc().unwrap();
    assert_eq!(gc.chunks_removed, 0, "a dry run left chunks unreferenced");

    let real = d.prune(PruneRequest { vm: VM.into(), keep: Some(keep), dry_run: false }).await.unwrap();
    assert_eq!(real.deleted, before[..2]);
    assert_eq!(backup_ids(&d), before[2..]);
    assert!(real.gc.is_some() && real.gc_deferred.is_none());

    // No rule, and none configured: refused.
    for keep in [None, Some(Keep::default())] {
        let e = d.prune(PruneRequest { vm: VM.into(), keep, dry_run: true }).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
    let e = d.prune(PruneRequest { vm: "nope".into(), keep: Some(keep), dry_run: true }).await.unwrap_err();
    assert!(matches!(e, Error::UnknownVm(_)), "{e}");
}
