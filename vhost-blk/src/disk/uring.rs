//! A queue thread's io_uring: readv or writev operations submitted together, and every one of
//! them waited for before [`run`] returns, whatever fails. An operation the kernel still has
//! in flight writes into its buffers (guest memory) or reads from them whenever it completes:
//! returning, or dropping the ring, before it did would let it land in memory the guest has
//! reused, or write stale data over a newer write once the caller redid the I/O another way.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

/// Operations queued at most at once (and the ring's size).
pub const ENTRIES: u32 = 256;

/// One readv or writev.
pub struct Op<'a> {
    pub fd: RawFd,
    pub iovs: &'a [libc::iovec],
    pub offset: u64,
}

/// Why a batch could not go through the io_uring. Nothing is in flight when it is returned, so
/// the caller may redo every operation the blocking way.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("The io_uring submission queue is full")]
    Full,
    #[error("Cannot submit to the io_uring")]
    Submit(#[source] io::Error),
    #[error("The io_uring completed unknown operation {0}")]
    UnknownCompletion(u64),
}

/// What [`run`] needs of a ring; the tests put a failing one in its place.
pub trait Ring {
    /// Queues `entry`; false when the submission queue is full.
    ///
    /// # Safety
    /// What the entry points to must stay valid until its completion has been reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool;
    /// Submits what is queued and waits for `want` completions; the number submitted.
    fn submit_and_wait(&mut self, want: usize) -> io::Result<usize>;
    /// Takes the completions there are: `(user_data, result)`.
    fn reap(&mut self, out: &mut Vec<(u64, i32)>);
}

impl Ring for IoUring {
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: our caller keeps what the entry points to valid until its completion.
        unsafe { self.submission().push(entry) }.is_ok()
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        IoUring::submit_and_wait(self, want)
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// Runs `ops` (reads or writes) in rounds of at most [`ENTRIES`]; each one's byte count or
/// error, in order. On an error, nothing submitted is still in flight.
pub fn run<R: Ring>(ring: &mut R, ops: &[Op<'_>], write: bool) -> Result<Vec<io::Result<usize>>, RingError> {
    let mut results: Vec<Option<io::Result<usize>>> = ops.iter().map(|_| None).collect();
    let mut reaped = Vec::new();
    for (round, chunk) in ops.chunks(ENTRIES as usize).enumerate() {
        let base = round * ENTRIES as usize;
        for (k, op) in chunk.iter().enumerate() {
            let (fd, iovs, n) = (types::Fd(op.fd), op.iovs.as_ptr(), op.iovs.len() as u32);
            let entry = if write {
                opcode::Writev::new(fd, iovs, n).offset(op.offset).build()
            } else {
                opcode::Readv::new(fd, iovs, n).offset(op.offset).build()
            };
            // SAFETY: the iovecs and the buffers they point to are borrowed for this call,
            // which reaps every completion of what it submitted before it returns. An entry
            // queued but not submitted (the queue filled up) is never submitted: the caller
            // drops the ring, and nothing submits without `io_uring_enter`.
            if !unsafe { ring.push(&entry.user_data((base + k) as u64)) } {
                return Err(RingError::Full);
            }
        }
        // The kernel owes one completion per submission; an unknown one (a kernel bug) is
        // reported, but only once every operation of ours has completed.
        let (mut submitted, mut seen) = (0usize, 0usize);
        let mut unknown = None;
        let mut stuck = Stuck::default();
        while seen < chunk.len() {
            match ring.submit_and_wait(chunk.len() - seen) {
                Ok(n) => submitted += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Nothing in flight: the caller may redo the lot another way.
                Err(e) if submitted <= seen => return Err(RingError::Submit(e)),
                // Operations in flight: they must complete first, however long it takes.
                Err(e) => stuck.wait(&e),
            }
            reaped.clear();
            ring.reap(&mut reaped);
            for &(data, res) in &reaped {
                let slot = usize::try_from(data)
                    .ok()
                    .filter(|&i| i >= base && i < base + chunk.len())
                    .and_then(|i| results.get_mut(i))
                    .filter(|r| r.is_none());
                match slot {
                    Some(r) => {
                        *r = Some(if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) });
                        seen += 1;
                    }
                    None => unknown = Some(data),
                }
            }
        }
        if let Some(data) = unknown {
            return Err(RingError::UnknownCompletion(data));
        }
    }
    Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Err(io::Error::other("no io_uring completion")))).collect())
}

/// Backs off while the ring cannot be waited on with operations in flight; says so, at most
/// every ten seconds.
#[derive(Default)]
struct Stuck {
    pause: Duration,
    said: Option<Instant>,
}

impl Stuck {
    fn wait(&mut self, e: &io::Error) {
        if self.said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::error!(error = %e, "cannot wait for io_uring operations in flight; retrying until they complete");
            self.said = Some(Instant::now());
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(1), Duration::from_millis(100));
        std::thread::sleep(self.pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A ring that does no I/O: each submitted operation completes with its length, but only
    /// after the waits `script` makes fail have been returned.
    #[derive(Default)]
    struct FakeRing {
        queued: Vec<u64>,
        in_flight: Vec<u64>,
        done: Vec<(u64, i32)>,
        /// What each call to `submit_and_wait` does: `Some(error)` fails it (after submitting
        /// nothing, or, with `submit_first`, after submitting what is queued).
        script: VecDeque<(bool, Option<i32>)>,
        capacity: usize,
        /// Completions this ring produces that belong to no submission.
        stray: Option<u64>,
    }

    impl Ring for FakeRing {
        unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
            if self.queued.len() + self.in_flight.len() >= self.capacity {
                return false;
            }
            self.queued.push(entry.get_user_data());
            true
        }

        fn submit_and_wait(&mut self, _want: usize) -> io::Result<usize> {
            let (submit_first, fail) = self.script.pop_front().unwrap_or((true, None));
            let mut n = 0;
            if fail.is_none() || submit_first {
                n = self.queued.len();
                self.in_flight.append(&mut self.queued);
            }
            if let Some(errno) = fail {
                return if n > 0 { Ok(n) } else { Err(io::Error::from_raw_os_error(errno)) };
            }
            self.done.extend(self.in_flight.drain(..).map(|d| (d, 4096)));
            if let Some(d) = self.stray.take() {
                // The stray one stands in for a real one, which completes later.
                let real = self.done.pop().unwrap();
                self.in_flight.push(real.0);
                self.done.push((d, 0));
            }
            Ok(n)
        }

        fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
            out.append(&mut self.done);
        }
    }

    fn ops(n: usize) -> (Vec<libc::iovec>, usize) {
        (vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 4096 }; n], n)
    }

    fn run_fake(ring: &mut FakeRing, n: usize) -> Result<Vec<io::Result<usize>>, RingError> {
        let (iovs, n) = ops(n);
        let ops: Vec<Op<'_>> = (0..n).map(|i| Op { fd: -1, iovs: &iovs[i..i + 1], offset: i as u64 * 4096 }).collect();
        run(ring, &ops, false)
    }

    #[test]
    fn a_failed_wait_with_operations_in_flight_waits_for_them_before_returning() {
        // Submitted, then two waits fail (EBUSY, ENOMEM) while all 8 are in flight.
        let mut ring = FakeRing { capacity: 256, ..FakeRing::default() };
        ring.script =
            VecDeque::from([(true, Some(libc::EINTR)), (false, Some(libc::EBUSY)), (false, Some(libc::ENOMEM))]);
        let res = run_fake(&mut ring, 8).expect("the operations in flight completed; their results count");
        assert!(ring.in_flight.is_empty() && ring.queued.is_empty());
        assert_eq!(res.iter().map(|r| *r.as_ref().unwrap()).collect::<Vec<_>>(), vec![4096; 8]);
    }

    #[test]
    fn a_failed_submission_with_nothing_in_flight_returns_at_once() {
        let mut ring = FakeRing { capacity: 256, ..FakeRing::default() };
        ring.script = VecDeque::from([(false, Some(libc::ENOMEM))]);
        assert!(matches!(run_fake(&mut ring, 8), Err(RingError::Submit(_))));
        assert!(ring.in_flight.is_empty(), "returned with operations in flight");
    }

    #[test]
    fn an_unknown_completion_is_an_error_only_once_every_operation_completed() {
        let mut ring = FakeRing { capacity: 256, stray: Some(9999), ..FakeRing::default() };
        assert!(matches!(run_fake(&mut ring, 8), Err(RingError::UnknownCompletion(9999))));
        assert!(ring.in_flight.is_empty(), "returned with operations in flight");
    }

    #[test]
    fn a_full_queue_submits_nothing_and_rounds_cover_every_operation() {
        let mut ring = FakeRing { capacity: 4, ..FakeRing::default() };
        assert!(matches!(run_fake(&mut ring, 8), Err(RingError::Full)));
        assert!(ring.in_flight.is_empty());
        let mut ring = FakeRing { capacity: 256, ..FakeRing::default() };
        let res = run_fake(&mut ring, 600).unwrap();
        assert_eq!(res.len(), 600);
        assert!(res.iter().all(|r| *r.as_ref().unwrap() == 4096));
    }
}
