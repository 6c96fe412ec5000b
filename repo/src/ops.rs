//! Reading the repository: list, get, verify, restore; and removing from it: delete, prune, gc.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::chunk::{self, ChunkHash, ReadFailure, TMP_PREFIX};
use super::manifest::{Consistency, DiskStats, FreezeWindow, Kind, Manifest};
use super::write::parallel;
use super::{validate_name, Error, Repository, Result, MANIFEST_SUFFIX};

/// Prefix of a backup directory being deleted.
const DEL_PREFIX: &str = ".del-";
static DEL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A backup as listed: the metadata of its manifests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupInfo {
    pub vm: String,
    pub id: String,
    pub created_unix_us: u64,
    pub consistency: Consistency,
    pub freeze_window: Option<FreezeWindow>,
    /// In name order.
    pub disks: Vec<DiskInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    pub disk: String,
    pub size: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub stats: DiskStats,
}

/// One position of one disk whose chunk is bad.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkProblem {
    pub disk: String,
    /// Chunk index in the disk's manifest.
    pub index: usize,
    /// Byte offset in the disk.
    pub offset: u64,
    pub hash: String,
    pub fault: ChunkFault,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum ChunkFault {
    /// No chunk file of that name.
    Missing,
    /// The file is there but is not that chunk (the reason says how).
    Corrupt(String),
    /// The file could not be read.
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub vm: String,
    pub id: String,
    /// Distinct chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Uncompressed bytes they hold.
    pub bytes_checked: u64,
    /// Zero chunks (nothing to read).
    pub chunks_zero: u64,
    /// Every bad position, by disk and index; empty when the backup is whole.
    pub problems: Vec<ChunkProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    /// Bytes of the removed chunk files.
    pub bytes_freed: u64,
    /// Leftovers of interrupted writes and deletes.
    pub leftovers_removed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Oldest first.
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
    pub gc: GcReport,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreStats {
    pub size: u64,
    /// Bytes written; the rest of the image is holes.
    pub bytes_written: u64,
    pub chunks_read: u64,
}

/// A backup with its manifests, checksums checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    pub info: BackupInfo,
    /// In disk name order, as `info.disks`.
    pub manifests: Vec<Manifest>,
}

impl Repository {
    /// The metadata of backup `vm`/`id` (manifest headers only, checksums not read).
    pub fn info(&self, vm: &str, id: &str) -> Result<BackupInfo> {
        let metas = self.read_backup(vm, id, false)?.0;
        let first = &metas[0];
        let info = BackupInfo {
            vm: vm.to_owned(),
            id: id.to_owned(),
            created_unix_us: first.created_unix_us,
            consistency: first.consistency,
            freeze_window: first.freeze_window,
            disks: metas
                .iter()
                .map(|m| DiskInfo {
                    disk: m.disk.clone(),
                    size: m.size,
                    kind: m.kind,
                    parent: m.parent.clone(),
                    stats: m.stats,
                })
                .collect(),
        };
        Ok(info)
    }

    /// Backup `vm`/`id` with every manifest read and checked in full.
    pub fn get(&self, vm: &str, id: &str) -> Result<Backup> {
        let (_, manifests) = self.read_backup(vm, id, true)?;
        let info = self.info(vm, id)?;
        Ok(Backup { info, manifests })
    }

    /// One disk's manifest, checked in full.
    pub fn manifest(&self, vm: &str, id: &str, disk: &str) -> Result<Manifest> {
        validate_name("VM", vm)?;
        validate_name("backup", id)?;
        validate_name("disk", disk)?;
        let path = self.manifest_path(vm, id, disk);
        if !path.exists() {
            if !self.backup_dir(vm, id).is_dir() {
                return Err(Error::BackupNotFound { vm: vm.into(), id: id.into() });
            }
            return Err(Error::DiskNotFound { vm: vm.into(), id: id.into(), disk: disk.into() });
        }
        let m = Manifest::read(&path, self.chunk_size())?;
        check_names(&path, &m.meta, vm, id, disk)?;
        Ok(m)
    }

    /// The manifest of `disk` in the VM's newest backup that has that disk: the parent of the
    /// next incremental backup.
    pub fn latest_manifest(&self, vm: &str, disk: &str) -> Result<Option<Manifest>> {
        for b in self.list(Some(vm))?.iter().rev() {
            if b.disks.iter().any(|d| d.disk == disk) {
                return self.manifest(vm, &b.id, disk).map(Some);
            }
        }
        Ok(None)
    }

    /// Reads the manifests of a backup: metadata only, or whole.
    fn read_backup(&self, vm: &str, id: &str, whole: bool) -> Result<(Vec<super::ManifestMeta>, Vec<Manifest>)> {
        validate_name("VM", vm)?;
        validate_name("backup", id)?;
        let dir = self.backup_dir(vm, id);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::BackupNotFound { vm: vm.into(), id: id.into() })
            }
            Err(e) => return Err(Error::io("list", &dir, e)),
        };
        let mut disks = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(disk) = name.to_str().and_then(|n| n.strip_suffix(MANIFEST_SUFFIX)) else {
                continue;
            };
            if validate_name("disk", disk).is_ok() {
                disks.push(disk.to_owned());
            }
        }
        disks.sort();
        if disks.is_empty() {
            return Err(Error::Inconsistent { vm: vm.into(), id: id.into(), reason: "it has no manifest".into() });
        }
        let mut metas = Vec::with_capacity(disks.len());
        let mut manifests = Vec::new();
        for disk in &disks {
            let path = self.manifest_path(vm, id, disk);
            let meta = if whole {
                let m = Manifest::read(&path, self.chunk_size())?;
                let meta = m.meta.clone();
                manifests.push(m);
                meta
            } else {
                Manifest::read_meta(&path, self.chunk_size())?
            };
            check_names(&path, &meta, vm, id, disk)?;
            metas.push(meta);
        }
        let first = &metas[0];
        for m in &metas[1..] {
            if (m.created_unix_us, m.consistency, m.freeze_window)
                != (first.created_unix_us, first.consistency, first.freeze_window)
            {
                return Err(Error::Inconsistent {
                    vm: vm.into(),
                    id: id.into(),
                    reason: format!("disks {} and {} differ in time or consistency", first.disk, m.disk),
                });
            }
        }
        Ok((metas, manifests))
    }

    /// The backups of `vm` (or of every VM), oldest first within a VM, VMs in name order.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<BackupInfo>> {
        let vms = match vm {
            Some(vm) => {
                validate_name("VM", vm)?;
                vec![vm.to_owned()]
            }
            None => list_names(&self.backups_dir())?,
        };
        let mut out = Vec::new();
        for vm in vms {
            let mut backups = Vec::new();
            for id in list_names(&self.vm_dir(&vm))? {
                backups.push(self.info(&vm, &id)?);
            }
            backups.sort_by(|a, b| (a.created_unix_us, &a.id).cmp(&(b.created_unix_us, &b.id)));
            out.extend(backups);
        }
        Ok(out)
    }

    /// Re-reads and re-hashes every chunk backup `vm`/`id` refers to. A damaged manifest is an
    /// error; bad chunks are reported, each position that uses them.
    pub fn verify(&self, vm: &str, id: &str) -> Result<VerifyReport> {
        let backup = self.get(vm, id)?;
        let mut jobs: HashMap<(ChunkHash, usize), Vec<(usize, usize)>> = HashMap::new();
        let mut chunks_zero = 0;
        for (d, m) in backup.manifests.iter().enumerate() {
            for (i, c) in m.chunks.iter().enumerate() {
                match c {
                    Some(h) => jobs.entry((*h, m.chunk_len(i))).or_default().push((d, i)),
                    None => chunks_zero += 1,
                }
            }
        }
        let jobs: Vec<_> = jobs.into_iter().collect();
        let results = parallel(
            self.threads,
            jobs.len(),
            || Ok((self.chunks.codec()?, Vec::new())),
            |(codec, buf), j| {
                let ((hash, len), _) = &jobs[j];
                Ok(match self.chunks.read(hash, *len, buf, codec) {
                    Ok(()) => None,
                    Err(ReadFailure::Missing) => Some(ChunkFault::Missing),
                    Err(ReadFailure::Corrupt(c)) => Some(ChunkFault::Corrupt(c.to_string())),
                    Err(ReadFailure::Io(e)) => Some(ChunkFault::Unreadable(e.to_string())),
                })
            },
        )?
        .results;
        let mut report = VerifyReport {
            vm: vm.into(),
            id: id.into(),
            chunks_checked: jobs.len() as u64,
            bytes_checked: jobs.iter().map(|((_, len), _)| *len as u64).sum(),
            chunks_zero,
            problems: Vec::new(),
        };
        for (j, fault) in results {
            let Some(fault) = fault else { continue };
            let ((hash, _), positions) = &jobs[j];
            for &(d, i) in positions {
                let m = &backup.manifests[d];
                report.problems.push(ChunkProblem {
                    disk: m.meta.disk.clone(),
                    index: i,
                    offset: i as u64 * m.meta.chunk_size,
                    hash: hash.to_string(),
                    fault: fault.clone(),
                });
            }
        }
        report.problems.sort_by(|a, b| (&a.disk, a.index).cmp(&(&b.disk, b.index)));
        if report.is_ok() {
            tracing::info!(vm, backup = id, chunks = report.chunks_checked, "backup verified");
        } else {
            tracing::error!(vm, backup = id, problems = report.problems.len(), "backup damaged");
        }
        Ok(report)
    }

    /// Deletes backup `vm`/`id` (its manifests; [`Repository::gc`] frees the chunks).
    pub fn delete(&self, vm: &str, id: &str) -> Result<()> {
        validate_name("VM", vm)?;
        validate_name("backup", id)?;
        let dir = self.backup_dir(vm, id);
        if !dir.is_dir() {
            return Err(Error::BackupNotFound { vm: vm.into(), id: id.into() });
        }
        let doomed = self.vm_dir(vm).join(format!(
            "{DEL_PREFIX}{id}-{}-{}",
            std::process::id(),
            DEL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // The rename makes the backup vanish at once; a crash after it leaves a leftover
        // that gc removes.
        fs::rename(&dir, &doomed).map_err(|e| Error::io("rename", &dir, e))?;
        chunk::sync_dir(&self.vm_dir(vm))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io("remove", &doomed, e))?;
        tracing::info!(vm, backup = id, "backup deleted");
        Ok(())
    }

    /// Keeps the `keep_last` newest backups of `vm`, deletes the others, then collects
    /// garbage. Fails with [`Error::Busy`] while a backup is being written.
    pub fn prune(&self, vm: &str, keep_last: NonZeroUsize) -> Result<PruneReport> {
        let _lock = self.lock(true)?;
        let backups = self.list(Some(vm))?;
        let cut = backups.len().saturating_sub(keep_last.get());
        let (old, new) = backups.split_at(cut);
        let mut deleted = Vec::new();
        for b in old {
            self.delete(vm, &b.id)?;
            deleted.push(b.id.clone());
        }
        let gc = self.gc_locked()?;
        tracing::info!(vm, deleted = deleted.len(), chunks_removed = gc.chunks_removed, "pruned");
        Ok(PruneReport { deleted, kept: new.iter().map(|b| b.id.clone()).collect(), gc })
    }

    /// Mark and sweep: removes every chunk no manifest refers to, and the leftovers of
    /// interrupted writes. Every manifest must read cleanly, or nothing is removed. Fails with
    /// [`Error::Busy`] while a backup is being written.
    pub fn gc(&self) -> Result<GcReport> {
        let _lock = self.lock(true)?;
        self.gc_locked()
    }

    fn gc_locked(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut marked: HashSet<ChunkHash> = HashSet::new();
        let backups = self.backups_dir();
        let mut leftovers = Vec::new();
        for vm in list_names(&backups)? {
            let vm_dir = self.vm_dir(&vm);
            for entry in fs::read_dir(&vm_dir).map_err(|e| Error::io("list", &vm_dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &vm_dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) || name.starts_with(DEL_PREFIX) {
                    leftovers.push(entry.path());
                }
            }
            for id in list_names(&vm_dir)? {
                for m in self.read_backup(&vm, &id, true)?.1 {
                    marked.extend(m.chunks.iter().flatten());
                }
            }
        }
        // Everything is marked: from here on, only removals.
        for dir in leftovers {
            fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
            report.leftovers_removed += 1;
        }
        let chunk::Listing { chunks, temps } = self.chunks.list()?;
        let mut dirty: HashSet<PathBuf> = HashSet::new();
        for t in temps {
            fs::remove_file(&t).map_err(|e| Error::io("remove", &t, e))?;
            report.leftovers_removed += 1;
            dirty.extend(t.parent().map(Path::to_owned));
        }
        for (hash, path, len) in chunks {
            if marked.contains(&hash) {
                report.chunks_kept += 1;
                continue;
            }
            fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            report.chunks_removed += 1;
            report.bytes_freed += len;
            dirty.insert(self.chunks.dir_of(&hash));
        }
        for d in dirty {
            chunk::sync_dir(&d)?;
        }
        for vm in list_names(&backups)? {
            // Only succeeds when empty.
            let _ = fs::remove_dir(self.vm_dir(&vm));
        }
        tracing::info!(
            removed = report.chunks_removed,
            kept = report.chunks_kept,
            bytes_freed = report.bytes_freed,
            "garbage collected"
        );
        Ok(report)
    }

    /// Writes disk `disk` of backup `vm`/`id` to a new raw image `dest`, sparse: zero chunks
    /// and zero 4 KiB blocks are holes. Every chunk is checked before it is written; the image
    /// appears at `dest` only when complete and synced.
    pub fn restore_raw(&self, vm: &str, id: &str, disk: &str, dest: &Path) -> Result<RestoreStats> {
        let m = self.manifest(vm, id, disk)?;
        if dest.exists() {
            return Err(Error::DestinationExists(dest.to_owned()));
        }
        let tmp = sibling(dest, "partial");
        let result = self.restore_raw_to(&m, &tmp).and_then(|stats| {
            fs::rename(&tmp, dest).map_err(|e| Error::io("rename", &tmp, e))?;
            chunk::sync_dir(parent_dir(dest))?;
            Ok(stats)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn restore_raw_to(&self, m: &Manifest, path: &Path) -> Result<RestoreStats> {
        let file =
            OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| Error::io("create", path, e))?;
        file.set_len(m.meta.size).map_err(|e| Error::io("resize", path, e))?;
        let jobs: Vec<(usize, ChunkHash)> =
            m.chunks.iter().enumerate().filter_map(|(i, c)| c.map(|h| (i, h))).collect();
        let written = AtomicU64::new(0);
        parallel(
            self.threads,
            jobs.len(),
            || Ok((self.chunks.codec()?, Vec::new())),
            |(codec, buf), j| {
                let (i, hash) = jobs[j];
                self.chunks.read(&hash, m.chunk_len(i), buf, codec).map_err(|f| match f {
                    ReadFailure::Missing => Error::ChunkMissing { hash },
                    ReadFailure::Corrupt(source) => Error::ChunkCorrupt { hash, source },
                    ReadFailure::Io(e) => Error::io("read", &self.chunks.path(&hash), e),
                })?;
                let base = i as u64 * m.meta.chunk_size;
                for (start, end) in nonzero_runs(buf, 4096) {
                    file.write_all_at(&buf[start..end], base + start as u64)
                        .map_err(|e| Error::io("write", path, e))?;
                    written.fetch_add((end - start) as u64, Ordering::Relaxed);
                }
                Ok(())
            },
        )?;
        file.sync_all().map_err(|e| Error::io("sync", path, e))?;
        Ok(RestoreStats { size: m.meta.size, bytes_written: written.into_inner(), chunks_read: jobs.len() as u64 })
    }

    /// Restores to a new qcow2 image: a raw image beside `dest` first, then
    /// `qemu-img convert -O qcow2` (which keeps the holes unallocated).
    pub fn restore_qcow2(&self, vm: &str, id: &str, disk: &str, dest: &Path) -> Result<RestoreStats> {
        let m = self.manifest(vm, id, disk)?;
        if dest.exists() {
            return Err(Error::DestinationExists(dest.to_owned()));
        }
        let raw = sibling(dest, "raw");
        let qcow = sibling(dest, "qcow2-partial");
        let result = (|| {
            let stats = self.restore_raw_to(&m, &raw)?;
            let out = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-t", "writeback"])
                .arg(&raw)
                .arg(&qcow)
                .output()
                .map_err(Error::QemuImgSpawn)?;
            if !out.status.success() {
                return Err(Error::QemuImg {
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            fs::File::open(&qcow).and_then(|f| f.sync_all()).map_err(|e| Error::io("sync", &qcow, e))?;
            fs::rename(&qcow, dest).map_err(|e| Error::io("rename", &qcow, e))?;
            chunk::sync_dir(parent_dir(dest))?;
            Ok(stats)
        })();
        let _ = fs::remove_file(&raw);
        if result.is_err() {
            let _ = fs::remove_file(&qcow);
        }
        result
    }
}

fn check_names(path: &Path, meta: &super::ManifestMeta, vm: &str, id: &str, disk: &str) -> Result<()> {
    if meta.vm != vm || meta.backup != id || meta.disk != disk {
        return Err(Error::manifest(
            path,
            super::Corruption::Invalid(format!(
                "it names {}/{}/{}, not the place it is in",
                meta.vm, meta.backup, meta.disk
            )),
        ));
    }
    Ok(())
}

/// Names of the entries of `dir` that are valid names (not work in progress), sorted; an
/// absent directory has none.
fn list_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if validate_name("entry", name).is_ok() && entry.path().is_dir() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `dir/.NAME.TAG-PID`, beside `dest`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_dir(dest).join(format!(".{name}.{tag}-{}", std::process::id()))
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The runs of `buf` made of `block`-sized pieces that are not all zero, as `(start, end)`.
fn nonzero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, piece) in buf.chunks(block).enumerate() {
        if chunk::is_zero(piece) {
            continue;
        }
        let (start, end) = (k * block, k * block + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}
