//! Stopping a job early: CancelJob, or livesnapd stopping (SIGTERM).
//!
//! A job looks at its [`Stop`] between its steps: before anything is asked of the guest, after
//! the cut, after the backup. A cancel also interrupts the step under way where that is safe —
//! the reading of the frozen bases (at its next read, and before the commit) and the wait for
//! the merge — but never the freeze, cut and thaw, which are short and must end with a thaw.
//! A stop for shutdown lets the step under way finish. Either way the job then ends as a
//! failure does: the snapshot abandoned (its delta merges), nothing checkpointed, and the job
//! recorded `cancelled`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Why a job was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A client's CancelJob: the step under way is interrupted where it safely can be.
    Cancel,
    /// livesnapd is stopping: the step under way finishes first.
    Shutdown,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Cancel => "a client asked (CancelJob)",
            StopReason::Shutdown => "livesnapd is stopping",
        })
    }
}

/// One job's stop request, shared by the job and the daemon.
#[derive(Debug, Default)]
pub struct Stop {
    reason: Mutex<Option<StopReason>>,
    /// Set by a cancel: the reading of the bases stops at its next read.
    interrupt: Arc<AtomicBool>,
    changed: Notify,
}

impl Stop {
    /// Asks the job to stop; a cancel overrides a shutdown, never the reverse.
    pub fn request(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if r.is_none() || reason == StopReason::Cancel {
                *r = Some(reason);
            }
        }
        if reason == StopReason::Cancel {
            self.interrupt.store(true, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }

    pub fn requested(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flag a blocking reader polls: set once the job is cancelled.
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    /// Resolves once the job is asked to stop, for either reason (a live restore stops feeding
    /// at once on both).
    pub async fn stopped(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.requested().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once the job is cancelled (not on a shutdown, which lets a step finish).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.requested() == Some(StopReason::Cancel) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_wakes_a_waiter_and_overrides_a_shutdown() {
        let stop = Arc::new(Stop::default());
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        stop.request(StopReason::Shutdown);
        assert_eq!(stop.requested(), Some(StopReason::Shutdown));
        assert!(!stop.interrupt_flag().load(Ordering::SeqCst), "a shutdown lets the reading go on");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a shutdown does not interrupt a step");
        stop.request(StopReason::Cancel);
        waiter.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(stop.interrupt_flag().load(Ordering::SeqCst));
        stop.request(StopReason::Shutdown);
        assert_eq!(stop.requested(), Some(StopReason::Cancel), "a cancel is not downgraded");
    }
}
