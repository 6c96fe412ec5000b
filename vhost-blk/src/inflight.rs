//! Inflight I/O tracking: vhost-user's `INFLIGHT_SHMFD` protocol feature.
//!
//! The backend allocates one shared memory region (a sealed memfd) and hands it to the frontend
//! (`GET_INFLIGHT_FD`), which keeps it for as long as the device lives and hands it back to the
//! next backend process (`SET_INFLIGHT_FD`) after a crash or an upgrade. Each queue has a
//! table in it with one entry per descriptor head: set when the backend takes a request, cleared
//! once the request is in the used ring, with a counter giving the order requests were taken in.
//! A backend started on an existing region resubmits, oldest first, every request that was taken
//! and not completed, and skips in the available ring exactly the requests it took: nothing is
//! lost and nothing is done twice, whatever order the requests completed in.
//!
//! The layout is QEMU's (`docs/interop/vhost-user.rst`, "Inflight I/O tracking", split rings),
//! the protocol libvhost-user's (`vu_queue_inflight_get` / `_pre_put` / `_post_put`,
//! `vu_check_queue_inflights`); `docs/inflight.md` has the table. The region is shared memory
//! another process writes too: every value read from it is checked before use.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, MmapRegion, VolatileMemory};

/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of a queue's header: features (8), version, desc_num, last_batch_head, used_idx (2 each).
const HEADER_LEN: usize = 16;
/// Bytes of one descriptor's entry: inflight (1), padding (5), next (2), counter (8).
const DESC_LEN: usize = 16;
/// Alignment of each queue's table in the region.
const ALIGN: usize = 64;
/// Offsets in a queue's header.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
/// Largest queue a region is made for (the virtio limit).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Indirect tables longer than this are refused (QEMU's and libvhost-user's limit too).
const MAX_INDIRECT: u32 = 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Inflight region for {num_queues} queues of {queue_size} entries is not valid (at most {max_queues} queues of {MAX_QUEUE_SIZE})")]
    Geometry { num_queues: u16, queue_size: u16, max_queues: usize },
    #[error(
        "Inflight region of {size} bytes at offset {offset} is too small for its queues ({needed} bytes) or unaligned"
    )]
    Size { size: u64, offset: u64, needed: u64 },
    #[error("Inflight region file is smaller ({file_len} bytes) than its mapping ends ({end})")]
    FileTooSmall { file_len: u64, end: u64 },
    #[error("Cannot create the inflight region")]
    Create(#[source] io::Error),
    #[error("Cannot seal the inflight region against shrinking")]
    Seal(#[source] io::Error),
    #[error("Cannot map the inflight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("Inflight table of queue {queue} has version {version}, this backend knows {VERSION}")]
    Version { queue: u16, version: u16 },
    #[error("Inflight table of queue {queue} has {desc_num} entries, the region was made for {queue_size}")]
    DescNum { queue: u16, desc_num: u16, queue_size: u16 },
    #[error("Queue {queue} has {size} entries, more than its inflight table's {desc_num}")]
    QueueTooLarge { queue: u16, size: u16, desc_num: u16 },
    #[error("Inflight table of queue {queue} names head {head}, outside its {desc_num} entries")]
    Head { queue: u16, head: u16, desc_num: u16 },
    #[error("An inflight region cannot be set while queues run")]
    WhileRunning,
    #[error("Cannot read the used index of queue {queue}")]
    UsedIndex {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
}

/// Bytes of one queue's table, as QEMU and libvhost-user compute it: a multiple of 64 that
/// holds the header and one entry per descriptor.
pub fn queue_region_size(queue_size: u16) -> usize {
    (DESC_LEN * usize::from(queue_size) + size_of::<u16>()).next_multiple_of(ALIGN)
}

/// The shared region: one table per queue, mapped for as long as anyone holds it.
#[derive(Debug)]
pub struct Region {
    map: MmapRegion,
    file: File,
    size: u64,
    offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl Region {
    fn check_geometry(num_queues: u16, queue_size: u16, max_queues: usize) -> Result<(), Error> {
        if num_queues == 0 || usize::from(num_queues) > max_queues || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(Error::Geometry { num_queues, queue_size, max_queues });
        }
        Ok(())
    }

    fn needed(num_queues: u16, queue_size: u16) -> u64 {
        (queue_region_size(queue_size) * usize::from(num_queues)) as u64
    }

    /// A zeroed region for `num_queues` queues of `queue_size` entries (`GET_INFLIGHT_FD`), in
    /// a memfd sealed against growing and shrinking, so that whoever holds it can map it safely.
    pub fn create(num_queues: u16, queue_size: u16, max_queues: usize) -> Result<Self, Error> {
        Self::check_geometry(num_queues, queue_size, max_queues)?;
        let size = Self::needed(num_queues, queue_size);
        // SAFETY: the name is a NUL-terminated literal; memfd_create only reads it.
        let fd =
            unsafe { libc::memfd_create(c"livesnap-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor, which nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(Error::Create)?;
        seal(&file, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL).map_err(Error::Seal)?;
        Self::map(file, size, 0, num_queues, queue_size)
    }

    /// The region a frontend hands back (`SET_INFLIGHT_FD`), checked against what this backend
    /// serves. A file that could still shrink under the mapping is sealed first, or refused.
    pub fn open(
        file: File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<Self, Error> {
        Self::check_geometry(num_queues, queue_size, max_queues)?;
        let needed = Self::needed(num_queues, queue_size);
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if size < needed || offset % page != 0 || usize::try_from(size).is_err() {
            return Err(Error::Size { size, offset, needed });
        }
        let end = offset.checked_add(size).ok_or(Error::Size { size, offset, needed })?;
        // Only our own seal matters: one already there (ours, from `create`) is fine.
        if !seals(&file).is_ok_and(|s| s & libc::F_SEAL_SHRINK != 0) {
            seal(&file, libc::F_SEAL_SHRINK).map_err(Error::Seal)?;
        }
        let file_len = file.metadata().map_err(Error::Create)?.len();
        if file_len < end {
            return Err(Error::FileTooSmall { file_len, end });
        }
        let region = Self::map(file, size, offset, num_queues, queue_size)?;
        // What libvhost-user does on SET_INFLIGHT_FD: each table is for `queue_size` entries.
        for q in 0..num_queues {
            region.table(q).store16(DESC_NUM_AT, queue_size);
        }
        Ok(region)
    }

    fn map(file: File, size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Result<Self, Error> {
        let dup = file.try_clone().map_err(Error::Create)?;
        let map = MmapRegion::from_file(FileOffset::new(dup, offset), size as usize).map_err(Error::Map)?;
        Ok(Region { map, file, size, offset, num_queues, queue_size })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of the mapping.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn table(&self, queue: u16) -> Table<'_> {
        Table { region: self, base: queue_region_size(self.queue_size) * usize::from(queue) }
    }
}

/// Sets `flags` as seals of a memfd.
fn seal(file: &File, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int and touches no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// One queue's table: every access is an atomic load or store of a naturally aligned field,
/// bounds- and alignment-checked by vm-memory.
struct Table<'a> {
    region: &'a Region,
    base: usize,
}

impl Table<'_> {
    fn at<T: vm_memory::AtomicInteger>(&self, offset: usize) -> &T {
        // Offsets are computed from the geometry checked at open: in bounds and aligned.
        match self.region.map.get_atomic_ref::<T>(self.base + offset) {
            Ok(r) => r,
            Err(e) => unreachable!("inflight table field at {}: {e}", self.base + offset),
        }
    }

    fn load16(&self, offset: usize) -> u16 {
        u16::from_le(self.at::<AtomicU16>(offset).load(Ordering::Acquire))
    }

    fn store16(&self, offset: usize, v: u16) {
        self.at::<AtomicU16>(offset).store(v.to_le(), Ordering::Release);
    }

    fn entry(head: u16) -> usize {
        HEADER_LEN + DESC_LEN * usize::from(head)
    }

    fn inflight(&self, head: u16) -> bool {
        self.at::<AtomicU8>(Self::entry(head)).load(Ordering::Acquire) != 0
    }

    fn set_inflight(&self, head: u16, on: bool) {
        self.at::<AtomicU8>(Self::entry(head)).store(u8::from(on), Ordering::Release);
    }

    fn counter(&self, head: u16) -> u64 {
        u64::from_le(self.at::<AtomicU64>(Self::entry(head) + 8).load(Ordering::Acquire))
    }

    fn set_counter(&self, head: u16, v: u64) {
        self.at::<AtomicU64>(Self::entry(head) + 8).store(v.to_le(), Ordering::Release);
    }
}

/// One queue's view of the region, kept by the queue's worker for as long as the queue runs.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<Region>,
    queue: u16,
    /// The counter the next request taken gets.
    counter: u64,
    /// Heads to run again before any new request, oldest first.
    resubmit: VecDeque<u16>,
}

/// What a queue resumes from, computed by [`QueueInflight::start`].
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    /// The position in the available ring of the first request not yet taken.
    pub next_avail: u16,
    /// Requests taken and not completed by the previous backend, oldest first.
    pub resubmit: Vec<u16>,
}

impl QueueInflight {
    /// Starts queue `queue` of `size` entries whose used ring's index reads `used_idx`:
    /// recovers the table a previous backend left, or initialises a new one.
    ///
    /// Mirrors libvhost-user's `vu_check_queue_inflights`: if the used index moved past what
    /// the table recorded, the request of the last batch reached the used ring and is done;
    /// every entry still marked was taken and not completed. The next request to take from the
    /// available ring is the one after all of those: used index plus their number.
    pub fn start(region: Arc<Region>, queue: u16, size: u16, used_idx: u16) -> Result<(Self, Resume), Error> {
        let t = region.table(queue);
        let desc_num = region.queue_size;
        if size > desc_num {
            return Err(Error::QueueTooLarge { queue, size, desc_num });
        }
        let version = t.load16(VERSION_AT);
        let stored = t.load16(DESC_NUM_AT);
        if stored != desc_num {
            return Err(Error::DescNum { queue, desc_num: stored, queue_size: desc_num });
        }
        let fresh = |region| {
            let q = QueueInflight { region, queue, counter: 0, resubmit: VecDeque::new() };
            Ok((q, Resume { next_avail: used_idx, resubmit: Vec::new() }))
        };
        if version == 0 {
            // A new region: nothing was ever taken.
            t.store16(USED_IDX_AT, used_idx);
            t.store16(VERSION_AT, VERSION);
            return fresh(region.clone());
        }
        if version != VERSION {
            return Err(Error::Version { queue, version });
        }
        if t.load16(USED_IDX_AT) != used_idx {
            let last = t.load16(LAST_BATCH_HEAD_AT);
            if last >= desc_num {
                return Err(Error::Head { queue, head: last, desc_num });
            }
            t.set_inflight(last, false);
            t.store16(USED_IDX_AT, used_idx);
        }
        let mut pending: Vec<(u64, u16)> =
            (0..desc_num).filter(|&h| t.inflight(h)).map(|h| (t.counter(h), h)).collect();
        if let Some(&(_, head)) = pending.iter().find(|&&(_, h)| h >= size) {
            return Err(Error::Head { queue, head, desc_num: size });
        }
        pending.sort_unstable();
        let counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let resubmit: Vec<u16> = pending.into_iter().map(|(_, h)| h).collect();
        // At most `desc_num` <= 32768 entries: the count fits a u16.
        let next_avail = used_idx.wrapping_add(resubmit.len() as u16);
        let q = QueueInflight { region, queue, counter, resubmit: resubmit.iter().copied().collect() };
        Ok((q, Resume { next_avail, resubmit }))
    }

    /// The next request to run again, oldest first.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Heads not yet resubmitted.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    /// Marks `head` taken, before anything of its request is done (`vu_queue_inflight_get`).
    pub fn take(&mut self, head: u16) {
        let t = self.region.table(self.queue);
        if head >= self.region.queue_size {
            return;
        }
        t.set_counter(head, self.counter);
        self.counter = self.counter.wrapping_add(1);
        t.set_inflight(head, true);
    }

    /// Before `head` goes into the used ring (`vu_queue_inflight_pre_put`).
    pub fn pre_put(&self, head: u16) {
        if head < self.region.queue_size {
            self.region.table(self.queue).store16(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// After `head` went into the used ring, whose index is now `used_idx`
    /// (`vu_queue_inflight_post_put`).
    pub fn post_put(&self, head: u16, used_idx: u16) {
        let t = self.region.table(self.queue);
        if head < self.region.queue_size {
            t.set_inflight(head, false);
        }
        t.store16(USED_IDX_AT, used_idx);
    }
}

/// The descriptors of the chain whose head is `head`, read from the descriptor table at
/// `desc_table` of a queue of `size` entries: how a resubmitted request is found again (the
/// available ring may have moved on). Same rules as virtio-queue's `DescriptorChain`: at most
/// `size` descriptors, one level of indirection, no wrap of the chain's byte count; a chain
/// that breaks them ends there, and its parser sees a short chain.
pub fn chain_at(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    size: u16,
    head: u16,
) -> impl Iterator<Item = Descriptor> + '_ {
    let mut table = desc_table;
    let mut table_len = size;
    let mut next = Some(head);
    let mut ttl = size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    std::iter::from_fn(move || loop {
        let index = next?;
        if ttl == 0 || index >= table_len {
            return None;
        }
        let addr = table.checked_add(u64::from(index) * size_of::<Descriptor>() as u64)?;
        let desc: Descriptor = mem.read_obj(addr).ok()?;
        if desc.refers_to_indirect_table() {
            if indirect || desc.len() % size_of::<Descriptor>() as u32 != 0 {
                return None;
            }
            let n = desc.len() / size_of::<Descriptor>() as u32;
            if n == 0 || n > MAX_INDIRECT {
                return None;
            }
            indirect = true;
            table = desc.addr();
            table_len = n as u16;
            ttl = table_len;
            next = Some(0);
            continue;
        }
        bytes = bytes.checked_add(desc.len())?;
        ttl -= 1;
        next = if desc.has_next() { Some(desc.next()) } else { None };
        return Some(desc);
    })
}

#[cfg(test)]
mod tests;
