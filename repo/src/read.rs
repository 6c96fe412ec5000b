//! Reading backups: list, info, get, one manifest, the latest manifest of a disk.

use serde::Serialize;

use crate::manifest::{
    Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta, MAX_HEAD_LEN, MAX_MANIFEST_LEN,
};
use crate::store::Fetched;
use crate::{validate_name, Corruption, Error, Repository, Result};

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
        match self.read_manifest(vm, id, disk)? {
            Some(m) => Ok(m),
            None if self.store.list_manifests(vm, id)?.is_none() => {
                Err(Error::BackupNotFound { vm: vm.into(), id: id.into() })
            }
            None => Err(Error::DiskNotFound { vm: vm.into(), id: id.into(), disk: disk.into() }),
        }
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

    /// The backups of `vm` (or of every VM), oldest first within a VM, VMs in name order.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<BackupInfo>> {
        let vms = match vm {
            Some(vm) => {
                validate_name("VM", vm)?;
                vec![vm.to_owned()]
            }
            None => self.store.list_vms()?,
        };
        let mut out = Vec::new();
        for vm in vms {
            let mut backups = Vec::new();
            for id in self.store.list_backups(&vm)? {
                backups.push(self.info(&vm, &id)?);
            }
            backups.sort_by(|a, b| (a.created_unix_us, &a.id).cmp(&(b.created_unix_us, &b.id)));
            out.extend(backups);
        }
        Ok(out)
    }

    /// Reads and checks manifest `vm`/`id`/`disk` in full; `None` when there is none.
    fn read_manifest(&self, vm: &str, id: &str, disk: &str) -> Result<Option<Manifest>> {
        let damaged =
            |source| Error::Manifest { vm: vm.into(), id: id.into(), disk: disk.into(), source: Box::new(source) };
        let mut buf = Vec::new();
        match self.store.get_manifest(vm, id, disk, MAX_MANIFEST_LEN, &mut buf)? {
            Fetched::Found => {}
            Fetched::Missing => return Ok(None),
            Fetched::TooLong(len) => return Err(damaged(Corruption::TooLong { len, max: MAX_MANIFEST_LEN })),
        }
        let m = Manifest::decode(&buf, self.chunk_size()).map_err(damaged)?;
        check_names(&m.meta, vm, id, disk)?;
        Ok(Some(m))
    }

    /// Reads the header and metadata of manifest `vm`/`id`/`disk`.
    fn read_meta(&self, vm: &str, id: &str, disk: &str) -> Result<Option<ManifestMeta>> {
        let mut buf = Vec::new();
        let Some(len) = self.store.get_manifest_prefix(vm, id, disk, MAX_HEAD_LEN, &mut buf)? else {
            return Ok(None);
        };
        let meta = Manifest::decode_meta(&buf, len, self.chunk_size()).map_err(|source| Error::Manifest {
            vm: vm.into(),
            id: id.into(),
            disk: disk.into(),
            source: Box::new(source),
        })?;
        check_names(&meta, vm, id, disk)?;
        Ok(Some(meta))
    }

    /// Reads the manifests of a backup: metadata only, or whole.
    pub(crate) fn read_backup(&self, vm: &str, id: &str, whole: bool) -> Result<(Vec<ManifestMeta>, Vec<Manifest>)> {
        validate_name("VM", vm)?;
        validate_name("backup", id)?;
        let Some(disks) = self.store.list_manifests(vm, id)? else {
            return Err(Error::BackupNotFound { vm: vm.into(), id: id.into() });
        };
        if disks.is_empty() {
            return Err(Error::Inconsistent { vm: vm.into(), id: id.into(), reason: "it has no manifest".into() });
        }
        let vanished = |disk: &str| Error::Inconsistent {
            vm: vm.into(),
            id: id.into(),
            reason: format!("the manifest of disk {disk} vanished while it was read"),
        };
        let mut metas = Vec::with_capacity(disks.len());
        let mut manifests = Vec::new();
        for disk in &disks {
            let meta = if whole {
                let m = self.read_manifest(vm, id, disk)?.ok_or_else(|| vanished(disk))?;
                let meta = m.meta.clone();
                manifests.push(m);
                meta
            } else {
                self.read_meta(vm, id, disk)?.ok_or_else(|| vanished(disk))?
            };
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
}

fn check_names(meta: &ManifestMeta, vm: &str, id: &str, disk: &str) -> Result<()> {
    if meta.vm != vm || meta.backup != id || meta.disk != disk {
        return Err(Error::Manifest {
            vm: vm.into(),
            id: id.into(),
            disk: disk.into(),
            source: Box::new(Corruption::Invalid(format!(
                "it names {}/{}/{}, not the place it is in",
                meta.vm, meta.backup, meta.disk
            ))),
        });
    }
    Ok(())
}
