//! Live restore against the real livesnap-blk process, killed with SIGKILL mid-copy.
//!
//! The target image starts zero with a restore map beside it; a test feeder serves the chunks
//! of a reference image over the control socket (background chunks paced, so that the copy
//! lasts across several kills; urgent ones at once). The test VMM writes stamped 4 KiB blocks,
//! reads and flushes through one queue, one request at a time. After each kill and restart with
//! the same arguments the guest reads the whole disk back: every block must hold what the last
//! completed FLUSH covered or a write acknowledged since, the reference's bytes where the guest
//! never wrote. At the end the image file is the reference with every acknowledged write on top.
//!
//! The test prints its seed; `LIVESNAP_SEED=N` replays its script (the kills' moments in the copy
//! still depend on timing).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastrand::Rng;
use livesnap_blk::restore::map::Map;
use livesnap_blk::restore::{self, Identity};
use livesnap_blk::snap::store::MetaFile;
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::programs;
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const DISK: u64 = 64 * MIB;
const BLOCKS: usize = (DISK / BLOCK as u64) as usize;
const CHUNK: u64 = 256 << 10;
const WAIT: Duration = Duration::from_secs(30);
/// A hang guard for the whole copy, not a measurement.
const COPY_WAIT: Duration = Duration::from_secs(300);
/// The feeder's pause before each background chunk while the test kills the backend.
const PACE: Duration = Duration::from_millis(20);
/// Background chunks the feeder serves to one backend process before the last: with the chunks
/// the guest's reads fetch, the copy cannot complete before the kills however fast or slow the
/// machine is (256 chunks).
const BACKGROUND_PER_LIFE: usize = 24;
const KILLS: usize = 4;

fn seed() -> Rng {
    let seed = std::env::var("LIVESNAP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("live_restore: seed {seed} (replay with LIVESNAP_SEED={seed})");
    Rng::with_seed(seed)
}

/// A 4 KiB block of version `v` of block `b`.
fn stamped(b: usize, v: u64) -> Vec<u8> {
    let mut unit = [0u8; 16];
    unit[..8].copy_from_slice(&(b as u64).to_le_bytes());
    unit[8..].copy_from_slice(&(v | 0x5a00_0000_0000_0000).to_le_bytes());
    unit.iter().copied().cycle().take(BLOCK).collect()
}

/// The reference disk (the backup): random bytes, every fourth chunk zero.
fn reference(rng: &mut Rng) -> Vec<u8> {
    let mut r = vec![0u8; DISK as usize];
    for (i, c) in r.chunks_mut(CHUNK as usize).enumerate() {
        if i % 4 != 3 {
            rng.fill(c);
        }
    }
    r
}

/// What each block holds: `None` is the reference's bytes, `Some(v)` the guest's version v.
struct Model {
    reference: Arc<Vec<u8>>,
    acked: Vec<Option<u64>>,
    /// What the last completed FLUSH covered, and what was acknowledged since.
    floor: Vec<Option<u64>>,
    since: Vec<Vec<u64>>,
    next: u64,
}

impl Model {
    fn content(&self, b: usize, v: Option<u64>) -> Vec<u8> {
        match v {
            None => self.reference[b * BLOCK..(b + 1) * BLOCK].to_vec(),
            Some(v) => stamped(b, v),
        }
    }

    fn content_all(&self) -> Vec<u8> {
        (0..BLOCKS).flat_map(|b| self.content(b, self.acked[b])).collect()
    }

    fn flushed(&mut self) {
        self.floor.clone_from(&self.acked);
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// What the guest reads from the image and map files: the image where the chunk is restored
    /// or the block marked guest-written, else the reference's bytes (the chunk's fill).
    fn guest_view(&self, image: &Path) -> Vec<u8> {
        let file: Arc<dyn MetaFile> = Arc::new(File::open(restore::map_path(image)).unwrap());
        let map = Map::open(file).unwrap();
        let data = std::fs::read(image).unwrap();
        let mut out = Vec::with_capacity(data.len());
        for b in 0..BLOCKS {
            let chunk = (b * BLOCK) as u64 / CHUNK;
            let from = if map.chunks.get(chunk) || map.blocks.get(b as u64) { &data } else { &*self.reference };
            out.extend_from_slice(&from[b * BLOCK..(b + 1) * BLOCK]);
        }
        out
    }

    /// Checks the disk as read after a restart; it becomes the model's state.
    fn after_kill(&mut self, data: &[u8], kill: usize) {
        let mut bad = Vec::new();
        for (b, got) in data.chunks(BLOCK).enumerate() {
            let found = std::iter::once(self.floor[b])
                .chain(self.since[b].iter().map(|v| Some(*v)))
                .find(|v| self.content(b, *v) == got);
            match found {
                Some(v) => self.acked[b] = v,
                None => bad.push(format!(
                    "block {b} (chunk {}): neither its flushed {:?} nor a later write{}",
                    b as u64 * BLOCK as u64 / CHUNK,
                    self.floor[b],
                    if got.iter().all(|&x| x == 0) { " (zeroes)" } else { "" }
                )),
            }
        }
        assert!(
            bad.is_empty(),
            "after kill {kill}: {} blocks wrong, e.g. {}",
            bad.len(),
            bad[..bad.len().min(6)].join("; ")
        );
        self.flushed();
    }
}

struct Rig {
    /// Kept (and named) when the test fails.
    dir: Option<tempfile::TempDir>,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::Builder::new().prefix("livesnap-live-restore").tempdir().unwrap();
        let image = dir.path().join("vda.raw");
        File::create(&image).unwrap().set_len(DISK).unwrap();
        let id = Identity { vm: "web01".into(), backup_id: "b1".into(), disk: "vda".into() };
        restore::create_map(&image, &id, DISK, CHUNK).unwrap();
        let (socket, control, log) =
            (dir.path().join("vda.sock"), dir.path().join("control.sock"), dir.path().join("livesnap-blk.log"));
        let args = vec![
            "--vm".into(),
            "web01".into(),
            "--disk".into(),
            format!("id=vda,image={},socket={},format=raw", image.display(), socket.display()),
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
            "--control".into(),
            control.display().to_string(),
        ];
        Rig { dir: Some(dir), image, socket, control, log, args }
    }

    fn start(&self) -> (Daemon, Frontend, BlkQueue) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(&self.args).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
        let daemon = Daemon::spawn("livesnap-blk", cmd, &[&self.socket, &self.control]).unwrap();
        let mut f =
            Frontend::connect(&self.socket, &Options { queues: 1, timeout: WAIT, ..Options::default() }).unwrap();
        let q = BlkQueue::new(f.take_queues().remove(0), 4, MIB as u32).unwrap();
        (daemon, f, q)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("kept {} (the backend's log is livesnap-blk.log)", d.keep().display());
            }
        }
    }
}

async fn client(path: &Path) -> SnapshotControlClient<Channel> {
    let ch = livesnap_proto::unix_channel(Endpoint::from_static("http://x.invalid"), path.to_owned()).await.unwrap();
    SnapshotControlClient::new(ch)
}

/// The test feeder: serves the reference's chunks until the stream ends. Returns whether the
/// backend said the restore is complete.
async fn feed(path: PathBuf, reference: Arc<Vec<u8>>, pace: Duration, mut background: usize) -> bool {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::RestoreData { disk: "vda".into(), ..Default::default() }).await.unwrap();
    let Ok(resp) = client(&path).await.restore_feed(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
        return false;
    };
    let mut wants = resp.into_inner();
    while let Ok(Some(w)) = wants.message().await {
        if w.complete {
            return true;
        }
        for c in w.chunks {
            if !w.urgent {
                if background == 0 {
                    continue;
                }
                background -= 1;
                tokio::time::sleep(pace).await;
            }
            let s = (c * CHUNK) as usize;
            let data = &reference[s..s + CHUNK as usize];
            let msg = if data.iter().all(|&b| b == 0) {
                pb::RestoreData { disk: "vda".into(), chunk: c, zero: true, ..Default::default() }
            } else {
                pb::RestoreData { disk: "vda".into(), chunk: c, data: data.to_vec(), ..Default::default() }
            };
            if tx.send(msg).await.is_err() {
                return false;
            }
        }
    }
    false
}

fn read_disk(q: &mut BlkQueue) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK as usize);
    for i in 0..DISK / MIB {
        out.extend(q.read(i * MIB / 512, MIB as u32).unwrap());
    }
    out
}

/// `ops` random guest requests: writes of 1 to 8 stamped blocks, reads checked against the
/// model (one in eight: each may fetch a chunk), a FLUSH one time in eight.
fn guest_load(q: &mut BlkQueue, m: &mut Model, rng: &mut Rng, ops: usize) {
    for _ in 0..ops {
        match rng.u8(0..8) {
            0 => {
                q.flush().unwrap();
                m.flushed();
            }
            1..=6 => {
                let n = rng.usize(1..=8);
                let start = rng.usize(0..BLOCKS - n);
                let v = m.next;
                m.next += 1;
                let data: Vec<u8> = (start..start + n).flat_map(|b| stamped(b, v)).collect();
                q.write((start * BLOCK / 512) as u64, &data).unwrap();
                for b in start..start + n {
                    m.acked[b] = Some(v);
                    m.since[b].push(v);
                }
            }
            _ => {
                let n = rng.usize(1..=16);
                let start = rng.usize(0..BLOCKS - n);
                let got = q.read((start * BLOCK / 512) as u64, (n * BLOCK) as u32).unwrap();
                for (i, blk) in got.chunks(BLOCK).enumerate() {
                    let b = start + i;
                    assert!(blk == m.content(b, m.acked[b]).as_slice(), "read of block {b} differs from the model");
                }
            }
        }
    }
}

fn status(rt: &tokio::runtime::Runtime, control: &Path) -> pb::LiveRestore {
    let st = rt.block_on(async { client(control).await.status(pb::StatusRequest {}).await.unwrap().into_inner() });
    st.disks[0].restore.clone().expect("the disk is not under restore: the copy completed before a kill")
}

#[test]
fn kill9_mid_copy_loses_no_flushed_write_and_lands_no_chunk_over_one() {
    let mut rng = seed();
    let rig = Rig::new();
    let reference = Arc::new(reference(&mut rng));
    let mut m = Model {
        reference: reference.clone(),
        acked: vec![None; BLOCKS],
        floor: vec![None; BLOCKS],
        since: vec![Vec::new(); BLOCKS],
        next: 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut kills_mid_copy = 0;
    for kill in 0..=KILLS {
        if kill > 0 {
            // The whole disk as the guest would read it, from the files: reading it through
            // the queue would fetch every chunk at once.
            m.after_kill(&m.guest_view(&rig.image), kill);
        }
        let (daemon, _f, mut q) = rig.start();
        let (pace, background) = if kill == KILLS { (Duration::ZERO, usize::MAX) } else { (PACE, BACKGROUND_PER_LIFE) };
        let feeder = rt.spawn(feed(rig.control.clone(), reference.clone(), pace, background));
        let ops = rng.usize(20..120);
        guest_load(&mut q, &mut m, &mut rng, ops);
        if kill == KILLS {
            // The rest of the copy, under load, then the image must be complete.
            let start = Instant::now();
            while !feeder.is_finished() {
                guest_load(&mut q, &mut m, &mut rng, 10);
                assert!(start.elapsed() < COPY_WAIT, "the copy did not complete: {:?}", status(&rt, &rig.control));
            }
            assert!(rt.block_on(feeder).unwrap(), "the feed ended without completing the restore");
            q.flush().unwrap();
            m.flushed();
            let st = status(&rt, &rig.control);
            assert!(st.complete && st.chunks_done == st.chunks_total, "{st:?}");
            let all = read_disk(&mut q);
            assert!(all == m.content_all(), "the guest's reading of the complete disk differs from the model");
            let status = daemon.stop(libc::SIGTERM, WAIT).unwrap();
            assert!(status.success(), "livesnap-blk exited with {status} after SIGTERM");
            break;
        }
        let st = status(&rt, &rig.control);
        eprintln!("kill {}: {} of {} chunks durable", kill + 1, st.chunks_done, st.chunks_total);
        if !st.complete {
            kills_mid_copy += 1;
        }
        let status = daemon.stop(libc::SIGKILL, WAIT).unwrap();
        assert!(!status.success(), "livesnap-blk exited by itself: {status}");
        let _ = rt.block_on(feeder);
    }
    assert!(kills_mid_copy >= 2, "only {kills_mid_copy} kills landed before the copy completed");
    let image = std::fs::read(&rig.image).unwrap();
    let mut bad = Vec::new();
    for (b, got) in image.chunks(BLOCK).enumerate() {
        if got != m.content(b, m.acked[b]).as_slice() {
            bad.push(b);
        }
    }
    drop(rt);
    assert!(bad.is_empty(), "the final image differs in {} blocks, e.g. {:?}", bad.len(), &bad[..bad.len().min(8)]);
    assert!(restore::read_map(&restore::map_path(&rig.image)).unwrap().complete);
}

#[test]
fn a_damaged_or_mismatched_map_stops_the_start_with_the_reason() {
    let rig = Rig::new();
    let map = restore::map_path(&rig.image);
    let good = std::fs::read(&map).unwrap();
    let run = |what: &str| {
        let out = Command::new(programs::livesnap_blk().unwrap()).args(&rig.args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{what}: livesnap-blk started");
        err
    };
    // A flipped byte in the backup's name: the checksum says so.
    let mut bad = good.clone();
    bad[50] ^= 1;
    std::fs::write(&map, &bad).unwrap();
    let err = run("checksum");
    assert!(err.contains("cannot resume its live restore") && err.contains("checksum"), "{err}");
    // A map of another disk.
    std::fs::write(&map, &good).unwrap();
    File::options().write(true).open(&rig.image).unwrap().set_len(DISK / 2).unwrap();
    let err = run("size");
    assert!(err.contains("does not fit an image of"), "{err}");
}
