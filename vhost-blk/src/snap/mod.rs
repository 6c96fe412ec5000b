//! The snapshot engine: redirect-on-write snapshots, the online merge and changed-block
//! tracking, for all disks of one VM. Nothing here knows about virtio: the engine wraps each
//! disk in a [`SnapDisk`], itself a [`DiskFile`], and works on byte ranges.
//!
//! - [`api`]: what callers see (the control service maps it to gRPC).
//! - [`Vm`]: the disks of one VM, the cut, merges, checkpoints, recovery at start.
//! - [`disk`]: a disk's mode (direct, snapshot active, merging) and its request paths.
//! - [`delta`]: the delta (data file and extent map) and the merger's steps.
//! - [`journal`], [`record`], [`cbt`]: what is persisted, each versioned and checksummed.
//! - [`recover`]: folds a delta into its base offline, when the record does not read back.
//! - [`extents`]: the in-memory range set; [`store`]: the directory the files live in.
//!
//! Files in the state directory: `snapshot.state` (the record), and per disk `ID.delta.N`,
//! `ID.map.N` (snapshot N's delta and journal) and `ID.cbt.G` (change-map generation G).
//! `docs/delta-format.md` describes their layout and `docs/snapshots.md` the protocol.

pub mod api;
pub mod cbt;
pub mod delta;
pub mod disk;
pub mod extents;
pub mod journal;
pub mod record;
pub mod recover;
pub mod store;

#[cfg(test)]
mod cut_tests;
#[cfg(test)]
mod full_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod recovery_tests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

pub use self::api::*;
use self::cbt::Bitmap;
use self::delta::Delta;
use self::disk::{Mode, SnapDisk};
use self::journal::Journal;
use self::record::{CbtState, RecordFile, SnapPhase, SnapState, VmState};
use self::store::Dir;
use crate::disk::DiskFile;

const RECORD_NAME: &str = "snapshot.state";
/// Bytes merged between two commits of the merge's progress.
const MERGE_COMMIT_BYTES: u64 = 64 << 20;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read or write {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create the change map {name}")]
    ChangeMap {
        name: String,
        #[source]
        source: cbt::Error,
    },
    #[error(
        "Snapshot record {path} cannot be trusted; nothing was served and no file was removed (see \"Recovery\" in docs/snapshots.md)",
        path = .path.display()
    )]
    RecordUnreadable {
        path: PathBuf,
        #[source]
        source: record::Error,
    },
    #[error(
        "Snapshot record {path} is missing or empty, but the state directory holds {files:?}; nothing was served and no file was removed (see \"Recovery\" in docs/snapshots.md)",
        path = .path.display()
    )]
    RecordMissing { path: PathBuf, files: Vec<String> },
    #[error("Cannot write the snapshot record {path}", path = .path.display())]
    RecordWrite {
        path: PathBuf,
        #[source]
        source: record::Error,
    },
    #[error("Delta of disk {disk} for snapshot {snapshot} cannot be opened")]
    Delta {
        disk: String,
        snapshot: u64,
        #[source]
        source: journal::Error,
    },
    #[error("Delta of disk {disk} for snapshot {snapshot} cannot be opened: {file} is missing")]
    DeltaMissing { disk: String, snapshot: u64, file: String },
    #[error("Snapshot {snapshot} has a delta for disk {disk}, which is not given; serve it again to keep its writes")]
    MissingDisk { snapshot: u64, disk: String },
}

/// Settings of a VM's engine.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes per change-map bit.
    pub granularity: u64,
    /// Default most bytes a delta may hold.
    pub delta_limit: Option<u64>,
    /// The host's boot id (tests pass their own).
    pub boot_id: String,
    /// Run merges on their own threads (tests drive them by hand).
    pub background_merge: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { granularity: 64 << 10, delta_limit: None, boot_id: cbt::boot_id(), background_merge: true }
    }
}

/// A disk handed to [`Vm::open`].
#[derive(Debug)]
pub struct DiskSpec {
    pub id: String,
    pub base: Arc<dyn DiskFile>,
    pub base_path: PathBuf,
}

struct Ctl {
    record: RecordFile,
    state: VmState,
    last_pause: Duration,
}

/// What the engine's threads share.
pub struct VmShared {
    name: String,
    dir: Arc<dyn Dir>,
    disks: Vec<Arc<SnapDisk>>,
    opts: Options,
    ctl: Mutex<Ctl>,
    stop: AtomicBool,
    mergers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared").field("name", &self.name).field("disks", &self.disks.len()).finish()
    }
}

/// The snapshot engine of one VM.
#[derive(Debug, Clone)]
pub struct Vm {
    shared: Arc<VmShared>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn create_err(name: &str) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Create { name: name.to_owned(), source }
}

fn delta_name(disk: &str, snapshot: u64) -> String {
    format!("{disk}.delta.{snapshot}")
}

fn map_name(disk: &str, snapshot: u64) -> String {
    format!("{disk}.map.{snapshot}")
}

fn cbt_name(disk: &str, gen: u64) -> String {
    format!("{disk}.cbt.{gen}")
}

/// Whether `name` is a delta, journal or change map (a file the record names while it is used).
fn is_engine_file(name: &str) -> bool {
    [".delta.", ".map.", ".cbt."].iter().any(|p| name.contains(p))
}

fn record_err(dir: &dyn Dir) -> impl FnOnce(record::Error) -> Error {
    let path = dir.path(RECORD_NAME);
    move |source| Error::RecordWrite { path, source }
}

/// Records in `state` that snapshot `id` was abandoned (the first reason stays): in the
/// snapshot while it exists, and beside the change maps it froze, so that its checkpoint is
/// refused also after the merge.
fn mark_abandoned(state: &mut VmState, id: u64, reason: &str) {
    if let Some(s) = state.snapshot.as_mut().filter(|s| s.id == id && s.abandoned.is_none()) {
        s.abandoned = Some(reason.chars().take(512).collect());
    }
    for c in state.cbt.iter_mut().filter(|c| c.frozen_for == Some(id)) {
        c.frozen_abandoned = true;
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Vm {
    /// Opens the engine on `dir`, recovering whatever a previous run left: an active snapshot
    /// stays active, a merge resumes, change maps carry on.
    pub fn open(name: &str, dir: Arc<dyn Dir>, disks: Vec<DiskSpec>, opts: Options) -> Result<Vm, Error> {
        let vm = Self::open_deferred(name, dir, disks, opts)?;
        vm.resume_merges();
        Ok(vm)
    }

    /// As [`Vm::open`], but an interrupted merge resumes only at [`Vm::resume_merges`]: opening
    /// starts no thread, so that livesnap-blk can confine itself in between.
    pub fn open_deferred(name: &str, dir: Arc<dyn Dir>, disks: Vec<DiskSpec>, opts: Options) -> Result<Vm, Error> {
        let (mut record, mut state) = Self::open_record(&*dir)?;

        if let Some(snap) = &state.snapshot {
            for (disk, _) in &snap.disks {
                if !disks.iter().any(|d| &d.id == disk) {
                    return Err(Error::MissingDisk { snapshot: snap.id, disk: disk.clone() });
                }
            }
        }

        let mut keep: HashSet<String> = HashSet::from([RECORD_NAME.to_owned()]);
        let mut snap_disks = Vec::new();
        for spec in disks {
            let size = spec.base.size();
            let (current, frozen) = Self::open_cbt(&*dir, &mut state, &spec.id, size, &opts)?;
            keep.insert(cbt_name(&spec.id, current.generation()));
            if let Some(f) = &frozen {
                keep.insert(cbt_name(&spec.id, f.generation()));
            }
            let mut mode = Mode::Direct;
            if let Some(snap) = &state.snapshot {
                if let Some((_, phase)) = snap.disks.iter().find(|(d, _)| *d == spec.id) {
                    let delta = Self::open_delta(&*dir, &spec.id, snap, size)?;
                    keep.insert(delta.data_name.clone());
                    keep.insert(delta.journal_name.clone());
                    let (bytes, extents) = delta.usage();
                    info!(vm = name, disk = %spec.id, snapshot = snap.id, ?phase, bytes, extents, "delta recovered");
                    mode = match phase {
                        SnapPhase::Active => Mode::Active(Arc::new(delta)),
                        SnapPhase::Merging => Mode::Merging(Arc::new(delta)),
                    };
                }
            }
            let d = SnapDisk::new(spec.id, spec.base, spec.base_path, mode, current);
            *d.frozen.lock().unwrap_or_else(PoisonError::into_inner) = frozen;
            snap_disks.push(Arc::new(d));
        }
        // Change maps of disks not served this time stay for when they are served again.
        for c in &state.cbt {
            keep.insert(cbt_name(&c.disk, c.current));
            if let Some(gen) = c.frozen {
                keep.insert(cbt_name(&c.disk, gen));
            }
        }
        record.write(&state).map_err(record_err(&*dir))?;
        // Only now, on the word of a record that was read (or of a new directory's first one).
        Self::remove_strays(&*dir, &keep);

        let shared = Arc::new(VmShared {
            name: name.to_owned(),
            dir,
            disks: snap_disks,
            opts,
            ctl: Mutex::new(Ctl { record, state, last_pause: Duration::ZERO }),
            stop: AtomicBool::new(false),
            mergers: Mutex::new(Vec::new()),
        });
        for d in &shared.disks {
            d.set_vm(Arc::downgrade(&shared));
        }
        Ok(Vm { shared })
    }

    /// Resumes every merge a previous run left unfinished, each on its own thread.
    pub fn resume_merges(&self) {
        let shared = &self.shared;
        let merging: Vec<usize> = (0..shared.disks.len())
            .filter(|&i| matches!(shared.disks[i].read_state().mode, Mode::Merging(_)))
            .collect();
        for i in merging {
            info!(vm = %shared.name, disk = %shared.disks[i].id, "resuming the merge");
            shared.spawn_merger(i);
        }
    }

    /// Reads the record; a directory is new only when the record is absent or empty and no
    /// file of the engine lies beside it. Anything else that does not read back stops here,
    /// before any file is touched.
    fn open_record(dir: &dyn Dir) -> Result<(RecordFile, VmState), Error> {
        let path = dir.path(RECORD_NAME);
        if let Some(file) = dir.open(RECORD_NAME).map_err(io_err(RECORD_NAME))? {
            let (record, state) =
                RecordFile::open(file).map_err(|source| Error::RecordUnreadable { path: path.clone(), source })?;
            if let Some(state) = state {
                return Ok((record, state));
            }
        }
        let mut files: Vec<String> =
            dir.list().map_err(io_err("the state directory"))?.into_iter().filter(|n| is_engine_file(n)).collect();
        if !files.is_empty() {
            files.sort();
            return Err(Error::RecordMissing { path, files });
        }
        // A new directory: its first record is written before any other file is created, so a
        // crash from here on leaves a record that names every file worth keeping.
        let file = dir.create(RECORD_NAME).map_err(io_err(RECORD_NAME))?;
        let (mut record, _) =
            RecordFile::open(file).map_err(|source| Error::RecordUnreadable { path: path.clone(), source })?;
        let state = VmState::default();
        record.write(&state).map_err(record_err(dir))?;
        Ok((record, state))
    }

    fn open_cbt(
        dir: &dyn Dir,
        state: &mut VmState,
        disk: &str,
        size: u64,
        opts: &Options,
    ) -> Result<(Arc<Bitmap>, Option<Arc<Bitmap>>), Error> {
        let fresh = |gen: u64, why: String| -> Result<Arc<Bitmap>, Error> {
            let name = cbt_name(disk, gen);
            let file = dir.create(&name).map_err(io_err(&name))?;
            Bitmap::create(file, gen, opts.granularity, size, Some(why), &opts.boot_id)
                .map(Arc::new)
                .map_err(|source| Error::ChangeMap { name, source })
        };
        let open = |gen: u64| -> Result<Arc<Bitmap>, Error> {
            let name = cbt_name(disk, gen);
            let reopened = match dir.open(&name).map_err(io_err(&name))? {
                Some(file) => Bitmap::open(file, gen, opts.granularity, size, &opts.boot_id)
                    .map_err(|e| livesnap_proto::error::chain(&e)),
                None => Err("The change map file is missing".to_owned()),
            };
            match reopened {
                Ok(bm) => Ok(Arc::new(bm)),
                Err(why) => {
                    warn!(disk, gen, reason = %why, "change map unusable; the next backup must be full");
                    fresh(gen, why)
                }
            }
        };
        match state.cbt(disk).cloned() {
            Some(c) => {
                let current = open(c.current)?;
                let frozen = c.frozen.map(&open).transpose()?;
                Ok((current, frozen))
            }
            None => {
                let current = fresh(0, "change tracking began after the disk was first served".into())?;
                state.cbt.push(CbtState {
                    disk: disk.to_owned(),
                    current: 0,
                    frozen: None,
                    frozen_for: None,
                    checkpoint: None,
                    frozen_abandoned: false,
                });
                Ok((current, None))
            }
        }
    }

    fn open_delta(dir: &dyn Dir, disk: &str, snap: &SnapState, size: u64) -> Result<Delta, Error> {
        let (dname, jname) = (delta_name(disk, snap.id), map_name(disk, snap.id));
        let missing =
            |file: &str| Error::DeltaMissing { disk: disk.to_owned(), snapshot: snap.id, file: file.to_owned() };
        let jfile = dir.open(&jname).map_err(io_err(&jname))?.ok_or_else(|| missing(&jname))?;
        let data = dir.open_data(&dname).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => missing(&dname),
            _ => Error::Io { what: dname.clone(), source: e },
        })?;
        let (journal, map) = Journal::open(jfile, snap.id, size).map_err(|source| Error::Delta {
            disk: disk.to_owned(),
            snapshot: snap.id,
            source,
        })?;
        Ok(Delta::new(snap.id, data, journal, map, (dname, jname), snap.delta_limit))
    }

    fn remove_strays(dir: &dyn Dir, keep: &HashSet<String>) {
        let Ok(names) = dir.list() else { return };
        for name in names {
            if is_engine_file(&name) && !keep.contains(&name) {
                info!(file = %name, "removing a file no snapshot refers to");
                if let Err(e) = dir.remove(&name) {
                    warn!(file = %name, error = %livesnap_proto::error::chain(&e), "cannot remove");
                }
            }
        }
    }

    /// The disk as the virtio layer should serve it.
    pub fn disk(&self, id: &str) -> Option<Arc<dyn DiskFile>> {
        self.shared.disks.iter().find(|d| d.id == id).map(|d| d.clone() as Arc<dyn DiskFile>)
    }

    /// Runs up to `steps` merge steps on every merging disk, finishing disks whose delta is
    /// empty; returns true while a merge is left. For tests that drive merges themselves.
    pub fn merge_some(&self, steps: usize) -> Result<bool, ControlError> {
        let mut left = false;
        for i in 0..self.shared.disks.len() {
            let disk = &self.shared.disks[i];
            let Mode::Merging(delta) = disk.read_state().mode.clone() else { continue };
            let merge_err = |source| ControlError::Merge { disk: disk.id.clone(), source };
            let mut buf = Vec::new();
            for _ in 0..steps {
                if delta.merge_step(&*disk.base, &mut buf).map_err(merge_err)? == 0 {
                    break;
                }
            }
            // As the merger: the end needs no journal, progress does.
            if delta.is_empty() {
                self.shared.finish_merge(i)?;
            } else {
                disk.commit_durably(&delta).map_err(merge_err)?;
                disk.release_merged(&delta);
                left = true;
            }
        }
        Ok(left)
    }

    /// Stops merges and makes everything durable; call after the last request completed.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let handles = std::mem::take(&mut *self.shared.mergers.lock().unwrap_or_else(PoisonError::into_inner));
        for h in handles {
            let _ = h.join();
        }
        for d in &self.shared.disks {
            if let Err(e) = d.flush() {
                error!(disk = %d.id, error = %livesnap_proto::error::chain(&e), "final flush failed");
            }
            let st = d.read_state();
            let frozen = d.frozen.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for bm in std::iter::once(st.cbt.clone()).chain(frozen) {
                if let Err(e) = bm.close() {
                    error!(disk = %d.id, error = %livesnap_proto::error::chain(&e), "cannot close the change map");
                }
            }
        }
    }
}

impl VmShared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disk_index(&self, id: &str) -> Result<usize, ControlError> {
        self.disks
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| ControlError::NotFound(format!("No disk {id:?} in VM {}", self.name)))
    }

    fn begin(self: &Arc<Self>, opts: BeginOptions) -> Result<SnapshotInfo, ControlError> {
        let mut ctl = self.ctl();
        if let Some(s) = &ctl.state.snapshot {
            return Err(ControlError::State(format!(
                "Snapshot {} is still {}; merge or abandon it first",
                s.id,
                if s.disks.iter().any(|(_, p)| *p == SnapPhase::Merging) { "merging" } else { "active" }
            )));
        }
        let mut chosen: Vec<usize> = Vec::new();
        if opts.disks.is_empty() {
            chosen.extend(0..self.disks.len());
        } else {
            for id in &opts.disks {
                let i = self.disk_index(id)?;
                if !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
        }
        let limit = opts.delta_limit.or(self.opts.delta_limit);
        if limit == Some(0) {
            return Err(ControlError::Invalid(
                "A delta limit of 0 bytes would abandon the snapshot at the first write".into(),
            ));
        }
        let id = ctl.state.next_id;

        // Prepare every file before the guest is paused.
        let mut prepared = Vec::new();
        let mut absorbed = Vec::new();
        let result = (|| -> Result<(), ControlError> {
            for &i in &chosen {
                let disk = &self.disks[i];
                let size = disk.size();
                let (dname, jname, cname) = (delta_name(&disk.id, id), map_name(&disk.id, id), cbt_name(&disk.id, id));
                let data = self.dir.create_data(&dname, size).map_err(create_err(&dname))?;
                let jfile = self.dir.create(&jname).map_err(create_err(&jname))?;
                let journal = Journal::create(jfile, id, size)
                    .map_err(|source| ControlError::DeltaMap { name: jname.clone(), source })?;
                let cfile = self.dir.create(&cname).map_err(create_err(&cname))?;
                let next = Bitmap::create(cfile, id, self.opts.granularity, size, None, &self.opts.boot_id)
                    .map_err(|source| ControlError::ChangeMap { name: cname.clone(), source })?;
                // A frozen generation never acknowledged (its backup failed) joins the current
                // one, so the next backup covers both.
                let old = disk.frozen.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if let Some(old) = old {
                    disk.read_state()
                        .cbt
                        .absorb(&old)
                        .map_err(|source| ControlError::AbsorbChanges { disk: disk.id.clone(), source })?;
                    absorbed.push(cbt_name(&disk.id, old.generation()));
                }
                let delta = Delta::new(id, data, journal, extents::ExtentMap::new(), (dname, jname), limit);
                prepared.push((i, Arc::new(delta), Arc::new(next)));
            }
            self.dir.sync().map_err(ControlError::SyncDir)
        })();
        if let Err(e) = result {
            for (i, delta, _) in &prepared {
                let _ = self.dir.remove(&delta.data_name);
                let _ = self.dir.remove(&delta.journal_name);
                let _ = self.dir.remove(&cbt_name(&self.disks[*i].id, id));
            }
            return Err(e);
        }

        let mut next_state = ctl.state.clone();
        next_state.next_id = id + 1;
        let names: Vec<String> = chosen.iter().map(|&i| self.disks[i].id.clone()).collect();
        let created_unix = now_unix();
        next_state.snapshot = Some(SnapState {
            id,
            created_unix,
            pause_us: 0,
            disks: names.iter().map(|n| (n.clone(), SnapPhase::Active)).collect(),
            cut_disks: names.clone(),
            delta_limit: limit,
            abandoned: None,
        });
        for (i, _, _) in &prepared {
            let disk = &self.disks[*i];
            if let Some(c) = next_state.cbt_mut(&disk.id) {
                c.frozen = Some(c.current);
                c.frozen_for = Some(id);
                c.current = id;
                c.frozen_abandoned = false;
            }
        }

        // The record first, while the guest runs: from the switch on, writes land in deltas
        // that a restart must find. Writes until the switch still go to the bases, and count
        // as before the cut (their change-map marks go to the generation frozen with it).
        if let Err(e) = ctl.record.write(&next_state) {
            for (i, delta, _) in &prepared {
                let _ = self.dir.remove(&delta.data_name);
                let _ = self.dir.remove(&delta.journal_name);
                let _ = self.dir.remove(&cbt_name(&self.disks[*i].id, id));
            }
            let e = ControlError::Record(e);
            error!(vm = %self.name, snapshot = id, error = %livesnap_proto::error::chain(&e), "snapshot failed: cannot record the cut");
            return Err(e);
        }
        // The cut: on every disk at once, requests from now on write to the delta. The guest
        // is held only while the modes are swapped; requests started before go on in theirs.
        let t0 = Instant::now();
        let mut guards: Vec<_> = chosen.iter().map(|&i| self.disks[i].pause()).collect();
        let mut old_gens = Vec::new();
        let mut drains = Vec::new();
        for (guard, (_, delta, next)) in guards.iter_mut().zip(&prepared) {
            guard.mode = Mode::Active(delta.clone());
            old_gens.push(std::mem::replace(&mut guard.cbt, next.clone()));
            drains.push(guard.new_epoch());
        }
        drop(guards);
        let pause = t0.elapsed();
        // The bases are frozen once the requests from before the cut have completed.
        for d in drains {
            d.wait();
        }
        // No write reaches these bases any more; a format that caches metadata (qcow2) writes
        // it out now, so that a reader of the file sees the disk as it was at the cut. (Not a
        // flush: syncing a raw base, dirty with the guest's recent writes, could take seconds,
        // and a guest frozen for the cut waits for `begin` to return.)
        for &i in &chosen {
            if let Err(e) = self.disks[i].base.publish() {
                error!(vm = %self.name, disk = %self.disks[i].id, snapshot = id, error = %livesnap_proto::error::chain(&e), "cannot write out the frozen base's metadata");
            }
        }

        for ((i, _, _), old) in prepared.iter().zip(old_gens) {
            let disk = &self.disks[*i];
            *disk.frozen.lock().unwrap_or_else(PoisonError::into_inner) = Some(old);
            disk.counters.cuts.fetch_add(1, Ordering::Relaxed);
            disk.counters.max_cut_pause_us.fetch_max(micros(pause), Ordering::Relaxed);
        }
        if let Some(s) = next_state.snapshot.as_mut() {
            s.pause_us = micros(pause);
        }
        ctl.state = next_state;
        ctl.last_pause = pause;
        for name in absorbed {
            let _ = self.dir.remove(&name);
        }
        info!(vm = %self.name, snapshot = id, disks = ?names, pause_us = micros(pause), "snapshot cut");
        Ok(SnapshotInfo { id, disks: names, created_unix, pause })
    }

    /// Switches the snapshot's active disks to merging and starts their mergers.
    fn start_merge(self: &Arc<Self>, ctl: &mut Ctl, abandoned: Option<&str>) -> Result<(), ControlError> {
        let Some(snap) = ctl.state.snapshot.clone() else { return Ok(()) };
        let active: Vec<usize> = snap
            .disks
            .iter()
            .filter(|(_, p)| *p == SnapPhase::Active)
            .filter_map(|(d, _)| self.disks.iter().position(|x| &x.id == d))
            .collect();
        let mut next_state = ctl.state.clone();
        if let Some(s) = next_state.snapshot.as_mut() {
            for (_, p) in &mut s.disks {
                *p = SnapPhase::Merging;
            }
        }
        if let Some(reason) = abandoned {
            mark_abandoned(&mut next_state, snap.id, reason);
        }
        // Recorded first: a restart resumes the merge, which copies what the journal holds. The
        // switch commits nothing: commits while merging sync the delta too.
        ctl.record.write(&next_state).map_err(ControlError::Record)?;
        let mut guards: Vec<_> = active.iter().map(|&i| self.disks[i].pause()).collect();
        let mut drains = Vec::new();
        for guard in &mut guards {
            if let Mode::Active(d) = &guard.mode {
                guard.mode = Mode::Merging(d.clone());
                drains.push(guard.new_epoch());
            }
        }
        drop(guards);
        // No merger starts while a write of the active phase could still add to the map.
        for d in drains {
            d.wait();
        }
        ctl.state = next_state;
        if self.opts.background_merge {
            for &i in &active {
                self.spawn_merger(i);
            }
        }
        Ok(())
    }

    fn spawn_merger(self: &Arc<Self>, i: usize) {
        if !self.opts.background_merge {
            return;
        }
        let vm = self.clone();
        let spawned =
            std::thread::Builder::new().name(format!("merge-{}", self.disks[i].id)).spawn(move || vm.run_merger(i));
        match spawned {
            Ok(h) => self.mergers.lock().unwrap_or_else(PoisonError::into_inner).push(h),
            Err(e) => {
                error!(disk = %self.disks[i].id, error = %livesnap_proto::error::chain(&e), "cannot start the merge thread")
            }
        }
    }

    fn run_merger(self: Arc<Self>, i: usize) {
        let disk = &self.disks[i];
        let Mode::Merging(delta) = disk.read_state().mode.clone() else { return };
        let (total, _) = delta.usage();
        info!(vm = %self.name, disk = %disk.id, snapshot = delta.snapshot, bytes = total, "merge started");
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let mut since_commit = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let step = delta.merge_step(&*disk.base, &mut buf);
            let done = match step {
                Ok(0) => true,
                Ok(n) => {
                    since_commit += n;
                    if since_commit < MERGE_COMMIT_BYTES {
                        continue;
                    }
                    false
                }
                Err(e) => {
                    error!(disk = %disk.id, error = %livesnap_proto::error::chain(&e), "merge step failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            since_commit = 0;
            if !done {
                match disk.commit_durably(&delta) {
                    Ok(()) => disk.release_merged(&delta),
                    // Progress not recorded is copied again after a crash; the merge goes on.
                    Err(e) => {
                        warn!(disk = %disk.id, error = %livesnap_proto::error::chain(&e), "cannot record merge progress")
                    }
                }
                continue;
            }
            // The end needs no journal (the record drops the delta): a full filesystem, which
            // may be why the snapshot was abandoned, cannot hold it up.
            match self.finish_merge(i) {
                Ok(()) => {
                    info!(vm = %self.name, disk = %disk.id, snapshot = delta.snapshot, bytes = delta.merged_bytes(),
                          secs = t0.elapsed().as_secs_f64(), "merge complete");
                    return;
                }
                Err(e) => {
                    error!(disk = %disk.id, error = %livesnap_proto::error::chain(&e), "cannot record the end of the merge; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Records disk `i`'s merge as complete once its delta is empty, and drops the delta.
    fn finish_merge(&self, i: usize) -> Result<(), ControlError> {
        let disk = &self.disks[i];
        let mut ctl = self.ctl();
        let Mode::Merging(delta) = disk.read_state().mode.clone() else { return Ok(()) };
        // The map only shrinks while merging (the writes of the active phase were drained at
        // its start), so an empty map stays empty: the base is made durable and the end
        // recorded while the guest runs, then only the mode is swapped.
        if !delta.is_empty() {
            return Ok(());
        }
        // Every byte is in the base once it is durable; the journal's last records are moot
        // once the record no longer names the delta (a FLUSH committed those it relied on).
        disk.base.flush().map_err(|source| ControlError::Merge { disk: disk.id.clone(), source })?;
        let mut next_state = ctl.state.clone();
        if let Some(s) = next_state.snapshot.as_mut() {
            s.disks.retain(|(d, _)| *d != disk.id);
            if s.disks.is_empty() {
                next_state.snapshot = None;
            }
        }
        ctl.record.write(&next_state).map_err(ControlError::Record)?;
        let mut guard = disk.pause();
        guard.mode = Mode::Direct;
        // Merging writes still running over an empty map write the base, as direct ones do.
        drop(guard.new_epoch());
        drop(guard);
        *disk.last_merge.lock().unwrap_or_else(PoisonError::into_inner) = Some((delta.snapshot, delta.merged_bytes()));
        ctl.state = next_state;
        drop(ctl);
        for name in [&delta.data_name, &delta.journal_name] {
            if let Err(e) = self.dir.remove(name) {
                warn!(file = %name, error = %livesnap_proto::error::chain(&e), "cannot remove a merged delta file");
            }
        }
        Ok(())
    }

    /// Called by a disk whose delta is full: abandons the snapshot so that writes go to the
    /// base. Returns false when that failed.
    pub fn abandon_for_overflow(self: &Arc<Self>, snapshot: u64, disk: &str, reason: &str) -> bool {
        let mut ctl = self.ctl();
        match &ctl.state.snapshot {
            Some(s) if s.id == snapshot => {}
            // Someone else already moved the snapshot on: the write can be retried.
            _ => return true,
        }
        let why = format!("disk {disk}: {reason}");
        error!(vm = %self.name, snapshot, reason = %why, "snapshot abandoned: the delta is full");
        match self.start_merge(&mut ctl, Some(&why)) {
            Ok(()) => true,
            Err(e) => {
                error!(vm = %self.name, snapshot, error = %livesnap_proto::error::chain(&e), "cannot abandon the snapshot");
                false
            }
        }
    }

    fn current_snapshot(&self, ctl: &Ctl, id: u64) -> Result<SnapState, ControlError> {
        match &ctl.state.snapshot {
            Some(s) if s.id == id => Ok(s.clone()),
            Some(s) => Err(ControlError::NotFound(format!("No snapshot {id}; the current one is {}", s.id))),
            None => Err(ControlError::NotFound(format!("No snapshot {id}; there is no snapshot"))),
        }
    }
}

impl SnapshotControl for Vm {
    fn begin(&self, opts: BeginOptions) -> Result<SnapshotInfo, ControlError> {
        self.shared.begin(opts)
    }

    fn status(&self) -> VmStatus {
        let sh = &self.shared;
        let ctl = sh.ctl();
        let snapshot = ctl.state.snapshot.as_ref().map(|s| SnapshotInfo {
            id: s.id,
            disks: s.cut_disks.clone(),
            created_unix: s.created_unix,
            pause: Duration::from_micros(s.pause_us),
        });
        let disks = sh
            .disks
            .iter()
            .map(|d| {
                let st = d.read_state();
                let (phase, delta) = match &st.mode {
                    Mode::Direct => (Phase::Direct, None),
                    Mode::Active(x) => (Phase::Active, Some(x.clone())),
                    Mode::Merging(x) => (Phase::Merging, Some(x.clone())),
                };
                drop(st);
                let (delta_bytes, delta_extents) = delta.as_ref().map_or((0, 0), |x| x.usage());
                DiskState {
                    id: d.id.clone(),
                    phase,
                    snapshot: delta.as_ref().map(|x| x.snapshot),
                    size: d.size(),
                    base_path: d.base_path.clone(),
                    base_format: d.format(),
                    delta_path: delta.as_ref().map(|x| sh.dir.path(&x.data_name)),
                    delta_bytes,
                    delta_extents,
                    merge: (phase == Phase::Merging).then(|| MergeProgress {
                        done_bytes: delta.as_ref().map_or(0, |x| x.merged_bytes()),
                        remaining_bytes: delta_bytes,
                    }),
                    abandoned: ctl
                        .state
                        .snapshot
                        .as_ref()
                        .and_then(|s| s.abandoned.clone())
                        .filter(|_| delta.is_some()),
                    last_merge: *d.last_merge.lock().unwrap_or_else(PoisonError::into_inner),
                }
            })
            .collect();
        VmStatus { vm: sh.name.clone(), snapshot, disks }
    }

    fn changes(&self, disk: &str) -> Result<Changes, ControlError> {
        let sh = &self.shared;
        let i = sh.disk_index(disk)?;
        let ctl = sh.ctl();
        let d = &sh.disks[i];
        let frozen = d.frozen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let until = ctl.state.cbt(disk).and_then(|c| c.frozen_for);
        let bm = match frozen {
            Some(f) => f,
            None => d.read_state().cbt.clone(),
        };
        let untrusted = bm.untrusted();
        Ok(Changes {
            disk: disk.to_owned(),
            since_checkpoint: ctl.state.cbt(disk).and_then(|c| c.checkpoint),
            until_snapshot: until,
            granularity: bm.granularity(),
            trusted: untrusted.is_none(),
            untrusted_reason: untrusted,
            extents: bm.extents(),
        })
    }

    fn merge(&self, id: u64) -> Result<(), ControlError> {
        let mut ctl = self.shared.ctl();
        self.shared.current_snapshot(&ctl, id)?;
        self.shared.start_merge(&mut ctl, None)
    }

    fn abandon(&self, id: u64, reason: &str) -> Result<(), ControlError> {
        let mut ctl = self.shared.ctl();
        let snap = self.shared.current_snapshot(&ctl, id)?;
        let reason = if reason.is_empty() { "abandoned by the operator" } else { reason };
        warn!(vm = %self.shared.name, snapshot = id, reason, "snapshot abandoned");
        if snap.abandoned.is_none() && snap.disks.iter().all(|(_, p)| *p == SnapPhase::Merging) {
            let mut next = ctl.state.clone();
            mark_abandoned(&mut next, id, reason);
            ctl.record.write(&next).map_err(ControlError::Record)?;
            ctl.state = next;
            return Ok(());
        }
        self.shared.start_merge(&mut ctl, Some(reason))
    }

    fn checkpoint(&self, id: u64) -> Result<(), ControlError> {
        let sh = &self.shared;
        let mut ctl = sh.ctl();
        if let Some(s) = &ctl.state.snapshot {
            if s.id == id {
                if let Some(why) = &s.abandoned {
                    return Err(ControlError::State(format!(
                        "Snapshot {id} was abandoned ({why}); its base was not kept frozen"
                    )));
                }
            }
        }
        if ctl.state.cbt.iter().any(|c| c.frozen_for == Some(id) && c.frozen_abandoned) {
            return Err(ControlError::State(format!(
                "Snapshot {id} was abandoned; its base was not kept frozen, so its backup cannot be acknowledged"
            )));
        }
        let mut next = ctl.state.clone();
        let mut hit = Vec::new();
        for c in &mut next.cbt {
            if c.frozen_for == Some(id) {
                if let Some(gen) = c.frozen.take() {
                    hit.push((c.disk.clone(), gen));
                }
                c.frozen_for = None;
                c.checkpoint = Some(id);
            }
        }
        if hit.is_empty() {
            return Err(ControlError::NotFound(format!("No change map waits for checkpoint {id}")));
        }
        ctl.record.write(&next).map_err(ControlError::Record)?;
        ctl.state = next;
        drop(ctl);
        for (disk, gen) in hit {
            if let Some(d) = sh.disks.iter().find(|d| d.id == disk) {
                d.frozen.lock().unwrap_or_else(PoisonError::into_inner).take();
            }
            let _ = sh.dir.remove(&cbt_name(&disk, gen));
        }
        Ok(())
    }

    fn stats(&self) -> Vec<DiskStats> {
        self.shared
            .disks
            .iter()
            .map(|d| {
                let c = &d.counters;
                let merged = match &d.read_state().mode {
                    Mode::Merging(x) => x.merged_bytes(),
                    _ => 0,
                };
                DiskStats {
                    id: d.id.clone(),
                    reads: c.reads.load(Ordering::Relaxed),
                    writes: c.writes.load(Ordering::Relaxed),
                    read_bytes: c.read_bytes.load(Ordering::Relaxed),
                    written_bytes: c.written_bytes.load(Ordering::Relaxed),
                    flushes: c.flushes.load(Ordering::Relaxed),
                    cuts: c.cuts.load(Ordering::Relaxed),
                    max_cut_pause: Duration::from_micros(c.max_cut_pause_us.load(Ordering::Relaxed)),
                    merged_bytes: merged,
                }
            })
            .collect()
    }
}
