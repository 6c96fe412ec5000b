//! The live-restore job in-process: a real repository and state database in a temp dir, and a
//! fake backend that the test plays step by step: it reports the target as a disk under restore
//! once "started", hands each feed it is asked for to the test, and applies the answers the way
//! livesnap-blk does (the bytes written into the target, the chunk's bit set in the map).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use livesnap_blk::restore::map::Map;
use tokio::sync::mpsc;

use super::ChunkSource;
use crate::daemon::config::{AgentEndpoint, Config, VmConfig};
use crate::daemon::model::{ImageFormat, LivePhase, RestoreProgress, RestoreRequest};
use crate::daemon::ports::{
    Agent, AgentError, Answer, AnswerBody, Backend, BackendError, ChangeMap, Connector, DiskState, Feed, MergeProgress,
    Phase, RestoreState, Snapshot, Timeouts, VmStatus, Want,
};
use crate::daemon::state::{JobKind, JobResult, JobState, Stage};
use crate::daemon::{Daemon, Error, SourceWrap};
use livesnap_repo::{BackupSpec, Consistency, CreateOptions, Repository};

const VM: &str = "vm1";
const K64: usize = 64 << 10;
/// Chunks of the backup's disk; 2 and 3 are zero, the last one short.
const CHUNKS: u64 = 12;
const WAIT: Duration = Duration::from_secs(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn data() -> Vec<u8> {
    let mut d = vec![0u8; (CHUNKS as usize - 1) * K64 + 1024];
    fastrand::Rng::with_seed(7).fill(&mut d);
    d[2 * K64..4 * K64].fill(0);
    d
}

/// The feed the daemon opened, as the backend holds it.
struct FeedEnd {
    wants: mpsc::Sender<Result<Want, BackendError>>,
    answers: mpsc::Receiver<Answer>,
}

#[derive(Default)]
struct World {
    /// The target the backend serves as disk vda; `None`: the backend is not started.
    serving: Mutex<Option<PathBuf>>,
    /// Feeds opened, not taken by the test yet.
    feeds: Mutex<Vec<FeedEnd>>,
    feed_opened: tokio::sync::Notify,
}

#[derive(Clone)]
struct Fake(Arc<World>);

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fake")
    }
}

#[async_trait]
impl Connector for Fake {
    async fn backend(&self, _vm: &VmConfig, _t: Timeouts) -> Result<Arc<dyn Backend>, BackendError> {
        if lock(&self.0.serving).is_none() {
            return Err(BackendError::NoAnswer { socket: "/fake/control.sock".into(), timeout: Duration::ZERO });
        }
        Ok(Arc::new(self.clone()))
    }

    async fn agent(&self, endpoint: &AgentEndpoint, _t: Timeouts) -> Result<Arc<dyn Agent>, AgentError> {
        let source = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        Err(AgentError::Unreachable { endpoint: endpoint.clone(), source })
    }
}

#[async_trait]
impl Backend for Fake {
    async fn status(&self) -> Result<VmStatus, BackendError> {
        let target = lock(&self.0.serving).clone();
        let Some(target) = target else {
            return Err(BackendError::NoAnswer { socket: "/fake/control.sock".into(), timeout: Duration::ZERO });
        };
        let map = livesnap_blk::restore::map_path(&target);
        let restore = livesnap_blk::restore::read_map(&map).ok().map(|m| RestoreState {
            vm: m.id.vm,
            backup_id: m.id.backup_id,
            disk: m.id.disk,
            chunk_size: m.chunk_size,
            chunks_total: m.chunks_total,
            chunks_done: m.chunks_done,
            complete: m.complete,
            map_path: map.clone(),
            fed: true,
        });
        Ok(VmStatus {
            snapshot: None,
            disks: vec![DiskState {
                id: "vda".into(),
                phase: Phase::Direct,
                snapshot: None,
                size: std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0),
                base_path: target,
                base_format: "raw".into(),
                abandoned: None,
                delta_bytes: 0,
                delta_extents: 0,
                merged_bytes: 0,
                restore,
            }],
        })
    }

    async fn changes(&self, _disk: &str) -> Result<ChangeMap, BackendError> {
        unreachable!("a live restore asks for no change map")
    }

    async fn begin(&self) -> Result<Snapshot, BackendError> {
        unreachable!("a live restore cuts no snapshot")
    }

    async fn merge(&self, _s: u64, _p: &mut (dyn FnMut(MergeProgress) + Send)) -> Result<(), BackendError> {
        unreachable!("a live restore merges nothing")
    }

    async fn abandon(&self, _s: u64, _r: &str) -> Result<(), BackendError> {
        unreachable!("a live restore abandons nothing")
    }

    async fn checkpoint(&self, _s: u64) -> Result<(), BackendError> {
        unreachable!("a live restore checkpoints nothing")
    }

    async fn restore_feed(&self, disk: &str) -> Result<Feed, BackendError> {
        assert_eq!(disk, "vda", "the feed names the backend's disk");
        let (want_tx, wants) = mpsc::channel(64);
        let (answers, answer_rx) = mpsc::channel(64);
        lock(&self.0.feeds).push(FeedEnd { wants: want_tx, answers: answer_rx });
        self.0.feed_opened.notify_waiters();
        Ok(Feed { wants, answers })
    }
}

/// Reads of the chunk source, as the tests see them.
#[derive(Default)]
struct Reads {
    /// Chunks read (started), in order.
    started: Mutex<Vec<u64>>,
    /// Reads wait while set, until released.
    gate: Mutex<bool>,
    released: std::sync::Condvar,
    /// Chunks whose reads fail.
    failing: Mutex<HashSet<u64>>,
}

struct Watched {
    inner: Arc<dyn ChunkSource>,
    reads: Arc<Reads>,
}

impl ChunkSource for Watched {
    fn chunks(&self) -> u64 {
        self.inner.chunks()
    }

    fn is_zero(&self, chunk: u64) -> bool {
        self.inner.is_zero(chunk)
    }

    fn read(&self, chunk: u64) -> Result<Vec<u8>, String> {
        lock(&self.reads.started).push(chunk);
        let mut gate = lock(&self.reads.gate);
        while *gate {
            gate = self.reads.released.wait(gate).unwrap_or_else(|p| p.into_inner());
        }
        drop(gate);
        if lock(&self.reads.failing).contains(&chunk) {
            return Err("the object store timed out".into());
        }
        self.inner.read(chunk)
    }
}

struct Rig {
    dir: tempfile::TempDir,
    config: Config,
    world: Arc<World>,
    reads: Arc<Reads>,
    data: Vec<u8>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_defaults("")
    }

    /// With `lines` in the config's `[defaults]`.
    fn with_defaults(lines: &str) -> Rig {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let data = data();
        let opts = CreateOptions { chunk_size: K64 as u64, ..CreateOptions::default() };
        let repo = Repository::create(dir.path().join("repo"), opts).unwrap();
        let spec = BackupSpec {
            vm: VM.into(),
            id: "b1".into(),
            consistency: Consistency::Crash,
            freeze_window: None,
            created_unix_us: None,
        };
        let mut w = repo.begin_backup(spec).unwrap();
        w.full("vda", &data.clone()).unwrap();
        w.commit().unwrap();
        let text = format!(
            "repository = \"{0}/repo\"\nsocket = \"{0}/d.sock\"\nstate = \"{0}/state.redb\"\nrestore_dir = \"{0}/restore\"\n\
             [defaults]\n{lines}\n[[vm]]\nname = \"{VM}\"\ncontrol = \"/fake/control.sock\"\n",
            dir.path().display()
        );
        let config = Config::parse(Path::new("/test.toml"), &text).unwrap();
        Rig { dir, config, world: Arc::new(World::default()), reads: Arc::new(Reads::default()), data }
    }

    fn daemon(&self) -> Arc<Daemon> {
        let d = Daemon::open_with(self.config.clone(), Arc::new(Fake(self.world.clone()))).unwrap();
        let reads = self.reads.clone();
        let wrap = SourceWrap(Box::new(move |inner| Arc::new(Watched { inner, reads: reads.clone() })));
        d.live_wrap.set(wrap).unwrap();
        d
    }

    fn target(&self) -> PathBuf {
        self.dir.path().join("restore/vda.raw")
    }

    fn map(&self) -> PathBuf {
        livesnap_blk::restore::map_path(&self.target())
    }

    fn request(&self) -> RestoreRequest {
        RestoreRequest {
            vm: VM.into(),
            id: "b1".into(),
            disk: "vda".into(),
            target: PathBuf::from("vda.raw"),
            format: ImageFormat::Raw,
            live: true,
        }
    }

    /// Starts a live restore; its first progress report and the stream.
    async fn start(
        &self,
        d: &Arc<Daemon>,
    ) -> (RestoreProgress, mpsc::Receiver<crate::daemon::Result<RestoreProgress>>) {
        let mut rx = d.restore(self.request()).await.unwrap();
        let first = rx.recv().await.unwrap().unwrap();
        (first, rx)
    }

    /// The backend starts, serving the target.
    fn serve(&self) {
        *lock(&self.world.serving) = Some(self.target());
    }

    /// The next feed the daemon opens.
    async fn feed(&self) -> FeedEnd {
        tokio::time::timeout(WAIT, async {
            loop {
                let opened = self.world.feed_opened.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if let Some(f) = lock(&self.world.feeds).pop() {
                    return f;
                }
                opened.await;
            }
        })
        .await
        .expect("the daemon opens a feed")
    }

    /// What livesnap-blk does with an answer: the bytes into the target, the chunk's bit in the map.
    fn apply(&self, a: &Answer) {
        let off = a.chunk * K64 as u64;
        match &a.body {
            AnswerBody::Data(d) => {
                let f = OpenOptions::new().write(true).open(self.target()).unwrap();
                f.write_all_at(d, off).unwrap();
                f.sync_all().unwrap();
            }
            AnswerBody::Zero => {}
            AnswerBody::Error(e) => panic!("chunk {} answered with an error: {e}", a.chunk),
        }
        let file = OpenOptions::new().read(true).write(true).open(self.map()).unwrap();
        let mut m = Map::open(Arc::new(file)).unwrap();
        m.chunks.set(a.chunk);
        m.persist().unwrap();
        if m.chunks.ones() == m.chunks.len() {
            m.set_complete().unwrap();
        }
    }

    /// The backup's bytes of chunk `c`.
    fn chunk(&self, c: u64) -> &[u8] {
        let start = c as usize * K64;
        &self.data[start..(start + K64).min(self.data.len())]
    }

    fn job(&self, d: &Daemon) -> JobState {
        let mut jobs = d.store.jobs().unwrap();
        jobs.retain(|j| j.kind == JobKind::LiveRestore);
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        jobs.pop().unwrap()
    }

    /// Waits until the job has a result.
    async fn ended(&self, d: &Daemon) -> JobState {
        tokio::time::timeout(WAIT, async {
            loop {
                let j = self.job(d);
                if j.result.is_some() {
                    return j;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the job ends")
    }
}

/// Stops the daemon as livesnapd does at SIGTERM and waits until its jobs' tasks let it go
/// (its database can then be opened again).
async fn shut(d: Arc<Daemon>) {
    d.stop_jobs();
    tokio::time::timeout(WAIT, d.wait_jobs()).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while Arc::strong_count(&d) > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the jobs' tasks end");
}

async fn answer(f: &mut FeedEnd) -> Answer {
    tokio::time::timeout(WAIT, f.answers.recv()).await.expect("an answer comes").expect("the feed is open")
}

async fn want(f: &FeedEnd, chunks: impl IntoIterator<Item = u64>, urgent: bool) {
    let w = Want { chunks: chunks.into_iter().collect(), urgent, complete: false };
    f.wants.send(Ok(w)).await.unwrap();
}

async fn complete(f: &FeedEnd) {
    f.wants.send(Ok(Want { chunks: Vec::new(), urgent: false, complete: true })).await.unwrap();
}

/// Waits until `n` reads have started.
async fn reads_started(r: &Reads, n: usize) -> Vec<u64> {
    tokio::time::timeout(WAIT, async {
        loop {
            let s = lock(&r.started).clone();
            if s.len() >= n {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the reads start")
}

fn set_gate(r: &Reads, closed: bool) {
    *lock(&r.gate) = closed;
    r.released.notify_all();
}

/// Holds the reads until dropped (a failing test too: the runtime waits for its blocking
/// threads when it shuts down).
struct Held(Arc<Reads>);

impl Held {
    fn new(r: &Arc<Reads>) -> Held {
        set_gate(r, true);
        Held(r.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        set_gate(&self.0, false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_restore_feeds_every_chunk_and_removes_the_map_only_once_complete() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (first, mut progress) = rig.start(&d).await;
    let live = first.live.clone().unwrap();
    assert_eq!(live.phase, LivePhase::Waiting);
    assert_eq!((live.chunks_done, live.chunks_total), (0, CHUNKS));
    assert_eq!(live.target, rig.target());
    assert_eq!(std::fs::metadata(rig.target()).unwrap().len(), rig.data.len() as u64, "sized like the disk");
    assert!(rig.map().exists());
    let j = rig.job(&d);
    assert_eq!((j.kind, j.stage, j.result), (JobKind::LiveRestore, Stage::Waiting, None));
    assert!(d.get_job(&j.id).await.unwrap().running);

    rig.serve();
    let mut f = rig.feed().await;
    want(&f, 0..CHUNKS, false).await;
    for _ in 0..CHUNKS {
        let a = answer(&mut f).await;
        match &a.body {
            AnswerBody::Data(bytes) => assert_eq!(bytes.as_slice(), rig.chunk(a.chunk), "chunk {}", a.chunk),
            AnswerBody::Zero => assert!(rig.chunk(a.chunk).iter().all(|b| *b == 0), "chunk {}", a.chunk),
            AnswerBody::Error(e) => panic!("chunk {}: {e}", a.chunk),
        }
        assert_eq!(a.body == AnswerBody::Zero, a.chunk == 2 || a.chunk == 3, "chunk {}", a.chunk);
        rig.apply(&a);
    }
    let read: HashSet<u64> = lock(&rig.reads.started).iter().copied().collect();
    assert_eq!(read, (0..CHUNKS).filter(|c| *c != 2 && *c != 3).collect(), "zero chunks are not read");
    // A progress report comes while feeding, then the end: the map goes only now.
    assert!(rig.map().exists(), "the map stays until the backend says complete");
    complete(&f).await;
    let mut last = None;
    while let Some(p) = tokio::time::timeout(WAIT, progress.recv()).await.unwrap() {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(last.live.as_ref().map(|l| (l.phase, l.chunks_done)), Some((LivePhase::Complete, CHUNKS)));
    let j = rig.ended(&d).await;
    assert_eq!((j.result, j.stage), (Some(JobResult::Ok), Stage::Done), "{}", j.reason);
    assert!(!rig.map().exists(), "the map is removed");
    assert_eq!(std::fs::read(rig.target()).unwrap(), rig.data, "the target holds the backup's disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_said_before_the_map_is_complete_keeps_the_map_and_the_job() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    rig.serve();
    let mut f = rig.feed().await;
    want(&f, [0], false).await;
    let a = answer(&mut f).await;
    rig.apply(&a);
    complete(&f).await;
    // The daemon checks the map, finds it incomplete, and opens the feed again.
    let mut f = rig.feed().await;
    assert!(rig.map().exists(), "an incomplete map is never removed");
    assert_eq!(rig.job(&d).result, None, "the job goes on");
    want(&f, 1..CHUNKS, false).await;
    for _ in 1..CHUNKS {
        let a = answer(&mut f).await;
        rig.apply(&a);
    }
    complete(&f).await;
    assert_eq!(rig.ended(&d).await.result, Some(JobResult::Ok));
    assert!(!rig.map().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_wants_are_read_before_queued_background_ones_and_never_wait_for_a_slot() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    let held = Held::new(&rig.reads);
    rig.serve();
    let mut f = rig.feed().await;
    // Background chunks fill every background slot; the reads are held.
    want(&f, [0, 1, 4, 5, 6, 7, 8, 9], false).await;
    let started = reads_started(&rig.reads, super::FETCHES).await;
    assert_eq!(started.iter().copied().collect::<HashSet<_>>(), HashSet::from([0, 1, 4, 5]));
    // A guest read waits for chunk 10: its read starts at once, before 6..9 that were queued.
    want(&f, [10], true).await;
    let started = reads_started(&rig.reads, super::FETCHES + 1).await;
    assert_eq!(started[super::FETCHES], 10, "{started:?}");
    // A background want for a chunk then wanted urgently jumps the queue too.
    want(&f, [11], false).await;
    want(&f, [9, 11], true).await;
    let started = reads_started(&rig.reads, super::FETCHES + 3).await;
    assert_eq!(
        started[super::FETCHES + 1..].iter().copied().collect::<HashSet<_>>(),
        HashSet::from([9, 11]),
        "{started:?}"
    );
    assert!(!started.contains(&6), "no background read starts while urgent ones are queued: {started:?}");
    drop(held);
    let mut got = HashSet::new();
    while got.len() < 10 {
        let a = answer(&mut f).await;
        assert!(matches!(a.body, AnswerBody::Data(_)), "chunk {}", a.chunk);
        assert!(got.insert(a.chunk), "chunk {} answered twice", a.chunk);
    }
    assert_eq!(got, HashSet::from([0, 1, 4, 5, 6, 7, 8, 9, 10, 11]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_failure_is_answered_as_an_error_then_served_once_it_recovers() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    // The chunk's file gone from the repository: a real read failure.
    let repo = Repository::open(rig.dir.path().join("repo")).unwrap();
    let hash = repo.manifest(VM, "b1", "vda").unwrap().chunks[5].unwrap().to_string();
    let file = rig.dir.path().join("repo/chunks").join(&hash[..2]).join(&hash);
    let aside = rig.dir.path().join("aside");
    std::fs::rename(&file, &aside).unwrap();
    rig.serve();
    let mut f = rig.feed().await;
    want(&f, [5], true).await;
    let a = answer(&mut f).await;
    assert_eq!(a.chunk, 5);
    let AnswerBody::Error(why) = &a.body else { panic!("a failed read answered {:?}", a.body) };
    assert!(why.contains(&hash[..8]) || why.to_lowercase().contains("missing"), "{why}");
    // The job goes on, and serves the chunk once the repository has it again.
    std::fs::rename(&aside, &file).unwrap();
    want(&f, [5], true).await;
    let a = answer(&mut f).await;
    assert_eq!(a.body, AnswerBody::Data(rig.chunk(5).to_vec()));
    // The same through a source that fails and recovers (an object store timing out).
    lock(&rig.reads.failing).insert(6);
    want(&f, [6], false).await;
    assert!(matches!(answer(&mut f).await.body, AnswerBody::Error(e) if e.contains("timed out")));
    lock(&rig.reads.failing).clear();
    want(&f, [6], false).await;
    assert_eq!(answer(&mut f).await.body, AnswerBody::Data(rig.chunk(6).to_vec()));
    // Out of range: an error answer, never a panic.
    want(&f, [CHUNKS + 3], true).await;
    let a = answer(&mut f).await;
    assert!(matches!(&a.body, AnswerBody::Error(e) if e.contains("out of range")), "{a:?}");
    assert_eq!(rig.job(&d).result, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_feed_is_opened_again_and_the_wants_it_lost_are_served() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    rig.serve();
    let mut f = rig.feed().await;
    want(&f, [0], true).await;
    rig.apply(&answer(&mut f).await);
    // The backend is killed: its stream ends with an error.
    f.wants.send(Err(BackendError::Ended { call: crate::daemon::ports::Call::RestoreFeed })).await.unwrap();
    drop(f);
    let mut f = rig.feed().await;
    assert_eq!(rig.job(&d).result, None);
    // Restarted, it wants again what it had not got, and the rest.
    want(&f, 1..CHUNKS, false).await;
    for _ in 1..CHUNKS {
        rig.apply(&answer(&mut f).await);
    }
    // The stream closing before its `complete` (the backend killed once its map was complete):
    // the complete map ends the job all the same.
    drop(f);
    assert_eq!(rig.ended(&d).await.result, Some(JobResult::Ok));
    assert!(!rig.map().exists());
    assert_eq!(std::fs::read(rig.target()).unwrap(), rig.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_restore_is_resumed_by_the_next_daemon() {
    let rig = Rig::new();
    let id = {
        let d = rig.daemon();
        let (first, _progress) = rig.start(&d).await;
        rig.serve();
        let mut f = rig.feed().await;
        want(&f, [0, 1, 2], false).await;
        for _ in 0..3 {
            rig.apply(&answer(&mut f).await);
        }
        let store = d.store.clone();
        shut(d).await;
        let j = store.jobs().unwrap().pop().unwrap();
        assert_eq!(j.result, None, "stopping livesnapd leaves the job to resume");
        drop(store);
        first.live.unwrap().job
    };
    let d = rig.daemon();
    d.recover().await.unwrap();
    let mut f = rig.feed().await;
    let v = d.get_job(&id).await.unwrap();
    assert!(v.running, "the same job runs again");
    want(&f, 3..CHUNKS, false).await;
    for _ in 3..CHUNKS {
        rig.apply(&answer(&mut f).await);
    }
    complete(&f).await;
    let j = rig.ended(&d).await;
    assert_eq!((j.id, j.result), (id, Some(JobResult::Ok)));
    assert_eq!(std::fs::read(rig.target()).unwrap(), rig.data);
    assert!(!rig.map().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_after_the_map_was_removed_ends_ok_and_one_whose_map_vanished_fails() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (first, _progress) = rig.start(&d).await;
    let id = first.live.unwrap().job;
    shut(d).await;
    // livesnapd died between recording the end (stage done) and recording the result.
    let store = crate::daemon::state::Store::open(&rig.config.state).unwrap();
    let mut j = store.job(&id).unwrap().unwrap();
    j.stage = Stage::Done;
    store.put_job(&j).unwrap();
    drop(store);
    std::fs::remove_file(rig.map()).unwrap();
    let d = rig.daemon();
    d.recover().await.unwrap();
    assert_eq!(rig.ended(&d).await.result, Some(JobResult::Ok));
    drop(d);
    // A map removed by hand before the end: the job fails and says so.
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    std::fs::remove_file(rig.map()).unwrap();
    let j = rig.ended(&d).await;
    assert_eq!(j.result, Some(JobResult::Failed));
    assert!(j.reason.contains("gone"), "{}", j.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_feeding_and_leaves_the_target_its_map_and_the_backup_they_need() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (first, mut progress) = rig.start(&d).await;
    let id = first.live.unwrap().job;
    rig.serve();
    let mut f = rig.feed().await;
    want(&f, [0], true).await;
    rig.apply(&answer(&mut f).await);
    d.cancel_job(&id).await.unwrap();
    let j = rig.ended(&d).await;
    assert_eq!(j.result, Some(JobResult::Cancelled));
    assert!(j.reason.contains("left in place"), "{}", j.reason);
    assert!(rig.target().exists() && rig.map().exists());
    assert!(tokio::time::timeout(WAIT, f.answers.recv()).await.unwrap().is_none(), "the feed is closed");
    // The client's stream ends with an error (not "done").
    let mut last = None;
    while let Some(p) = tokio::time::timeout(WAIT, progress.recv()).await.unwrap() {
        last = Some(p);
    }
    assert!(matches!(last, Some(Err(Error::LiveEnded { .. }))), "{last:?}");
    let e = d.cancel_job(&id).await.unwrap_err();
    assert!(matches!(e, Error::NotRunning { .. }), "{e}");
    // Ended, but the target still needs the chunks not in: the backup stays until the target
    // and its map are given up.
    let e = d.delete_backup(VM.into(), "b1".into()).await.unwrap_err();
    assert!(matches!(e, Error::LiveRestoreLeft { .. }), "{e}");
    assert!(e.to_string().contains(&rig.map().display().to_string()), "{e}");
    std::fs::remove_file(rig.map()).unwrap();
    std::fs::remove_file(rig.target()).unwrap();
    d.delete_backup(VM.into(), "b1".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_being_live_restored_is_neither_deleted_nor_pruned() {
    use crate::daemon::retention::{Keep, PruneRequest};
    let rig = Rig::new();
    let d = rig.daemon();
    let (_first, _progress) = rig.start(&d).await;
    let e = d.delete_backup(VM.into(), "b1".into()).await.unwrap_err();
    assert!(matches!(e, Error::LiveRestoring { .. }), "{e}");
    // A newer backup, and a prune that keeps only it.
    let repo = Repository::open(rig.dir.path().join("repo")).unwrap();
    let spec = BackupSpec {
        vm: VM.into(),
        id: "b2".into(),
        consistency: Consistency::Crash,
        freeze_window: None,
        created_unix_us: None,
    };
    let mut w = repo.begin_backup(spec).unwrap();
    w.full("vda", &rig.data.clone()).unwrap();
    w.commit().unwrap();
    let keep = Keep { last: 1, ..Keep::default() };
    let e = d.prune(PruneRequest { vm: VM.into(), keep: Some(keep), dry_run: false }).await.unwrap_err();
    assert!(matches!(e, Error::LiveRestoring { .. }), "{e}");
    assert_eq!(repo.list(Some(VM)).unwrap().len(), 2, "nothing removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_target_or_an_unknown_backup_creates_nothing() {
    let rig = Rig::new();
    let d = rig.daemon();
    std::fs::write(rig.target(), b"mine").unwrap();
    let e = d.restore(rig.request()).await.unwrap_err();
    assert!(matches!(e, Error::Restore(crate::restore::Error::DestinationExists(_))), "{e}");
    assert_eq!(std::fs::read(rig.target()).unwrap(), b"mine");
    assert!(!rig.map().exists());
    let mut r = rig.request();
    r.target = "other.raw".into();
    r.id = "b9".into();
    let e = d.restore(r).await.unwrap_err();
    assert!(matches!(e, Error::Repo(livesnap_repo::Error::BackupNotFound { .. })), "{e}");
    let names: Vec<_> =
        std::fs::read_dir(rig.dir.path().join("restore")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["vda.raw"], "nothing created");
    // A stale map beside a new target: refused, the new target removed again.
    let mut r = rig.request();
    r.target = "stale.raw".into();
    std::fs::write(rig.dir.path().join("restore/stale.raw.restore"), b"old").unwrap();
    let e = d.restore(r).await.unwrap_err();
    assert!(matches!(e, Error::LiveMap { .. }), "{e}");
    assert!(!rig.dir.path().join("restore/stale.raw").exists());
    assert!(d.store.jobs().unwrap().is_empty(), "no job recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_guest_fetches_the_background_copy_keeps_to_one_read() {
    let rig = Rig::new();
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    let held = Held::new(&rig.reads);
    rig.serve();
    let mut f = rig.feed().await;
    // A guest read waits for chunk 10 (its read held), then the background wants four chunks.
    want(&f, [10], true).await;
    assert_eq!(reads_started(&rig.reads, 1).await, [10]);
    want(&f, [0, 1, 4, 5], false).await;
    // Another guest read: by the time its read starts, the feeder has taken the background
    // want and started every background read it allows.
    want(&f, [11], true).await;
    let started = reads_started(&rig.reads, 3).await;
    assert!(started.contains(&11), "{started:?}");
    let background: Vec<u64> = started.iter().copied().filter(|c| ![10, 11].contains(c)).collect();
    assert_eq!(background.len(), super::FETCHES_BESIDE_GUEST, "background reads beside the guest's: {started:?}");
    drop(held);
    let mut got = HashSet::new();
    while got.len() < 6 {
        got.insert(answer(&mut f).await.chunk);
    }
    assert_eq!(got, HashSet::from([0, 1, 4, 5, 10, 11]));
    shut(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_bytes_per_sec_holds_the_background_copy_but_never_a_guest_read() {
    // One byte a second: after the first reads, the next background read is due in hours.
    let rig = Rig::with_defaults("restore_bytes_per_sec = 1");
    let d = rig.daemon();
    let (_, _progress) = rig.start(&d).await;
    rig.serve();
    let mut f = rig.feed().await;
    want(&f, [0, 1, 4, 5, 6, 7, 8], false).await;
    let mut got = HashSet::new();
    while got.len() < super::FETCHES {
        got.insert(answer(&mut f).await.chunk);
    }
    assert_eq!(got, HashSet::from([0, 1, 4, 5]), "the first background reads go at once");
    // A guest read waits for chunk 9: read at once, pace or not.
    want(&f, [9], true).await;
    let a = answer(&mut f).await;
    assert_eq!(a.chunk, 9);
    assert!(matches!(a.body, AnswerBody::Data(_)));
    // The feeder went round its loop after each answer: no background read was started.
    let started = lock(&rig.reads.started).clone();
    assert_eq!(started.len(), super::FETCHES + 1, "background reads started past their pace: {started:?}");
    shut(d).await;
}
