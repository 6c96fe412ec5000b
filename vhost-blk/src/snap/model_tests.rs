//! The model test: random sequences of writes, flushes, cuts, merges, abandons, checkpoints and
//! crashes, run against the engine on crash-prone memory ([`store::mem`]) and checked against a
//! reference disk. A crash is injected at every persistence step in turn (the fuse), or at a
//! random point, either as a kill of the process (every completed write survives in the page
//! cache, same boot) or as a power loss (unsynced writes survive at random, torn by sector).
//!
//! The same sequences also run with the base a real raw file (tempfile), through the page cache
//! and with `cache=none` (`O_DIRECT`, guest buffers bounced where unaligned): there a crash is a
//! kill for the base (a real file cannot lose its unsynced writes on demand), while the state
//! directory still crashes either way; once the fuse has blown (the process is dead from that
//! step on) the base takes no more writes, as the crash-prone one does not.
//!
//! Seeds are printed on failure; `LIVESNAP_MODEL_SEED=N` replays one case and
//! `LIVESNAP_MODEL_CASES=N` sets how many run.

use std::sync::Arc;

use fastrand::Rng;

use super::store::mem::{crash_file, Fuse, MemDir, MemFile};
use super::*;
use crate::disk::{Buf, Cache};

const SECTOR: u64 = 512;
const SECTORS: u64 = 96;
const SIZE: u64 = SECTORS * SECTOR;
const GRANULARITY: u64 = 2048;

/// Whether an event of `percent` in 100 happens.
fn chance(rng: &mut Rng, percent: u64) -> bool {
    rng.u64(..100) < percent
}

/// Sector `idx` holding version `v` (0 is all zeroes).
fn sector_bytes(v: u64, idx: u64) -> Vec<u8> {
    if v == 0 {
        return vec![0; SECTOR as usize];
    }
    let mut s = vec![(v as u8) ^ (idx as u8); SECTOR as usize];
    s[0..8].copy_from_slice(&v.to_le_bytes());
    s[8..16].copy_from_slice(&idx.to_le_bytes());
    s
}

fn version_of(bytes: &[u8], idx: u64) -> Option<u64> {
    let v = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
    (sector_bytes(v, idx) == bytes).then_some(v)
}

/// The reference disk.
#[derive(Clone)]
struct Model {
    /// Version of each sector as of now (exact while nothing is in doubt).
    cur: Vec<u64>,
    /// Version at the last completed flush.
    flushed: Vec<u64>,
    /// Versions written since that flush, completed or in doubt.
    since: Vec<Vec<u64>>,
}

impl Model {
    fn new() -> Self {
        Model {
            cur: vec![0; SECTORS as usize],
            flushed: vec![0; SECTORS as usize],
            since: vec![Vec::new(); SECTORS as usize],
        }
    }
}

/// The disk under the engine.
enum Base {
    /// Crash-prone memory: loses unsynced writes at a power loss.
    Mem(Arc<MemFile>),
    /// A raw image file served with a cache mode; survives every crash whole.
    Raw { _file: tempfile::NamedTempFile, path: std::path::PathBuf, disk: Arc<dyn DiskFile> },
}

/// A disk that stops writing once the fuse has blown: the process died at that step.
#[derive(Debug)]
struct Fused {
    inner: Arc<dyn DiskFile>,
    fuse: Arc<Fuse>,
}

impl Fused {
    fn alive(&self) -> crate::disk::Result<()> {
        if self.fuse.blown() {
            return Err(std::io::Error::other("the process crashed").into());
        }
        Ok(())
    }
}

impl DiskFile for Fused {
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
        self.alive()?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> crate::disk::Result<()> {
        self.alive()?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> crate::disk::Result<()> {
        self.alive()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> crate::disk::Result<()> {
        self.alive()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
}

impl Base {
    fn new(fuse: &Arc<Fuse>, cache: Option<Cache>) -> Self {
        let Some(cache) = cache else { return Base::Mem(MemDir::new_file(fuse.clone(), SIZE)) };
        // Under /var/tmp: a disk-backed filesystem takes O_DIRECT where /tmp may not.
        let file = tempfile::NamedTempFile::new_in("/var/tmp").expect("cannot create the base image");
        file.as_file().set_len(SIZE).expect("cannot size the base image");
        let path = file.path().to_owned();
        let disk = crate::disk::open_with(&path, Some(crate::disk::Format::Raw), false, cache).unwrap_or_else(|e| {
            panic!("cannot open the base with cache={cache}: {}", livesnap_proto::error::chain(&e))
        });
        Base::Raw { _file: file, path, disk: Arc::new(Fused { inner: disk, fuse: fuse.clone() }) }
    }

    fn disk(&self) -> Arc<dyn DiskFile> {
        match self {
            Base::Mem(f) => f.clone(),
            Base::Raw { disk, .. } => disk.clone(),
        }
    }

    /// What the image holds, as another process reading it would see it.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Base::Mem(f) => f.bytes(),
            Base::Raw { path, .. } => std::fs::read(path).expect("cannot read the base image"),
        }
    }

    fn crash(&self, keep: &mut dyn FnMut(usize) -> Option<usize>) {
        if let Base::Mem(f) = self {
            crash_file(f, keep);
        }
    }
}

struct Case {
    rng: Rng,
    seed: u64,
    fuse: Arc<Fuse>,
    dir: Arc<MemDir>,
    base: Base,
    vm: Option<Vm>,
    model: Model,
    next_version: u64,
    boot: u64,
    delta_limit: Option<u64>,
    /// Content at the cut of each snapshot, while it is known exactly.
    cut_images: std::collections::BTreeMap<u64, Vec<u64>>,
    /// The base must equal the cut image while the snapshot is active.
    base_frozen_checkable: bool,
    /// Snapshots seen abandoned: their checkpoints must be refused, also after the merge.
    abandoned: std::collections::BTreeSet<u64>,
    log: Vec<String>,
}

impl Case {
    /// A case on crash-prone memory (`cache` `None`) or on a raw file with that cache mode.
    fn new(seed: u64, cache: Option<Cache>) -> Self {
        let mut rng = Rng::with_seed(seed);
        let fuse = Arc::new(Fuse::default());
        fuse.arm(i64::MAX);
        let delta_limit = chance(&mut rng, 20).then(|| (4 + rng.u64(..20)) * SECTOR);
        let mut c = Case {
            rng,
            seed,
            dir: Arc::new(MemDir::new(fuse.clone())),
            base: Base::new(&fuse, cache),
            fuse,
            vm: None,
            model: Model::new(),
            next_version: 1,
            boot: 1,
            delta_limit,
            cut_images: Default::default(),
            base_frozen_checkable: false,
            abandoned: Default::default(),
            log: Vec::new(),
        };
        c.open();
        c
    }

    fn open(&mut self) {
        let opts = Options {
            granularity: GRANULARITY,
            delta_limit: self.delta_limit,
            boot_id: format!("boot-{}", self.boot),
            background_merge: false,
        };
        let spec = DiskSpec { id: "d".into(), base: self.base.disk(), base_path: "/mem/base".into() };
        let vm = Vm::open("model", self.dir.clone(), vec![spec], opts);
        self.vm = Some(vm.unwrap_or_else(|e| self.fail(&format!("reopen failed: {e:#?}"))));
    }

    fn vm(&self) -> &Vm {
        self.vm.as_ref().unwrap_or_else(|| self.fail("no vm"))
    }

    fn disk(&self) -> Arc<dyn DiskFile> {
        self.vm().disk("d").unwrap_or_else(|| self.fail("no disk"))
    }

    fn fail(&self, what: &str) -> ! {
        panic!("model case seed {} failed: {what}\nops:\n  {}", self.seed, self.log.join("\n  "));
    }

    fn snapshot(&self) -> Option<(u64, Phase)> {
        let st = self.vm().status();
        st.snapshot.map(|s| (s.id, st.disks[0].phase))
    }

    fn read_all(&self) -> Vec<u64> {
        let mut buf = vec![0u8; SIZE as usize];
        if let Err(e) = self.disk().read_vectored_at(&[Buf::from(&mut buf[..])], 0) {
            self.fail(&format!("read failed: {e}"));
        }
        (0..SECTORS)
            .map(|i| {
                let s = &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
                version_of(s, i).unwrap_or_else(|| self.fail(&format!("sector {i} holds garbage")))
            })
            .collect()
    }

    fn write(&mut self, zeroes: bool) -> bool {
        let start = self.rng.u64(..SECTORS);
        let n = 1 + self.rng.u64(..8.min(SECTORS - start));
        let v = if zeroes { 0 } else { self.next_version };
        self.next_version += 1;
        self.log.push(format!("write {start}+{n} v{v}"));
        let res = if zeroes {
            self.disk().write_zeroes(start * SECTOR, n * SECTOR, chance(&mut self.rng, 50))
        } else {
            let mut data: Vec<u8> = (start..start + n).flat_map(|i| sector_bytes(v, i)).collect();
            // Split across two buffers now and then, as a guest's scatter list would be.
            let cut = if n > 1 && chance(&mut self.rng, 30) { SECTOR as usize } else { data.len() };
            let (a, b) = data.split_at_mut(cut);
            let bufs: Vec<Buf<'_>> = [a, b].into_iter().filter(|x| !x.is_empty()).map(Buf::from).collect();
            self.disk().write_vectored_at(&bufs, start * SECTOR)
        };
        for i in start..start + n {
            self.model.since[i as usize].push(v);
            self.model.cur[i as usize] = v;
        }
        match res {
            Ok(()) => true,
            Err(e) if self.fuse.blown() => {
                self.log.push(format!("  failed by the crash: {e}"));
                false
            }
            Err(e) => self.fail(&format!("write failed without a crash: {e}")),
        }
    }

    fn flush(&mut self) -> bool {
        self.log.push("flush".into());
        match self.disk().flush() {
            Ok(()) => {
                self.model.flushed = self.model.cur.clone();
                self.model.since.iter_mut().for_each(Vec::clear);
                true
            }
            Err(_) if self.fuse.blown() => false,
            Err(e) => self.fail(&format!("flush failed without a crash: {e}")),
        }
    }

    /// A control call: false when the crash struck it.
    fn control(&mut self, what: &str, res: Result<(), ControlError>) -> bool {
        self.log.push(what.to_owned());
        match res {
            Ok(()) => true,
            Err(e) if e.is_storage() && self.fuse.blown() => false,
            Err(e) => self.fail(&format!("{what} failed: {e}")),
        }
    }

    fn check_reads(&self) {
        let got = self.read_all();
        if got != self.model.cur {
            self.fail(&format!("read back {got:?}\nexpected {:?}", self.model.cur));
        }
    }

    fn check_frozen_base(&self) {
        if !self.base_frozen_checkable {
            return;
        }
        let Some((id, Phase::Active)) = self.snapshot() else { return };
        let Some(image) = self.cut_images.get(&id) else { return };
        let bytes = self.base.bytes();
        for (i, want) in image.iter().enumerate() {
            let s = &bytes[i * SECTOR as usize..(i + 1) * SECTOR as usize];
            if version_of(s, i as u64) != Some(*want) {
                self.fail(&format!("frozen base changed at sector {i}: want v{want}"));
            }
        }
    }

    fn check_changes(&self) {
        let ch = self.vm().changes("d").unwrap_or_else(|e| self.fail(&format!("changes: {e}")));
        if !ch.trusted {
            return;
        }
        let Some(from) = ch.since_checkpoint.and_then(|id| self.cut_images.get(&id)) else { return };
        let to = match ch.until_snapshot {
            None => self.model.cur.clone(),
            Some(n) => match self.cut_images.get(&n) {
                Some(img) => img.clone(),
                None => return,
            },
        };
        for i in 0..SECTORS as usize {
            if from[i] != to[i] {
                let off = i as u64 * SECTOR;
                if !ch.extents.iter().any(|&(s, l)| s <= off && off < s + l) {
                    self.fail(&format!(
                        "sector {i} changed (v{} -> v{}) but the trusted change map misses it: {:?}",
                        from[i], to[i], ch.extents
                    ));
                }
            }
        }
    }

    fn crash(&mut self) {
        let power_loss = chance(&mut self.rng, 40);
        self.log.push(format!("crash ({})", if power_loss { "power loss" } else { "kill" }));
        self.vm = None;
        let mut rng = self.rng.fork();
        let mut keep = |_: usize| -> Option<usize> {
            if !power_loss {
                return Some(usize::MAX);
            }
            match rng.u64(..3) {
                0 => None,
                1 => Some(usize::MAX),
                _ => Some(rng.u64(..8) as usize),
            }
        };
        self.dir.crash(&mut keep);
        self.base.crash(&mut keep);
        if power_loss {
            self.boot += 1;
            // What the disk held at earlier cuts is no longer known exactly.
            self.cut_images.clear();
        }
        self.base_frozen_checkable = false;
        self.fuse.arm(i64::MAX);
        self.open();
        // Every sector holds the flushed version or one written after it.
        let got = self.read_all();
        for (i, v) in got.iter().enumerate() {
            let (flushed, since) = (self.model.flushed[i], &self.model.since[i]);
            if *v != flushed && !since.contains(v) {
                self.fail(&format!(
                    "after the crash sector {i} holds v{v}, flushed was v{flushed}, written since {since:?}"
                ));
            }
        }
        self.model.cur = got.clone();
        self.model.flushed = got;
        self.model.since.iter_mut().for_each(Vec::clear);
        self.check_changes();
    }

    fn step(&mut self) -> bool {
        let r = self.rng.u64(..100);
        let snap = self.snapshot();
        match r {
            0..=44 => self.write(false),
            45..=49 => self.write(true),
            50..=61 => self.flush(),
            62..=69 => {
                if snap.is_some() {
                    return true;
                }
                match self.vm().begin(BeginOptions::default()) {
                    Ok(info) => {
                        self.log.push(format!("begin -> {}", info.id));
                        self.cut_images.insert(info.id, self.model.cur.clone());
                        self.base_frozen_checkable = true;
                        true
                    }
                    Err(e) if e.is_storage() && self.fuse.blown() => {
                        self.log.push("begin (crashed)".into());
                        false
                    }
                    Err(e) => self.fail(&format!("begin failed: {e}")),
                }
            }
            70..=77 => match snap {
                Some((id, Phase::Active)) => {
                    let res = self.vm().merge(id);
                    self.control(&format!("merge {id}"), res)
                }
                _ => true,
            },
            78..=87 => {
                let steps = 1 + self.rng.u64(..3) as usize;
                self.log.push(format!("merge_some {steps}"));
                match self.vm().merge_some(steps) {
                    Ok(_) => true,
                    Err(_) if self.fuse.blown() => false,
                    Err(e) => self.fail(&format!("merge step failed: {e}")),
                }
            }
            88..=90 => match snap {
                Some((id, _)) => {
                    let res = self.vm().abandon(id, "model");
                    self.base_frozen_checkable = false;
                    self.control(&format!("abandon {id}"), res)
                }
                None => true,
            },
            91..=95 => {
                let until = self.vm().changes("d").map(|c| c.until_snapshot).unwrap_or(None);
                let Some(id) = until else { return true };
                let res = self.vm().checkpoint(id);
                match res {
                    Err(ControlError::State(_)) if self.abandoned.contains(&id) => true,
                    Ok(()) if self.abandoned.contains(&id) => {
                        self.fail(&format!("checkpoint {id} of an abandoned snapshot accepted"))
                    }
                    res => self.control(&format!("checkpoint {id}"), res),
                }
            }
            96..=97 => {
                self.check_reads();
                true
            }
            _ => false,
        }
    }

    fn run(&mut self, ops: usize) {
        // Half the cases blow the fuse at some persistence step; the rest crash at random.
        if chance(&mut self.rng, 50) {
            let budget = self.rng.u64(..300) as i64;
            self.fuse.arm(budget);
        }
        for _ in 0..ops {
            let stepped = self.step();
            if let Some(s) = self.vm().status().snapshot.filter(|_| self.vm().status().disks[0].abandoned.is_some()) {
                self.abandoned.insert(s.id);
            }
            if !stepped {
                self.crash();
                if chance(&mut self.rng, 50) {
                    let budget = self.rng.u64(..300) as i64;
                    self.fuse.arm(budget);
                }
            } else {
                self.check_frozen_base();
                self.check_changes();
            }
        }
        // Finish: merge whatever is left, then the base alone must hold the disk.
        self.fuse.arm(i64::MAX);
        if let Some((id, Phase::Active)) = self.snapshot() {
            let res = self.vm().merge(id);
            self.control("final merge", res);
        }
        while self.vm().merge_some(8).unwrap_or_else(|e| self.fail(&format!("final merge: {e}"))) {}
        if self.snapshot().is_some() {
            self.fail("a snapshot is left after its merge");
        }
        self.check_reads();
        self.flush();
        let bytes = self.base.bytes();
        for i in 0..SECTORS {
            let s = &bytes[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
            if version_of(s, i) != Some(self.model.cur[i as usize]) {
                self.fail(&format!("after the merge the base's sector {i} is not v{}", self.model.cur[i as usize]));
            }
        }
        // No delta file is left behind once the backend restarts (a removal the crash struck
        // is finished by the next start).
        self.vm = None;
        self.open();
        self.check_reads();
        let left: Vec<String> = self
            .dir
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.contains(".delta.") || n.contains(".map."))
            .collect();
        if !left.is_empty() {
            self.fail(&format!("delta files left after the merge: {left:?}"));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_cases(cache: Option<Cache>, default_cases: u64) {
    if let Some(seed) = env_u64("LIVESNAP_MODEL_SEED") {
        Case::new(seed, cache).run(80);
        return;
    }
    let cases = env_u64("LIVESNAP_MODEL_CASES").unwrap_or(default_cases);
    for seed in 0..cases {
        Case::new(seed, cache).run(80);
    }
}

#[test]
fn random_sequences_with_crashes_keep_flushed_writes_frozen_bases_and_change_maps() {
    run_cases(None, 2000);
}

#[test]
fn random_sequences_on_a_page_cached_raw_base_keep_the_same_rules() {
    run_cases(Some(Cache::Writeback), 300);
}

#[test]
fn random_sequences_on_a_raw_base_with_cache_none_keep_the_same_rules() {
    run_cases(Some(Cache::None), 300);
}
