//! Removing from the repository: [`Repository::delete`], [`Repository::prune`] and
//! [`Repository::gc`] (mark and sweep).

use std::collections::HashSet;
use std::num::NonZeroUsize;

use serde::Serialize;

use crate::hash::ChunkHash;
use crate::{validate_name, Error, Repository, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    /// Bytes of the removed chunks.
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

impl Repository {
    /// Deletes backup `vm`/`id` (its manifests; [`Repository::gc`] frees the chunks).
    pub fn delete(&self, vm: &str, id: &str) -> Result<()> {
        validate_name("VM", vm)?;
        validate_name("backup", id)?;
        if !self.store.remove_backup(vm, id)? {
            return Err(Error::BackupNotFound { vm: vm.into(), id: id.into() });
        }
        tracing::info!(vm, backup = id, "backup deleted");
        Ok(())
    }

    /// Keeps the `keep_last` newest backups of `vm`, deletes the others, then collects
    /// garbage. Fails with [`Error::Busy`] while a backup is being written.
    pub fn prune(&self, vm: &str, keep_last: NonZeroUsize) -> Result<PruneReport> {
        let _lock = self.store.lock_exclusive()?;
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
        let _lock = self.store.lock_exclusive()?;
        self.gc_locked()
    }

    fn gc_locked(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut marked: HashSet<ChunkHash> = HashSet::new();
        for vm in self.store.list_vms()? {
            for id in self.store.list_backups(&vm)? {
                // By the names the manifests list, read without keys: a host collects a store
                // shared with tenants whose keys it does not hold.
                let Some(disks) = self.store.list_manifests(&vm, &id)? else { continue };
                for disk in disks {
                    if let Some(names) = self.read_chunk_names(&vm, &id, &disk)? {
                        marked.extend(names.iter().flatten());
                    }
                }
            }
        }
        // Everything is marked: from here on, only removals.
        report.leftovers_removed = self.store.remove_leftovers()?;
        let mut removed = Vec::new();
        for (hash, len) in self.store.list_chunks()? {
            if marked.contains(&hash) {
                report.chunks_kept += 1;
                continue;
            }
            self.store.remove_chunk(&hash)?;
            removed.push(hash);
            report.chunks_removed += 1;
            report.bytes_freed += len;
        }
        self.store.flush_chunks(&removed)?;
        tracing::info!(
            removed = report.chunks_removed,
            kept = report.chunks_kept,
            bytes_freed = report.bytes_freed,
            "garbage collected"
        );
        Ok(report)
    }
}
