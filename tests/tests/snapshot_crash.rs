//! livesnap-blk's snapshot engine against the real process, killed with SIGKILL under write load.
//!
//! The test VMM writes from 2 queues with several requests in flight; every 4 KiB block it
//! writes carries its block number and a version (the write's id), repeated over the block with
//! a check word, so that a block read back names the write it came from and garbage or a torn
//! write is seen; some writes are WRITE_ZEROES (holes in the delta), known by version. A model of what was acknowledged and what the last completed FLUSH made
//! durable says which versions each block may hold after a kill: the one the last completed
//! FLUSH covered, or any written after it. The test thread cuts snapshots, starts merges,
//! checkpoints and kills the process at random moments; the base image is read straight from
//! the host while a snapshot is active and after every merge.
//!
//! Every test prints its seed; `LIVESNAP_SEED=N` replays its script (the interleaving of the
//! queues with the kills still depends on timing).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fastrand::Rng;
use livesnap_proto::error::chain;
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::blk::{self, BlkQueue, Completion, Request};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::programs;
use tonic::transport::{Channel, Endpoint};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const DISK: u64 = 64 * MIB;
const BLOCKS: usize = (DISK / BLOCK as u64) as usize;
const SECTORS_PER_BLOCK: u64 = BLOCK as u64 / 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const WAIT: Duration = Duration::from_secs(30);
/// Longest a merge may take before the test gives up waiting (a hang guard, not a measurement).
const MERGE_WAIT: Duration = Duration::from_secs(120);
/// Requests each queue keeps in flight.
const DEPTH: usize = 8;
const DISK_ID: &str = "vda";

// ---------------------------------------------------------------------------------------------
// Random numbers and the seed.

/// Whether an event of one chance in `n` happens.
fn one_in(rng: &mut Rng, n: u64) -> bool {
    rng.u64(..n) == 0
}

/// Sleeps from `lo` to `hi` milliseconds, both included.
fn sleep_ms(rng: &mut Rng, lo: u64, hi: u64) {
    std::thread::sleep(Duration::from_millis(rng.u64(lo..=hi)));
}

/// The test's seed: `LIVESNAP_SEED`, else the clock; printed so that a failure can be replayed.
fn seed(test: &str) -> Rng {
    let seed = std::env::var("LIVESNAP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("{test}: seed {seed} (replay with LIVESNAP_SEED={seed})");
    Rng::with_seed(seed)
}

// ---------------------------------------------------------------------------------------------
// Block contents: (block, version) stamped all over the block.

const MAGIC: &[u8; 8] = b"LSCRASH1";
const UNIT: usize = 32;

fn check_word(block: u64, version: u64) -> u64 {
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.rotate_left(29) ^ 0x5bd1_e995;
    x ^= x >> 31;
    x.wrapping_mul(0xff51_afd7_ed55_8ccd)
}

fn unit(block: u64, version: u64) -> [u8; UNIT] {
    let mut u = [0u8; UNIT];
    u[..8].copy_from_slice(MAGIC);
    u[8..16].copy_from_slice(&block.to_le_bytes());
    u[16..24].copy_from_slice(&version.to_le_bytes());
    u[24..].copy_from_slice(&check_word(block, version).to_le_bytes());
    u
}

/// `n` blocks from `start`, each stamped with its block number and `version`.
fn stamped(start: usize, n: usize, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * BLOCK);
    for b in start..start + n {
        let u = unit(b as u64, version);
        for _ in 0..BLOCK / UNIT {
            out.extend_from_slice(&u);
        }
    }
    out
}

/// The (block, version) a block holds, if it is a whole, untorn stamped block.
fn parse(block: &[u8]) -> Option<(usize, u64)> {
    let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap());
    if &block[..8] != MAGIC {
        return None;
    }
    let (b, v) = (word(8), word(16));
    if word(24) != check_word(b, v) {
        return None;
    }
    let u = unit(b, v);
    block.chunks_exact(UNIT).all(|c| c == u).then_some((b as usize, v))
}

/// Checks every block of `data` (the whole disk) against `allowed(block) = (oldest, newest)`
/// version; returns the version each block holds. A block of zeroes is the newest WRITE_ZEROES
/// of `zeroes[block]` in the range, if there is one. Panics listing the first wrong blocks.
fn verify(what: &str, data: &[u8], zeroes: &[Vec<u64>], allowed: impl Fn(usize) -> (u64, u64)) -> Vec<u64> {
    assert_eq!(data.len() as u64, DISK, "{what}: short read");
    let mut versions = vec![0; BLOCKS];
    let mut bad = Vec::new();
    for (b, blk) in data.chunks_exact(BLOCK).enumerate() {
        let (lo, hi) = allowed(b);
        match parse(blk) {
            None if blk.iter().all(|&x| x == 0) => match zeroes[b].iter().rev().find(|&&z| lo <= z && z <= hi) {
                Some(&z) => versions[b] = z,
                None => {
                    bad.push(format!("block {b}: zeroes, but no WRITE_ZEROES of it between versions {lo} and {hi}"))
                }
            },
            None => bad.push(format!("block {b}: garbage or torn (starts {:02x?})", &blk[..24])),
            Some((other, v)) if other != b => bad.push(format!("block {b}: holds block {other}'s data (version {v})")),
            Some((_, v)) if v < lo => bad.push(format!("block {b}: version {v}, older than {lo}, the oldest allowed")),
            Some((_, v)) if v > hi => bad.push(format!("block {b}: version {v}, newer than {hi}, the newest written")),
            Some((_, v)) => versions[b] = v,
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {BLOCKS} blocks wrong, e.g. {}",
        bad.len(),
        bad[..bad.len().min(8)].join("; ")
    );
    versions
}

// ---------------------------------------------------------------------------------------------
// The model of the disk, shared by the two queue threads and the test thread.

/// Per block, versions are write ids, increasing in submission order. Two writes to one block
/// are never in flight at once, so a block's writes are ordered.
#[derive(Debug)]
struct Model {
    /// The last acknowledged version.
    acked: Vec<u64>,
    /// The version the last completed FLUSH made durable (acknowledged before it was sent).
    floor: Vec<u64>,
    /// The last version submitted, acknowledged or not.
    submitted: Vec<u64>,
    busy: Vec<bool>,
    /// The versions of each block that were WRITE_ZEROES, oldest first.
    zeroes: Vec<Vec<u64>>,
    next_version: u64,
    writes_acked: u64,
    flushes_done: u64,
}

impl Model {
    /// A fresh disk: every block holds version 0.
    fn new() -> Model {
        let v = vec![0; BLOCKS];
        Model {
            acked: v.clone(),
            floor: v.clone(),
            submitted: v,
            busy: vec![false; BLOCKS],
            zeroes: vec![Vec::new(); BLOCKS],
            next_version: 1,
            writes_acked: 0,
            flushes_done: 0,
        }
    }

    /// After a restart: the disk holds `versions`, durable (a kill keeps what the backend's files
    /// hold), nothing in flight.
    fn restart(&mut self, versions: Vec<u64>) {
        self.acked.clone_from(&versions);
        self.floor.clone_from(&versions);
        self.submitted = versions;
        self.busy.fill(false);
        self.writes_acked = 0;
        self.flushes_done = 0;
    }

    /// Picks a range of `n` blocks with no write in flight and gives it the next version.
    fn reserve(&mut self, rng: &mut Rng, n: usize, zero: bool) -> Option<(usize, u64)> {
        for _ in 0..8 {
            let start = rng.u64(..(BLOCKS - n + 1) as u64) as usize;
            if self.busy[start..start + n].iter().any(|&b| b) {
                continue;
            }
            let v = self.next_version;
            self.next_version += 1;
            for b in start..start + n {
                self.busy[b] = true;
                self.submitted[b] = v;
                if zero {
                    self.zeroes[b].push(v);
                }
            }
            return Some((start, v));
        }
        None
    }

    fn in_flight(&self) -> usize {
        self.busy.iter().filter(|&&b| b).count()
    }
}

/// What the base image must hold while a snapshot is active: per block, the oldest and newest
/// version it may hold. A block with no write in flight across the cut has exactly one.
#[derive(Clone, Debug)]
struct CutWindow {
    lo: Vec<u64>,
    hi: Vec<u64>,
}

impl CutWindow {
    fn exact_blocks(&self) -> usize {
        self.lo.iter().zip(&self.hi).filter(|(l, h)| l == h).count()
    }
}

/// A write load on both queues until `stop` (or until `budget` bytes were submitted and every
/// request completed).
#[derive(Debug)]
struct Load {
    model: Mutex<Model>,
    stop: AtomicBool,
    budget: Option<u64>,
    submitted_bytes: AtomicU64,
    flush_one_in: u64,
}

impl Load {
    fn new(model: Model, budget: Option<u64>) -> Load {
        Load {
            model: Mutex::new(model),
            stop: AtomicBool::new(false),
            budget,
            submitted_bytes: AtomicU64::new(0),
            flush_one_in: 16,
        }
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }

    fn into_model(self) -> Model {
        self.model.into_inner().unwrap()
    }
}

#[derive(Debug)]
enum Pending {
    /// A WRITE, or a WRITE_ZEROES (with or without unmap).
    Write { start: usize, n: usize, version: u64 },
    /// A FLUSH, with the versions acknowledged when it was sent: what it makes durable.
    Flush(Vec<u64>),
}

/// Blocks per write: mostly 4 KiB, some up to 64 KiB, some up to 1 MiB.
fn write_len(rng: &mut Rng) -> usize {
    match rng.u64(..20) {
        0..=11 => 1,
        12..=16 => 2 + rng.u64(..15) as usize,
        _ => 17 + rng.u64(..240) as usize,
    }
}

/// One queue's share of the load.
fn drive(q: &mut BlkQueue, load: &Load, mut rng: Rng) {
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut done: Vec<Completion> = Vec::new();
    while !load.stop.load(Ordering::SeqCst) {
        let budget_left = load.budget.is_none_or(|b| load.submitted_bytes.load(Ordering::SeqCst) < b);
        if !budget_left && pending.is_empty() {
            return;
        }
        let mut submitted = false;
        while budget_left && pending.len() < DEPTH && q.free_slots() > 0 {
            if one_in(&mut rng, load.flush_one_in) {
                let durable = load.model().acked.clone();
                let tag = q.submit(&Request::Flush).unwrap();
                pending.insert(tag, Pending::Flush(durable));
            } else {
                let n = write_len(&mut rng);
                let zero = one_in(&mut rng, 12);
                let Some((start, version)) = load.model().reserve(&mut rng, n, zero) else { break };
                let sector = start as u64 * SECTORS_PER_BLOCK;
                let tag = if zero {
                    let num_sectors = (n as u64 * SECTORS_PER_BLOCK) as u32;
                    q.submit(&Request::WriteZeroes { sector, num_sectors, unmap: one_in(&mut rng, 2) }).unwrap()
                } else {
                    q.submit(&Request::Write { sector, data: &stamped(start, n, version) }).unwrap()
                };
                load.submitted_bytes.fetch_add((n * BLOCK) as u64, Ordering::SeqCst);
                pending.insert(tag, Pending::Write { start, n, version });
            }
            submitted = true;
        }
        if submitted {
            q.kick().unwrap();
        }
        done.clear();
        match q.reap(Some(Duration::from_millis(20)), &mut done) {
            Ok(_) | Err(blk::Error::Timeout(_)) => {}
            Err(e) => panic!("queue failed: {}", chain(&e)),
        }
        for c in &done {
            let p = pending.remove(&c.tag).unwrap();
            assert_eq!(c.status, OK, "{p:?} failed with status {}", c.status);
            let mut m = load.model();
            match p {
                Pending::Write { start, n, version } => {
                    for b in start..start + n {
                        m.acked[b] = version;
                        m.busy[b] = false;
                    }
                    m.writes_acked += 1;
                }
                Pending::Flush(durable) => {
                    for (f, d) in m.floor.iter_mut().zip(durable) {
                        *f = (*f).max(d);
                    }
                    m.flushes_done += 1;
                }
            }
        }
    }
}

/// Runs the load on `queues` while `script` runs on this thread; `script` must stop the load
/// (set `stop`) unless the load has a budget. Returns the queues, the model and what the
/// script returned.
fn with_load<T>(
    queues: Vec<BlkQueue>,
    load: Load,
    rng: &mut Rng,
    script: impl FnOnce(&Load) -> T,
) -> (Vec<BlkQueue>, Model, T) {
    let seeds: Vec<Rng> = queues.iter().map(|_| rng.fork()).collect();
    let (queues, out) = std::thread::scope(|s| {
        let load = &load;
        let handles: Vec<_> = queues
            .into_iter()
            .zip(seeds)
            .map(|(mut q, r)| {
                s.spawn(move || {
                    drive(&mut q, load, r);
                    q
                })
            })
            .collect();
        // Joining a panicked queue thread panics here; stop the others first.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| script(load)));
        // A load with a budget runs it out; any other stops with the script.
        if out.is_err() || load.budget.is_none() {
            load.stop.store(true, Ordering::SeqCst);
        }
        let queues: Vec<BlkQueue> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (queues, out)
    });
    match out {
        Ok(out) => (queues, load.into_model(), out),
        Err(p) => std::panic::resume_unwind(p),
    }
}

// ---------------------------------------------------------------------------------------------
// The backend, its disk and its control service.

/// A directory kept (and named) when the test fails, removed otherwise.
struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    fn new() -> Workdir {
        Workdir(Some(tempfile::Builder::new().prefix("livesnap-crash").tempdir().unwrap()))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.0.take() {
                eprintln!("kept {} (the backend's log is livesnap-blk.log)", d.keep().display());
            }
        }
    }
}

/// A tmpfs mounted on a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs (the test needs root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A VM of one 64 MiB raw disk served by livesnap-blk with snapshots, restartable with the same
/// arguments.
struct Rig {
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    // Dropped last: the tmpfs (if any) before the directory it is mounted in.
    _tmpfs: Option<Tmpfs>,
    _work: Workdir,
}

impl Rig {
    /// A fresh disk whose every block holds version 0.
    fn new(extra: &[&str], tmpfs: Option<&str>) -> Rig {
        let work = Workdir::new();
        let dir = work.path().to_owned();
        let image = dir.join("disk.raw");
        let mut f = File::create(&image).unwrap();
        for chunk in 0..DISK / MIB {
            let per = (MIB as usize) / BLOCK;
            std::io::Write::write_all(&mut f, &stamped(chunk as usize * per, per, 0)).unwrap();
        }
        drop(f);
        let (socket, control, state, log) =
            (dir.join("vda.sock"), dir.join("control.sock"), dir.join("state"), dir.join("livesnap-blk.log"));
        let tmpfs = tmpfs.map(|size| Tmpfs::mount(&state, size));
        let mut args: Vec<String> = vec![
            "--vm".into(),
            "crash-test".into(),
            "--queues".into(),
            "2".into(),
            "--disk".into(),
            format!("id={DISK_ID},image={},socket={},format=raw", image.display(), socket.display()),
            "--state-dir".into(),
            state.display().to_string(),
            "--control".into(),
            control.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Rig { image, socket, control, log, args, _tmpfs: tmpfs, _work: work }
    }

    /// Starts the backend (its log appended to `livesnap-blk.log`), connects the test VMM with 2
    /// queues and the control client.
    fn start(&self) -> (Daemon, Frontend, Vec<BlkQueue>, Ctl) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(&self.args).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
        let daemon = Daemon::spawn("livesnap-blk", cmd, &[&self.socket, &self.control]).unwrap();
        let mut f =
            Frontend::connect(&self.socket, &Options { queues: 2, timeout: WAIT, ..Options::default() }).unwrap();
        let qs = f.take_queues().into_iter().map(|v| BlkQueue::new(v, 16, MIB as u32).unwrap()).collect();
        let ctl = Ctl::connect(&self.control);
        (daemon, f, qs, ctl)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn read_base(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// The whole disk as the guest reads it.
fn read_disk(q: &mut BlkQueue) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK as usize);
    for i in 0..DISK / MIB {
        out.extend(q.read(i * MIB / 512, MIB as u32).unwrap());
    }
    out
}

fn kill9(daemon: Daemon) {
    let status = daemon.stop(libc::SIGKILL, WAIT).unwrap();
    assert!(!status.success(), "livesnap-blk exited by itself: {status}");
}

fn sigterm(daemon: Daemon) {
    let status = daemon.stop(libc::SIGTERM, WAIT).unwrap();
    assert!(status.success(), "livesnap-blk exited with {status} after SIGTERM");
}

/// The snapshot control client, on its own runtime.
struct Ctl {
    rt: tokio::runtime::Runtime,
    client: SnapshotControlClient<Channel>,
}

fn within<F: std::future::Future>(rt: &tokio::runtime::Runtime, what: &str, f: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(WAIT, f).await })
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

impl Ctl {
    fn connect(path: &Path) -> Ctl {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let path = path.to_owned();
        let channel =
            within(&rt, "connect", livesnap_proto::unix_channel(Endpoint::from_static("http://x.invalid"), path))
                .unwrap();
        Ctl { rt, client: SnapshotControlClient::new(channel) }
    }

    fn begin(&mut self) -> pb::Snapshot {
        let mut c = self.client.clone();
        within(&self.rt, "Begin", c.begin(pb::BeginRequest::default())).unwrap().into_inner().snapshot.unwrap()
    }

    /// Sends Begin without waiting for the reply.
    fn begin_async(&self) -> tokio::task::JoinHandle<Result<tonic::Response<pb::BeginReply>, tonic::Status>> {
        let mut c = self.client.clone();
        self.rt.spawn(async move { c.begin(pb::BeginRequest::default()).await })
    }

    fn status(&mut self) -> pb::VmStatus {
        let mut c = self.client.clone();
        within(&self.rt, "Status", c.status(pb::StatusRequest {})).unwrap().into_inner()
    }

    /// Starts the merge: returns once the backend accepted it (the merge's stream opened).
    fn merge(&mut self, id: u64) {
        let mut c = self.client.clone();
        drop(within(&self.rt, "Merge", c.merge(pb::MergeRequest { snapshot_id: id })).unwrap());
    }

    /// Sends Merge without waiting for the reply.
    fn merge_async(&self, id: u64) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
        let mut c = self.client.clone();
        self.rt.spawn(async move { c.merge(pb::MergeRequest { snapshot_id: id }).await.map(drop) })
    }

    fn checkpoint(&mut self, id: u64) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        within(&self.rt, "Checkpoint", c.checkpoint(pb::CheckpointRequest { snapshot_id: id })).map(drop)
    }

    /// The first page's header and the extents of every page, `(offset, length)`.
    fn changes(&mut self, disk: &str) -> (pb::ChangesPage, Vec<(u64, u64)>) {
        let mut c = self.client.clone();
        let disk = disk.to_owned();
        within(&self.rt, "Changes", async move {
            let mut stream = c.changes(pb::ChangesRequest { disk }).await.unwrap().into_inner();
            let mut first: Option<pb::ChangesPage> = None;
            let mut extents = Vec::new();
            while let Some(page) = stream.message().await.unwrap() {
                extents.extend(page.extents.iter().map(|e| (e.offset, e.length)));
                first.get_or_insert(pb::ChangesPage { extents: Vec::new(), ..page });
            }
            (first.unwrap(), extents)
        })
    }

    /// Polls Status until no snapshot is left; returns every disk state seen meanwhile.
    fn wait_merged(&mut self) -> Vec<pb::DiskState> {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let st = self.status();
            if st.snapshot.is_none() {
                assert!(st.disks.iter().all(|d| phase(d) == pb::Phase::Direct), "no snapshot, yet {:?}", st.disks);
                return seen;
            }
            seen.extend(st.disks);
            assert!(
                start.elapsed() < MERGE_WAIT,
                "the merge did not complete within {MERGE_WAIT:?}: {:?}",
                seen.last()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn phase(d: &pb::DiskState) -> pb::Phase {
    pb::Phase::try_from(d.phase).unwrap_or(pb::Phase::Unspecified)
}

fn disk_state(st: &pb::VmStatus) -> &pb::DiskState {
    st.disks.iter().find(|d| d.id == DISK_ID).unwrap()
}

/// Ends a run: merges what is left (calling Merge if the snapshot is still active), checks the
/// guest still reads `expect`, stops the backend with SIGTERM and checks the base image file
/// holds exactly `expect`.
fn finish(rig: &Rig, ctl: &mut Ctl, q: &mut BlkQueue, daemon: Daemon, model: &Model, what: &str) {
    let st = ctl.status();
    if let Some(s) = &st.snapshot {
        if phase(disk_state(&st)) == pb::Phase::Active {
            ctl.merge(s.id);
        }
    }
    ctl.wait_merged();
    assert_eq!(model.in_flight(), 0, "{what}");
    let exact = |b: usize| (model.acked[b], model.acked[b]);
    verify(&format!("{what}: the disk after the merge"), &read_disk(q), &model.zeroes, exact);
    sigterm(daemon);
    verify(&format!("{what}: the base image after the merge and SIGTERM"), &rig.read_base(), &model.zeroes, exact);
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 under write load, before the cut, with a snapshot active, mid-merge.

/// Where a kill struck, and so what the backend must find at restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kill {
    /// No snapshot: it must restart direct.
    BeforeCut,
    /// Begin sent, its reply perhaps not: direct or active.
    DuringCut,
    /// Begin answered, no merge asked: active.
    Active,
    /// Merge sent, its reply perhaps not: active, merging or done.
    DuringMergeCall,
    /// Merge accepted (or resumed after a restart): merging or done.
    Merging,
}

impl Kill {
    fn allows(self, p: pb::Phase) -> bool {
        use pb::Phase::*;
        match self {
            Kill::BeforeCut => p == Direct,
            Kill::DuringCut => matches!(p, Direct | Active),
            Kill::Active => p == Active,
            Kill::DuringMergeCall => matches!(p, Direct | Active | Merging),
            Kill::Merging => matches!(p, Direct | Merging),
        }
    }
}

/// What the test thread does while the load runs, from `phase` on, until it kills the backend
/// as `target` says, at a random moment.
#[allow(clippy::too_many_arguments)]
fn crash_script(
    rng: &mut Rng,
    load: &Load,
    ctl: &mut Ctl,
    daemon: Daemon,
    mut phase: pb::Phase,
    target: Kill,
    cut: &mut Option<CutWindow>,
    rig: &Rig,
    what: &str,
) -> Kill {
    let mut snapshot = ctl.status().snapshot.map(|s| s.id);
    sleep_ms(rng, 30, 200);
    loop {
        match phase {
            pb::Phase::Direct => {
                if target == Kill::BeforeCut {
                    kill9(daemon);
                    return Kill::BeforeCut;
                }
                let lo = load.model().acked.clone();
                if target == Kill::DuringCut {
                    let h = ctl.begin_async();
                    std::thread::sleep(call_delay(rng));
                    kill9(daemon);
                    let hi = load.model().submitted.clone();
                    *cut = Some(CutWindow { lo, hi });
                    let _ = ctl.rt.block_on(h);
                    return Kill::DuringCut;
                }
                let s = ctl.begin();
                let hi = load.model().submitted.clone();
                snapshot = Some(s.id);
                *cut = Some(CutWindow { lo, hi });
                phase = pb::Phase::Active;
                // Long enough for the delta to grow to many MiB.
                sleep_ms(rng, 100, 500);
            }
            pb::Phase::Active => {
                if one_in(rng, 2) {
                    // The base is frozen: read straight from the host under load, it is the disk at the cut.
                    let w = cut.as_ref().unwrap();
                    let zeroes = load.model().zeroes.clone();
                    verify(
                        &format!("{what}: the base image read under load while the snapshot is active"),
                        &rig.read_base(),
                        &zeroes,
                        |b| (w.lo[b], w.hi[b]),
                    );
                }
                let id = snapshot.unwrap();
                match target {
                    Kill::Active => {
                        kill9(daemon);
                        return Kill::Active;
                    }
                    Kill::DuringMergeCall => {
                        let h = ctl.merge_async(id);
                        std::thread::sleep(call_delay(rng));
                        kill9(daemon);
                        let _ = ctl.rt.block_on(h);
                        return Kill::DuringMergeCall;
                    }
                    _ => {
                        ctl.merge(id);
                        phase = pb::Phase::Merging;
                    }
                }
            }
            _ => {
                // Often right after the Merge call, while the delta is still large.
                if one_in(rng, 2) {
                    sleep_ms(rng, 0, 40);
                }
                kill9(daemon);
                return Kill::Merging;
            }
        }
    }
}

/// How long after sending a call to kill: a Begin or a Merge syncs files (the delta, the
/// base) and takes from under a millisecond to tens of them, so spread the kill over that.
fn call_delay(rng: &mut Rng) -> Duration {
    if one_in(rng, 2) {
        Duration::from_micros(rng.u64(..5000))
    } else {
        Duration::from_millis(5 + rng.u64(..80))
    }
}

const ALL_KILLS: [Kill; 5] = [Kill::BeforeCut, Kill::DuringCut, Kill::Active, Kill::DuringMergeCall, Kill::Merging];

#[test]
fn kill_before_the_cut_while_active_and_mid_merge_keeps_every_flushed_write() {
    const KILLS: usize = 30;
    let mut rng = seed("kill_before_the_cut_while_active_and_mid_merge_keeps_every_flushed_write");
    let rig = Rig::new(&[], None);
    let mut model = Model::new();
    let mut kills: HashMap<Kill, usize> = HashMap::new();
    let mut restarted_in: HashMap<(Kill, pb::Phase), usize> = HashMap::new();
    let (mut total_kills, mut iteration, mut exact_cut_blocks, mut acked, mut flushes) = (0, 0, 0usize, 0, 0);
    while total_kills < KILLS {
        iteration += 1;
        let (mut daemon, mut f, mut qs, mut ctl) = rig.start();
        let st = ctl.status();
        assert!(st.snapshot.is_none(), "iteration {iteration}: a snapshot is left from a clean stop: {st:?}");
        let mut phase = pb::Phase::Direct;
        let mut cut: Option<CutWindow> = None;
        for round in 0.. {
            let what = format!("iteration {iteration} round {round}");
            let load = Load::new(model, None);
            let mut script_rng = rng.fork();
            // Every kind of kill in turn for a run's first kill; then what the phase allows.
            let target = match phase {
                pb::Phase::Direct => ALL_KILLS[(iteration - 1) % ALL_KILLS.len()],
                pb::Phase::Active => ALL_KILLS[2 + rng.u64(..3) as usize],
                _ => Kill::Merging,
            };
            let (back, m, kill) = with_load(qs, load, &mut rng, |load| {
                crash_script(&mut script_rng, load, &mut ctl, daemon, phase, target, &mut cut, &rig, &what)
            });
            model = m;
            drop(back);
            drop(f);
            total_kills += 1;
            *kills.entry(kill).or_default() += 1;
            acked += model.writes_acked;
            flushes += model.flushes_done;
            eprintln!(
                "{what}: killed ({kill:?}) with {} blocks in flight, {} writes and {} flushes acknowledged",
                model.in_flight(),
                model.writes_acked,
                model.flushes_done
            );

            (daemon, f, qs, ctl) = rig.start();
            let st = ctl.status();
            phase = phase_of(&st);
            *restarted_in.entry((kill, phase)).or_default() += 1;
            assert!(kill.allows(phase), "{what}: killed {kill:?}, restarted {phase:?}: {st:?}");
            let after = format!("{what}: the disk after kill -9 ({kill:?}) and restart in {phase:?}");
            let found = verify(&after, &read_disk(&mut qs[0]), &model.zeroes, |b| (model.floor[b], model.submitted[b]));
            model.restart(found);
            match phase {
                pb::Phase::Active => {
                    let w = cut.as_ref().unwrap();
                    exact_cut_blocks += w.exact_blocks();
                    verify(
                        &format!("{what}: the base image after kill -9 with the snapshot active"),
                        &rig.read_base(),
                        &model.zeroes,
                        |b| (w.lo[b], w.hi[b]),
                    );
                    assert!(disk_state(&st).abandoned.is_empty(), "{what}: {st:?}");
                }
                pb::Phase::Merging => assert!(disk_state(&st).abandoned.is_empty(), "{what}: {st:?}"),
                _ => cut = None,
            }
            // A snapshot that survived the kill may take another one before it is merged.
            if phase == pb::Phase::Direct || round >= 2 || one_in(&mut rng, 2) || total_kills >= KILLS {
                break;
            }
        }
        finish(&rig, &mut ctl, &mut qs[0], daemon, &model, &format!("iteration {iteration}"));
        drop(qs);
        drop(f);
    }
    eprintln!(
        "{total_kills} kills in {iteration} runs: {kills:?}; restarted in {restarted_in:?}; {acked} writes and {flushes} flushes \
         acknowledged; {exact_cut_blocks} block checks of a frozen base with exactly one allowed version"
    );
}

fn phase_of(st: &pb::VmStatus) -> pb::Phase {
    let p = phase(disk_state(st));
    assert_eq!(st.snapshot.is_some(), p != pb::Phase::Direct, "{st:?}");
    p
}

// ---------------------------------------------------------------------------------------------
// 2. Changed-block tracking across kill -9.

#[test]
fn changes_after_kill_cover_every_acknowledged_write_since_the_checkpoint() {
    const RUNS: usize = 8;
    let mut rng = seed("changes_after_kill_cover_every_acknowledged_write_since_the_checkpoint");
    let rig = Rig::new(&[], None);
    let mut model = Model::new();
    for run in 0..RUNS {
        let what = format!("run {run}");
        let (daemon, f, qs, mut ctl) = rig.start();
        let load = Load::new(model, None);
        let mut script_rng = rng.fork();
        let (back, m, (id, first_after_cut)) = with_load(qs, load, &mut rng, |load| {
            let r = &mut script_rng;
            sleep_ms(r, 20, 150);
            let s = ctl.begin();
            // Every version from here on was sent after the cut: its blocks are in the new map.
            let first_after_cut = load.model().next_version;
            ctl.checkpoint(s.id).unwrap();
            let (page, _) = ctl.changes(DISK_ID);
            assert_eq!(page.since_checkpoint, Some(s.id), "{what}: {page:?}");
            assert!(
                page.trusted,
                "{what}: the map of a generation begun by a cut is untrusted: {}",
                page.untrusted_reason
            );
            sleep_ms(r, 100, 400);
            if one_in(r, 2) {
                ctl.merge(s.id);
                sleep_ms(r, 0, 100);
            }
            kill9(daemon);
            (s.id, first_after_cut)
        });
        model = m;
        drop(back);
        drop(f);

        let (daemon, f, mut qs, mut ctl) = rig.start();
        let (page, extents) = ctl.changes(DISK_ID);
        assert_eq!(page.since_checkpoint, Some(id), "{what}: {page:?}");
        assert_eq!(page.until_snapshot, None, "{what}: {page:?}");
        assert!(
            page.trusted,
            "{what}: after a plain kill -9 in the same boot the change map is untrusted ({:?}); the design says a kill never \
             leaves a write untracked",
            page.untrusted_reason
        );
        assert!(page.granularity > 0 && page.granularity % BLOCK as u64 == 0, "{page:?}");
        let covered = |b: usize| {
            let (s, e) = (b as u64 * BLOCK as u64, (b as u64 + 1) * BLOCK as u64);
            let i = extents.partition_point(|&(o, l)| o + l <= s);
            extents.get(i).is_some_and(|&(o, l)| o <= s && e <= o + l)
        };
        let must: Vec<usize> = (0..BLOCKS).filter(|&b| model.acked[b] >= first_after_cut).collect();
        let missed: Vec<usize> = must.iter().copied().filter(|&b| !covered(b)).collect();
        assert!(
            missed.is_empty(),
            "{what}: {} of the {} blocks written and acknowledged since checkpoint {id} are not in the changes, e.g. {:?}; \
             extents {:?}",
            missed.len(),
            must.len(),
            &missed[..missed.len().min(8)],
            &extents[..extents.len().min(8)]
        );
        let changed: u64 = extents.iter().map(|e| e.1).sum();
        assert_eq!(changed, page.changed_bytes, "{what}");
        eprintln!(
            "{what}: killed with {} blocks in flight; the changes since checkpoint {id} cover all {} blocks acknowledged since the \
             cut ({changed} bytes changed)",
            model.in_flight(),
            must.len()
        );
        let found = verify(
            &format!("{what}: the disk after kill -9 and restart"),
            &read_disk(&mut qs[0]),
            &model.zeroes,
            |b| (model.floor[b], model.submitted[b]),
        );
        model.restart(found);
        finish(&rig, &mut ctl, &mut qs[0], daemon, &model, &what);
        drop(qs);
        drop(f);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A full delta: --delta-limit, and a state directory that runs out of space.

/// Cuts a snapshot, writes `bytes` under load (each write must succeed), and checks that the
/// snapshot was abandoned, never failing a write, for `reason`; then that the merge leaves
/// everything in the base.
fn overflow_keeps_every_write(rig: &Rig, test: &str, bytes: u64, reason: &str) {
    let mut rng = seed(test);
    let (daemon, f, qs, mut ctl) = rig.start();
    let s = ctl.begin();
    let load = Load::new(Model::new(), Some(bytes));
    let (mut qs, model, ()) = with_load(qs, load, &mut rng, |_| ());
    // Every write completed with OK (`drive` asserts it) and none is in flight.
    assert_eq!(model.in_flight(), 0);
    let in_delta_at_most = model.acked.iter().filter(|&&v| v > 0).count() as u64 * BLOCK as u64;
    assert!(in_delta_at_most > 2 * MIB, "{test}: only {in_delta_at_most} bytes written");
    let exact = |b: usize| (model.acked[b], model.acked[b]);
    verify(&format!("{test}: the disk read back after the overflow"), &read_disk(&mut qs[0]), &model.zeroes, exact);

    let check = |d: &pb::DiskState| {
        if d.snapshot == Some(s.id) {
            assert_eq!(phase(d), pb::Phase::Merging, "{test}: after {bytes} bytes written the snapshot is still {d:?}");
            assert!(d.abandoned.contains(reason), "{test}: abandoned for {:?}, expected {reason:?}", d.abandoned);
        }
    };
    let mut seen = ctl.status().disks;
    seen.iter().for_each(check);
    seen.extend(ctl.wait_merged());
    seen.iter().for_each(check);
    let log = rig.log_text();
    assert!(
        log.lines().any(|l| l.contains("snapshot abandoned") && l.contains(reason)),
        "{test}: the backend did not report the abandon for {reason:?}:\n{log}"
    );
    eprintln!(
        "{test}: {} writes acknowledged, all OK; Status showed the abandoned snapshot {} times before its merge completed",
        model.writes_acked,
        seen.iter().filter(|d| d.snapshot == Some(s.id)).count()
    );
    // The state directory still works: the next snapshot is cut and merged.
    let next = ctl.begin();
    assert_eq!(next.id, s.id + 1);
    ctl.merge(next.id);
    ctl.wait_merged();
    finish(rig, &mut ctl, &mut qs[0], daemon, &model, test);
    drop(qs);
    drop(f);
}

#[test]
fn writes_past_the_delta_limit_succeed_and_abandon_the_snapshot() {
    let rig = Rig::new(&["--delta-limit", "1048576"], None);
    overflow_keeps_every_write(
        &rig,
        "writes_past_the_delta_limit_succeed_and_abandon_the_snapshot",
        6 * MIB,
        "limit of 1048576 bytes",
    );
}

#[test]
fn enospc_in_the_state_dir_abandons_the_snapshot_and_fails_no_write() {
    let rig = Rig::new(&[], Some("2M"));
    overflow_keeps_every_write(
        &rig,
        "enospc_in_the_state_dir_abandons_the_snapshot_and_fails_no_write",
        8 * MIB,
        "ENOSPC",
    );
}

/// The backup of an abandoned snapshot must fail (docs/snapshots.md, "Abandon and overflow"):
/// Checkpoint refuses it while the snapshot is merging and also once the merge is complete and
/// the snapshot has left the record.
#[test]
fn checkpoint_of_an_abandoned_snapshot_is_refused_after_its_merge() {
    let rig = Rig::new(&["--delta-limit", "1048576"], None);
    let mut rng = seed("checkpoint_of_an_abandoned_snapshot_is_refused_after_its_merge");
    let (daemon, f, qs, mut ctl) = rig.start();
    let s = ctl.begin();
    let load = Load::new(Model::new(), Some(4 * MIB));
    let (qs, _, ()) = with_load(qs, load, &mut rng, |_| ());
    ctl.wait_merged();
    assert!(rig.log_text().contains("snapshot abandoned"), "the snapshot was not abandoned");
    let res = ctl.checkpoint(s.id);
    assert!(res.is_err(), "Checkpoint of snapshot {} accepted after it was abandoned and merged", s.id);
    sigterm(daemon);
    drop(qs);
    drop(f);
}
