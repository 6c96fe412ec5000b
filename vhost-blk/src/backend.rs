//! The vhost-user glue: features, the config space, and the queue loop. One worker thread per
//! queue, so the queues of a disk do I/O in parallel.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

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
    #[error("Event for unknown queue {0}")]
    UnknownQueue(u16),
}

/// The vhost-user backend of one disk, for one frontend connection.
#[derive(Debug)]
pub struct BlkBackend {
    dev: Arc<BlkDevice>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    num_queues: usize,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
}

impl BlkBackend {
    pub fn new(dev: Arc<BlkDevice>, mem: GuestMemoryAtomic<GuestMemoryMmap>, num_queues: usize) -> Self {
        BlkBackend { dev, mem, num_queues, event_idx: AtomicBool::new(false), acked_features: AtomicU64::new(0) }
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

    /// Serves one queue until it has no more requests, signalling the guest once per batch.
    fn process_queue(&self, vring: &VringRwLock) -> Result<(), Error> {
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(Error::Notification)?;
            }
            // Take every available request first, so that their reads can overlap; the queue
            // lock is released before add_used takes it again.
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                std::iter::from_fn(|| queue.pop_descriptor_chain(mem.clone())).take(MAX_QUEUE_SIZE).collect()
            };
            let taken = !chains.is_empty();
            let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
            let lens = self.dev.process_batch(chains.into_iter(), &mem);
            let mut used = false;
            for (head, len) in heads.into_iter().zip(lens) {
                // A head outside the descriptor table cannot be returned; skip it and go on
                // with the requests behind it.
                match vring.add_used(head, len) {
                    Ok(()) => used = true,
                    Err(e) => {
                        debug!(head, error = %livesnap_proto::error::chain(&e), "dropping a chain with an invalid head")
                    }
                }
            }
            if used && (!event_idx || vring.needs_notification().map_err(Error::Notification)?) {
                vring.signal_used_queue().map_err(Error::Signal)?;
            }
            if !event_idx || !vring.enable_notification().map_err(Error::Notification)? {
                return Ok(());
            }
            if !taken {
                // The ring claims more requests but yields none: its available index is
                // corrupt. Spinning here would burn a host CPU for a broken guest.
                return Err(Error::InvalidAvailIndex);
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
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

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        self.dev.negotiated(features & (1 << VIRTIO_BLK_F_FLUSH) != 0);
        debug!(writeback = self.dev.writeback(), "features acknowledged");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        // Fields past what we implement read as zero, as in QEMU's own devices.
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
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

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // `self.mem` is the same atomic handle the daemon updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| warn!(error = %livesnap_proto::error::chain(&e), "cannot create an exit event"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            debug!(?evset, "ignoring unexpected event set");
            return Ok(());
        }
        // One queue per thread: the event index is the thread's own vring.
        // The trait wants an io::Error; the typed one rides in it as its payload.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, Error::UnknownQueue(device_event)))?;
        if let Err(e) = self.process_queue(vring) {
            // A broken ring is the frontend's fault; keep the worker alive for the next kick.
            debug!(error = %livesnap_proto::error::chain(&e), "queue processing failed");
        }
        Ok(())
    }
}
