//! virtio-blk requests (virtio 1.2 §5.2.6) on one queue of the test VMM.
//!
//! A [`BlkQueue`] owns a [`Vring`] and divides its buffer space into request slots: a 16-byte
//! header and a status byte per slot, and a page-aligned data buffer of `slot_size` bytes. Each
//! request is one chain `header (read-only) [+ data] + status (device-writable)`.
//!
//! Two ways to drive it:
//! - synchronous, for tests: [`BlkQueue::request`] and the helpers [`read`](BlkQueue::read),
//!   [`write`](BlkQueue::write), [`flush`](BlkQueue::flush), ... submit one request, kick, and
//!   wait for its completion at most the queue's timeout;
//! - asynchronous, for the benchmark: [`submit`](BlkQueue::submit) up to one request per slot,
//!   [`kick`](BlkQueue::kick) once per batch, [`reap`](BlkQueue::reap) completions.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};

use crate::frontend::{self, Vring};
use crate::virtq::{self, Used};

/// Bytes in a virtio-blk sector, the unit of request offsets.
pub const SECTOR_SIZE: u64 = 512;

/// Header and status area of one slot.
const SLOT_HDR: u64 = 32;
const PAGE: u64 = 4096;
const NO_SLOT: u16 = u16::MAX;
/// Status value the device must overwrite.
const STATUS_UNSET: u8 = 0xff;

/// Errors of virtio-blk requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{slots} slots of {slot_size} bytes do not fit in the {available} bytes of queue buffers")]
    BuffersTooSmall { slots: u16, slot_size: u32, available: u64 },
    #[error("All {0} request slots are in flight")]
    NoFreeSlot(usize),
    #[error("Request of {len} bytes exceeds the slot size of {max}")]
    TooLarge { len: usize, max: u32 },
    #[error("Virtqueue operation failed")]
    Queue(#[from] virtq::Error),
    #[error("Cannot notify the backend")]
    Notify(#[source] frontend::Error),
    #[error("Cannot wait for the call eventfd")]
    Wait(#[source] io::Error),
    #[error("Guest memory access at {addr:#x} failed")]
    Memory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("No completion within {0:?}")]
    Timeout(Duration),
    #[error("Device completed chain {0}, which no request of this queue owns")]
    ForeignCompletion(u16),
    #[error("{request} request failed with status {status}")]
    Status { request: &'static str, status: u8 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One virtio-blk request. Offsets and counts are in 512-byte sectors.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    Read {
        sector: u64,
        len: u32,
    },
    Write {
        sector: u64,
        data: &'a [u8],
    },
    /// Writes `len` bytes that the slot's data buffer already holds, as a guest writes data
    /// that is already in its memory (see [`BlkQueue::fill_slots`]): no copy by the driver.
    WriteInPlace {
        sector: u64,
        len: u32,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        num_sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        num_sectors: u32,
        unmap: bool,
    },
}

impl Request<'_> {
    /// The name used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Read { .. } => "read",
            Request::Write { .. } | Request::WriteInPlace { .. } => "write",
            Request::Flush => "flush",
            Request::GetId => "get-id",
            Request::Discard { .. } => "discard",
            Request::WriteZeroes { .. } => "write-zeroes",
        }
    }

    fn type_and_sector(&self) -> (u32, u64) {
        match *self {
            Request::Read { sector, .. } => (VIRTIO_BLK_T_IN, sector),
            Request::Write { sector, .. } | Request::WriteInPlace { sector, .. } => (VIRTIO_BLK_T_OUT, sector),
            Request::Flush => (VIRTIO_BLK_T_FLUSH, 0),
            Request::GetId => (VIRTIO_BLK_T_GET_ID, 0),
            Request::Discard { .. } => (VIRTIO_BLK_T_DISCARD, 0),
            Request::WriteZeroes { .. } => (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        }
    }
}

/// A request the device completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The slot returned by [`BlkQueue::submit`].
    pub tag: u16,
    /// The status byte (`VIRTIO_BLK_S_*`; 0xff if the device did not write it).
    pub status: u8,
    /// Bytes the device reported written into the chain (data and status).
    pub len: u32,
}

/// Result of a synchronous request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    pub len: u32,
    /// The device-writable data buffer (read data, id), whatever `len` says.
    pub data: Vec<u8>,
}

/// virtio-blk requests on one queue; `Send`, so each queue can have its own thread.
#[derive(Debug)]
pub struct BlkQueue {
    vring: Vring,
    hdr_base: GuestAddress,
    data_base: GuestAddress,
    slot_size: u32,
    free: Vec<u16>,
    slot_of_head: Vec<u16>,
    stash: VecDeque<Completion>,
    in_flight: usize,
}

impl BlkQueue {
    /// Requests on `vring` with `slots` requests at most in flight, each of at most `slot_size`
    /// data bytes (rounded up to a page).
    pub fn new(vring: Vring, slots: u16, slot_size: u32) -> Result<Self> {
        let (base, available) = vring.buffers();
        let slot_size = slot_size.max(1).next_multiple_of(PAGE as u32);
        let hdr_len = (u64::from(slots) * SLOT_HDR).next_multiple_of(PAGE);
        if slots == 0 || hdr_len + u64::from(slots) * u64::from(slot_size) > available {
            return Err(Error::BuffersTooSmall { slots, slot_size, available });
        }
        let size = usize::from(vring.queue().size());
        Ok(BlkQueue {
            hdr_base: base,
            data_base: base.unchecked_add(hdr_len),
            slot_size,
            free: (0..slots).rev().collect(),
            slot_of_head: vec![NO_SLOT; size],
            stash: VecDeque::new(),
            in_flight: 0,
            vring,
        })
    }

    pub fn vring(&self) -> &Vring {
        &self.vring
    }

    /// The queue underneath, e.g. to place raw descriptors. Completions of chains not submitted
    /// through this `BlkQueue` make [`reap`](Self::reap) fail with [`Error::ForeignCompletion`].
    pub fn vring_mut(&mut self) -> &mut Vring {
        &mut self.vring
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Slots free for [`submit`](Self::submit).
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Data bytes a slot holds.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// Guest address of slot `tag`'s data buffer.
    pub fn slot_data(&self, tag: u16) -> GuestAddress {
        self.data_base.unchecked_add(u64::from(tag) * u64::from(self.slot_size))
    }

    fn write_mem(&self, buf: &[u8], addr: GuestAddress) -> Result<()> {
        self.vring.mem().write_slice(buf, addr).map_err(|source| Error::Memory { addr: addr.raw_value(), source })
    }

    /// Puts `data` at the start of every slot's data buffer, for [`Request::WriteInPlace`].
    pub fn fill_slots(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > self.slot_size as usize {
            return Err(Error::TooLarge { len: data.len(), max: self.slot_size });
        }
        let slots = self.free.len() + self.in_flight;
        for tag in 0..slots as u16 {
            self.write_mem(data, self.slot_data(tag))?;
        }
        Ok(())
    }

    /// Places `req` in a free slot and on the available ring (not yet visible to the device:
    /// see [`kick`](Self::kick)). Returns the slot, which tags its completion.
    pub fn submit(&mut self, req: &Request) -> Result<u16> {
        let tag = *self.free.last().ok_or(Error::NoFreeSlot(self.in_flight))?;
        let hdr = self.hdr_base.unchecked_add(u64::from(tag) * SLOT_HDR);
        let status = hdr.unchecked_add(16);
        let data = self.slot_data(tag);

        let (ty, sector) = req.type_and_sector();
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&ty.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.write_mem(&header, hdr)?;
        self.write_mem(&[STATUS_UNSET], status)?;

        // The data buffer: its length, whether the device writes it, and what the driver puts in.
        let seg;
        let (len, writable, payload): (usize, bool, &[u8]) = match *req {
            Request::Read { len, .. } => (len as usize, true, &[]),
            Request::Write { data, .. } => (data.len(), false, data),
            Request::WriteInPlace { len, .. } => (len as usize, false, &[]),
            Request::Flush => (0, false, &[]),
            Request::GetId => (VIRTIO_BLK_ID_BYTES as usize, true, &[]),
            Request::Discard { sector, num_sectors } => {
                seg = segment(sector, num_sectors, 0);
                (seg.len(), false, &seg)
            }
            Request::WriteZeroes { sector, num_sectors, unmap } => {
                seg = segment(sector, num_sectors, if unmap { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 });
                (seg.len(), false, &seg)
            }
        };
        if len > self.slot_size as usize {
            return Err(Error::TooLarge { len, max: self.slot_size });
        }
        self.write_mem(payload, data)?;
        let mut chain = vec![(hdr, 16, false)];
        // A zero-length data buffer is left out rather than sent as an empty descriptor.
        if len > 0 {
            chain.push((data, len as u32, writable));
        }
        chain.push((status, 1, true));
        let head = self.vring.queue_mut().add_chain(&chain)?;
        self.slot_of_head[usize::from(head)] = tag;
        self.free.pop();
        self.in_flight += 1;
        Ok(tag)
    }

    /// Makes the submitted requests visible to the device and kicks it if it asked for it.
    pub fn kick(&mut self) -> Result<()> {
        self.vring.notify().map_err(Error::Notify)
    }

    /// Moves completions into `out` and returns how many. With `wait`, waits at most that long
    /// for at least one when requests are in flight ([`Error::Timeout`] if none came).
    pub fn reap(&mut self, wait: Option<Duration>, out: &mut Vec<Completion>) -> Result<usize> {
        let start = out.len();
        out.extend(self.stash.drain(..));
        let deadline = wait.filter(|_| out.len() == start && self.in_flight > 0).map(|w| Instant::now() + w);
        self.reap_ring(deadline, out)?;
        Ok(out.len() - start)
    }

    /// Reaps the used ring into `out`; with a deadline, waits until at least one came.
    fn reap_ring(&mut self, deadline: Option<Instant>, out: &mut Vec<Completion>) -> Result<()> {
        let start = out.len();
        loop {
            while let Some(used) = self.vring.queue_mut().pop_used()? {
                out.push(self.complete(used)?);
            }
            let Some(deadline) = deadline.filter(|_| out.len() == start) else {
                return Ok(());
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(self.vring.timeout()));
            }
            self.vring.wait_call(left).map_err(Error::Wait)?;
        }
    }

    fn complete(&mut self, used: Used) -> Result<Completion> {
        let tag = std::mem::replace(&mut self.slot_of_head[usize::from(used.id)], NO_SLOT);
        if tag == NO_SLOT {
            return Err(Error::ForeignCompletion(used.id));
        }
        self.free.push(tag);
        self.in_flight -= 1;
        let addr = self.hdr_base.unchecked_add(u64::from(tag) * SLOT_HDR + 16);
        let status =
            self.vring.mem().read_obj::<u8>(addr).map_err(|source| Error::Memory { addr: addr.raw_value(), source })?;
        Ok(Completion { tag, status, len: used.len })
    }

    /// Submits `req`, kicks, and waits for its completion at most the queue's timeout.
    /// Completions of other requests met meanwhile are kept for [`reap`](Self::reap).
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        let tag = self.submit(req)?;
        self.kick()?;
        let deadline = Instant::now() + self.vring.timeout();
        let mut done = Vec::new();
        let completion = loop {
            self.reap_ring(Some(deadline), &mut done)?;
            if let Some(i) = done.iter().position(|c| c.tag == tag) {
                let c = done.remove(i);
                self.stash.extend(done);
                break c;
            }
            self.stash.extend(done.drain(..));
        };
        let len = match *req {
            Request::Read { len, .. } => len as usize,
            Request::GetId => VIRTIO_BLK_ID_BYTES as usize,
            _ => 0,
        };
        let mut data = vec![0u8; len];
        let addr = self.slot_data(tag);
        self.vring
            .mem()
            .read_slice(&mut data, addr)
            .map_err(|source| Error::Memory { addr: addr.raw_value(), source })?;
        Ok(Response { status: completion.status, len: completion.len, data })
    }

    /// [`request`](Self::request), failing unless the status is `VIRTIO_BLK_S_OK`.
    pub fn request_ok(&mut self, req: &Request) -> Result<Response> {
        let resp = self.request(req)?;
        if u32::from(resp.status) != VIRTIO_BLK_S_OK {
            return Err(Error::Status { request: req.name(), status: resp.status });
        }
        Ok(resp)
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>> {
        Ok(self.request_ok(&Request::Read { sector, len })?.data)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        self.request_ok(&Request::Write { sector, data }).map(drop)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request_ok(&Request::Flush).map(drop)
    }

    /// The device id (serial), up to its first NUL byte.
    pub fn get_id(&mut self) -> Result<String> {
        let data = self.request_ok(&Request::GetId)?.data;
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        Ok(String::from_utf8_lossy(&data[..end]).into_owned())
    }

    pub fn discard(&mut self, sector: u64, num_sectors: u32) -> Result<()> {
        self.request_ok(&Request::Discard { sector, num_sectors }).map(drop)
    }

    pub fn write_zeroes(&mut self, sector: u64, num_sectors: u32, unmap: bool) -> Result<()> {
        self.request_ok(&Request::WriteZeroes { sector, num_sectors, unmap }).map(drop)
    }
}

/// A discard / write-zeroes segment: sector, number of sectors, flags.
fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}
