//! Quiesce, cut, thaw: the agent's connection opened before the freeze, then the freeze, the
//! backend's Begin and the thaw, whatever Begin answered.

use std::sync::Arc;
use std::time::Instant;

use livesnap_proto::error::chain;
use tracing::{error, info, warn};

use super::{now_unix_us, us, Failure, Job, AGENT_TIMEOUTS};
use crate::daemon::model::{Event, QuiesceMode};
use crate::daemon::ports::{Agent, Backend, BackendError, Snapshot};
use crate::daemon::state::Stage;
use crate::daemon::Error;
use livesnap_repo::{Consistency, FreezeWindow};

/// A snapshot cut, and what the backup made of it will say.
#[derive(Clone, Debug)]
pub(super) struct Cut {
    pub snapshot: Snapshot,
    pub consistency: Consistency,
    pub window: Option<FreezeWindow>,
    /// For the backup's note: why it is crash-consistent, a thaw that failed.
    pub notes: Vec<String>,
}

impl Job {
    /// The agent to freeze through, or why the backup is crash-consistent. With
    /// quiesce=required, an agent that cannot be reached fails the job (nothing is cut).
    async fn agent(&self) -> Result<Result<Arc<dyn Agent>, String>, Failure> {
        let ep = match (self.quiesce, &self.vm.agent) {
            (QuiesceMode::Off, _) => return Ok(Err("quiesce=off".into())),
            (_, None) => return Ok(Err("no agent is configured for the VM".into())),
            (_, Some(ep)) => ep,
        };
        match self.d.connector.agent(ep, AGENT_TIMEOUTS).await {
            Ok(a) => Ok(Ok(a)),
            Err(e) if self.quiesce == QuiesceMode::Required => {
                Err(Failure { stage: Stage::Quiesce, error: Error::Quiesce(e) })
            }
            Err(e) => Ok(Err(format!("the agent is unreachable: {}", chain(&e)))),
        }
    }

    /// Freezes the guest; `None` (and why in `crash_reason`) if it did not freeze.
    async fn freeze(
        &self,
        agent: &dyn Agent,
        crash_reason: &mut Option<String>,
    ) -> Result<Option<(Instant, u64)>, Failure> {
        self.emit(Event::Quiescing);
        let t0 = (Instant::now(), now_unix_us());
        match agent.freeze(self.freeze_timeout, &self.state.id).await {
            Ok(r) => {
                self.emit(Event::Frozen { filesystems: r.filesystems });
                Ok(Some(t0))
            }
            Err(e) => {
                // Whatever the agent managed before failing is undone.
                if let Err(t) = agent.thaw().await {
                    warn!(vm = %self.vm.name, error = %chain(&t), "thaw after a failed freeze failed");
                }
                if self.quiesce == QuiesceMode::Required {
                    return Err(Failure { stage: Stage::Quiesce, error: Error::Quiesce(e) });
                }
                *crash_reason = Some(format!("the freeze failed: {}", chain(&e)));
                Ok(None)
            }
        }
    }

    pub(super) async fn quiesce_and_cut(&mut self, backend: &dyn Backend) -> Result<Cut, Failure> {
        let name = self.vm.name.clone();
        let (agent, mut crash_reason) = match self.agent().await? {
            Ok(a) => (Some(a), None),
            Err(why) => (None, Some(why)),
        };
        self.enter(Stage::Quiesce).await;
        let frozen = match &agent {
            Some(a) => self.freeze(&**a, &mut crash_reason).await?,
            None => None,
        };

        // The cut, then the thaw at once, whether the cut worked or not.
        self.enter_soon(Stage::Cut);
        let t_cut = Instant::now();
        let begin = backend.begin().await;
        let cut_rtt = t_cut.elapsed();
        let mut window = None;
        let mut notes = Vec::new();
        if let (Some(a), Some((t0, t0_unix))) = (&agent, frozen) {
            self.enter_soon(Stage::Thaw);
            let r = a.thaw().await;
            let w = FreezeWindow { frozen_unix_us: t0_unix, thawed_unix_us: t0_unix + us(t0.elapsed()) };
            match r {
                Ok(r) if !r.was_frozen => {
                    // The agent's lease ran out before the thaw: it may have thawed before the cut.
                    let why = format!(
                        "the agent thawed by itself (its {:?} lease ran out) before the thaw",
                        self.freeze_timeout
                    );
                    warn!(vm = %name, reason = %why);
                    crash_reason = Some(why);
                }
                Ok(_) => window = Some(w),
                Err(e) => {
                    window = Some(w);
                    let note = format!("the thaw failed ({}); the agent's watchdog thaws at its deadline", chain(&e));
                    error!(vm = %name, note = %note);
                    notes.push(note);
                }
            }
        }
        let snapshot = match begin {
            Ok(s) => s,
            Err(e) => {
                self.abandon_stray(backend, &e).await;
                return Err(self.backend_failed(Stage::Cut)(e));
            }
        };
        let window_us = window.map_or(0, |w| w.duration_us());
        if window.is_some() {
            self.d.metrics.freeze(&name, std::time::Duration::from_micros(window_us));
        }
        info!(vm = %name, snapshot = snapshot.id, pause_us = snapshot.pause_us, cut_rtt_us = us(cut_rtt), freeze_window_us = window_us, "cut");
        self.emit_wait(Event::Cut {
            snapshot_id: snapshot.id,
            crash_consistent_reason: crash_reason.clone(),
            pause_us: snapshot.pause_us,
        })
        .await;
        self.emit_wait(Event::Thawed { freeze_window_us: window_us }).await;
        let consistency = if window.is_some() { Consistency::Application } else { Consistency::Crash };
        if let Some(why) = crash_reason {
            notes.insert(0, format!("crash-consistent: {why}"));
        }
        Ok(Cut { snapshot, consistency, window, notes })
    }

    /// A Begin that failed (timed out) may still have cut: a snapshot that appeared is given up.
    async fn abandon_stray(&self, backend: &dyn Backend, e: &BackendError) {
        let Ok(st) = backend.status().await else { return };
        if let Some(s) = st.snapshot {
            let reason = format!("job {}: the cut failed: {}", self.state.id, chain(e));
            let r = backend.abandon(s.id, &reason).await;
            warn!(vm = %self.vm.name, snapshot = s.id, abandoned = r.is_ok(), "a snapshot appeared although Begin failed");
        }
    }
}
