//! Back up: the frozen bases read, hashed and written into the repository on a blocking thread,
//! progress sent back as events. Before the commit, the backend must still hold every base
//! frozen (the snapshot active, none of its disks given up).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;

use super::cut::Cut;
use super::plan::{DiskPlan, Plan};
use super::stop::StopReason;
use super::{Failure, Job};
use crate::daemon::model::Event;
use crate::daemon::ports::Backend;
use crate::daemon::reader::Base;
use crate::daemon::state::Stage;
use crate::daemon::Error;
use livesnap_repo::{self as repo, BackupSpec};

fn at_backup(error: impl Into<Error>) -> Failure {
    Failure { stage: Stage::Backup, error: error.into() }
}

impl Job {
    /// Writes and commits the backup of every planned disk.
    pub(super) async fn back_up(
        &self,
        backend: &Arc<dyn Backend>,
        cut: &Cut,
        plans: Vec<DiskPlan>,
    ) -> Result<repo::BackupInfo, Failure> {
        let spec = BackupSpec {
            vm: self.vm.name.clone(),
            id: self.state.id.clone(),
            consistency: cut.consistency,
            freeze_window: cut.window,
            created_unix_us: None,
        };
        let (repo, rate) = (self.d.repo.clone(), self.d.config.read_bytes_per_sec);
        let (tx, snap_id, backend) = (self.tx.clone(), cut.snapshot.id, backend.clone());
        let vm = self.vm.name.clone();
        let rt = tokio::runtime::Handle::current();
        // A cancel stops the reading at its next read, and the commit.
        let interrupt = self.stop.interrupt_flag();
        let cancelled = {
            let interrupt = interrupt.clone();
            move |f: Failure| {
                if interrupt.load(Ordering::SeqCst) {
                    Failure { stage: Stage::Backup, error: Error::Cancelled(StopReason::Cancel) }
                } else {
                    f
                }
            }
        };
        let write = tokio::task::spawn_blocking(move || -> Result<repo::BackupInfo, Failure> {
            let mut w = repo.begin_backup(spec).map_err(at_backup)?;
            let ptx = tx.clone();
            w.set_progress(Box::new(move |disk, done, total| {
                let _ = ptx.try_send(Event::BackingUp { disk: disk.to_owned(), bytes_read: done, bytes_total: total });
            }));
            for p in &plans {
                // An incremental's first report comes from the writer, which knows how much it
                // will read (whole chunks where most changed); a full one reads the disk.
                if matches!(p.plan, Plan::Full) {
                    let _ = tx.try_send(Event::BackingUp { disk: p.disk.clone(), bytes_read: 0, bytes_total: p.size });
                }
                let base = Base::open(&p.base_path, &p.base_format, p.size, rate)
                    .map_err(|source| at_backup(Error::Base { disk: p.disk.clone(), source }))?
                    .interrupted_by(interrupt.clone());
                let stats = match &p.plan {
                    Plan::Full => w.full(&p.disk, &base),
                    Plan::Incremental { parent, extents } => w.incremental(&p.disk, &base, parent, extents),
                }
                .map_err(at_backup)
                .map_err(&cancelled)?;
                info!(vm = %vm, disk = %p.disk, bytes_read = stats.bytes_read, bytes_changed = stats.bytes_changed,
                    image_bytes_read = base.image_bytes_read(), "disk backed up");
            }
            let st =
                rt.block_on(backend.status()).map_err(|source| at_backup(Error::Backend { vm: vm.clone(), source }))?;
            if !st.holds(snap_id) {
                let why: Vec<String> =
                    st.disks.iter().filter_map(|d| d.abandoned.as_ref().map(|a| format!("{}: {a}", d.id))).collect();
                let why = if why.is_empty() { "the snapshot is no longer active".to_owned() } else { why.join("; ") };
                return Err(at_backup(Error::SnapshotLost { why }));
            }
            if interrupt.load(Ordering::SeqCst) {
                return Err(at_backup(Error::Cancelled(StopReason::Cancel)));
            }
            w.commit().map_err(at_backup)
        });
        write.await.map_err(|e| at_backup(Error::Task(e)))?
    }
}
