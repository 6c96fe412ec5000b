//! [`RestoreDisk`] against a model: random guest reads, writes, flushes and feed answers, with a
//! crash injected at every persistence step (image and map live in memory that forgets unsynced
//! writes, whole or torn at a sector), then a restart that must keep every flushed write and
//! never put the backup's bytes over one.
//!
//! The model keeps, per 512-byte sector, the value a crash must keep (`stable`: the last flushed
//! guest write, else the backup's bytes) and the values written since the last flush (`since`):
//! after a crash a sector may hold any of them, nothing else.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::disk::{Answer, AnswerError, FeedMsg, Options, RestoreDisk};
use super::map::{Header, Identity, Map};
use crate::disk::{Buf, DiskFile};
use crate::snap::store::mem::{crash_file, Fuse, MemDir, MemFile};
use crate::snap::store::MetaFile;

const CHUNK: u64 = 16 << 10;
const SECTOR: usize = 512;
/// 39 whole chunks, then a short one that ends in a short block.
const SIZE: u64 = 39 * CHUNK + 4096 + 1536;

struct Model {
    backup: Vec<u8>,
    cur: Vec<u8>,
    stable: Vec<u8>,
    since: Vec<Vec<Vec<u8>>>,
}

impl Model {
    fn new(rng: &mut fastrand::Rng) -> Model {
        let mut backup = vec![0u8; SIZE as usize];
        for (i, chunk) in backup.chunks_mut(CHUNK as usize).enumerate() {
            // Some chunks are zero: the feed answers them with `zero`.
            if i % 3 != 1 {
                rng.fill(chunk);
            }
        }
        let sectors = SIZE as usize / SECTOR;
        Model { cur: backup.clone(), stable: backup.clone(), backup, since: vec![Vec::new(); sectors] }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.cur[o..o + data.len()].copy_from_slice(data);
        for s in o / SECTOR..(o + data.len()) / SECTOR {
            self.since[s].push(self.cur[s * SECTOR..(s + 1) * SECTOR].to_vec());
        }
    }

    fn flush(&mut self) {
        self.stable = self.cur.clone();
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// Checks that `got` is what a crash may leave, and takes it as the new state.
    fn after_crash(&mut self, got: &[u8], ctx: &str) {
        for (s, sector) in got.chunks(SECTOR).enumerate() {
            let at = s * SECTOR..(s + 1) * SECTOR;
            let ok = sector == &self.stable[at.clone()] || self.since[s].iter().any(|v| v == sector);
            assert!(
                ok,
                "{ctx}: sector {s} (chunk {}) holds neither its flushed value nor a later write \
                 (backup's: {})",
                s as u64 * SECTOR as u64 / CHUNK,
                sector == &self.backup[at]
            );
        }
        self.cur = got.to_vec();
        self.flush();
    }

    fn answer(&self, chunk: u64) -> Answer {
        let s = (chunk * CHUNK) as usize;
        let e = (s + CHUNK as usize).min(SIZE as usize);
        let data = &self.backup[s..e];
        if data.iter().all(|&b| b == 0) {
            Answer::Zero
        } else {
            Answer::Data(data.to_vec())
        }
    }
}

struct Rig {
    fuse: Arc<Fuse>,
    image: Arc<MemFile>,
    map: Arc<MemFile>,
    /// When fills commit: [`Options::commit_bytes`] and [`Options::commit_age`].
    commit: (u64, Duration),
}

/// Fills commit every two chunks (by bytes).
const COMMIT_BY_BYTES: (u64, Duration) = (2 * CHUNK, Duration::MAX);
/// Every fill commits (its age is at least zero).
const COMMIT_BY_AGE: (u64, Duration) = (u64::MAX, Duration::ZERO);

impl Rig {
    fn new() -> Rig {
        Rig::with_commit(COMMIT_BY_BYTES)
    }

    fn with_commit(commit: (u64, Duration)) -> Rig {
        let fuse = Arc::new(Fuse::default());
        fuse.arm(i64::MAX);
        let image = MemDir::new_file(fuse.clone(), SIZE);
        let map = MemDir::new_file(fuse.clone(), 0);
        let id = Identity { vm: "web01".into(), backup_id: "b1".into(), disk: "vda".into() };
        let h = Header { flags: 0, size: SIZE, chunk_size: CHUNK, id };
        MetaFile::set_len(&*map, h.file_len()).unwrap();
        MetaFile::write_at(&*map, &h.encode().unwrap(), 0).unwrap();
        MetaFile::sync(&*map).unwrap();
        Rig { fuse, image, map, commit }
    }

    fn open(&self) -> Option<(RestoreDisk, Feeder)> {
        let map = Map::open(self.map.clone()).unwrap();
        if map.header().complete() {
            return None;
        }
        // No waiting: a request that needs a chunk fails at once, the test answers its want
        // and repeats it, so that everything runs on one thread in a reproducible order.
        let (commit_bytes, commit_age) = self.commit;
        let opts = Options { wait: Duration::ZERO, window: 3, commit_bytes, commit_age, retry: Duration::ZERO };
        let disk = RestoreDisk::new(self.image.clone(), map, PathBuf::from("/mem/vda.restore"), opts).unwrap();
        let (gen, rx) = disk.attach();
        let feeder = Feeder { gen, rx, wanted: BTreeSet::new(), urgent: BTreeSet::new(), complete: false };
        Some((disk, feeder))
    }

    fn crash(&self, rng: &mut fastrand::Rng) {
        let mut keep = |_| match rng.u8(0..4) {
            0 => None,
            1 => Some(rng.usize(0..8)),
            _ => Some(usize::MAX),
        };
        crash_file(&self.image, &mut keep);
        crash_file(&self.map, &mut keep);
    }
}

struct Feeder {
    gen: u64,
    rx: UnboundedReceiver<FeedMsg>,
    wanted: BTreeSet<u64>,
    urgent: BTreeSet<u64>,
    complete: bool,
}

impl Feeder {
    fn poll(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                FeedMsg::Want { chunks, urgent } => {
                    if urgent {
                        self.urgent.extend(chunks.iter().copied());
                    }
                    self.wanted.extend(chunks);
                }
                FeedMsg::Complete => self.complete = true,
            }
        }
    }

    /// Answers every want, the background's too, until the disk wants nothing more.
    fn answer_all(&mut self, disk: &RestoreDisk, m: &Model) -> Result<(), AnswerError> {
        loop {
            self.poll();
            let Some(c) = self.wanted.pop_first() else { return Ok(()) };
            self.urgent.remove(&c);
            disk.answer(self.gen, c, m.answer(c))?;
        }
    }

    /// Answers the urgent wants only: what a waiting guest request needs.
    fn answer_urgent(&mut self, disk: &RestoreDisk, m: &Model) -> Result<(), AnswerError> {
        self.poll();
        while let Some(c) = self.urgent.pop_first() {
            self.wanted.remove(&c);
            disk.answer(self.gen, c, m.answer(c))?;
        }
        Ok(())
    }

    fn forget(&mut self, c: u64) {
        self.wanted.remove(&c);
        self.urgent.remove(&c);
    }
}

fn read(disk: &RestoreDisk, offset: u64, len: usize) -> crate::disk::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    disk.read_vectored_at(&[Buf::from(&mut buf[..])], offset)?;
    Ok(buf)
}

/// Runs `op` once; when it fails for want of a chunk, answers the urgent wants and runs it
/// again.
fn with_feed<T>(
    disk: &RestoreDisk,
    feeder: &mut Feeder,
    m: &Model,
    mut op: impl FnMut() -> crate::disk::Result<T>,
) -> Result<T, ()> {
    match op() {
        Ok(v) => Ok(v),
        Err(_) => {
            feeder.answer_urgent(disk, m).map_err(|_| ())?;
            op().map_err(|_| ())
        }
    }
}

/// One random guest or feed step; Err when an injected crash interrupted it.
fn step(rng: &mut fastrand::Rng, disk: &RestoreDisk, feeder: &mut Feeder, m: &mut Model) -> Result<(), ()> {
    let sectors = SIZE / SECTOR as u64;
    match rng.u8(0..10) {
        0..=2 => {
            // A write: whole blocks mostly, sometimes part of one.
            let (offset, len) = if rng.bool() {
                let blocks = SIZE.div_ceil(4096);
                let b = rng.u64(0..blocks);
                let n = rng.u64(1..=3.min(blocks - b));
                (b * 4096, (n * 4096).min(SIZE - b * 4096))
            } else {
                let s = rng.u64(0..sectors);
                (s * SECTOR as u64, rng.u64(1..=4.min(sectors - s)) * SECTOR as u64)
            };
            let mut data = vec![0u8; len as usize];
            if rng.u8(0..4) != 0 {
                rng.fill(&mut data);
            }
            let zeroes = data.iter().all(|&b| b == 0);
            let r = with_feed(disk, feeder, m, || {
                if zeroes {
                    disk.write_zeroes(offset, len, false)
                } else {
                    let mut d = data.clone();
                    disk.write_vectored_at(&[Buf::from(&mut d[..])], offset)
                }
            });
            // A write that failed may have reached the image or not: either is allowed.
            m.write(offset, &data);
            r
        }
        3..=5 => {
            let s = rng.u64(0..sectors);
            let len = rng.u64(1..=40.min(sectors - s)) * SECTOR as u64;
            let offset = s * SECTOR as u64;
            let got = with_feed(disk, feeder, m, || read(disk, offset, len as usize))?;
            let want = &m.cur[offset as usize..(offset + len) as usize];
            assert!(got == want, "read of {len} at {offset} differs from the model");
            Ok(())
        }
        6 => {
            disk.flush().map_err(|_| ())?;
            m.flush();
            Ok(())
        }
        7 => {
            // Hostile answers: never written, never a panic.
            feeder.poll();
            let c = rng.u64(0..SIZE.div_ceil(CHUNK) + 2);
            let r = match rng.u8(0..3) {
                0 => disk.answer(feeder.gen, c, Answer::Data(vec![0xee; 100])),
                1 => disk.answer(feeder.gen + 1, c, Answer::Zero),
                _ if !feeder.wanted.contains(&c) => {
                    disk.answer(feeder.gen, c, Answer::Data(vec![0xee; CHUNK as usize]))
                }
                _ => return Ok(()),
            };
            assert!(r.is_err(), "a hostile answer for chunk {c} was taken");
            Ok(())
        }
        _ => {
            // The feed answers one want, sometimes with an error.
            feeder.poll();
            let Some(&c) = feeder.wanted.iter().nth(rng.usize(0..feeder.wanted.len().max(1))) else {
                return Ok(());
            };
            feeder.forget(c);
            if rng.u8(0..5) == 0 {
                return disk.answer(feeder.gen, c, Answer::Error("repository unreachable".into())).map_err(|_| ());
            }
            disk.answer(feeder.gen, c, m.answer(c)).map_err(|_| ())
        }
    }
}

fn image_bytes(rig: &Rig) -> Vec<u8> {
    let mut b = rig.image.bytes();
    b.resize(SIZE as usize, 0);
    b
}

/// Runs `ops` random steps with the fuse armed at `budget`; on a crash, restarts and checks
/// what the guest reads; then more load, the rest of the restore, and the image against the
/// model. Returns whether the fuse blew.
fn run(seed: u64, budget: i64, ops: usize) -> bool {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Odd seeds commit each fill at once (the age rule), even ones every two chunks (bytes).
    let rig = Rig::with_commit(if seed % 2 == 1 { COMMIT_BY_AGE } else { COMMIT_BY_BYTES });
    let mut m = Model::new(&mut rng);
    let (disk, mut feeder) = rig.open().unwrap();
    rig.fuse.arm(budget);
    let mut crashed = false;
    for _ in 0..ops {
        if step(&mut rng, &disk, &mut feeder, &mut m).is_err() {
            assert!(rig.fuse.blown(), "seed {seed} budget {budget}: a step failed without a crash");
            crashed = true;
            break;
        }
    }
    drop(disk);
    let ctx = format!("seed {seed} budget {budget}");
    if crashed {
        rig.crash(&mut rng);
    }
    rig.fuse.arm(i64::MAX);
    let Some((disk, mut feeder)) = rig.open() else {
        // Completed before the crash: the image is the model, within what a crash may lose.
        m.after_crash(&image_bytes(&rig), &ctx);
        return crashed;
    };
    // What the guest reads after the restart is what a crash may leave.
    let got = with_feed(&disk, &mut feeder, &m, || read(&disk, 0, SIZE as usize)).unwrap();
    m.after_crash(&got, &ctx);
    for _ in 0..ops / 4 {
        step(&mut rng, &disk, &mut feeder, &mut m).unwrap();
    }
    for _ in 0..100 {
        feeder.answer_all(&disk, &m).unwrap();
        disk.tick().unwrap();
        feeder.poll();
        if feeder.complete {
            break;
        }
    }
    disk.flush().unwrap();
    m.flush();
    assert!(disk.is_complete() && feeder.complete, "{ctx}: the restore did not complete");
    assert!(image_bytes(&rig) == m.cur, "{ctx}: the completed image differs from the model");
    assert!(Map::open(rig.map.clone()).unwrap().header().complete());
    assert!(rig.open().is_none(), "{ctx}: a complete map is served as a plain image");
    crashed
}

#[test]
fn random_load_without_crashes_matches_the_model() {
    for seed in 0..20 {
        run(seed, i64::MAX, 300);
    }
}

#[test]
fn a_crash_at_every_persistence_step_keeps_flushed_writes_and_the_backup() {
    for seed in 100..106 {
        let mut budget = 0;
        // Every budget up to the first one that the whole run does not use up.
        while run(seed, budget, 120) {
            budget += 1;
        }
        assert!(budget > 20, "seed {seed}: only {budget} persistence steps");
    }
}

#[test]
fn a_guest_write_over_part_of_a_block_waits_for_its_chunk() {
    let rig = Rig::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let m = Model::new(&mut rng);
    let (disk, mut feeder) = rig.open().unwrap();
    let mut d = vec![9u8; 512];
    // Half a block of chunk 20: the chunk is wanted urgently and the write fails (no wait).
    assert!(disk.write_vectored_at(&[Buf::from(&mut d[..])], 20 * CHUNK + 512).is_err());
    feeder.poll();
    assert!(feeder.urgent.contains(&20));
    // A whole block of chunk 24 goes straight to the image.
    let mut w = vec![7u8; 4096];
    disk.write_vectored_at(&[Buf::from(&mut w[..])], 24 * CHUNK).unwrap();
    feeder.answer_urgent(&disk, &m).unwrap();
    disk.write_vectored_at(&[Buf::from(&mut d[..])], 20 * CHUNK + 512).unwrap();
    let got = read(&disk, 20 * CHUNK, 4096).unwrap();
    let mut want = m.backup[20 * CHUNK as usize..20 * CHUNK as usize + 4096].to_vec();
    want[512..1024].fill(9);
    assert_eq!(got, want);
    // Chunk 24, filled later by the background, kept the guest's block.
    while !feeder.complete {
        feeder.answer_all(&disk, &m).unwrap();
        disk.tick().unwrap();
        feeder.poll();
    }
    assert_eq!(read(&disk, 24 * CHUNK, 4096).unwrap(), vec![7u8; 4096]);
    let next = 24 * CHUNK as usize + 4096;
    assert_eq!(read(&disk, next as u64, 4096).unwrap(), m.backup[next..next + 4096].to_vec());
}

#[test]
fn a_flushed_guest_block_survives_a_crash_before_its_chunk_arrives() {
    let rig = Rig::new();
    let mut rng = fastrand::Rng::with_seed(3);
    let m = Model::new(&mut rng);
    let (disk, _) = rig.open().unwrap();
    let mut w = vec![5u8; 8192];
    disk.write_vectored_at(&[Buf::from(&mut w[..])], 3 * CHUNK + 4096).unwrap();
    disk.flush().unwrap();
    drop(disk);
    crash_file(&rig.image, &mut |_| None);
    crash_file(&rig.map, &mut |_| None);
    let (disk, mut feeder) = rig.open().unwrap();
    let got = with_feed(&disk, &mut feeder, &m, || read(&disk, 3 * CHUNK, CHUNK as usize)).unwrap();
    let mut want = m.backup[3 * CHUNK as usize..4 * CHUNK as usize].to_vec();
    want[4096..12288].fill(5);
    assert!(got == want, "the flushed guest blocks were lost or overwritten by the backup");
}

/// The image, with a hook run once inside its next sync (after the sync point): what a fill on
/// another thread does while a commit syncs.
struct HookedImage {
    inner: Arc<MemFile>,
    #[allow(clippy::type_complexity)]
    in_sync: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for HookedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookedImage").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl DiskFile for HookedImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn format(&self) -> crate::disk::Format {
        self.inner.format()
    }
    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> crate::disk::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> crate::disk::Result<()> {
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> crate::disk::Result<()> {
        DiskFile::flush(&*self.inner)?;
        let hook = self.in_sync.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> crate::disk::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> crate::disk::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

#[test]
fn a_chunk_filled_while_a_commit_syncs_the_image_is_not_marked_by_that_commit() {
    let rig = Rig::new();
    let mut rng = fastrand::Rng::with_seed(11);
    let m = Model::new(&mut rng);
    let image = Arc::new(HookedImage { inner: rig.image.clone(), in_sync: std::sync::Mutex::new(None) });
    let opts = Options {
        wait: Duration::ZERO,
        window: 3,
        commit_bytes: u64::MAX,
        commit_age: Duration::MAX,
        ..Options::default()
    };
    let map = Map::open(rig.map.clone()).unwrap();
    let disk = Arc::new(RestoreDisk::new(image.clone(), map, PathBuf::from("/mem/vda.restore"), opts).unwrap());
    let (gen, mut rx) = disk.attach();
    while rx.try_recv().is_ok() {}
    // Chunks 0, 1 and 2 are wanted by the background (window 3). Chunk 0 is filled, then a
    // commit starts; while it syncs the image, chunk 2 is filled (its bytes not synced).
    disk.answer(gen, 0, m.answer(0)).unwrap();
    let (d, answer) = (disk.clone(), m.answer(2));
    *image.in_sync.lock().unwrap() = Some(Box::new(move || d.answer(gen, 2, answer).unwrap()));
    disk.commit().unwrap();
    assert!(image.in_sync.lock().unwrap().is_none(), "the hook did not run");
    // A crash loses what was not synced: chunk 2's bytes. Its bit must not be durable.
    drop(disk);
    crash_file(&rig.image, &mut |_| None);
    crash_file(&rig.map, &mut |_| None);
    let map = Map::open(rig.map.clone()).unwrap();
    assert!(map.chunks.get(0), "chunk 0 was committed");
    assert!(!map.chunks.get(2), "chunk 2 is marked restored, its bytes were not synced before the mark");
    let (disk, mut feeder) = rig.open().unwrap();
    let s = 2 * CHUNK as usize;
    let got = with_feed(&disk, &mut feeder, &m, || read(&disk, s as u64, CHUNK as usize)).unwrap();
    assert!(got == m.backup[s..s + CHUNK as usize], "chunk 2 reads other than the backup after the restart");
}

#[test]
fn the_reads_of_one_batch_want_their_chunks_in_one_urgent_want() {
    let rig = Rig::new();
    let mut rng = fastrand::Rng::with_seed(13);
    let m = Model::new(&mut rng);
    let (disk, mut feeder) = rig.open().unwrap();
    feeder.poll();
    let (mut a, mut b, mut c) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
    let (ba, bb, bc) = ([Buf::from(&mut a[..])], [Buf::from(&mut b[..])], [Buf::from(&mut c[..])]);
    // Chunks 30 and 20 are missing (no waiting here: the reads fail), chunk 30 read twice.
    let reads: Vec<(u64, &[Buf<'_>])> = vec![(30 * CHUNK, &ba), (20 * CHUNK + 4096, &bb), (30 * CHUNK + 8192, &bc)];
    assert!(disk.read_batch(&reads).iter().all(Result::is_err));
    let mut urgent = Vec::new();
    while let Ok(msg) = feeder.rx.try_recv() {
        if let FeedMsg::Want { chunks, urgent: true } = msg {
            urgent.push(chunks);
        }
    }
    assert_eq!(urgent, vec![vec![20, 30]], "one urgent want, before any read waits");
    feeder.wanted.extend([20, 30]);
    feeder.urgent.extend([20, 30]);
    feeder.answer_urgent(&disk, &m).unwrap();
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    let (ba, bb) = ([Buf::from(&mut a[..])], [Buf::from(&mut b[..])]);
    let reads: Vec<(u64, &[Buf<'_>])> = vec![(30 * CHUNK, &ba), (20 * CHUNK + 4096, &bb)];
    assert!(disk.read_batch(&reads).iter().all(Result::is_ok));
    let s = 20 * CHUNK as usize + 4096;
    assert!(b == m.backup[s..s + 4096] && a == m.backup[30 * CHUNK as usize..30 * CHUNK as usize + 4096]);
}
