//! Writing a backup: chunks first, then each disk's manifest, then one commit that makes the
//! backup visible.
//!
//! The pool's threads read, hash and compress chunks; as many storing threads put the chunk
//! files they hand over through a short queue into the store, so a worker never waits for a
//! chunk to become durable (a local store's `fsync`, an object store's PUT) while there are
//! chunks to compress. Every put is done, and the chunks flushed, before the disk's manifest is
//! staged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};

use rayon::prelude::*;

use crate::chunk::{self, Decoder, Encoder};
use crate::crypto::DataKey;
use crate::hash::ChunkHash;
use crate::manifest::{chunk_len, Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta};
use crate::read::BackupInfo;
use crate::store::{PendingBackup, Store, StoreLock};
use crate::{now_unix_us, validate_name, Error, Repository, Result, Source};

/// What a new backup is.
#[derive(Clone, Debug)]
pub struct BackupSpec {
    pub vm: String,
    /// Unique among the VM's backups.
    pub id: String,
    pub consistency: Consistency,
    pub freeze_window: Option<FreezeWindow>,
    /// Default: now.
    pub created_unix_us: Option<u64>,
}

/// Called from the worker threads as chunks are done: `(disk, bytes_done, bytes_total)` of the
/// bytes to read from the source for that disk. `bytes_done` can pass the total when a patch
/// falls back to reading its chunk whole (a parent chunk that did not read back).
pub type Progress = dyn Fn(&str, u64, u64) + Send + Sync;

/// One chunk to build.
#[derive(Debug)]
struct Job {
    index: usize,
    /// Build it from the parent's chunk and the changed ranges instead of reading it whole.
    patch: Option<Patch>,
}

#[derive(Debug)]
struct Patch {
    /// The parent's chunk; `None`: it was zeros.
    base: Option<ChunkHash>,
    /// Changed byte ranges within the chunk, sorted, disjoint.
    ranges: Vec<(usize, usize)>,
}

impl Job {
    /// Bytes this job reads from the source.
    fn source_bytes(&self, size: u64, chunk_size: u64) -> u64 {
        match &self.patch {
            Some(p) => p.ranges.iter().map(|(s, e)| (e - s) as u64).sum(),
            None => chunk_len(size, chunk_size, self.index) as u64,
        }
    }
}

/// A backup being written. Dropped without [`BackupWriter::commit`], it removes what it wrote
/// except chunks (which [`Repository::gc`] collects if nothing refers to them).
pub struct BackupWriter<'r> {
    repo: &'r Repository,
    spec: BackupSpec,
    created_unix_us: u64,
    /// The manifests staged so far; dropped without a commit, it removes them.
    pending: Box<dyn PendingBackup>,
    disks: BTreeSet<String>,
    progress: Option<Box<Progress>>,
    /// The VM's key: chunks and manifests are sealed under it.
    key: Option<Arc<DataKey>>,
    /// Held until the writer is dropped (after its commit): see [`crate::store::Store::lock_shared`].
    _lock: StoreLock,
}

impl std::fmt::Debug for BackupWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter").field("spec", &self.spec).field("disks", &self.disks).finish_non_exhaustive()
    }
}

impl Repository {
    /// Begins backup `spec.id` of `spec.vm`. Holds the repository lock shared until the writer is
    /// committed or dropped.
    pub fn begin_backup(&self, spec: BackupSpec) -> Result<BackupWriter<'_>> {
        validate_name("VM", &spec.vm)?;
        validate_name("backup", &spec.id)?;
        if let Some(w) = &spec.freeze_window {
            if w.thawed_unix_us < w.frozen_unix_us {
                return Err(Error::InvalidFreezeWindow);
            }
        }
        let lock = self.store.lock_shared()?;
        let pending = self.store.begin_backup(&spec.vm, &spec.id)?;
        let created_unix_us = spec.created_unix_us.unwrap_or_else(now_unix_us);
        let key = self.key(&spec.vm).cloned();
        Ok(BackupWriter {
            repo: self,
            spec,
            created_unix_us,
            pending,
            disks: BTreeSet::new(),
            progress: None,
            key,
            _lock: lock,
        })
    }
}

impl BackupWriter<'_> {
    pub fn set_progress(&mut self, progress: Box<Progress>) {
        self.progress = Some(progress);
    }

    /// Backs up every chunk of `source` as disk `disk`.
    pub fn full(&mut self, disk: &str, source: &dyn Source) -> Result<DiskStats> {
        self.start_disk(disk)?;
        let size = source.size();
        let count = chunk_count(disk, size, self.repo.chunk_size())?;
        let table = vec![None; count];
        let jobs: Vec<Job> = (0..count).map(|index| Job { index, patch: None }).collect();
        self.write_disk(disk, source, table, &jobs, size, size, Kind::Full, None)
    }

    /// Backs up disk `disk` from `parent`, its manifest in an earlier backup, and `changed`: the
    /// byte extents `(offset, len)` written since, sorted by offset, of any granularity. Only
    /// chunks they touch are read (and those whose bytes a change of size moved, and any the
    /// parent names that are no longer stored); the others keep the parent's hashes.
    pub fn incremental(
        &mut self,
        disk: &str,
        source: &dyn Source,
        parent: &Manifest,
        changed: &[(u64, u64)],
    ) -> Result<DiskStats> {
        let mismatch = |reason: String| Error::ParentMismatch { disk: disk.to_owned(), reason };
        if parent.meta.vm != self.spec.vm || parent.meta.disk != disk {
            return Err(mismatch(format!("it is disk {} of VM {}", parent.meta.disk, parent.meta.vm)));
        }
        if parent.key != self.key.as_ref().map(|k| k.id()) {
            let under =
                |k: Option<crate::KeyId>| k.map_or("not encrypted".to_owned(), |k| format!("encrypted under key {k}"));
            return Err(mismatch(format!(
                "it is {}, and this backup is {}",
                under(parent.key),
                under(self.key.as_ref().map(|k| k.id()))
            )));
        }
        let cs = self.repo.chunk_size();
        if parent.meta.chunk_size != cs || parent.chunks.len() as u64 != parent.meta.size.div_ceil(cs) {
            return Err(mismatch("its chunk table does not fit this repository".into()));
        }
        self.start_disk(disk)?;
        let size = source.size();
        let count = chunk_count(disk, size, cs)?;

        let invalid = |reason: String| Error::InvalidExtents { disk: disk.to_owned(), reason };
        // The changed ranges within each touched chunk, merged, relative to the chunk.
        let mut ranges: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        let mut prev_off = 0u64;
        let mut covered_end = 0u64;
        let mut bytes_changed = 0u64;
        for &(off, len) in changed {
            if off < prev_off {
                return Err(invalid(format!("offset {off} comes after offset {prev_off}")));
            }
            prev_off = off;
            let end = off
                .checked_add(len)
                .filter(|&e| e <= size)
                .ok_or_else(|| invalid(format!("extent {off}+{len} ends beyond the disk's {size} bytes")))?;
            if len == 0 {
                continue;
            }
            let start = off.max(covered_end);
            if end > start {
                bytes_changed += end - start;
            }
            covered_end = covered_end.max(end);
            for i in off / cs..=(end - 1) / cs {
                let base = i * cs;
                let r = ((off.max(base) - base) as usize, (end.min(base + cs) - base) as usize);
                let v = ranges.entry(i as usize).or_default();
                match v.last_mut() {
                    Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
                    _ => v.push(r),
                }
            }
        }

        let mut table = vec![None; count];
        let mut jobs = Vec::new();
        for (i, entry) in table.iter_mut().enumerate() {
            let len = chunk_len(size, cs, i);
            let same_bytes = i < parent.chunks.len() && chunk_len(parent.meta.size, cs, i) == len;
            let old = parent.chunks.get(i).copied().flatten();
            let old_stored = match old {
                None => true,
                Some(h) => self.repo.store.has_chunk(&h)?,
            };
            if same_bytes && !old_stored {
                tracing::warn!(vm = %self.spec.vm, disk, chunk = ?old,
                    "a chunk of the parent is missing: reading it again");
            }
            match ranges.remove(&i) {
                None if same_bytes && old_stored => *entry = old,
                None => jobs.push(Job { index: i, patch: None }),
                Some(r) => {
                    let covered: usize = r.iter().map(|(s, e)| e - s).sum();
                    // Patching the parent's chunk reads only the changed bytes from the
                    // source (the storage the VMs run on), however much of it changed; the
                    // repository's copy is read instead of the rest.
                    let patch = (same_bytes && old_stored && covered < len).then_some(Patch { base: old, ranges: r });
                    jobs.push(Job { index: i, patch });
                }
            }
        }
        let parent_id = Some(parent.meta.backup.clone());
        self.write_disk(disk, source, table, &jobs, size, bytes_changed, Kind::Incremental, parent_id)
    }

    fn start_disk(&mut self, disk: &str) -> Result<()> {
        validate_name("disk", disk)?;
        if self.disks.contains(disk) {
            return Err(Error::DuplicateDisk(disk.to_owned()));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_disk(
        &mut self,
        disk: &str,
        source: &dyn Source,
        mut table: Vec<Option<ChunkHash>>,
        jobs: &[Job],
        size: u64,
        bytes_changed: u64,
        kind: Kind,
        parent: Option<String>,
    ) -> Result<DiskStats> {
        let repo = self.repo;
        let cs = repo.chunk_size();
        let total: u64 = jobs.iter().map(|j| j.source_bytes(size, cs)).sum();
        let done = AtomicU64::new(0);
        let progress = self.progress.as_deref();
        let level = repo.config.compression_level;
        let store = &*repo.store;
        let key = self.key.as_deref();
        // Reads, hashes and compresses one chunk: what it did, and its chunk file unless it is
        // zeros.
        let build = |w: &mut Worker, job: &Job| -> Result<(Built, Option<Vec<u8>>)> {
            let buf = &mut w.buf;
            let i = job.index;
            let len = chunk_len(size, cs, i);
            let off = i as u64 * cs;
            let read = |buf: &mut [u8], at: u64| {
                source.read_at(buf, at).map_err(|e| Error::SourceRead { disk: disk.to_owned(), offset: at, source: e })
            };
            let mut built = Built::default();
            let base = match &job.patch {
                None => None,
                Some(Patch { base: None, ranges }) => {
                    buf.clear();
                    buf.resize(len, 0);
                    Some(ranges)
                }
                Some(Patch { base: Some(h), ranges }) => {
                    let decoder = match &mut w.decoder {
                        Some(d) => d,
                        None => w.decoder.insert(Decoder::new(cs as usize)?),
                    };
                    match chunk::fetch(store, h, len, buf, decoder, key) {
                        Ok(()) => Some(ranges),
                        Err(f) => {
                            tracing::warn!(disk, chunk = %h, failure = ?f,
                                "cannot read the parent's chunk to patch: reading all of it");
                            None
                        }
                    }
                }
            };
            if let Some(ranges) = base {
                for &(s, e) in ranges {
                    read(&mut buf[s..e], off + s as u64)?;
                }
                built.bytes_read = ranges.iter().map(|(s, e)| (e - s) as u64).sum();
                built.patched = true;
            } else {
                let hole = source.reads_as_zero(off, len as u64).map_err(|e| Error::SourceRead {
                    disk: disk.to_owned(),
                    offset: off,
                    source: e,
                })?;
                if hole {
                    buf.clear();
                    buf.resize(len, 0);
                } else {
                    // The read fills all of it: what the buffer held needs no zeroing (`resize`
                    // also shortens).
                    buf.resize(len, 0);
                    read(buf, off)?;
                    built.bytes_read = len as u64;
                }
            }
            let file = if chunk::is_zero(buf) {
                built.zero = true;
                None
            } else {
                let hash = chunk::name_of(key, buf);
                built.hash = Some(hash);
                Some(w.encoder.encode(buf, key, &hash)?.to_vec())
            };
            // A hole skipped counts as done.
            built.covered = if built.patched { built.bytes_read } else { len as u64 };
            Ok((built, file))
        };
        // Called once a chunk is done: stored (from the storing thread that put it), or zeros.
        let chunk_done = |covered: u64| {
            let d = done.fetch_add(covered, Ordering::Relaxed) + covered;
            if let Some(p) = progress {
                p(disk, d, total);
            }
        };
        let threads = repo.threads;
        let (send, recv) = mpsc::sync_channel::<Put>(threads);
        let recv = Mutex::new(recv);
        // Set by a storing thread that failed: the workers stop.
        let failed = AtomicBool::new(false);
        let (results, stored, store_error) = std::thread::scope(|s| {
            let storers: Vec<_> =
                (0..threads).map(|_| s.spawn(|| store_chunks(store, &recv, &failed, &chunk_done))).collect();
            let results: Result<Vec<Option<Built>>> = repo.pool.install(|| {
                jobs.par_iter()
                    .enumerate()
                    .map_init(
                        || None::<Worker>,
                        |state, (pos, job)| {
                            if failed.load(Ordering::Relaxed) {
                                return Ok(None);
                            }
                            let w = match state {
                                Some(w) => w,
                                None => state.insert(Worker {
                                    encoder: Encoder::new(level)?,
                                    decoder: None,
                                    buf: Vec::new(),
                                }),
                            };
                            let (built, file) = build(w, job)?;
                            match (built.hash, file) {
                                (Some(hash), Some(file)) => {
                                    if send.send(Put { pos, hash, file, covered: built.covered }).is_err() {
                                        return Ok(None);
                                    }
                                }
                                _ => chunk_done(built.covered),
                            }
                            Ok(Some(built))
                        },
                    )
                    .collect()
            });
            // The storing threads end once they have put what is queued.
            drop(send);
            let (mut stored, mut error) = (Vec::new(), None);
            for storer in storers {
                match storer.join() {
                    Ok(Ok(s)) => stored.extend(s),
                    Ok(Err(e)) => error = error.or(Some(e)),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            (results, stored, error)
        });
        if let Some(e) = store_error {
            return Err(e);
        }
        let mut results = results?;
        for (pos, bytes) in stored {
            if let Some(Some(built)) = results.get_mut(pos) {
                built.stored = Some(bytes);
            }
        }
        let mut stats = DiskStats { bytes_changed, ..DiskStats::default() };
        let mut new_chunks = Vec::new();
        for (job, result) in jobs.iter().zip(results) {
            // A job is skipped only after a storing thread failed, which returned above.
            let built = result.ok_or_else(|| Error::ChunksNotStored { disk: disk.to_owned() })?;
            let entry = built.hash;
            stats.bytes_read += built.bytes_read;
            stats.chunks_read += 1;
            stats.chunks_patched += u64::from(built.patched);
            stats.chunks_zero += u64::from(built.zero);
            if let (Some(bytes), Some(hash)) = (built.stored, entry) {
                stats.chunks_new += 1;
                stats.bytes_stored += bytes;
                new_chunks.push(hash);
            }
            table[job.index] = entry;
        }
        // The new chunks become durable before a manifest can name them.
        store.flush_chunks(&new_chunks)?;
        let manifest = Manifest {
            meta: ManifestMeta {
                vm: self.spec.vm.clone(),
                disk: disk.to_owned(),
                backup: self.spec.id.clone(),
                size,
                chunk_size: cs,
                created_unix_us: self.created_unix_us,
                kind,
                parent,
                consistency: self.spec.consistency,
                freeze_window: self.spec.freeze_window,
                stats,
            },
            chunks: table,
            key: key.map(DataKey::id),
        };
        self.write_manifest(disk, &manifest)?;
        self.disks.insert(disk.to_owned());
        tracing::debug!(vm = %self.spec.vm, backup = %self.spec.id, disk, ?kind,
            bytes_read = stats.bytes_read, chunks_new = stats.chunks_new, "disk written");
        Ok(stats)
    }

    fn write_manifest(&mut self, disk: &str, m: &Manifest) -> Result<()> {
        let bytes = m.encode(self.key.as_deref())?;
        Ok(self.pending.put_manifest(disk, &bytes)?)
    }

    /// Makes the backup visible, all disks at once.
    pub fn commit(self) -> Result<BackupInfo> {
        let (vm, id) = (self.spec.vm.clone(), self.spec.id.clone());
        if self.disks.is_empty() {
            return Err(Error::EmptyBackup { vm, id });
        }
        let disks = self.disks.len();
        let repo = self.repo;
        self.pending.commit()?;
        let info = repo.info(&vm, &id)?;
        tracing::info!(vm = %vm, backup = %id, disks, "backup committed");
        Ok(info)
    }
}

fn chunk_count(disk: &str, size: u64, chunk_size: u64) -> Result<usize> {
    usize::try_from(size.div_ceil(chunk_size)).map_err(|_| Error::InvalidExtents {
        disk: disk.to_owned(),
        reason: format!("a disk of {size} bytes has too many chunks"),
    })
}

/// A chunk file built by a worker of [`BackupWriter::write_disk`], for a storing thread to put.
struct Put {
    /// The job's position in the list of jobs.
    pos: usize,
    hash: ChunkHash,
    file: Vec<u8>,
    /// Source bytes it stands for, for the progress.
    covered: u64,
}

/// A storing thread of [`BackupWriter::write_disk`]: puts the chunk files it receives until the
/// queue is closed, calling `chunk_done` after each put, and returns the positions of the jobs
/// whose chunks it stored as new, with the bytes they take. After a failure (its own or another
/// storing thread's) it sets `failed` (the workers stop) and only empties the queue, so no
/// worker waits on it; it returns its own failure.
fn store_chunks(
    store: &dyn Store,
    recv: &Mutex<Receiver<Put>>,
    failed: &AtomicBool,
    chunk_done: &(dyn Fn(u64) + Sync),
) -> Result<Vec<(usize, u64)>> {
    let (mut stored, mut error) = (Vec::new(), None);
    loop {
        // Poisoned only by a panic in `recv`, which leaves the receiver as it was.
        let next = recv.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(put) = next else { break };
        // Set by this thread along with `error`, or by another storing thread.
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        match store.put_chunk(&put.hash, &put.file) {
            Ok(true) => stored.push((put.pos, put.file.len() as u64)),
            Ok(false) => {}
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                error = Some(e);
                continue;
            }
        }
        chunk_done(put.covered);
    }
    match error {
        Some(e) => Err(e.into()),
        None => Ok(stored),
    }
}

/// What one thread of [`BackupWriter::write_disk`] reuses from chunk to chunk.
struct Worker {
    encoder: Encoder,
    /// For patches only.
    decoder: Option<Decoder>,
    buf: Vec<u8>,
}

/// What building one chunk did.
#[derive(Debug, Default)]
struct Built {
    /// Its name; `None`: zeros.
    hash: Option<ChunkHash>,
    /// From the source.
    bytes_read: u64,
    /// Source bytes it stands for (a hole skipped counts), for the progress.
    covered: u64,
    patched: bool,
    zero: bool,
    /// The bytes of its chunk file when it was new to the store.
    stored: Option<u64>,
}
