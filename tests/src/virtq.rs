//! The driver side of a split virtqueue (virtio 1.x, §2.7) in shared guest memory.
//!
//! [`SplitQueue`] lays out the descriptor table, the available ring and the used ring in guest
//! memory, hands out descriptors from a free list, publishes chains to the device and reaps the
//! used ring. It supports `VIRTIO_RING_F_EVENT_IDX`: it writes `used_event` when it runs out of
//! used entries and reads `avail_event` to decide whether the device needs a kick.
//!
//! What the driver believes about its own chains (their links, which heads are in flight) is kept
//! on the driver side, never read back from shared memory, so a device that scribbles on the rings
//! cannot corrupt the driver. A raw path ([`SplitQueue::alloc_descs`],
//! [`SplitQueue::write_desc`], [`SplitQueue::push_avail`], [`SplitQueue::set_avail_idx`]) places
//! arbitrary descriptors and indexes for tests of hostile guests.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, Le16, Le32, Le64};

/// Guest memory as the test VMM maps it.
pub type Memory = vm_memory::GuestMemoryMmap<()>;

/// Largest queue size allowed by the spec.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of the driver side of a virtqueue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Queue size {0} is not a power of two between 1 and {MAX_QUEUE_SIZE}")]
    InvalidSize(u16),
    #[error("Rings at {0:#x} do not fit in guest memory")]
    RingsOutOfMemory(u64),
    #[error("Guest memory access at {addr:#x} failed")]
    Memory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("A chain needs at least one buffer")]
    EmptyChain,
    #[error("{needed} descriptors needed but only {free} are free")]
    QueueFull { needed: usize, free: usize },
    #[error("Descriptor index {0} is outside the table")]
    InvalidIndex(u16),
    #[error("Device returned used id {0}, which is not the head of a chain in flight")]
    UnknownUsedId(u32),
    #[error("Device moved the used index from {last} to {idx}, past the {size} ring entries")]
    UsedIndexJump { last: u16, idx: u16, size: u16 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One descriptor exactly as it is placed in the table (the raw path writes anything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One element reaped from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head of the chain the device returned.
    pub id: u16,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// `vring_need_event()` of the spec: whether moving an index from `old` to `new` crosses `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of one split virtqueue.
pub struct SplitQueue {
    mem: Arc<Memory>,
    size: u16,
    event_idx: bool,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    /// Free descriptor indices, used as a stack.
    free: Vec<u16>,
    /// The driver's own copy of each descriptor's link within its chain.
    next: Vec<u16>,
    /// For each chain head in flight, the number of descriptors it owns; 0 when not in flight.
    chain_len: Vec<u16>,
    /// Index of the next available-ring entry to fill.
    next_avail: u16,
    /// Available index the device was last shown.
    published: u16,
    /// Used index up to which entries were reaped.
    last_used: u16,
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.size)
            .field("event_idx", &self.event_idx)
            .field("desc_table", &self.desc_table)
            .field("free", &self.free.len())
            .field("next_avail", &self.next_avail)
            .field("last_used", &self.last_used)
            .finish_non_exhaustive()
    }
}

impl SplitQueue {
    /// Bytes the three parts of a queue of `size` take, laid out from a 16-byte aligned base.
    pub fn layout_size(size: u16) -> u64 {
        let (_, _, used) = Self::offsets(size);
        used + 6 + 8 * u64::from(size)
    }

    /// Offsets of the descriptor table, available ring and used ring from the base.
    fn offsets(size: u16) -> (u64, u64, u64) {
        let n = u64::from(size);
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        (0, avail, used)
    }

    /// Lays out and zeroes a queue of `size` entries at `base` (aligned to 16 bytes).
    pub fn new(mem: Arc<Memory>, base: GuestAddress, size: u16, event_idx: bool) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidSize(size));
        }
        let len = Self::layout_size(size);
        let fits = usize::try_from(len).is_ok_and(|l| mem.check_range(base, l));
        if base.raw_value() % 16 != 0 || !fits {
            return Err(Error::RingsOutOfMemory(base.raw_value()));
        }
        let zeroes = vec![0u8; len as usize];
        mem.write_slice(&zeroes, base).map_err(|source| Error::Memory { addr: base.raw_value(), source })?;
        let (d, a, u) = Self::offsets(size);
        Ok(SplitQueue {
            mem,
            size,
            event_idx,
            desc_table: base.unchecked_add(d),
            avail_ring: base.unchecked_add(a),
            used_ring: base.unchecked_add(u),
            free: (0..size).rev().collect(),
            next: vec![0; usize::from(size)],
            chain_len: vec![0; usize::from(size)],
            next_avail: 0,
            published: 0,
            last_used: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn mem(&self) -> &Arc<Memory> {
        &self.mem
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Guest addresses of the descriptor table, the available ring and the used ring.
    pub fn addresses(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc_table, self.avail_ring, self.used_ring)
    }

    /// Descriptors not owned by a chain in flight.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    fn store_u16(&self, val: u16, addr: GuestAddress, order: Ordering) -> Result<()> {
        self.mem.store(val.to_le(), addr, order).map_err(|source| Error::Memory { addr: addr.raw_value(), source })
    }

    fn load_u16(&self, addr: GuestAddress, order: Ordering) -> Result<u16> {
        let v: u16 = self.mem.load(addr, order).map_err(|source| Error::Memory { addr: addr.raw_value(), source })?;
        Ok(u16::from_le(v))
    }

    /// Writes descriptor `index` of the table, whatever its contents.
    pub fn write_desc(&mut self, index: u16, desc: Descriptor) -> Result<()> {
        if index >= self.size {
            return Err(Error::InvalidIndex(index));
        }
        let addr = self.desc_table.unchecked_add(16 * u64::from(index));
        let raw = (Le64::from(desc.addr), Le32::from(desc.len), Le16::from(desc.flags), Le16::from(desc.next));
        let res = self
            .mem
            .write_obj(raw.0, addr)
            .and_then(|()| self.mem.write_obj(raw.1, addr.unchecked_add(8)))
            .and_then(|()| self.mem.write_obj(raw.2, addr.unchecked_add(12)))
            .and_then(|()| self.mem.write_obj(raw.3, addr.unchecked_add(14)));
        res.map_err(|source| Error::Memory { addr: addr.raw_value(), source })
    }

    /// Takes `n` descriptors from the free list and links them, in the driver's books, into one
    /// chain headed by the first index returned. Nothing is written to the table: the caller
    /// writes what it wants with [`write_desc`](Self::write_desc) and publishes the head with
    /// [`push_avail`](Self::push_avail). The descriptors return to the free list when the device
    /// returns the head.
    pub fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > self.free.len() {
            return Err(Error::QueueFull { needed: n, free: self.free.len() });
        }
        let ids: Vec<u16> = self.free.split_off(self.free.len() - n).into_iter().rev().collect();
        for w in ids.windows(2) {
            self.next[usize::from(w[0])] = w[1];
        }
        // n <= free.len() <= size <= 32768.
        self.chain_len[usize::from(ids[0])] = n as u16;
        Ok(ids)
    }

    /// Places a chain of buffers (guest address, length, device-writable) in the table and
    /// appends its head to the available ring. The device sees it after [`publish`](Self::publish).
    pub fn add_chain(&mut self, bufs: &[(GuestAddress, u32, bool)]) -> Result<u16> {
        let ids = self.alloc_descs(bufs.len())?;
        for (i, (&(addr, len, writable), &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = Descriptor { addr: addr.raw_value(), len, flags, next: next.unwrap_or(0) };
            if let Err(e) = self.write_desc(id, desc) {
                self.release(ids[0]);
                return Err(e);
            }
        }
        self.push_avail(ids[0])?;
        Ok(ids[0])
    }

    /// Appends `head` to the available ring without publishing it. Any value is accepted.
    pub fn push_avail(&mut self, head: u16) -> Result<()> {
        let slot = 4 + 2 * u64::from(self.next_avail % self.size);
        self.store_u16(head, self.avail_ring.unchecked_add(slot), Ordering::Relaxed)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Makes the entries appended since the last publication visible to the device. Returns
    /// whether the device asked to be notified of them (`avail_event` with EVENT_IDX, else the
    /// `VRING_USED_F_NO_NOTIFY` flag).
    pub fn publish(&mut self) -> Result<bool> {
        let (old, new) = (self.published, self.next_avail);
        // Descriptors and ring entries must be visible before the index that exposes them.
        fence(Ordering::Release);
        self.store_u16(new, self.avail_ring.unchecked_add(2), Ordering::Relaxed)?;
        self.published = new;
        // The index store must be ordered before reading the device's suppression state, or both
        // sides may decide the other will act.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event_addr = self.used_ring.unchecked_add(4 + 8 * u64::from(self.size));
            let event = self.load_u16(event_addr, Ordering::Relaxed)?;
            Ok(need_event(event, new, old))
        } else {
            let flags = self.load_u16(self.used_ring, Ordering::Relaxed)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY as u16 == 0 && new != old)
        }
    }

    /// Raw path: stores `idx` as the available index at once (after a release fence), whatever
    /// was appended. Later [`push_avail`](Self::push_avail) calls continue from `idx`.
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        fence(Ordering::Release);
        self.store_u16(idx, self.avail_ring.unchecked_add(2), Ordering::Relaxed)?;
        self.next_avail = idx;
        self.published = idx;
        Ok(())
    }

    /// The used index as the device last wrote it.
    pub fn used_idx(&self) -> Result<u16> {
        self.load_u16(self.used_ring.unchecked_add(2), Ordering::Acquire)
    }

    /// Reaps the next used element, if any, and returns its descriptors to the free list.
    ///
    /// When the ring is empty and EVENT_IDX is on, asks for an interrupt at the next used entry
    /// (writes `used_event`) and checks again, so that waiting for the call eventfd after a
    /// `None` cannot miss a completion.
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        let mut idx = self.used_idx()?;
        if idx == self.last_used {
            if !self.event_idx {
                return Ok(None);
            }
            let event_addr = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
            self.store_u16(self.last_used, event_addr, Ordering::Relaxed)?;
            fence(Ordering::SeqCst);
            idx = self.used_idx()?;
            if idx == self.last_used {
                return Ok(None);
            }
        }
        if idx.wrapping_sub(self.last_used) > self.size {
            return Err(Error::UsedIndexJump { last: self.last_used, idx, size: self.size });
        }
        // The element must be read after the index that exposed it.
        fence(Ordering::Acquire);
        let elem = self.used_ring.unchecked_add(4 + 8 * u64::from(self.last_used % self.size));
        let read = |a: GuestAddress| {
            self.mem.read_obj::<Le32>(a).map(u32::from).map_err(|source| Error::Memory { addr: a.raw_value(), source })
        };
        let (id, len) = (read(elem)?, read(elem.unchecked_add(4))?);
        self.last_used = self.last_used.wrapping_add(1);
        match u16::try_from(id) {
            Ok(head) if head < self.size && self.chain_len[usize::from(head)] > 0 => {
                self.release(head);
                Ok(Some(Used { id: head, len }))
            }
            _ => Err(Error::UnknownUsedId(id)),
        }
    }

    /// Returns the chain headed by `head` to the free list.
    fn release(&mut self, head: u16) {
        let n = std::mem::take(&mut self.chain_len[usize::from(head)]);
        let mut d = head;
        for _ in 0..n {
            self.free.push(d);
            d = self.next[usize::from(d)];
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};

    const SIZE: u16 = 8;

    fn setup(event_idx: bool) -> (SplitQueue, Queue) {
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let drv = SplitQueue::new(mem, GuestAddress(0x1000), SIZE, event_idx).unwrap();
        let (d, a, u) = drv.addresses();
        let mut dev = Queue::new(SIZE).unwrap();
        dev.set_size(SIZE);
        dev.try_set_desc_table_address(d).unwrap();
        dev.try_set_avail_ring_address(a).unwrap();
        dev.try_set_used_ring_address(u).unwrap();
        dev.set_event_idx(event_idx);
        dev.set_ready(true);
        assert!(dev.is_valid(drv.mem().as_ref()));
        (drv, dev)
    }

    #[test]
    fn chains_reach_rust_vmm_device_and_come_back() {
        let (mut drv, mut dev) = setup(false);
        let mem = drv.mem().clone();
        let head = drv.add_chain(&[(GuestAddress(0x8000), 16, false), (GuestAddress(0x9000), 512, true)]).unwrap();
        assert!(drv.publish().unwrap());
        assert_eq!(drv.num_free(), usize::from(SIZE) - 2);

        let chain = dev.pop_descriptor_chain(mem.as_ref()).unwrap();
        assert_eq!(chain.head_index(), head);
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 2);
        assert_eq!((descs[0].addr().0, descs[0].len(), descs[0].is_write_only()), (0x8000, 16, false));
        assert_eq!((descs[1].addr().0, descs[1].len(), descs[1].is_write_only()), (0x9000, 512, true));
        assert!(drv.pop_used().unwrap().is_none());

        dev.add_used(mem.as_ref(), head, 512).unwrap();
        assert_eq!(drv.pop_used().unwrap(), Some(Used { id: head, len: 512 }));
        assert_eq!(drv.num_free(), usize::from(SIZE));
    }

    #[test]
    fn full_queue_refuses_then_recycles_across_index_wrap() {
        let (mut drv, mut dev) = setup(false);
        let mem = drv.mem().clone();
        // Enough rounds to wrap the 16-bit indexes.
        for round in 0..(70_000 / usize::from(SIZE)) {
            let heads: Vec<u16> =
                (0..SIZE).map(|i| drv.add_chain(&[(GuestAddress(0x8000 + u64::from(i)), 1, true)]).unwrap()).collect();
            assert!(matches!(drv.add_chain(&[(GuestAddress(0x8000), 1, true)]), Err(Error::QueueFull { .. })));
            drv.publish().unwrap();
            for _ in 0..SIZE {
                let c = dev.pop_descriptor_chain(mem.as_ref()).unwrap();
                dev.add_used(mem.as_ref(), c.head_index(), round as u32).unwrap();
            }
            let mut got: Vec<u16> = std::iter::from_fn(|| drv.pop_used().unwrap()).map(|u| u.id).collect();
            got.sort_unstable();
            let mut want = heads;
            want.sort_unstable();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn event_idx_suppresses_kicks_and_requests_interrupts() {
        let (mut drv, mut dev) = setup(true);
        let mem = drv.mem().clone();
        drv.add_chain(&[(GuestAddress(0x8000), 1, true)]).unwrap();
        // avail_event is 0: the first entry crosses it.
        assert!(drv.publish().unwrap());
        // The device has not consumed anything, so avail_event stays behind: no new kick.
        drv.add_chain(&[(GuestAddress(0x8000), 1, true)]).unwrap();
        assert!(!drv.publish().unwrap());

        // A device that drained the ring and re-enabled notifications wants the next kick.
        while let Some(c) = dev.pop_descriptor_chain(mem.as_ref()) {
            dev.add_used(mem.as_ref(), c.head_index(), 0).unwrap();
        }
        dev.enable_notification(mem.as_ref()).unwrap();
        drv.add_chain(&[(GuestAddress(0x8000), 1, true)]).unwrap();
        assert!(drv.publish().unwrap());

        // Reaping everything writes used_event = last_used, so the device must notify next time.
        while drv.pop_used().unwrap().is_some() {}
        let c = dev.pop_descriptor_chain(mem.as_ref()).unwrap();
        dev.add_used(mem.as_ref(), c.head_index(), 0).unwrap();
        assert!(dev.needs_notification(mem.as_ref()).unwrap());
    }

    #[test]
    fn raw_descriptors_and_bogus_used_ids() {
        let (mut drv, mut dev) = setup(false);
        let mem = drv.mem().clone();
        let ids = drv.alloc_descs(1).unwrap();
        // A descriptor that points outside memory and links to itself.
        let desc = Descriptor { addr: u64::MAX - 4, len: 4096, flags: VRING_DESC_F_NEXT as u16, next: ids[0] };
        drv.write_desc(ids[0], desc).unwrap();
        assert!(matches!(drv.write_desc(SIZE, desc), Err(Error::InvalidIndex(_))));
        drv.push_avail(ids[0]).unwrap();
        drv.publish().unwrap();
        let c = dev.pop_descriptor_chain(mem.as_ref()).unwrap();
        assert_eq!(c.head_index(), ids[0]);
        dev.add_used(mem.as_ref(), ids[0], 0).unwrap();
        assert_eq!(drv.pop_used().unwrap().map(|u| u.id), Some(ids[0]));
        // Returning the same head twice is caught.
        dev.add_used(mem.as_ref(), ids[0], 0).unwrap();
        assert!(matches!(drv.pop_used(), Err(Error::UnknownUsedId(_))));
        assert_eq!(drv.num_free(), usize::from(SIZE));
    }
}
