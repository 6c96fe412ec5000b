//! The agent's domain: freeze, thaw, status and the lease, knowing nothing of gRPC.
//!
//! One freeze at a time (a mutex over [`State`]). Each freeze and thaw runs in a task of its
//! own, so a host that disconnects mid-call cannot cancel it half way. The lease is a timer task
//! armed before the first hook runs: at the deadline it thaws, whatever happened to the host,
//! the daemon or the connection. Thaw is idempotent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use tokio::time::Instant;

use livesnap_proto::error::chain;

use crate::freeze::{FreezeOutcome, Freezer, FsTarget, ThawOutcome};
use crate::hooks::{HookResult, Hooks, Phase};
use crate::lease::{LeaseState, StateFile};

/// Longest snapshot id accepted.
pub const MAX_SNAPSHOT_ID: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Already frozen (snapshot {snapshot_id:?}); thaw first")]
    AlreadyFrozen { snapshot_id: String },
    #[error("Deadline {requested:?} is out of range (more than 0, at most {max:?})")]
    InvalidDeadline { requested: Duration, max: Duration },
    #[error("Snapshot id is longer than {MAX_SNAPSHOT_ID} bytes or holds control characters")]
    InvalidSnapshotId,
    #[error("The agent's worker task failed")]
    Worker(#[source] tokio::task::JoinError),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match e {
            Error::AlreadyFrozen { .. } => tonic::Code::FailedPrecondition,
            Error::InvalidDeadline { .. } | Error::InvalidSnapshotId => tonic::Code::InvalidArgument,
            Error::Worker(_) => tonic::Code::Internal,
        };
        livesnap_proto::error::status(code, &e)
    }
}

/// What happened to one filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsOutcome {
    Frozen,
    Thawed,
    FrozenByOther,
    Unsupported,
    NotFrozen,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsReport {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub outcome: FsOutcome,
    pub error: Option<String>,
}

impl FsReport {
    fn new(t: &FsTarget, outcome: FsOutcome, error: Option<String>) -> Self {
        FsReport {
            mount_point: t.mount_point.clone(),
            fs_type: t.fs_type.clone(),
            source: t.source.clone(),
            outcome,
            error,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FreezeReport {
    pub frozen: bool,
    /// Why the freeze was aborted.
    pub error: Option<String>,
    pub filesystems: Vec<FsReport>,
    pub hooks: Vec<HookResult>,
    pub deadline: Option<SystemTime>,
}

#[derive(Clone, Debug, Default)]
pub struct ThawReport {
    pub was_frozen: bool,
    pub filesystems: Vec<FsReport>,
    pub hooks: Vec<HookResult>,
    pub error: Option<String>,
}

/// Why a freeze ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThawReason {
    Host,
    Lease,
    Restart,
    Shutdown,
}

impl ThawReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ThawReason::Host => "host",
            ThawReason::Lease => "lease",
            ThawReason::Restart => "restart",
            ThawReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct StatusReport {
    pub frozen: bool,
    pub since: Option<SystemTime>,
    pub deadline: Option<SystemTime>,
    pub remaining: Duration,
    pub snapshot_id: String,
    pub last_thaw_reason: Option<ThawReason>,
}

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub hooks: Hooks,
    pub max_deadline: Duration,
    pub state_file: PathBuf,
}

/// A freeze in force.
#[derive(Debug)]
struct Frozen {
    snapshot_id: String,
    since: SystemTime,
    deadline: Instant,
    deadline_wall: SystemTime,
    /// What we froze, in freeze order.
    ours: Vec<FsTarget>,
    /// The hooks that ran `freeze`, in order.
    hooks: Vec<PathBuf>,
}

#[derive(Debug, Default)]
struct State {
    frozen: Option<Frozen>,
    /// Bumped at each freeze and thaw; a lease timer only acts on its own generation.
    generation: u64,
    last_thaw_reason: Option<ThawReason>,
}

#[derive(Debug)]
struct Inner<F> {
    freezer: F,
    config: Config,
    state_file: StateFile,
    state: Mutex<State>,
}

/// The agent. Cheap to clone; all clones share one state.
#[derive(Debug)]
pub struct Agent<F> {
    inner: Arc<Inner<F>>,
}

impl<F> Clone for Agent<F> {
    fn clone(&self) -> Self {
        Agent { inner: Arc::clone(&self.inner) }
    }
}

/// The agent as the service sees it.
pub trait AgentApi: Send + Sync + 'static {
    fn freeze(
        &self,
        deadline: Duration,
        snapshot_id: String,
    ) -> impl std::future::Future<Output = Result<FreezeReport, Error>> + Send;
    fn thaw(&self) -> impl std::future::Future<Output = Result<ThawReport, Error>> + Send;
    fn status(&self) -> impl std::future::Future<Output = StatusReport> + Send;
    fn max_deadline(&self) -> Duration;
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(Error::Worker)
}

impl<F: Freezer> Agent<F> {
    pub fn new(freezer: F, config: Config) -> Self {
        let state_file = StateFile { path: config.state_file.clone() };
        Agent { inner: Arc::new(Inner { freezer, config, state_file, state: Mutex::new(State::default()) }) }
    }

    /// At start: if a previous agent died while frozen, thaws what it recorded (in reverse
    /// order) and runs the `thaw` hooks of the hooks that had run `freeze`. A corrupt record
    /// thaws every filesystem of the plan: better to thaw someone else's freeze than to leave the
    /// guest frozen.
    pub async fn recover(&self) -> Result<Option<ThawReport>, Error> {
        let mut st = self.inner.state.lock().await;
        let recorded = match self.inner.state_file.read() {
            Ok(None) => return Ok(None),
            Ok(Some(s)) => s,
            Err(e) => {
                tracing::error!(error = %chain(&e), "state file unreadable: thawing every freezable filesystem");
                let inner = Arc::clone(&self.inner);
                let plan = blocking(move || inner.freezer.plan()).await?.unwrap_or_default();
                LeaseState { frozen: plan.into_iter().map(|t| t.mount_point).collect(), ..Default::default() }
            }
        };
        tracing::warn!(snapshot = %recorded.snapshot_id, filesystems = recorded.frozen.len(), "a previous agent left a freeze: thawing it");
        let targets: Vec<FsTarget> = recorded
            .frozen
            .iter()
            .map(|p| FsTarget { mount_point: p.clone(), fs_type: String::new(), source: String::new(), dev: (0, 0) })
            .collect();
        let frozen = Frozen {
            snapshot_id: recorded.snapshot_id,
            since: SystemTime::now(),
            deadline: Instant::now(),
            deadline_wall: SystemTime::now(),
            ours: targets,
            hooks: recorded.hooks,
        };
        st.frozen = Some(frozen);
        Ok(Some(self.thaw_locked(&mut st, ThawReason::Restart).await?))
    }

    /// Thaws if frozen, for a shutdown.
    pub async fn shutdown(&self) -> Result<ThawReport, Error> {
        let mut st = self.inner.state.lock().await;
        self.thaw_locked(&mut st, ThawReason::Shutdown).await
    }

    async fn do_freeze(&self, deadline: Duration, snapshot_id: String) -> Result<FreezeReport, Error> {
        let max = self.inner.config.max_deadline;
        if deadline.is_zero() || deadline > max {
            return Err(Error::InvalidDeadline { requested: deadline, max });
        }
        if snapshot_id.len() > MAX_SNAPSHOT_ID || snapshot_id.chars().any(char::is_control) {
            return Err(Error::InvalidSnapshotId);
        }
        let mut st = self.inner.state.lock().await;
        if let Some(f) = &st.frozen {
            return Err(Error::AlreadyFrozen { snapshot_id: f.snapshot_id.clone() });
        }
        let deadline_at = Instant::now() + deadline;
        let deadline_wall = SystemTime::now() + deadline;
        st.generation += 1;
        self.arm_lease(st.generation, deadline_at);
        let mut report = FreezeReport::default();
        tracing::info!(snapshot = %snapshot_id, ?deadline, "freeze requested");

        let hooks_cfg = &self.inner.config.hooks;
        let hook_list = match hooks_cfg.list() {
            Ok(h) => h,
            Err(e) => {
                report.error =
                    Some(format!("Cannot list the hooks directory {}: {}", hooks_cfg.dir.display(), chain(&e)));
                return Ok(report);
            }
        };
        report.hooks = hooks_cfg.run_freeze(&hook_list, &snapshot_id, deadline_at).await;
        let ran: Vec<PathBuf> = hook_list[..report.hooks.len()].to_vec();
        let abort = |report: &mut FreezeReport, why: String| {
            tracing::error!(snapshot = %snapshot_id, reason = %why, "freeze aborted");
            report.error = Some(why);
        };
        if let Some(why) = report.hooks.iter().find_map(HookResult::failure) {
            abort(&mut report, why);
        } else if Instant::now() >= deadline_at {
            abort(&mut report, "The deadline passed while the freeze hooks ran".into());
        }
        if report.error.is_none() {
            self.freeze_filesystems(&mut report, &snapshot_id, deadline_wall, &ran, deadline_at).await?;
            if let Some(why) = report.error.take() {
                abort(&mut report, why);
            }
        }
        if report.error.is_some() {
            st.generation += 1; // disarms the lease
            let ff = hooks_cfg.run_reverse(&ran, Phase::FreezeFail, &snapshot_id).await;
            report.hooks.extend(ff);
            return Ok(report);
        }
        let ours: Vec<FsTarget> = report
            .filesystems
            .iter()
            .filter(|f| f.outcome == FsOutcome::Frozen)
            .map(|f| FsTarget {
                mount_point: f.mount_point.clone(),
                fs_type: f.fs_type.clone(),
                source: f.source.clone(),
                dev: (0, 0),
            })
            .collect();
        tracing::info!(snapshot = %snapshot_id, filesystems = ours.len(), "frozen");
        st.frozen = Some(Frozen {
            snapshot_id,
            since: SystemTime::now(),
            deadline: deadline_at,
            deadline_wall,
            ours,
            hooks: ran,
        });
        report.frozen = true;
        report.deadline = Some(deadline_wall);
        Ok(report)
    }

    /// Freezes the plan's filesystems into `report`; on a failure thaws what it froze and sets
    /// `report.error`. The state file lists, before each FIFREEZE, what we froze plus the one
    /// being frozen.
    async fn freeze_filesystems(
        &self,
        report: &mut FreezeReport,
        snapshot_id: &str,
        deadline_wall: SystemTime,
        hooks: &[PathBuf],
        deadline_at: Instant,
    ) -> Result<(), Error> {
        let inner = Arc::clone(&self.inner);
        let plan = match blocking(move || inner.freezer.plan()).await? {
            Ok(p) => p,
            Err(e) => {
                report.error = Some(format!("Cannot list the filesystems: {}", chain(&e)));
                return Ok(());
            }
        };
        if let Some(t) = on_planned_fs(self.inner.state_file.dir(), &plan) {
            report.error = Some(format!(
                "The state directory {} is on {}, a filesystem to freeze; it must be on a tmpfs such as /run",
                self.inner.state_file.dir().display(),
                t.mount_point.display()
            ));
            return Ok(());
        }
        let mut record = LeaseState {
            snapshot_id: snapshot_id.to_string(),
            deadline_unix_ms: unix_ms(deadline_wall),
            frozen: Vec::new(),
            hooks: hooks.to_vec(),
        };
        let mut ours: Vec<FsTarget> = Vec::new();
        for t in &plan {
            record.frozen = ours.iter().chain([t]).map(|t| t.mount_point.clone()).collect();
            if let Err(e) = self.inner.state_file.write(&record) {
                report.error = Some(chain(&e));
                break;
            }
            let inner = Arc::clone(&self.inner);
            let mp = t.mount_point.clone();
            match blocking(move || inner.freezer.freeze(&mp)).await? {
                Ok(FreezeOutcome::Frozen) => {
                    ours.push(t.clone());
                    report.filesystems.push(FsReport::new(t, FsOutcome::Frozen, None));
                }
                Ok(FreezeOutcome::FrozenByOther) => {
                    tracing::warn!(mount_point = %t.mount_point.display(), "already frozen by someone else; left to them");
                    report.filesystems.push(FsReport::new(t, FsOutcome::FrozenByOther, None));
                }
                Ok(FreezeOutcome::Unsupported) => {
                    report.filesystems.push(FsReport::new(t, FsOutcome::Unsupported, None));
                }
                Err(e) => {
                    report.filesystems.push(FsReport::new(t, FsOutcome::Failed, Some(chain(&e))));
                    report.error = Some(format!("Cannot freeze {}: {}", t.mount_point.display(), chain(&e)));
                    break;
                }
            }
            if Instant::now() >= deadline_at {
                report.error = Some("The deadline passed while freezing".into());
                break;
            }
        }
        record.frozen = ours.iter().map(|t| t.mount_point.clone()).collect();
        if report.error.is_none() {
            if let Err(e) = self.inner.state_file.write(&record) {
                report.error = Some(chain(&e));
            }
        }
        if report.error.is_some() {
            let (fs, _) = self.thaw_targets(&ours).await?;
            for f in fs {
                if let Some(r) = report.filesystems.iter_mut().find(|r| r.mount_point == f.mount_point) {
                    *r = f;
                }
            }
            if let Err(e) = self.inner.state_file.remove() {
                tracing::error!(error = %chain(&e), "cannot remove the state file");
            }
        }
        Ok(())
    }

    /// Thaws `ours` in reverse order; the reports and whether every thaw worked.
    async fn thaw_targets(&self, ours: &[FsTarget]) -> Result<(Vec<FsReport>, bool), Error> {
        let mut out = Vec::new();
        let mut ok = true;
        for t in ours.iter().rev() {
            let inner = Arc::clone(&self.inner);
            let mp = t.mount_point.clone();
            let r = match blocking(move || inner.freezer.thaw(&mp)).await? {
                Ok(ThawOutcome::Thawed) => FsReport::new(t, FsOutcome::Thawed, None),
                Ok(ThawOutcome::NotFrozen) => FsReport::new(t, FsOutcome::NotFrozen, None),
                Err(e) => {
                    ok = false;
                    tracing::error!(mount_point = %t.mount_point.display(), error = %chain(&e), "cannot thaw");
                    FsReport::new(t, FsOutcome::Failed, Some(chain(&e)))
                }
            };
            out.push(r);
        }
        Ok((out, ok))
    }

    async fn thaw_locked(&self, st: &mut State, reason: ThawReason) -> Result<ThawReport, Error> {
        st.generation += 1;
        let Some(frozen) = st.frozen.take() else {
            return Ok(ThawReport::default());
        };
        let (filesystems, ok) = self.thaw_targets(&frozen.ours).await?;
        let mut report = ThawReport { was_frozen: true, filesystems, ..Default::default() };
        if ok {
            if let Err(e) = self.inner.state_file.remove() {
                tracing::error!(error = %chain(&e), "cannot remove the state file");
            }
        } else {
            // The record stays: a restarted agent tries again.
            report.error = Some("Some filesystems could not be thawed".into());
        }
        tracing::warn!(snapshot = %frozen.snapshot_id, reason = reason.as_str(), "thawed");
        st.last_thaw_reason = Some(reason);
        report.hooks = self.inner.config.hooks.run_reverse(&frozen.hooks, Phase::Thaw, &frozen.snapshot_id).await;
        Ok(report)
    }

    fn arm_lease(&self, generation: u64, deadline: Instant) {
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let mut st = agent.inner.state.lock().await;
            if st.generation == generation && st.frozen.is_some() {
                tracing::warn!("freeze lease expired: thawing");
                if let Err(e) = agent.thaw_locked(&mut st, ThawReason::Lease).await {
                    tracing::error!(error = %chain(&e), "lease thaw failed");
                }
            }
        });
    }
}

impl<F: Freezer> AgentApi for Agent<F> {
    async fn freeze(&self, deadline: Duration, snapshot_id: String) -> Result<FreezeReport, Error> {
        let agent = self.clone();
        tokio::spawn(async move { agent.do_freeze(deadline, snapshot_id).await }).await.map_err(Error::Worker)?
    }

    async fn thaw(&self) -> Result<ThawReport, Error> {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut st = agent.inner.state.lock().await;
            agent.thaw_locked(&mut st, ThawReason::Host).await
        })
        .await
        .map_err(Error::Worker)?
    }

    async fn status(&self) -> StatusReport {
        let st = self.inner.state.lock().await;
        match &st.frozen {
            Some(f) => StatusReport {
                frozen: true,
                since: Some(f.since),
                deadline: Some(f.deadline_wall),
                remaining: f.deadline.saturating_duration_since(Instant::now()),
                snapshot_id: f.snapshot_id.clone(),
                last_thaw_reason: st.last_thaw_reason,
            },
            None => StatusReport { last_thaw_reason: st.last_thaw_reason, ..Default::default() },
        }
    }

    fn max_deadline(&self) -> Duration {
        self.inner.config.max_deadline
    }
}

/// The planned filesystem holding `dir`, if any (compared by device number).
fn on_planned_fs<'a>(dir: &Path, plan: &'a [FsTarget]) -> Option<&'a FsTarget> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok().or_else(|| dir.parent().and_then(|p| std::fs::metadata(p).ok()))?;
    let dev = meta.dev();
    // dev_t decoded as glibc's gnu_dev_major/gnu_dev_minor do.
    let major = u32::try_from(((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)).ok()?;
    let minor = u32::try_from(((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)).ok()?;
    plan.iter().find(|t| t.dev == (major, minor))
}

/// Milliseconds since the Unix epoch, for the wire.
pub fn to_unix_ms(t: Option<SystemTime>) -> u64 {
    t.map(unix_ms).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{AgentHome, FakeFreezer};

    #[tokio::test]
    async fn a_failed_call_answers_with_its_whole_chain_and_a_fitting_code() {
        let join = tokio::spawn(async { panic!("worker exploded") }).await.unwrap_err();
        let status = tonic::Status::from(Error::Worker(join));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().starts_with("The agent's worker task failed: "), "{}", status.message());
        assert!(status.message().contains("worker exploded"), "{}", status.message());
        let status = tonic::Status::from(Error::AlreadyFrozen { snapshot_id: "s1".into() });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), "Already frozen (snapshot \"s1\"); thaw first");
    }

    struct Fixture {
        /// Holds the home's folder.
        dir: tempfile::TempDir,
        home: AgentHome,
        fake: FakeFreezer,
        agent: Agent<FakeFreezer>,
    }

    impl Fixture {
        fn new(mounts: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let home = AgentHome::new(dir.path()).unwrap();
            let fake = FakeFreezer::new(mounts);
            let agent = Agent::new(fake.clone(), home.config());
            Fixture { dir, home, fake, agent }
        }

        fn hook(&self, name: &str, extra: &str) {
            self.home.hook(name, extra).unwrap();
        }

        fn calls(&self) -> Vec<String> {
            self.home.calls()
        }

        fn state(&self) -> Option<LeaseState> {
            StateFile { path: self.home.state_file() }.read().unwrap()
        }
    }

    const MOUNTS: &[&str] = &["/data", "/boot", "/"];

    #[tokio::test]
    async fn freeze_runs_hooks_then_freezes_and_thaw_reverses_both() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-db", "");
        f.hook("20-app", "");
        let r = f.agent.freeze(Duration::from_secs(60), "snap-1".into()).await.unwrap();
        assert!(r.frozen, "{:?}", r.error);
        assert_eq!(r.filesystems.iter().filter(|f| f.outcome == FsOutcome::Frozen).count(), 3);
        assert_eq!(f.state().unwrap().frozen, MOUNTS.iter().map(PathBuf::from).collect::<Vec<_>>());
        let s = f.agent.status().await;
        assert!(s.frozen && s.snapshot_id == "snap-1" && s.remaining > Duration::ZERO);

        let t = f.agent.thaw().await.unwrap();
        assert!(t.was_frozen && t.error.is_none());
        assert_eq!(f.fake.log(), ["freeze /data", "freeze /boot", "freeze /", "thaw /", "thaw /boot", "thaw /data"]);
        assert_eq!(f.calls(), ["10-db freeze", "20-app freeze", "20-app thaw", "10-db thaw"]);
        assert!(f.state().is_none());
        assert_eq!(f.agent.status().await.last_thaw_reason, Some(ThawReason::Host));
        // Idempotent.
        let again = f.agent.thaw().await.unwrap();
        assert!(!again.was_frozen && again.filesystems.is_empty());
    }

    #[tokio::test]
    async fn a_failing_pre_freeze_hook_aborts_before_any_freeze_and_gets_freeze_fail() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-db", "");
        f.hook("20-broken", "echo cannot flush >&2; exit 7");
        f.hook("30-never", "");
        let r = f.agent.freeze(Duration::from_secs(60), "s".into()).await.unwrap();
        assert!(!r.frozen);
        let why = r.error.unwrap();
        assert!(why.contains("20-broken") && why.contains("cannot flush"), "{why}");
        assert!(f.fake.log().is_empty());
        assert_eq!(f.calls(), ["10-db freeze", "20-broken freeze", "20-broken freeze-fail", "10-db freeze-fail"]);
        assert!(!f.agent.status().await.frozen);
        assert!(f.state().is_none());
    }

    #[tokio::test]
    async fn a_filesystem_that_fails_to_freeze_thaws_the_others_and_aborts() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-db", "");
        f.fake.fail_freeze_of("/boot");
        let r = f.agent.freeze(Duration::from_secs(60), "s".into()).await.unwrap();
        assert!(!r.frozen);
        assert!(r.error.unwrap().contains("/boot"));
        assert_eq!(f.fake.log(), ["freeze /data", "freeze /boot", "thaw /data"]);
        assert!(f.fake.frozen().is_empty());
        assert_eq!(f.calls(), ["10-db freeze", "10-db freeze-fail"]);
        assert!(f.state().is_none());
    }

    #[tokio::test]
    async fn a_filesystem_frozen_by_someone_else_is_reported_and_left_frozen() {
        let f = Fixture::new(MOUNTS);
        f.fake.freeze_externally("/boot");
        let r = f.agent.freeze(Duration::from_secs(60), "s".into()).await.unwrap();
        assert!(r.frozen);
        assert_eq!(r.filesystems[1].outcome, FsOutcome::FrozenByOther);
        assert_eq!(f.state().unwrap().frozen, [PathBuf::from("/data"), PathBuf::from("/")]);
        f.agent.thaw().await.unwrap();
        assert_eq!(f.fake.frozen(), [PathBuf::from("/boot")]);
    }

    #[tokio::test]
    async fn a_second_freeze_and_bad_arguments_are_refused() {
        let f = Fixture::new(MOUNTS);
        assert!(matches!(f.agent.freeze(Duration::ZERO, "s".into()).await, Err(Error::InvalidDeadline { .. })));
        assert!(matches!(
            f.agent.freeze(Duration::from_secs(601), "s".into()).await,
            Err(Error::InvalidDeadline { .. })
        ));
        assert!(matches!(f.agent.freeze(Duration::from_secs(5), "a\0b".into()).await, Err(Error::InvalidSnapshotId)));
        f.agent.freeze(Duration::from_secs(60), "one".into()).await.unwrap();
        assert!(matches!(
            f.agent.freeze(Duration::from_secs(60), "two".into()).await,
            Err(Error::AlreadyFrozen { .. })
        ));
        f.agent.thaw().await.unwrap();
    }

    #[tokio::test]
    async fn the_lease_thaws_at_the_deadline_without_the_host() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-db", "");
        let r = f.agent.freeze(Duration::from_millis(400), "s".into()).await.unwrap();
        assert!(r.frozen);
        let start = std::time::Instant::now();
        while f.agent.status().await.frozen {
            assert!(start.elapsed() < Duration::from_secs(20), "the lease did not thaw");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(f.fake.frozen().is_empty());
        assert_eq!(f.agent.status().await.last_thaw_reason, Some(ThawReason::Lease));
        assert_eq!(f.calls(), ["10-db freeze", "10-db thaw"]);
        assert!(f.state().is_none());
    }

    #[tokio::test]
    async fn a_lease_of_a_thawed_freeze_does_not_touch_the_next_one() {
        let f = Fixture::new(MOUNTS);
        f.agent.freeze(Duration::from_millis(300), "one".into()).await.unwrap();
        f.agent.thaw().await.unwrap();
        f.agent.freeze(Duration::from_secs(60), "two".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(f.agent.status().await.frozen, "the first freeze's lease thawed the second");
        f.agent.thaw().await.unwrap();
    }

    #[tokio::test]
    async fn a_host_that_gives_up_mid_freeze_does_not_cancel_it_and_the_lease_still_thaws() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-slow", "sleep 1");
        let call = f.agent.freeze(Duration::from_secs(3), "s".into());
        assert!(tokio::time::timeout(Duration::from_millis(200), call).await.is_err());
        let start = std::time::Instant::now();
        while !f.agent.status().await.frozen {
            assert!(start.elapsed() < Duration::from_secs(20), "the abandoned freeze never completed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while f.agent.status().await.frozen {
            assert!(start.elapsed() < Duration::from_secs(30), "the lease did not thaw");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(f.fake.frozen().is_empty());
    }

    #[tokio::test]
    async fn a_restarted_agent_thaws_exactly_what_the_dead_one_recorded() {
        let f = Fixture::new(MOUNTS);
        f.hook("10-db", "");
        f.fake.freeze_externally("/boot");
        f.agent.freeze(Duration::from_secs(600), "s".into()).await.unwrap();
        // The agent dies: a new one starts on the same state file, with the guest still frozen.
        let reborn = Agent::new(f.fake.clone(), f.home.config());
        let r = reborn.recover().await.unwrap().unwrap();
        assert!(r.was_frozen);
        assert_eq!(f.fake.frozen(), [PathBuf::from("/boot")]);
        assert!(f.state().is_none());
        assert_eq!(f.calls(), ["10-db freeze", "10-db thaw"]);
        assert_eq!(reborn.status().await.last_thaw_reason, Some(ThawReason::Restart));
        assert!(reborn.recover().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_corrupt_state_file_thaws_every_planned_filesystem() {
        let f = Fixture::new(MOUNTS);
        f.fake.freeze_externally("/data");
        std::fs::create_dir_all(f.dir.path().join("run")).unwrap();
        std::fs::write(f.home.state_file(), "garbage").unwrap();
        f.agent.recover().await.unwrap().unwrap();
        assert!(f.fake.frozen().is_empty());
        assert_eq!(f.fake.log(), ["thaw /", "thaw /boot", "thaw /data"]);
    }

    #[test]
    fn errors_map_to_fitting_grpc_codes() {
        let s: tonic::Status = Error::AlreadyFrozen { snapshot_id: "x".into() }.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let s: tonic::Status = Error::InvalidSnapshotId.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
    }
}
