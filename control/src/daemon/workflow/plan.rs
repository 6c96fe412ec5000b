//! How each disk is backed up: whole, or only its changed extents on top of its latest backup.
//!
//! A disk's backup is incremental when its change map is trusted, ends at the cut, and starts at
//! the checkpoint of the snapshot the VM's latest backup of the disk was cut from.

use std::path::PathBuf;

use super::{at, Failure, Job};
use crate::daemon::model::BackupMode;
use crate::daemon::ports::{Backend, BackendError, Call, ChangeMap, Snapshot, VmStatus};
use crate::daemon::state::Stage;
use crate::daemon::Error;
use livesnap_repo::Manifest;

/// Why a disk's backup cannot be incremental.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoParent {
    #[error("No earlier backup of it was checkpointed (the first backup of a disk is full)")]
    FirstBackup,
    #[error("Its change map is not trusted: {0}")]
    Untrusted(String),
    #[error("Its change map does not end at the cut of snapshot {0}")]
    NotAtCut(u64),
    #[error("The repository has no earlier backup of it")]
    NoEarlierBackup,
    #[error(
        "The latest backup {backup} was cut from snapshot {snapshot}, the change map starts at checkpoint {since}"
    )]
    OtherSnapshot { backup: String, snapshot: u64, since: u64 },
    #[error("The latest backup {backup} was not made by this daemon")]
    NotOurs { backup: String },
}

pub(super) enum Plan {
    Full,
    Incremental { parent: Box<Manifest>, extents: Vec<(u64, u64)> },
}

pub(super) struct DiskPlan {
    pub disk: String,
    pub base_path: PathBuf,
    pub base_format: String,
    pub size: u64,
    pub plan: Plan,
}

impl Job {
    /// Before the cut: every backup of the VM must open under its key (or, without one, be
    /// unencrypted), so that a wrong or missing key fails the job, naming the key, before the
    /// guest is frozen, rather than start the VM over under another key.
    pub(super) async fn check_key(&self) -> Result<(), Failure> {
        let vm = self.vm.name.clone();
        self.d
            .blocking(move |repo, _| {
                repo.list(Some(&vm))?;
                Ok(())
            })
            .await
            .map_err(at(Stage::Cut))
    }

    /// Before the cut, so that a backup that cannot be incremental does not freeze the guest
    /// for nothing.
    pub(super) async fn check_incremental(&self, backend: &dyn Backend, st: &VmStatus) -> Result<(), Failure> {
        for d in &st.disks {
            let ch = backend.changes(&d.id).await.map_err(self.backend_failed(Stage::Backup))?;
            if let Err(why) = self.parent_for(&d.id, &ch, None).await.map_err(at(Stage::Backup))? {
                return Err(Failure { stage: Stage::Backup, error: Error::NotIncremental { disk: d.id.clone(), why } });
            }
        }
        Ok(())
    }

    /// Each disk of the snapshot's plan; a disk backed up whole in auto mode says why in `notes`.
    pub(super) async fn plan(
        &self,
        backend: &dyn Backend,
        snap: &Snapshot,
        notes: &mut Vec<String>,
    ) -> Result<Vec<DiskPlan>, Failure> {
        let st = backend.status().await.map_err(self.backend_failed(Stage::Backup))?;
        let mut plans = Vec::new();
        for disk in &snap.disks {
            let d = st.disks.iter().find(|d| &d.id == disk).ok_or_else(|| {
                self.backend_failed(Stage::Backup)(BackendError::InvalidReply {
                    call: Call::Status,
                    reason: format!("no disk {disk}"),
                })
            })?;
            let plan = if self.mode == BackupMode::Full {
                Plan::Full
            } else {
                let ch = backend.changes(disk).await.map_err(self.backend_failed(Stage::Backup))?;
                match self.parent_for(disk, &ch, Some(snap.id)).await.map_err(at(Stage::Backup))? {
                    Ok(parent) => Plan::Incremental { parent: Box::new(parent), extents: ch.extents },
                    Err(why) if self.mode == BackupMode::Incremental => {
                        return Err(Failure {
                            stage: Stage::Backup,
                            error: Error::NotIncremental { disk: disk.clone(), why },
                        })
                    }
                    Err(why) => {
                        notes.push(format!("disk {disk} full: {why}"));
                        Plan::Full
                    }
                }
            };
            plans.push(DiskPlan {
                disk: disk.clone(),
                base_path: d.base_path.clone(),
                base_format: d.base_format.clone(),
                size: d.size,
                plan,
            });
        }
        Ok(plans)
    }

    /// The parent manifest of an incremental backup of `disk`, or why there is none; the
    /// change map must end at `snapshot`, if given.
    async fn parent_for(
        &self,
        disk: &str,
        ch: &ChangeMap,
        snapshot: Option<u64>,
    ) -> crate::daemon::Result<Result<Manifest, NoParent>> {
        // The first backup of a disk says so, rather than why its change map is untrusted.
        let Some(since) = ch.since_checkpoint else {
            return Ok(Err(NoParent::FirstBackup));
        };
        if let Some(why) = &ch.untrusted {
            return Ok(Err(NoParent::Untrusted(why.clone())));
        }
        if let Some(id) = snapshot {
            if ch.until_snapshot != Some(id) {
                return Ok(Err(NoParent::NotAtCut(id)));
            }
        }
        let (vm, disk) = (self.vm.name.clone(), disk.to_owned());
        self.d
            .blocking(move |repo, store| {
                let Some(m) = repo.latest_manifest(&vm, &disk)? else {
                    return Ok(Err(NoParent::NoEarlierBackup));
                };
                match store.backup(&vm, &m.meta.backup)? {
                    Some(b) if b.snapshot_id == since => Ok(Ok(m)),
                    Some(b) => Ok(Err(NoParent::OtherSnapshot {
                        backup: m.meta.backup.clone(),
                        snapshot: b.snapshot_id,
                        since,
                    })),
                    None => Ok(Err(NoParent::NotOurs { backup: m.meta.backup.clone() })),
                }
            })
            .await
    }
}
