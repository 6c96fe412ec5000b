//! The scheduler with its clock, random delay and jobs faked: time only moves when a test
//! moves it, and a test waits for the scheduler to go to sleep, never for real time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::daemon::retention::unix;

/// Time that moves only when told; remembers when each sleeper wants to wake.
#[derive(Debug)]
struct FakeClock {
    inner: Mutex<(i64, Vec<i64>)>,
    changed: Notify,
}

impl FakeClock {
    fn new(now: i64) -> Arc<FakeClock> {
        Arc::new(FakeClock { inner: Mutex::new((now, Vec::new())), changed: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (i64, Vec<i64>)> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, t: i64) {
        self.lock().0 = t;
        self.changed.notify_waiters();
    }

    /// Waits until someone sleeps until later than now; the earliest such wake-up time.
    async fn next_sleep(&self) -> i64 {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let g = self.lock();
                if let Some(t) = g.1.iter().copied().filter(|&t| t > g.0).min() {
                    return t;
                }
            }
            changed.await;
        }
    }
}

#[async_trait]
impl Clock for FakeClock {
    fn now(&self) -> i64 {
        self.lock().0
    }

    async fn sleep_until(&self, t: i64) {
        if self.lock().0 >= t {
            return;
        }
        self.lock().1.push(t);
        self.changed.notify_waiters();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().0 >= t {
                break;
            }
            changed.await;
        }
        let mut g = self.lock();
        if let Some(i) = g.1.iter().position(|&x| x == t) {
            g.1.remove(i);
        }
    }
}

/// Always the same fraction of the bound.
#[derive(Debug)]
struct FixedJitter(u32);

impl Jitter for FixedJitter {
    fn delay(&self, max: Duration) -> Duration {
        max * self.0 / 100
    }
}

/// Records the jobs; each may be held until the test releases it.
#[derive(Debug)]
struct FakeRunner {
    started: Mutex<Vec<String>>,
    running: Mutex<usize>,
    most_at_once: Mutex<usize>,
    /// `Some`: each job takes a permit before it ends.
    release: Option<Semaphore>,
    started_one: Notify,
}

impl FakeRunner {
    fn new(hold: bool) -> Arc<FakeRunner> {
        Arc::new(FakeRunner {
            started: Mutex::new(Vec::new()),
            running: Mutex::new(0),
            most_at_once: Mutex::new(0),
            release: hold.then(|| Semaphore::new(0)),
            started_one: Notify::new(),
        })
    }

    fn started(&self) -> Vec<String> {
        self.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    async fn wait_started(&self, n: usize) {
        loop {
            let notified = self.started_one.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.started().len() >= n {
                return;
            }
            notified.await;
        }
    }
}

#[async_trait]
impl Runner for FakeRunner {
    async fn run(&self, vm: &str, _schedule: &str) -> Result<(), String> {
        {
            let mut r = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *r += 1;
            let mut m = self.most_at_once.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *m = (*m).max(*r);
        }
        self.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(vm.to_owned());
        self.started_one.notify_waiters();
        if let Some(s) = &self.release {
            if let Ok(p) = s.acquire().await {
                p.forget();
            }
        }
        *self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
        Ok(())
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Arc::new(Store::open(&dir.path().join("state.redb")).unwrap_or_else(|e| panic!("{e}")));
    Rig { _dir: dir, store }
}

fn schedule(name: &str, calendar: &str, vms: &[&str], delay: Duration) -> Schedule {
    Schedule {
        name: name.into(),
        calendar: Some(Calendar::parse(calendar).unwrap_or_else(|e| panic!("{e}"))),
        vms: vms.iter().map(|v| v.to_string()).collect(),
        randomized_delay: delay,
        keep: None,
    }
}

fn start(
    r: &Rig,
    s: &[Schedule],
    max_jobs: usize,
    clock: &Arc<FakeClock>,
    jitter: u32,
    runner: &Arc<FakeRunner>,
) -> Scheduler {
    Scheduler::start(s, max_jobs, r.store.clone(), clock.clone(), Arc::new(FixedJitter(jitter)), runner.clone())
}

#[tokio::test]
async fn a_schedule_missed_while_down_runs_once_at_start_then_on_its_calendar() {
    let r = rig();
    // Last ran on 1 March 2026 at 02:00; the daemon comes back three days (72 elapses) later.
    r.store.put_schedule_run("hourly", unix(2026, 3, 1, 2, 0)).unwrap_or_else(|e| panic!("{e}"));
    let now = unix(2026, 3, 4, 2, 30);
    let clock = FakeClock::new(now);
    let runner = FakeRunner::new(false);
    let s = start(&r, &[schedule("hourly", "hourly", &["a", "b"], Duration::ZERO)], 4, &clock, 0, &runner);
    // It runs once, now, then sleeps until the next elapse after now.
    assert_eq!(clock.next_sleep().await, unix(2026, 3, 4, 3, 0));
    s.idle().await;
    assert_eq!(runner.started(), ["a", "b"], "once, not once per missed hour");
    assert_eq!(r.store.schedule_last_run("hourly").unwrap_or_else(|e| panic!("{e}")), Some(now));
    clock.set(unix(2026, 3, 4, 3, 0));
    assert_eq!(clock.next_sleep().await, unix(2026, 3, 4, 4, 0));
    runner.wait_started(4).await;
    s.idle().await;
    assert_eq!(runner.started(), ["a", "b", "a", "b"]);
    s.stop().await;
}

#[tokio::test]
async fn a_schedule_seen_for_the_first_time_catches_nothing_up() {
    let r = rig();
    let now = unix(2026, 3, 4, 2, 30);
    let clock = FakeClock::new(now);
    let runner = FakeRunner::new(false);
    let s = start(&r, &[schedule("daily", "daily", &["a"], Duration::ZERO)], 1, &clock, 0, &runner);
    assert_eq!(clock.next_sleep().await, unix(2026, 3, 5, 0, 0));
    s.idle().await;
    assert!(runner.started().is_empty());
    assert_eq!(r.store.schedule_last_run("daily").unwrap_or_else(|e| panic!("{e}")), Some(now), "counted from now on");
    s.stop().await;
}

#[tokio::test]
async fn the_random_delay_is_added_to_the_elapse_and_stays_within_its_bound() {
    let r = rig();
    let now = unix(2026, 3, 4, 2, 30);
    r.store.put_schedule_run("nightly", now).unwrap_or_else(|e| panic!("{e}"));
    let clock = FakeClock::new(now);
    let runner = FakeRunner::new(false);
    let delay = Duration::from_secs(30 * 60);
    // The fake draws the whole bound: the job waits for 22:30 + 30 min, not less.
    let s = start(&r, &[schedule("nightly", "Mon..Fri 22:30", &["a"], delay)], 1, &clock, 100, &runner);
    let due = unix(2026, 3, 4, 22, 30);
    assert_eq!(clock.next_sleep().await, due + 1800);
    assert!(runner.started().is_empty(), "ran before its delay was over");
    clock.set(due + 1800);
    runner.wait_started(1).await;
    s.stop().await;
    // The real draw: from 0 to the bound, to the second, and not always the same.
    let draws: Vec<Duration> = (0..2000).map(|_| RandomJitter.delay(delay)).collect();
    assert!(draws.iter().all(|d| *d <= delay && d.subsec_nanos() == 0), "{:?}", draws.iter().max());
    assert!(draws.iter().any(|d| *d < delay / 4) && draws.iter().any(|d| *d > delay * 3 / 4));
    assert_eq!(RandomJitter.delay(Duration::ZERO), Duration::ZERO);
}

#[tokio::test]
async fn no_more_than_max_jobs_run_at_once_and_the_others_wait_in_order() {
    let r = rig();
    let now = unix(2026, 3, 4, 2, 30);
    r.store.put_schedule_run("all", now).unwrap_or_else(|e| panic!("{e}"));
    let clock = FakeClock::new(now);
    let runner = FakeRunner::new(true);
    let vms = ["v1", "v2", "v3", "v4", "v5"];
    let s = start(&r, &[schedule("all", "03:00", &vms, Duration::ZERO)], 2, &clock, 0, &runner);
    assert_eq!(clock.next_sleep().await, unix(2026, 3, 4, 3, 0));
    clock.set(unix(2026, 3, 4, 3, 0));
    runner.wait_started(2).await;
    let release = runner.release.as_ref().unwrap_or_else(|| panic!("held"));
    for n in 3..=5 {
        tokio::task::yield_now().await;
        assert_eq!(runner.started().len(), n - 1, "a job started over the bound");
        release.add_permits(1);
        runner.wait_started(n).await;
    }
    release.add_permits(2);
    s.idle().await;
    assert_eq!(runner.started(), vms, "in the order queued");
    assert_eq!(*runner.most_at_once.lock().unwrap_or_else(std::sync::PoisonError::into_inner), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_vm_still_queued_is_not_queued_twice() {
    let r = rig();
    let now = unix(2026, 3, 4, 2, 30);
    r.store.put_schedule_run("often", now).unwrap_or_else(|e| panic!("{e}"));
    let clock = FakeClock::new(now);
    let runner = FakeRunner::new(true);
    let s = start(&r, &[schedule("often", "*:*:0/10", &["a"], Duration::ZERO)], 1, &clock, 0, &runner);
    assert_eq!(clock.next_sleep().await, now + 10);
    clock.set(now + 10);
    runner.wait_started(1).await;
    // The job is still running at the next two elapses.
    assert_eq!(clock.next_sleep().await, now + 20);
    clock.set(now + 20);
    assert_eq!(clock.next_sleep().await, now + 30);
    clock.set(now + 30);
    assert_eq!(clock.next_sleep().await, now + 40);
    let release = runner.release.as_ref().unwrap_or_else(|| panic!("held"));
    // Enough for three jobs: a VM queued again would run, and show, rather than hang.
    release.add_permits(3);
    s.idle().await;
    assert_eq!(runner.started(), ["a"]);
    s.stop().await;
}

#[test]
fn schedules_are_checked_against_the_vms() {
    use crate::daemon::config::Config;
    let base = "repository = \"/r\"\nsocket = \"/s.sock\"\nstate = \"/var/lib/l/state.redb\"\n\
                [[vm]]\nname = \"a\"\ncontrol = \"/a.sock\"\n[[vm]]\nname = \"b\"\ncontrol = \"/b.sock\"\n";
    let parse = |extra: &str| Config::parse(std::path::Path::new("/c.toml"), &format!("{base}{extra}"));
    let c = parse(
        "[scheduler]\nmax_jobs = 3\n[[schedule]]\nname = \"nightly\"\ncalendar = \"Mon..Fri 22:30\"\n\
         vms = [\"b\", \"a\"]\nrandomized_delay = \"30min\"\nkeep = { last = 3, daily = 7 }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.max_jobs, 3);
    let s = &c.schedules[0];
    assert_eq!(
        (s.vms.as_slice(), s.randomized_delay),
        (["b".to_string(), "a".to_string()].as_slice(), Duration::from_secs(1800))
    );
    assert_eq!(s.keep, Some(Keep { last: 3, daily: 7, ..Keep::default() }));
    assert_eq!(c.schedule_of("a").map(|s| s.name.as_str()), Some("nightly"));
    assert_eq!(parse("").unwrap_or_else(|e| panic!("{e}")).max_jobs, DEFAULT_MAX_JOBS);
    let retention_only = parse("[[schedule]]\nname = \"keep\"\nvms = [\"a\"]\nkeep = { weekly = 4 }\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(retention_only.schedules[0].calendar.is_none());
    for (extra, want) in [
        ("[scheduler]\nmax_jobs = 0\n", "max_jobs 0"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"zz\"]\n", "VM \"zz\" is not configured"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = []\n", "names no VM"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily 02:00\"\nvms = [\"a\"]\n", "stands alone"),
        (
            "[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\n[[schedule]]\nname = \"t\"\ncalendar = \"daily\"\nvms = [\"a\"]\n",
            "in schedule s already",
        ),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\n[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"b\"]\n", "twice"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\nrandomized_delay = \"soon\"\n", "randomized_delay"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\nrandomized_delay = \"2days\"\n", "longer than 24h"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\nkeep = { last = 0 }\n", "no rule above 0"),
        ("[[schedule]]\nname = \"s\"\ncalendar = \"daily\"\nvms = [\"a\"]\nkeep = { forever = 1 }\n", "not valid"),
        ("[[schedule]]\nname = \"s\"\nvms = [\"a\"]\n", "needs a calendar"),
        ("[[schedule]]\nname = \"../s\"\ncalendar = \"daily\"\nvms = [\"a\"]\n", "schedule"),
    ] {
        let e = parse(extra).err().unwrap_or_else(|| panic!("accepted {extra}"));
        let chain = format!("{e} {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
        assert!(chain.contains(want), "{extra}: {want:?} not in {chain}");
    }
}
