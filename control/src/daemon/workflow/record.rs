//! Record: the backup indexed in the state as soon as it is committed (whatever happens to the
//! merge), and the job's outcome written and sent last.

use std::time::Instant;

use livesnap_proto::error::chain;
use tracing::{error, info, warn};

use super::cut::Cut;
use super::{at, now_unix_us, Failure, Job};
use crate::daemon::model::{Backup, Event};
use crate::daemon::state::{BackupState, JobResult, Stage};
use crate::daemon::{Claim, Error};
use livesnap_repo::{self as repo, Consistency};

impl Job {
    /// Indexes the committed backup: what the repository does not know of it.
    pub(super) async fn record_backup(
        &self,
        info: &repo::BackupInfo,
        cut: &Cut,
        notes: Vec<String>,
    ) -> Result<BackupState, Failure> {
        let all_incremental = info.disks.iter().all(|d| d.kind == repo::Kind::Incremental);
        let record = BackupState {
            version: BackupState::current_version(),
            vm: self.vm.name.clone(),
            id: info.id.clone(),
            job: self.state.id.clone(),
            snapshot_id: cut.snapshot.id,
            kind: if all_incremental { "incremental" } else { "full" }.into(),
            consistency: match cut.consistency {
                Consistency::Application => "application",
                Consistency::Crash => "crash",
            }
            .into(),
            freeze_window_us: cut.window.map_or(0, |w| w.duration_us()),
            note: notes.join("; "),
        };
        let r = record.clone();
        self.d.blocking(move |_, s| Ok(s.put_backup(&r)?)).await.map_err(at(Stage::Record))?;
        Ok(record)
    }

    /// Writes the job's outcome, releases the VM, then sends Done or Failed.
    pub(super) async fn finish(&mut self, outcome: Result<Backup, Failure>, started: Instant, claim: Claim) {
        let (vm, id) = (self.vm.name.clone(), self.state.id.clone());
        let ended = now_unix_us();
        self.state.finished_unix_us = Some(ended);
        match outcome {
            Ok(backup) => {
                self.state.result = Some(JobResult::Ok);
                self.enter(Stage::Done).await;
                self.d.metrics.job_finished(&vm, self.mode, JobResult::Ok, started.elapsed(), ended);
                info!(vm = %vm, job = %id, secs = started.elapsed().as_secs_f64(), "snapshot job done");
                // Retention after a success only, while the job still holds the VM: a stopping
                // daemon waits for it, and the client sees the backups as retention left them.
                self.d.retain_after_backup(&vm).await;
                self.d.unregister_job(&id);
                drop(claim);
                self.emit_wait(Event::Done(backup)).await;
            }
            Err(f) => {
                let reason = chain(&f.error);
                let result = if matches!(f.error, Error::Cancelled(_)) {
                    warn!(vm = %vm, job = %id, stage = %f.stage, reason = %reason, "snapshot job cancelled");
                    JobResult::Cancelled
                } else {
                    error!(vm = %vm, job = %id, stage = %f.stage, reason = %reason, "snapshot job failed");
                    JobResult::Failed
                };
                self.state.result = Some(result);
                self.state.reason = reason;
                self.enter(f.stage).await;
                self.d.metrics.job_finished(&vm, self.mode, result, started.elapsed(), ended);
                self.d.unregister_job(&id);
                drop(claim);
                self.emit_wait(Event::Failed { stage: f.stage, error: f.error }).await;
            }
        }
    }
}
