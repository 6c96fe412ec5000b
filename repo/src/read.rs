//! Reading backups: list, info, get, one manifest, the latest manifest of a disk.

use serde::Serialize;

use crate::crypto::KeyId;
use crate::hash::ChunkHash;
use crate::manifest::{
    self, Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta, Place, MAX_HEAD_LEN, MAX_MANIFEST_LEN,
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
    /// The key its manifests and chunks are encrypted under; `None`: not encrypted.
    pub key: Option<KeyId>,
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
        let (metas, _, key) = self.read_backup(vm, id, false)?;
        let first = &metas[0];
        let info = BackupInfo {
            vm: vm.to_owned(),
            id: id.to_owned(),
            created_unix_us: first.created_unix_us,
            consistency: first.consistency,
            freeze_window: first.freeze_window,
            key,
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
        let (_, manifests, _) = self.read_backup(vm, id, true)?;
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

    /// The manifest of `disk` in the VM's newest backup that has that disk and is under the
    /// VM's present key (or, for a VM without one, not encrypted): the parent of the next
    /// incremental backup. Backups under another key are passed over, as their chunk names
    /// mean nothing under this one.
    pub fn latest_manifest(&self, vm: &str, disk: &str) -> Result<Option<Manifest>> {
        validate_name("VM", vm)?;
        for b in self.list_vm(vm, is_key_error)?.iter().rev() {
            if b.disks.iter().any(|d| d.disk == disk) {
                return self.manifest(vm, &b.id, disk).map(Some);
            }
        }
        Ok(None)
    }

    /// The backups of `vm` (or of every VM), oldest first within a VM, VMs in name order.
    /// Listing one VM, a backup it cannot open (its key missing or another) is an error;
    /// listing every VM, backups encrypted under keys this repository was given none for
    /// (other hosts' tenants in a shared store) are left out.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<BackupInfo>> {
        let (vms, skip): (_, fn(&Error) -> bool) = match vm {
            Some(vm) => {
                validate_name("VM", vm)?;
                (vec![vm.to_owned()], |_| false)
            }
            None => (self.store.list_vms()?, |e| matches!(e, Error::KeyMissing { .. })),
        };
        let mut out = Vec::new();
        for vm in vms {
            out.extend(self.list_vm(&vm, skip)?);
        }
        Ok(out)
    }

    /// The backups of `vm`, oldest first, leaving out those whose reading fails as `skip` says.
    fn list_vm(&self, vm: &str, skip: fn(&Error) -> bool) -> Result<Vec<BackupInfo>> {
        let mut backups = Vec::new();
        for id in self.store.list_backups(vm)? {
            match self.info(vm, &id) {
                Ok(info) => backups.push(info),
                Err(e) if skip(&e) => tracing::debug!(vm, backup = %id, error = %e, "backup left out of the listing"),
                Err(e) => return Err(e),
            }
        }
        backups.sort_by(|a, b| (a.created_unix_us, &a.id).cmp(&(b.created_unix_us, &b.id)));
        Ok(backups)
    }

    /// The bytes of manifest `vm`/`id`/`disk`, unchecked but bounded; `None` when there is none.
    fn fetch_manifest(&self, vm: &str, id: &str, disk: &str) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        match self.store.get_manifest(vm, id, disk, MAX_MANIFEST_LEN, &mut buf)? {
            Fetched::Found => Ok(Some(buf)),
            Fetched::Missing => Ok(None),
            Fetched::TooLong(len) => Err(Error::Manifest {
                vm: vm.into(),
                id: id.into(),
                disk: disk.into(),
                source: Box::new(Corruption::TooLong { len, max: MAX_MANIFEST_LEN }),
            }),
        }
    }

    /// Reads and checks manifest `vm`/`id`/`disk` in full (and opens it under the VM's key
    /// when it is encrypted); `None` when there is none.
    fn read_manifest(&self, vm: &str, id: &str, disk: &str) -> Result<Option<Manifest>> {
        let damaged =
            |source| Error::Manifest { vm: vm.into(), id: id.into(), disk: disk.into(), source: Box::new(source) };
        let Some(buf) = self.fetch_manifest(vm, id, disk)? else { return Ok(None) };
        let m = match self.key_for(vm, id, manifest::sealed_key(&buf))? {
            None => Manifest::decode(&buf, self.chunk_size()),
            Some(key) => Manifest::open(&buf, self.chunk_size(), key, &Place { vm, id, disk }),
        }
        .map_err(damaged)?;
        check_names(&m.meta, vm, id, disk)?;
        Ok(Some(m))
    }

    /// The chunk names manifest `vm`/`id`/`disk` lists, read without a key (garbage
    /// collection: an encrypted manifest's structure and checksum are checked, not its
    /// authenticity); `None` when there is none.
    pub(crate) fn read_chunk_names(&self, vm: &str, id: &str, disk: &str) -> Result<Option<Vec<Option<ChunkHash>>>> {
        let damaged =
            |source| Error::Manifest { vm: vm.into(), id: id.into(), disk: disk.into(), source: Box::new(source) };
        let Some(buf) = self.fetch_manifest(vm, id, disk)? else { return Ok(None) };
        if manifest::sealed_key(&buf).is_none() {
            // A plain manifest is checked whole, as every reader would.
            let m = Manifest::decode(&buf, self.chunk_size()).map_err(damaged)?;
            check_names(&m.meta, vm, id, disk)?;
            return Ok(Some(m.chunks));
        }
        Manifest::chunk_names(&buf).map(Some).map_err(damaged)
    }

    /// Reads the header and metadata of manifest `vm`/`id`/`disk`, with the key it is sealed
    /// under.
    fn read_meta(&self, vm: &str, id: &str, disk: &str) -> Result<Option<(ManifestMeta, Option<KeyId>)>> {
        let mut buf = Vec::new();
        let Some(len) = self.store.get_manifest_prefix(vm, id, disk, MAX_HEAD_LEN, &mut buf)? else {
            return Ok(None);
        };
        let found = manifest::sealed_key(&buf);
        let meta = match self.key_for(vm, id, found)? {
            None => Manifest::decode_meta(&buf, len, self.chunk_size()),
            Some(key) => Manifest::open_meta(&buf, len, self.chunk_size(), key, &Place { vm, id, disk }),
        }
        .map_err(|source| Error::Manifest {
            vm: vm.into(),
            id: id.into(),
            disk: disk.into(),
            source: Box::new(source),
        })?;
        check_names(&meta, vm, id, disk)?;
        Ok(Some((meta, found)))
    }

    /// Reads the manifests of a backup: metadata only, or whole; and the key they are sealed
    /// under (the same for all).
    #[allow(clippy::type_complexity)]
    pub(crate) fn read_backup(
        &self,
        vm: &str,
        id: &str,
        whole: bool,
    ) -> Result<(Vec<ManifestMeta>, Vec<Manifest>, Option<KeyId>)> {
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
        let mut keys = Vec::with_capacity(disks.len());
        let mut manifests = Vec::new();
        for disk in &disks {
            let (meta, key) = if whole {
                let m = self.read_manifest(vm, id, disk)?.ok_or_else(|| vanished(disk))?;
                let meta = (m.meta.clone(), m.key);
                manifests.push(m);
                meta
            } else {
                self.read_meta(vm, id, disk)?.ok_or_else(|| vanished(disk))?
            };
            metas.push(meta);
            keys.push(key);
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
        // Every manifest opened under the VM's one key, or none is encrypted: key_for saw to it.
        Ok((metas, manifests, keys[0]))
    }
}

/// A backup that cannot be read with the VM's key (or lack of one).
fn is_key_error(e: &Error) -> bool {
    matches!(e, Error::KeyMissing { .. } | Error::WrongKey { .. } | Error::NotEncrypted { .. })
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
