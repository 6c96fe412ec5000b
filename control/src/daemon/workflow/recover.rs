//! The clean-up of the jobs a previous daemon left unfinished (killed, or stopped mid-job):
//! the guest thawed, a snapshot the job cut abandoned (its delta merges), the job marked failed.
//! Never a checkpoint: the changes the snapshot froze stay in the change map.

use std::sync::Arc;
use std::time::Duration;

use livesnap_proto::error::chain;
use tracing::{error, info, warn};

use super::{now_unix_us, AGENT_TIMEOUTS, BACKEND_TIMEOUTS};
use crate::daemon::config::VmConfig;
use crate::daemon::state::{JobKind, JobResult, JobState, Stage};
use crate::daemon::{Daemon, Error, Result};

/// Retries of the clean-up of a job left unfinished, while its backend does not answer.
const RECOVERY_RETRY: Duration = Duration::from_secs(5);
const RECOVERY_ATTEMPTS: u32 = 120;

impl Daemon {
    /// Cleans up after the jobs a previous daemon left unfinished. A first attempt is made
    /// before returning; a VM whose backend does not answer is retried in the background, held
    /// (no new job) until it is clean.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let jobs = self.blocking(|_, s| Ok(s.jobs()?)).await?;
        // Live restores are not cleaned up but resumed ([`Daemon::resume_live_restores`]).
        for job in jobs.into_iter().filter(|j| j.result.is_none() && j.kind == JobKind::Snapshot) {
            warn!(job = %job.id, vm = %job.vm, stage = %job.stage, "a job was left unfinished by a previous daemon: cleaning up");
            let Some(vm) = self.config.vm(&job.vm).cloned() else {
                self.finish_recovered(
                    job,
                    "daemon restarted; the VM is no longer configured, nothing was cleaned up".into(),
                )
                .await;
                continue;
            };
            let claim = match self.claim(&vm.name, &format!("recovery of {}", job.id)) {
                Ok(c) => c,
                Err(_) => {
                    // Two unfinished jobs of one VM: the first one's clean-up covers both.
                    self.finish_recovered(job, "daemon restarted".into()).await;
                    continue;
                }
            };
            match self.cleanup(&vm, &job).await {
                Ok(stage) => {
                    self.finish_recovered(job, format!("daemon restarted during stage {stage}")).await;
                    drop(claim);
                }
                Err(e) => {
                    warn!(vm = %vm.name, job = %job.id, error = %chain(&e), "clean-up failed; retrying in the background");
                    let d = self.clone();
                    tokio::spawn(async move {
                        for _ in 0..RECOVERY_ATTEMPTS {
                            tokio::time::sleep(RECOVERY_RETRY).await;
                            match d.cleanup(&vm, &job).await {
                                Ok(stage) => {
                                    d.finish_recovered(job, format!("daemon restarted during stage {stage}")).await;
                                    drop(claim);
                                    return;
                                }
                                Err(e) => warn!(vm = %vm.name, job = %job.id, error = %chain(&e), "clean-up failed"),
                            }
                        }
                        error!(vm = %vm.name, job = %job.id, "giving up cleaning up; check the backend by hand");
                        d.finish_recovered(job, "daemon restarted; the clean-up failed: check the backend".into())
                            .await;
                        drop(claim);
                    });
                }
            }
        }
        self.resume_live_restores().await
    }

    async fn finish_recovered(&self, mut job: JobState, reason: String) {
        job.reason = format!("{reason} (stage {})", job.stage);
        job.result = Some(JobResult::Failed);
        job.finished_unix_us = Some(now_unix_us());
        info!(job = %job.id, vm = %job.vm, reason = %job.reason, "unfinished job marked failed");
        if let Err(e) = self.blocking(move |_, s| Ok(s.put_job(&job)?)).await {
            error!(error = %chain(&e), "cannot record a recovered job");
        }
    }

    /// Thaws the guest and abandons the job's snapshot if the backend still has it active.
    /// Returns the job's stage for the record.
    async fn cleanup(&self, vm: &VmConfig, job: &JobState) -> Result<Stage> {
        if let Some(ep) = &vm.agent {
            // An agent that does not answer thaws by itself at its deadline (its watchdog).
            match self.connector.agent(ep, AGENT_TIMEOUTS).await {
                Ok(a) => match a.thaw().await {
                    Ok(r) => info!(vm = %vm.name, was_frozen = r.was_frozen, "guest thawed"),
                    Err(e) => {
                        warn!(vm = %vm.name, error = %chain(&e), "thaw failed; the agent's watchdog thaws at its deadline")
                    }
                },
                Err(e) => {
                    warn!(vm = %vm.name, error = %chain(&e), "agent unreachable; its watchdog thaws at its deadline")
                }
            }
        }
        let backend = self.connector.backend(vm, BACKEND_TIMEOUTS).await.map_err(Error::backend(&vm.name))?;
        let st = backend.status().await.map_err(Error::backend(&vm.name))?;
        if let Some(s) = &st.snapshot {
            let active = st.active_in(s.id);
            let ours = job.snapshot_id.is_none_or(|id| id == s.id);
            if active && ours {
                let reason = format!("livesnapd restarted during job {}", job.id);
                backend.abandon(s.id, &reason).await.map_err(Error::backend(&vm.name))?;
                info!(vm = %vm.name, snapshot = s.id, "snapshot of an unfinished job abandoned; its delta merges");
            } else if active {
                warn!(vm = %vm.name, snapshot = s.id, "the backend has a snapshot this job did not cut; left alone");
            }
        }
        Ok(job.stage)
    }
}
