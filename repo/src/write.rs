//! Writing a backup: chunks first, then each disk's manifest, then one rename that makes the
//! backup visible.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::chunk::{self, ChunkHash, Codec, TMP_PREFIX};
use super::manifest::{chunk_len, Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta};
use super::ops::BackupInfo;
use super::{now_unix_us, validate_name, Error, RepoLock, Repository, Result, Source, MANIFEST_SUFFIX};

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
    tmp_dir: PathBuf,
    disks: BTreeSet<String>,
    progress: Option<Box<Progress>>,
    committed: bool,
    _lock: RepoLock,
}

impl std::fmt::Debug for BackupWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter").field("spec", &self.spec).field("disks", &self.disks).finish_non_exhaustive()
    }
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

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
        let lock = self.lock(false)?;
        let vm_dir = self.vm_dir(&spec.vm);
        if self.backup_dir(&spec.vm, &spec.id).exists() {
            return Err(Error::BackupExists { vm: spec.vm, id: spec.id });
        }
        fs::create_dir_all(&vm_dir).map_err(|e| Error::io("create", &vm_dir, e))?;
        let tmp_dir = vm_dir.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            spec.id,
            std::process::id(),
            DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&tmp_dir).map_err(|e| Error::io("create", &tmp_dir, e))?;
        let created_unix_us = spec.created_unix_us.unwrap_or_else(now_unix_us);
        Ok(BackupWriter {
            repo: self,
            spec,
            created_unix_us,
            tmp_dir,
            disks: BTreeSet::new(),
            progress: None,
            committed: false,
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
            let old_stored = old.is_none_or(|h| self.repo.chunks.contains(&h));
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
        let Done { states, results } = parallel(
            repo.threads,
            jobs.len(),
            || Ok((repo.chunks.codec()?, Vec::new(), DiskStats::default(), [false; 256])),
            |(codec, buf, stats, dirty): &mut (Codec, Vec<u8>, DiskStats, [bool; 256]), j| {
                let job = &jobs[j];
                let i = job.index;
                let len = chunk_len(size, cs, i);
                let off = i as u64 * cs;
                let read = |buf: &mut [u8], at: u64| {
                    source.read_at(buf, at).map_err(|e| Error::SourceRead {
                        disk: disk.to_owned(),
                        offset: at,
                        source: e,
                    })
                };
                let mut from_source = len as u64;
                let base = match &job.patch {
                    None => None,
                    Some(Patch { base: None, ranges }) => {
                        buf.clear();
                        buf.resize(len, 0);
                        Some(ranges)
                    }
                    Some(Patch { base: Some(h), ranges }) => match repo.chunks.read(h, len, buf, codec) {
                        Ok(()) => Some(ranges),
                        Err(f) => {
                            tracing::warn!(disk, chunk = %h, failure = ?f,
                                    "cannot read the parent's chunk to patch: reading all of it");
                            None
                        }
                    },
                };
                if let Some(ranges) = base {
                    for &(s, e) in ranges {
                        read(&mut buf[s..e], off + s as u64)?;
                    }
                    from_source = ranges.iter().map(|(s, e)| (e - s) as u64).sum();
                    stats.chunks_patched += 1;
                } else {
                    buf.resize(len, 0);
                    read(buf, off)?;
                }
                stats.bytes_read += from_source;
                stats.chunks_read += 1;
                let entry = if chunk::is_zero(buf) {
                    stats.chunks_zero += 1;
                    None
                } else {
                    let hash = ChunkHash::of(buf);
                    let written = repo.chunks.put(&hash, buf, codec)?;
                    if written > 0 {
                        stats.chunks_new += 1;
                        stats.bytes_stored += written;
                        dirty[usize::from(hash.0[0])] = true;
                    }
                    Some(hash)
                };
                let d = done.fetch_add(from_source, Ordering::Relaxed) + from_source;
                if let Some(p) = progress {
                    p(disk, d, total);
                }
                Ok(entry)
            },
        )?;
        let mut stats = DiskStats::default();
        let mut dirty = [false; 256];
        for (_, _, s, d) in &states {
            stats.bytes_read += s.bytes_read;
            stats.chunks_read += s.chunks_read;
            stats.chunks_zero += s.chunks_zero;
            stats.chunks_new += s.chunks_new;
            stats.chunks_patched += s.chunks_patched;
            stats.bytes_stored += s.bytes_stored;
            for (a, b) in dirty.iter_mut().zip(d) {
                *a |= *b;
            }
        }
        stats.bytes_changed = bytes_changed;
        for (j, entry) in results {
            table[jobs[j].index] = entry;
        }
        // The renames of new chunks become durable before a manifest can name them.
        for (b, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
            chunk::sync_dir(&repo.chunks.dir().join(format!("{b:02x}")))?;
        }
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
        };
        self.write_manifest(disk, &manifest)?;
        self.disks.insert(disk.to_owned());
        tracing::debug!(vm = %self.spec.vm, backup = %self.spec.id, disk, ?kind,
            bytes_read = stats.bytes_read, chunks_new = stats.chunks_new, "disk written");
        Ok(stats)
    }

    fn write_manifest(&self, disk: &str, m: &Manifest) -> Result<()> {
        let bytes = m.encode()?;
        let path = self.tmp_dir.join(format!("{disk}{MANIFEST_SUFFIX}"));
        let tmp = self.tmp_dir.join(format!("{TMP_PREFIX}{disk}"));
        chunk::write_durably(&tmp, &path, &bytes)
    }

    /// Makes the backup visible, all disks at once.
    pub fn commit(mut self) -> Result<BackupInfo> {
        let (vm, id) = (self.spec.vm.clone(), self.spec.id.clone());
        if self.disks.is_empty() {
            return Err(Error::EmptyBackup { vm, id });
        }
        chunk::sync_dir(&self.tmp_dir)?;
        let dest = self.repo.backup_dir(&vm, &id);
        if dest.exists() {
            return Err(Error::BackupExists { vm, id });
        }
        fs::rename(&self.tmp_dir, &dest).map_err(|e| Error::io("rename", &self.tmp_dir, e))?;
        self.committed = true;
        chunk::sync_dir(&self.repo.vm_dir(&vm))?;
        chunk::sync_dir(&self.repo.backups_dir())?;
        let info = self.repo.info(&vm, &id)?;
        tracing::info!(vm = %vm, backup = %id, disks = self.disks.len(), "backup committed");
        Ok(info)
    }
}

impl Drop for BackupWriter<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn chunk_count(disk: &str, size: u64, chunk_size: u64) -> Result<usize> {
    usize::try_from(size.div_ceil(chunk_size)).map_err(|_| Error::InvalidExtents {
        disk: disk.to_owned(),
        reason: format!("a disk of {size} bytes has too many chunks"),
    })
}

/// Runs `work(state, j)` for `j` in `0..jobs` on up to `threads` threads, each with its own
/// `init()` state. Stops at the first error. Returns the states and `(j, result)` pairs.
pub(super) fn parallel<S, T, I, W>(threads: usize, jobs: usize, init: I, work: W) -> Result<Done<S, T>>
where
    S: Send,
    T: Send,
    I: Fn() -> Result<S> + Sync,
    W: Fn(&mut S, usize) -> Result<T> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = threads.clamp(1, jobs.max(1));
    let run = || -> Result<Worker<S, T>> {
        let mut state = init()?;
        let mut out = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let j = next.fetch_add(1, Ordering::Relaxed);
            if j >= jobs {
                break;
            }
            match work(&mut state, j) {
                Ok(t) => out.push((j, t)),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok((state, out))
    };
    let outcomes: Vec<Result<Worker<S, T>>> = if threads == 1 {
        vec![run()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(run)).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        })
    };
    let mut states = Vec::with_capacity(threads);
    let mut results = Vec::with_capacity(jobs);
    for o in outcomes {
        let (s, r) = o?;
        states.push(s);
        results.extend(r);
    }
    Ok(Done { states, results })
}

/// What one worker of [`parallel`] ends with.
type Worker<S, T> = (S, Vec<(usize, T)>);

/// What [`parallel`] returns: each worker's state, and each job's result by job number.
pub(super) struct Done<S, T> {
    pub states: Vec<S>,
    pub results: Vec<(usize, T)>,
}
