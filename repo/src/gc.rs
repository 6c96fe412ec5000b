//! Removing from the repository: [`Repository::delete`], [`Repository::prune`] and
//! [`Repository::gc`] (mark and sweep).

use std::collections::HashSet;
use std::num::NonZeroUsize;

use serde::Serialize;

use crate::hash::ChunkHash;
use crate::manifest::Manifest;
use crate::store::GcRun;
use crate::{validate_name, Error, Repository, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    /// Bytes of the removed chunks.
    pub bytes_freed: u64,
    /// Leftovers of interrupted writes and deletes.
    pub leftovers_removed: u64,
    /// Unreferenced chunks left for the next collection: this one ran out of time.
    pub chunks_deferred: u64,
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
    /// garbage. Fails with [`Error::Busy`] while a backup is being written to a store that
    /// locks (a local directory).
    pub fn prune(&self, vm: &str, keep_last: NonZeroUsize) -> Result<PruneReport> {
        let run = self.store.begin_gc()?;
        let backups = self.list(Some(vm))?;
        let cut = backups.len().saturating_sub(keep_last.get());
        let (old, new) = backups.split_at(cut);
        let mut deleted = Vec::new();
        for b in old {
            self.delete(vm, &b.id)?;
            deleted.push(b.id.clone());
        }
        let gc = self.collect(run)?;
        tracing::info!(vm, deleted = deleted.len(), chunks_removed = gc.chunks_removed, "pruned");
        Ok(PruneReport { deleted, kept: new.iter().map(|b| b.id.clone()).collect(), gc })
    }

    /// Mark and sweep: removes every chunk no manifest refers to, and the leftovers of
    /// interrupted writes. Every manifest must read cleanly, or nothing is removed. A store
    /// that locks (a local directory) fails with [`Error::Busy`] while a backup is being
    /// written; an object store shared by hosts removes only chunks older than its grace
    /// period and keeps what running writers may rely on (docs/repository.md).
    pub fn gc(&self) -> Result<GcReport> {
        let run = self.store.begin_gc()?;
        self.collect(run)
    }

    fn collect(&self, mut run: Box<dyn GcRun + '_>) -> Result<GcReport> {
        let mut report = GcReport::default();
        // Candidates first: a chunk stored after this listing is not one.
        let candidates = run.candidates()?;
        let mut marked: HashSet<ChunkHash> = HashSet::new();
        for p in run.protected_manifests()? {
            // Read without keys, as every manifest gc marks by (encrypted ones included).
            let names = Manifest::chunk_names(&p.bytes).map_err(|source| Error::Manifest {
                vm: p.vm,
                id: p.id,
                disk: p.disk,
                source: Box::new(source),
            })?;
            marked.extend(names.iter().flatten());
        }
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
        for (hash, len) in candidates {
            if marked.contains(&hash) {
                report.chunks_kept += 1;
                continue;
            }
            if !run.may_remove() {
                report.chunks_deferred += 1;
                continue;
            }
            self.store.remove_chunk(&hash)?;
            removed.push(hash);
            report.chunks_removed += 1;
            report.bytes_freed += len;
        }
        self.store.flush_chunks(&removed)?;
        drop(run);
        tracing::info!(
            removed = report.chunks_removed,
            kept = report.chunks_kept,
            deferred = report.chunks_deferred,
            bytes_freed = report.bytes_freed,
            "garbage collected"
        );
        Ok(report)
    }
}
