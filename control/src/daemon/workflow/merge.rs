//! Merge and checkpoint: the snapshot's delta merged into its base (progress sent as events),
//! then the change maps restarted at the cut. The checkpoint comes only now, with the backup
//! committed: the changes up to the cut are safe in the repository. A checkpoint that fails
//! fails nothing: the next backup is full, and the backup's note says why.

use livesnap_proto::error::chain;
use tracing::warn;

use super::{at, Failure, Job};
use crate::daemon::model::Event;
use crate::daemon::ports::Backend;
use crate::daemon::state::{BackupState, Stage};

impl Job {
    pub(super) async fn merge(&self, backend: &dyn Backend, snapshot: u64) -> Result<(), Failure> {
        let mut progress = |p: crate::daemon::ports::MergeProgress| {
            self.emit(Event::Merging { merged_bytes: p.merged_bytes, remaining_bytes: p.remaining_bytes })
        };
        backend.merge(snapshot, &mut progress).await.map_err(self.backend_failed(Stage::Merge))
    }

    /// Checkpoints `snapshot`; returns the backup's record, its note updated if that failed.
    pub(super) async fn checkpoint(
        &self,
        backend: &dyn Backend,
        snapshot: u64,
        mut record: BackupState,
    ) -> Result<BackupState, Failure> {
        if let Err(e) = backend.checkpoint(snapshot).await {
            let note = format!("the checkpoint failed, the next backup will be full: {}", chain(&e));
            warn!(vm = %self.vm.name, snapshot, note = %note);
            record.note = if record.note.is_empty() { note } else { format!("{}; {note}", record.note) };
            let r = record.clone();
            self.d.blocking(move |_, s| Ok(s.put_backup(&r)?)).await.map_err(at(Stage::Record))?;
        }
        Ok(record)
    }
}
