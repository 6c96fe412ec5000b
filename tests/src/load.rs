//! Load on a backend for the benchmarks: a worker thread per queue of the test VMM keeps
//! requests in flight, drawn from its [`Source`], while the calling thread steers (sleeps out a
//! measured window, cuts a snapshot, merges it) through the [`Gate`] the workers watch.
//! Completions count while the gate says so; with a [`Trace`], a worker also records the
//! latencies of its requests and the gaps between completions, per millisecond.
//!
//! [`run`] is the runner itself, for any kind of worker (the benchmarks' `pread`/`pwrite`
//! limit uses it too); [`on_queues`] runs [`queue_worker`]s on virtio-blk queues.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::blk::{self, BlkQueue, Request, SECTOR_SIZE};

/// Limit of one wait for a completion; only a hung backend reaches it.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// A wait for a completion this long counts as a stall of the queue.
pub const STALL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Queue operation failed")]
    Queue(#[from] blk::Error),
    #[error("A {request} request failed with status {status}")]
    Status { request: &'static str, status: u8 },
    #[error("Worker {0} panicked")]
    Panicked(usize),
}

/// The requests of one worker, until it runs out.
pub type Source = Box<dyn Iterator<Item = Request<'static>> + Send>;

/// `block`-byte requests at uniformly random blocks of a `size`-byte disk, forever; `writes` of
/// every 256 are writes (of what the slots hold), the rest reads. The same `seed` gives the same
/// sequence.
pub fn random(seed: u64, size: u64, block: u32, writes: u32) -> impl Iterator<Item = Request<'static>> + Send {
    let mut rng = fastrand::Rng::with_seed(seed);
    let blocks = size / u64::from(block);
    std::iter::repeat_with(move || {
        let sector = rng.u64(..blocks.max(1)) * u64::from(block) / SECTOR_SIZE;
        match rng.u32(..256) < writes {
            true => Request::WriteInPlace { sector, len: block },
            false => Request::Read { sector, len: block },
        }
    })
}

/// `block`-byte reads or writes (of what the slots hold) sweeping the bytes of `range` once.
pub fn sweep(range: Range<u64>, block: u32, write: bool) -> impl Iterator<Item = Request<'static>> + Clone + Send {
    range.step_by(block as usize).map(move |off| match write {
        true => Request::WriteInPlace { sector: off / SECTOR_SIZE, len: block },
        false => Request::Read { sector: off / SECTOR_SIZE, len: block },
    })
}

/// What the workers of one load share with the thread steering it.
#[derive(Debug)]
pub struct Gate {
    start: Instant,
    workers: usize,
    stop: AtomicBool,
    counting: AtomicBool,
    finished: AtomicUsize,
}

impl Gate {
    /// Time since the load started.
    pub fn at(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the workers count their completions from now on.
    pub fn count(&self, on: bool) {
        self.counting.store(on, Ordering::SeqCst);
    }

    pub fn counting(&self) -> bool {
        self.counting.load(Ordering::Relaxed)
    }

    /// Whether the workers must stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits until every worker ran out of requests.
    pub fn wait_workers(&self) {
        while self.finished.load(Ordering::SeqCst) < self.workers {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sleeps `warmup`, then counts completions for `run`; returns how long they were counted.
    pub fn measure(&self, warmup: Duration, run: Duration) -> Duration {
        std::thread::sleep(warmup);
        self.count(true);
        let t0 = self.at();
        std::thread::sleep(run);
        let t1 = self.at();
        self.count(false);
        t1 - t0
    }
}

/// Runs `worker` on a thread per element of `ctx` while `steer` runs on this one, then stops
/// them. Returns what `steer` returned, the sum of what the workers returned (their counted
/// completions) and how long the load ran.
pub fn run<C: Send, T, E: From<Error> + Send>(
    ctx: &mut [C],
    counting: bool,
    worker: impl Fn(&mut C, &Gate) -> Result<u64, E> + Sync,
    steer: impl FnOnce(&Gate) -> Result<T, E>,
) -> Result<(T, u64, Duration), E> {
    let gate = Gate {
        start: Instant::now(),
        workers: ctx.len(),
        stop: AtomicBool::new(false),
        counting: AtomicBool::new(counting),
        finished: AtomicUsize::new(0),
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = ctx
            .iter_mut()
            .map(|c| {
                let (gate, worker) = (&gate, &worker);
                s.spawn(move || {
                    let r = worker(c, gate);
                    gate.finished.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let steered = steer(&gate);
        gate.stop.store(true, Ordering::SeqCst);
        let mut ops = 0;
        let mut failed = None;
        for (i, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(n)) => ops += n,
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some(Error::Panicked(i).into())),
            }
        }
        let ran = gate.at();
        let steered = steered?;
        match failed {
            Some(e) => Err(e),
            None => Ok((steered, ops, ran)),
        }
    })
}

/// One queue's part of [`on_queues`].
type QueueWork<'a> = (&'a mut BlkQueue, Source, Option<&'a mut Trace>);

/// Runs a [`queue_worker`] per queue, worker i on `sources[i]` (recording into `traces[i]`
/// with `traces`), `depth` requests in flight each, while `steer` runs; see [`run`].
pub fn on_queues<T, E: From<Error> + Send>(
    queues: &mut [BlkQueue],
    depth: usize,
    sources: Vec<Source>,
    traces: Option<&mut [Trace]>,
    counting: bool,
    steer: impl FnOnce(&Gate) -> Result<T, E>,
) -> Result<(T, u64, Duration), E> {
    let mut traces: Vec<Option<&mut Trace>> = traces.map(|t| t.iter_mut().map(Some).collect()).unwrap_or_default();
    traces.resize_with(queues.len(), || None);
    let mut work: Vec<QueueWork<'_>> =
        queues.iter_mut().zip(sources).zip(traces).map(|((q, src), trace)| (q, src, trace)).collect();
    run(
        &mut work,
        counting,
        |(q, src, trace), gate| queue_worker(q, depth, src, gate, trace.as_deref_mut()).map_err(E::from),
        steer,
    )
}

/// Keeps `depth` requests of `source` in flight on `q` until `gate` stops it or `source` runs
/// out; returns the completions counted.
pub fn queue_worker(
    q: &mut BlkQueue,
    depth: usize,
    source: &mut Source,
    gate: &Gate,
    mut trace: Option<&mut Trace>,
) -> Result<u64, Error> {
    // When each slot's request was submitted, and what it is.
    let mut submitted = vec![(gate.start, ""); q.free_slots() + q.in_flight()];
    let mut done = Vec::with_capacity(depth);
    let (mut ops, mut last, mut more) = (0, Instant::now(), true);
    loop {
        more &= !gate.stopped();
        while more && q.in_flight() < depth {
            match source.next() {
                Some(req) => submitted[usize::from(q.submit(&req)?)] = (Instant::now(), req.name()),
                None => more = false,
            }
        }
        if q.in_flight() == 0 {
            return Ok(ops);
        }
        q.kick()?;
        done.clear();
        q.reap(Some(TIMEOUT), &mut done)?;
        let now = Instant::now();
        if let Some(c) = done.iter().find(|c| c.status != 0) {
            return Err(Error::Status { request: submitted[usize::from(c.tag)].1, status: c.status });
        }
        if let Some(t) = trace.as_deref_mut() {
            let lat = done.iter().map(|c| now - submitted[usize::from(c.tag)].0).max().unwrap_or_default();
            t.record(now - gate.start, lat, now - last);
        }
        last = now;
        if gate.counting() {
            ops += done.len() as u64;
        }
    }
}

/// Per worker and per millisecond of completion time: the longest latency of a request
/// completed then and the longest wait for a completion ending then, in µs.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    max_lat: Vec<u32>,
    max_gap: Vec<u32>,
    /// Waits for a completion of at least [`STALL`]: (when it ended, how long).
    stalls: Vec<(Duration, Duration)>,
}

impl Trace {
    fn record(&mut self, at: Duration, lat: Duration, gap: Duration) {
        let ms = at.as_millis() as usize;
        if ms >= self.max_lat.len() {
            self.max_lat.resize(ms + 1024, 0);
            self.max_gap.resize(ms + 1024, 0);
        }
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.max_lat[ms] = self.max_lat[ms].max(us(lat));
        self.max_gap[ms] = self.max_gap[ms].max(us(gap));
        if gap >= STALL {
            self.stalls.push((at, gap));
        }
    }

    /// Time stalled in waits that ended from `from` to `to`.
    pub fn stalled(&self, from: Duration, to: Duration) -> Duration {
        self.stalls.iter().filter(|(at, _)| *at >= from && *at <= to).map(|(_, gap)| *gap).sum()
    }

    /// Longest latency and gap of completions from `from` to `to` (whole milliseconds), in µs.
    pub fn window(&self, from: Duration, to: Duration) -> (u32, u32) {
        let (a, b) = (from.as_millis() as usize, (to.as_millis() as usize + 1).min(self.max_lat.len()));
        let max = |v: &[u32]| v.get(a..b).and_then(|s| s.iter().max().copied()).unwrap_or(0);
        (max(&self.max_lat), max(&self.max_gap))
    }
}
