//! The virtio side of a vhost-user-blk device: features, the config space, and the queue loop
//! that takes requests, tracks them in the inflight region and completes them. One worker
//! thread per queue ([`crate::handler`] runs them), so the queues of a disk do I/O in parallel.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::inflight::{self, QueueInflight};
use crate::virtio::{BlkDevice, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

/// Largest queue a frontend may set up (QEMU's limit for vhost-user-blk too).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Data segments per request announced to the guest: fits QEMU's default 128-entry queues
/// even without indirect descriptors (header and status take two entries).
const SEG_MAX: u32 = 126;
/// Offset of `writeback` in `struct virtio_blk_config`.
const CONFIG_WRITEBACK: usize = 32;
/// Bytes of `struct virtio_blk_config` up to and including the write-zeroes fields.
const CONFIG_LEN: usize = 60;
/// The test hook's environment variable (see [`TestDelay`]).
pub const TEST_DELAY_ENV: &str = "LIVESNAP_BLK_TEST_DELAY";

/// Why a queue could not be served. The guest's requests get their own virtio status; these
/// are faults of the ring itself, logged at `debug!` (the frontend or the guest broke it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot change the queue's notification state")]
    Notification(#[source] virtio_queue::Error),
    #[error("Cannot signal the used queue")]
    Signal(#[source] io::Error),
    #[error("The available ring index is invalid")]
    InvalidAvailIndex,
    #[error("Cannot start a thread for a held request")]
    Spawn(#[source] io::Error),
}

/// Why [`TEST_DELAY_ENV`] was refused.
#[derive(Debug, thiserror::Error)]
#[error("{TEST_DELAY_ENV}={spec:?} is not ms=MS[,every=N][,sectors=FIRST-END]: {why}")]
pub struct DelaySpecError {
    spec: String,
    why: &'static str,
}

/// A test hook, read once at start-up from [`TEST_DELAY_ENV`] (never from anything a guest
/// controls): requests it selects are held `hold` before they run, on a thread of their own,
/// while the queue goes on with the others; so completions come out of order. `every`: every
/// n-th request taken on a queue (counting from the first); `sectors`: only requests whose
/// header names a sector in `first..end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDelay {
    pub hold: Duration,
    pub every: u64,
    pub sectors: Option<(u64, u64)>,
}

impl TestDelay {
    /// The hook the environment asks for, if any.
    pub fn from_env() -> Result<Option<Self>, DelaySpecError> {
        match std::env::var(TEST_DELAY_ENV) {
            Ok(spec) => Self::parse(&spec).map(Some),
            Err(_) => Ok(None),
        }
    }

    pub fn parse(spec: &str) -> Result<Self, DelaySpecError> {
        let err = |why| DelaySpecError { spec: spec.to_owned(), why };
        let (mut hold, mut every, mut sectors) = (None, 1, None);
        for item in spec.split(',') {
            let (key, value) = item.split_once('=').ok_or(err("an item is not key=value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|_| err("a number is not an unsigned integer"));
            match key {
                "ms" => hold = Some(Duration::from_millis(num(value)?)),
                "every" => every = num(value)?.max(1),
                "sectors" => {
                    let (a, b) = value.split_once('-').ok_or(err("sectors is not FIRST-END"))?;
                    sectors = Some((num(a)?, num(b)?));
                }
                _ => return Err(err("unknown key")),
            }
        }
        Ok(TestDelay { hold: hold.ok_or(err("ms is missing"))?, every, sectors })
    }

    fn selects(&self, seq: u64, sector: Option<u64>) -> bool {
        seq % self.every == 0 && self.sectors.is_none_or(|(a, b)| sector.is_some_and(|s| (a..b).contains(&s)))
    }
}

/// One queue: its vring and everything the worker and the held requests share.
pub struct Queue {
    pub index: u16,
    pub vring: VringRwLock,
    /// The queue's table in the inflight region, once the frontend shared one. Locked for each
    /// take and each completion, before the vring's own lock.
    inflight: Mutex<Option<QueueInflight>>,
    /// Requests held by the test hook and not yet completed; zero without the hook.
    held: Mutex<usize>,
    held_cv: Condvar,
    /// Releases held requests at once (the connection ends).
    release: AtomicBool,
    /// Requests taken so far, for the test hook.
    taken: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Queue {
    pub fn new(index: u16, vring: VringRwLock) -> Self {
        Queue {
            index,
            vring,
            inflight: Mutex::new(None),
            held: Mutex::new(0),
            held_cv: Condvar::new(),
            release: AtomicBool::new(false),
            taken: AtomicU64::new(0),
        }
    }

    /// Starts tracking this queue in `region`, recovering what a previous backend left:
    /// returns the available-ring position to resume from.
    pub fn start_inflight(&self, region: Arc<inflight::Region>) -> Result<u16, inflight::Error> {
        let size = self.vring.get_ref().get_queue().size();
        let used_idx =
            self.vring.queue_used_idx().map_err(|source| inflight::Error::UsedIndex { queue: self.index, source })?;
        let (q, resume) = QueueInflight::start(region, self.index, size, used_idx)?;
        if !resume.resubmit.is_empty() {
            warn!(queue = self.index, requests = ?resume.resubmit, "resubmitting requests a previous backend left in flight");
        }
        *lock(&self.inflight) = Some(q);
        Ok(resume.next_avail)
    }

    /// Stops tracking (the queue stops, or the connection ends).
    pub fn stop_inflight(&self) {
        *lock(&self.inflight) = None;
    }

    /// Lets held requests run now, and any held later at once (the queue stops).
    pub fn release_held(&self) {
        self.release.store(true, Ordering::Release);
        let _held = lock(&self.held);
        self.held_cv.notify_all();
    }

    /// The test hook holds requests again (the queue starts).
    pub fn hold_again(&self) {
        self.release.store(false, Ordering::Release);
    }

    /// Waits until every held request has completed.
    pub fn drain_held(&self) {
        let mut held = lock(&self.held);
        while *held > 0 {
            held = self.held_cv.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Puts `head` into the used ring, recording it in the inflight table around the update
    /// so that a crash at any point leaves it either in flight or done, never both.
    /// Returns whether it went in (a head outside the descriptor table cannot).
    fn complete(&self, head: u16, len: u32) -> bool {
        let inflight = lock(&self.inflight);
        if let Some(t) = inflight.as_ref() {
            t.pre_put(head);
        }
        let used = {
            let mut state = self.vring.get_mut();
            if let Err(e) = state.add_used(head, len) {
                debug!(head, error = %livesnap_proto::error::chain(&e), "dropping a chain with an invalid head");
                return false;
            }
            state.get_queue().next_used()
        };
        if let Some(t) = inflight.as_ref() {
            t.post_put(head, used);
        }
        true
    }

    fn signal(&self, event_idx: bool) -> Result<(), Error> {
        if !event_idx || self.vring.needs_notification().map_err(Error::Notification)? {
            self.vring.signal_used_queue().map_err(Error::Signal)?;
        }
        Ok(())
    }

    /// Waits until a held request may run: its time is up or the queue is being released.
    fn hold(&self, until: Instant) {
        let mut held = lock(&self.held);
        while !self.release.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            held = self.held_cv.wait_timeout(held, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// The virtio-blk device of one disk, for one frontend connection.
#[derive(Debug)]
pub struct BlkBackend {
    dev: Arc<BlkDevice>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    num_queues: usize,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    delay: Option<TestDelay>,
}

impl BlkBackend {
    pub fn new(
        dev: Arc<BlkDevice>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        num_queues: usize,
        delay: Option<TestDelay>,
    ) -> Self {
        BlkBackend { dev, mem, num_queues, event_idx: AtomicBool::new(false), acked_features: AtomicU64::new(0), delay }
    }

    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    pub fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.dev.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    pub fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        self.dev.negotiated(features & (1 << VIRTIO_BLK_F_FLUSH) != 0);
        self.event_idx.store(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0, Ordering::Relaxed);
        debug!(writeback = self.dev.writeback(), "features acknowledged");
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &self.dev.capacity().to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &512u32.to_le_bytes()); // blk_size
        put(CONFIG_WRITEBACK, &[u8::from(self.dev.writeback())]);
        put(34, &(self.num_queues as u16).to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        // Fields past what we implement read as zero, as in QEMU's own devices.
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match (offset as usize, buf) {
            (CONFIG_WRITEBACK, [v]) if wce => {
                debug!(writeback = *v != 0, "guest set the cache mode");
                self.dev.set_writeback(*v != 0);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    /// Serves one queue until it has no more requests, signalling the guest once per batch.
    /// Requests a previous backend left in flight run first, oldest first, then the available
    /// ring. Each request is marked in the inflight table before it runs, and unmarked as it
    /// enters the used ring.
    pub fn process_queue(&self, q: &Arc<Queue>) -> Result<(), Error> {
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                q.vring.disable_notification().map_err(Error::Notification)?;
            }
            let chains = self.take(q, &mem);
            let taken = !chains.is_empty();
            let (held, now): (Vec<_>, Vec<_>) = chains.into_iter().partition(|c| c.held);
            for chain in held {
                self.hold(q, chain)?;
            }
            let heads: Vec<u16> = now.iter().map(|c| c.head).collect();
            let lens = self.dev.process_batch(now.into_iter().map(|c| c.descs.into_iter()), &mem);
            let mut used = false;
            for (head, len) in heads.into_iter().zip(lens) {
                // A head outside the descriptor table cannot be returned; it is skipped and
                // the requests behind it go on.
                used |= q.complete(head, len);
            }
            if used {
                q.signal(event_idx)?;
            }
            if !event_idx || !q.vring.enable_notification().map_err(Error::Notification)? {
                return Ok(());
            }
            if !taken {
                // The ring claims more requests but yields none: its available index is
                // corrupt. Spinning here would burn a host CPU for a broken guest.
                return Err(Error::InvalidAvailIndex);
            }
        }
    }

    /// Takes every request there is: those to resubmit, then the available ring's; marks each
    /// new one in flight before anything of it runs.
    fn take(&self, q: &Queue, mem: &GuestMemoryMmap) -> Vec<Taken> {
        let mut inflight = lock(&q.inflight);
        let mut chains = Vec::new();
        let mut state = q.vring.get_mut();
        let queue = state.get_queue_mut();
        let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
        if let Some(t) = inflight.as_mut() {
            while let Some(head) = t.next_resubmit() {
                chains.push(Taken { head, descs: inflight::chain_at(mem, table, size, head).collect(), held: false });
            }
        }
        let resubmitted = chains.len();
        while chains.len() < MAX_QUEUE_SIZE + resubmitted {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            chains.push(Taken { head: chain.head_index(), descs: chain.collect(), held: false });
        }
        drop(state);
        for c in &mut chains[resubmitted..] {
            if let Some(t) = inflight.as_mut() {
                t.take(c.head);
            }
        }
        drop(inflight);
        if let Some(delay) = &self.delay {
            for c in &mut chains {
                let seq = q.taken.fetch_add(1, Ordering::Relaxed);
                c.held = delay.selects(seq, header_sector(&c.descs, mem));
            }
        }
        chains
    }

    /// Runs `chain` on a thread of its own once the test hook's delay is over.
    fn hold(&self, q: &Arc<Queue>, chain: Taken) -> Result<(), Error> {
        let Some(delay) = &self.delay else { return Ok(()) };
        let until = Instant::now() + delay.hold;
        let (q2, dev, mem) = (q.clone(), self.dev.clone(), self.mem.memory().into_inner());
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        *lock(&q.held) += 1;
        debug!(queue = q.index, head = chain.head, "test hook: holding a request");
        let spawned = std::thread::Builder::new().name("held-request".into()).spawn(move || {
            q2.hold(until);
            let len = dev.process(chain.descs.into_iter(), &mem);
            if q2.complete(chain.head, len) {
                if let Err(e) = q2.signal(event_idx) {
                    debug!(error = %livesnap_proto::error::chain(&e), "cannot signal a held request's completion");
                }
            }
            *lock(&q2.held) -= 1;
            q2.held_cv.notify_all();
        });
        if let Err(e) = spawned {
            *lock(&q.held) -= 1;
            return Err(Error::Spawn(e));
        }
        Ok(())
    }
}

/// A request taken from the queue.
struct Taken {
    head: u16,
    descs: Vec<Descriptor>,
    /// Selected by the test hook.
    held: bool,
}

/// The sector a request's header names, if its first descriptor holds a whole header.
fn header_sector(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Option<u64> {
    let d = descs.first().filter(|d| !d.is_write_only() && d.len() >= 16)?;
    let addr = d.addr().checked_add(8)?;
    mem.read_obj::<u64>(addr).ok().map(u64::from_le)
}
