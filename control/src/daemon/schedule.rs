//! Scheduled backups: `[[schedule]]` tables name a group of VMs (one VM is a group of one), a
//! calendar event ([`super::calendar`], UTC) with a random delay, and the group's retention
//! ([`super::retention`]); `[scheduler] max_jobs` bounds the scheduled jobs that run at once.
//!
//! - Each schedule sleeps until its next elapse after its last run, plus a delay drawn
//!   uniformly from `0..=randomized_delay`, then queues a backup of each of its VMs (in the
//!   order the schedule names them) and records the run's time in the state database.
//! - A schedule whose next elapse passed while livesnapd was down runs once at start (as a
//!   systemd timer with `Persistent=true`), not once per missed elapse. A schedule that never
//!   ran before counts from the daemon's first start with it: nothing is caught up.
//! - One queue per host: at most `max_jobs` scheduled jobs run at once; the others wait, in the
//!   order they were queued. A VM whose previous scheduled backup is still queued or running
//!   is not queued twice (a warning says so). Backups asked for by clients
//!   (CreateSnapshot) do not wait in this queue.
//! - Time comes from a [`Clock`], and the jobs run through a [`Runner`]: the tests put fakes in
//!   both and never wait for real time.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{error, info, warn};

use super::calendar::Calendar;
use super::config::VmConfig;
use super::model::{BackupMode, Event, QuiesceMode, SnapshotRequest};
use super::retention::Keep;
use super::state::Store;
use super::Daemon;

/// The default bound on scheduled jobs at once.
pub const DEFAULT_MAX_JOBS: usize = 1;
const MAX_MAX_JOBS: u32 = 64;
/// The longest random delay a schedule may ask for.
const MAX_RANDOMIZED_DELAY: Duration = Duration::from_secs(24 * 3600);

// ---- configuration -------------------------------------------------------------------------

/// `[scheduler]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SchedulerFile {
    max_jobs: Option<u32>,
}

/// One `[[schedule]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScheduleFile {
    name: String,
    /// Optional: a group with retention only (its backups started by an orchestrator).
    calendar: Option<String>,
    vms: Vec<String>,
    randomized_delay: Option<String>,
    keep: Option<KeepFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeepFile {
    last: Option<u32>,
    hourly: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    monthly: Option<u32>,
    yearly: Option<u32>,
}

/// A checked schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub name: String,
    /// `None`: no scheduled backups, retention only.
    pub calendar: Option<Calendar>,
    /// In the order the schedule names them, each a configured VM in no other schedule.
    pub vms: Vec<String>,
    pub randomized_delay: Duration,
    /// Applied after each successful backup of one of its VMs; `None`: backups are kept.
    pub keep: Option<Keep>,
}

/// Checks the `[scheduler]` and `[[schedule]]` tables against the configured VMs; the bound on
/// scheduled jobs and the schedules, or why not.
pub(super) fn check(
    scheduler: Option<SchedulerFile>,
    files: Vec<ScheduleFile>,
    vms: &[VmConfig],
) -> Result<(usize, Vec<Schedule>), String> {
    let max_jobs = match scheduler.unwrap_or_default().max_jobs {
        None => DEFAULT_MAX_JOBS,
        Some(n @ 1..=MAX_MAX_JOBS) => n as usize,
        Some(n) => return Err(format!("scheduler.max_jobs {n} is not from 1 to {MAX_MAX_JOBS}")),
    };
    let mut names = HashSet::new();
    let mut taken: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        livesnap_repo::validate_name("schedule", &f.name).map_err(|e| format!("schedule {:?}: {e}", f.name))?;
        let at = |what: String| format!("schedule {}: {what}", f.name);
        if !names.insert(f.name.clone()) {
            return Err(at("is configured twice".into()));
        }
        let calendar = f.calendar.as_deref().map(Calendar::parse).transpose().map_err(|e| at(e.to_string()))?;
        if f.vms.is_empty() {
            return Err(at("names no VM (vms = [\"NAME\", …])".into()));
        }
        for vm in &f.vms {
            if !vms.iter().any(|v| &v.name == vm) {
                return Err(at(format!("VM {vm:?} is not configured ([[vm]])")));
            }
            if let Some(other) = taken.insert(vm.clone(), f.name.clone()) {
                return Err(at(format!(
                    "VM {vm} is in schedule {other} already (a VM is in one schedule: one retention)"
                )));
            }
        }
        let randomized_delay = match &f.randomized_delay {
            None => Duration::ZERO,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| at(format!("randomized_delay {s:?} is not a duration such as \"30min\": {e}")))?,
        };
        if randomized_delay > MAX_RANDOMIZED_DELAY {
            return Err(at(format!(
                "randomized_delay {:?} is longer than 24h",
                f.randomized_delay.unwrap_or_default()
            )));
        }
        if calendar.is_none() && f.randomized_delay.is_some() {
            return Err(at("randomized_delay goes with a calendar".into()));
        }
        let keep = f.keep.map(|k| Keep {
            last: k.last.unwrap_or(0),
            hourly: k.hourly.unwrap_or(0),
            daily: k.daily.unwrap_or(0),
            weekly: k.weekly.unwrap_or(0),
            monthly: k.monthly.unwrap_or(0),
            yearly: k.yearly.unwrap_or(0),
        });
        if keep.is_some_and(|k| k.is_empty()) {
            return Err(at("keep has no rule above 0: it would keep everything; leave it out instead".into()));
        }
        if calendar.is_none() && keep.is_none() {
            return Err(at("needs a calendar, a keep table, or both".into()));
        }
        out.push(Schedule { name: f.name, calendar, vms: f.vms, randomized_delay, keep });
    }
    Ok((max_jobs, out))
}

// ---- time ----------------------------------------------------------------------------------

/// Where the scheduler's time comes from: seconds since the epoch, UTC.
#[async_trait]
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> i64;
    /// Returns once [`Clock::now`] is `t` or later.
    async fn sleep_until(&self, t: i64);
}

/// The system's wall clock. It sleeps a minute at most at a time, so that a clock set
/// forward (or a host resumed from suspend) is noticed within a minute.
#[derive(Debug, Default)]
pub struct SystemClock;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> i64 {
        now_ms().div_euclid(1000)
    }

    async fn sleep_until(&self, t: i64) {
        loop {
            let left = t.saturating_mul(1000).saturating_sub(now_ms());
            if left <= 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(left.min(60_000) as u64)).await;
        }
    }
}

/// A random delay from 0 to `max` inclusive, to the second.
pub trait Jitter: Send + Sync + fmt::Debug {
    fn delay(&self, max: Duration) -> Duration;
}

/// Uniform, from fastrand (no cryptographic need: it only spreads the hosts' start times).
#[derive(Debug, Default)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn delay(&self, max: Duration) -> Duration {
        Duration::from_secs(fastrand::u64(0..=max.as_secs()))
    }
}

// ---- jobs ----------------------------------------------------------------------------------

/// Runs one scheduled backup to its end.
#[async_trait]
pub trait Runner: Send + Sync + fmt::Debug {
    /// Backs `vm` up for `schedule`; why not, if it failed.
    async fn run(&self, vm: &str, schedule: &str) -> Result<(), String>;
}

/// Scheduled backups through the daemon's CreateSnapshot: incremental where the change maps
/// allow, quiesced where the agent answers. Retention runs inside the job, after its success.
#[derive(Debug)]
pub struct DaemonRunner(pub Arc<Daemon>);

#[async_trait]
impl Runner for DaemonRunner {
    async fn run(&self, vm: &str, schedule: &str) -> Result<(), String> {
        let req = SnapshotRequest {
            vm: vm.to_owned(),
            mode: BackupMode::Auto,
            quiesce: QuiesceMode::Preferred,
            freeze_timeout: None,
        };
        let (job, mut rx) = self.0.create_snapshot(req).await.map_err(|e| livesnap_proto::error::chain(&e))?;
        info!(vm, schedule, job = %job, "scheduled backup started");
        let mut last = None;
        while let Some(e) = rx.recv().await {
            last = Some(e);
        }
        match last {
            Some(Event::Done(_)) => Ok(()),
            Some(Event::Failed { error, .. }) => Err(livesnap_proto::error::chain(&error)),
            _ => Err("the job ended without an outcome".into()),
        }
    }
}

/// The queue of scheduled jobs: FIFO, at most `max_jobs` running.
#[derive(Debug)]
struct Queue {
    tx: mpsc::UnboundedSender<(String, String)>,
    /// VMs queued or running.
    pending: Mutex<HashSet<String>>,
    /// How many VMs are queued or running, for [`Scheduler::idle`].
    count: watch::Sender<usize>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn submit(&self, vm: &str, schedule: &str) {
        let mut p = self.lock();
        if !p.insert(vm.to_owned()) {
            warn!(vm, schedule, "the VM's previous scheduled backup is still queued or running: not queued again");
            return;
        }
        self.count.send_replace(p.len());
        drop(p);
        if self.tx.send((vm.to_owned(), schedule.to_owned())).is_err() {
            self.done(vm);
        }
    }

    fn done(&self, vm: &str) {
        let mut p = self.lock();
        p.remove(vm);
        self.count.send_replace(p.len());
    }
}

/// The schedules of one daemon, running.
#[derive(Debug)]
pub struct Scheduler {
    queue: Arc<Queue>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Scheduler {
    /// Starts every schedule that has a calendar, and the queue's dispatcher.
    pub fn start(
        schedules: &[Schedule],
        max_jobs: usize,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        jitter: Arc<dyn Jitter>,
        runner: Arc<dyn Runner>,
    ) -> Scheduler {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
        let queue = Arc::new(Queue { tx, pending: Mutex::new(HashSet::new()), count: watch::channel(0).0 });
        let (stop, _) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let slots = Arc::new(Semaphore::new(max_jobs.max(1)));
        {
            let (queue, mut stopped) = (queue.clone(), stop.subscribe());
            tasks.spawn(async move {
                loop {
                    let next = tokio::select! {
                        n = rx.recv() => n,
                        _ = stopped.wait_for(|s| *s) => None,
                    };
                    let Some((vm, schedule)) = next else { break };
                    // A semaphore hands its permits out in the order asked for: one asker
                    // here, so the jobs start in the order queued.
                    let permit = tokio::select! {
                        p = slots.clone().acquire_owned() => p,
                        _ = stopped.wait_for(|s| *s) => break,
                    };
                    let Ok(permit) = permit else { break };
                    let (queue, runner) = (queue.clone(), runner.clone());
                    tokio::spawn(async move {
                        match runner.run(&vm, &schedule).await {
                            Ok(()) => info!(vm = %vm, schedule = %schedule, "scheduled backup done"),
                            Err(e) => error!(vm = %vm, schedule = %schedule, error = %e, "scheduled backup failed"),
                        }
                        drop(permit);
                        queue.done(&vm);
                    });
                }
                let left = queue.lock().len();
                if left > 0 {
                    info!(jobs = left, "scheduler stopped: queued backups not started");
                }
            });
        }
        for s in schedules {
            let Some(calendar) = s.calendar.clone() else { continue };
            let t = Timer {
                name: s.name.clone(),
                calendar,
                vms: s.vms.clone(),
                randomized_delay: s.randomized_delay,
                store: store.clone(),
                clock: clock.clone(),
                jitter: jitter.clone(),
                queue: queue.clone(),
            };
            let mut stopped = stop.subscribe();
            tasks.spawn(async move {
                tokio::select! {
                    () = t.run() => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            });
        }
        Scheduler { queue, stop, tasks }
    }

    /// Stops the schedules and the queue: nothing new starts; jobs running go on (the daemon
    /// stops them).
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Returns once no scheduled job is queued or running.
    pub async fn idle(&self) {
        let mut rx = self.queue.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Daemon {
    /// Starts the configured schedules on the system clock, their jobs through
    /// [`DaemonRunner`]. Call once, after [`Daemon::recover`].
    pub fn start_scheduler(self: &Arc<Self>) -> Scheduler {
        let timed = self.config.schedules.iter().filter(|s| s.calendar.is_some()).count();
        if timed > 0 {
            info!(schedules = timed, max_jobs = self.config.max_jobs, "scheduled backups on");
        }
        Scheduler::start(
            &self.config.schedules,
            self.config.max_jobs,
            self.store.clone(),
            Arc::new(SystemClock),
            Arc::new(RandomJitter),
            Arc::new(DaemonRunner(self.clone())),
        )
    }
}

/// One schedule's loop.
#[derive(Debug)]
struct Timer {
    name: String,
    calendar: Calendar,
    vms: Vec<String>,
    randomized_delay: Duration,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Jitter>,
    queue: Arc<Queue>,
}

impl Timer {
    async fn last_run(&self) -> Option<i64> {
        let (store, name) = (self.store.clone(), self.name.clone());
        match tokio::task::spawn_blocking(move || store.schedule_last_run(&name)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                error!(schedule = %self.name, error = %livesnap_proto::error::chain(&e), "cannot read the schedule's last run: counting from now");
                None
            }
            Err(e) => {
                error!(schedule = %self.name, error = %e, "cannot read the schedule's last run: counting from now");
                None
            }
        }
    }

    async fn record_run(&self, t: i64) {
        let (store, name) = (self.store.clone(), self.name.clone());
        let r = tokio::task::spawn_blocking(move || store.put_schedule_run(&name, t)).await;
        if let Some(e) = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(livesnap_proto::error::chain(&e)),
            Err(e) => Some(e.to_string()),
        } {
            error!(schedule = %self.name, error = %e, "cannot record the schedule's run: a restart may run it again");
        }
    }

    async fn run(self) {
        let mut last = match self.last_run().await {
            Some(t) => t,
            None => {
                // First start with this schedule: nothing to catch up; from now on a missed
                // elapse is noticed.
                let now = self.clock.now();
                self.record_run(now).await;
                now
            }
        };
        loop {
            let Some(next) = self.calendar.next_after(last) else {
                info!(schedule = %self.name, calendar = %self.calendar, "the schedule has no elapse left");
                return;
            };
            let now = self.clock.now();
            let missed = next <= now;
            let due = if missed { now } else { next };
            let delay = self.jitter.delay(self.randomized_delay).min(self.randomized_delay);
            let at = due.saturating_add(delay.as_secs() as i64);
            if missed {
                info!(schedule = %self.name, missed = next, delay_secs = delay.as_secs(), "an elapse was missed while livesnapd was down: running once");
            }
            self.clock.sleep_until(at).await;
            last = self.clock.now().max(at);
            self.record_run(last).await;
            info!(schedule = %self.name, vms = self.vms.len(), "schedule elapsed: backups queued");
            for vm in &self.vms {
                self.queue.submit(vm, &self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests;
