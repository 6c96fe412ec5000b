//! virtio-blk request chains, from the descriptor table the guest wrote to the statuses it
//! reads back: the split queue of virtio-queue pops the chains (loops, indirect tables, next
//! indices out of range included) and livesnap-blk parses and runs them on an in-memory disk.
//!
//! Holds: no panic; the disk is only ever called with ranges inside it, never changed when
//! read-only; a chain's used length never exceeds its writable bytes plus the status byte; a
//! chain with a writable status byte in guest memory gets a status, and an error status
//! reports exactly one byte.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use livesnap_blk::virtio::{BlkDevice, MAX_REQUEST_BYTES};
use livesnap_fuzz::{Change, MemDisk};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
/// Guest memory: two regions with a hole between them, and nothing past the second.
const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
const MEM_END: u64 = 0x3_0000;

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    /// Above `MEM_END` but not wrapped: addresses far outside memory, or near u64::MAX.
    far: Option<u64>,
    len: u16,
    huge_len: Option<u32>,
    write: bool,
    next: Option<u16>,
    indirect: bool,
}

#[derive(Arbitrary, Debug)]
struct Header {
    at: u32,
    kind: u8,
    sector: u16,
    huge_sector: Option<u64>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    readonly: bool,
    flush_negotiated: bool,
    extra_sectors: u8,
    headers: Vec<Header>,
    pokes: Vec<(u32, Vec<u8>)>,
    descs: Vec<Desc>,
    heads: Vec<u16>,
}

fn desc(d: &Desc) -> RawDescriptor {
    let addr = d.far.unwrap_or(u64::from(d.addr) % (MEM_END + 0x1000));
    let len = d.huge_len.unwrap_or(u32::from(d.len) % 0x3000);
    let mut flags = 0;
    if d.write {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if d.indirect {
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    let next = match d.next {
        Some(n) => {
            flags |= VRING_DESC_F_NEXT as u16;
            n % (QUEUE_SIZE + 2)
        }
        None => 0,
    };
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn kind(k: u8) -> u32 {
    match k % 8 {
        0 => VIRTIO_BLK_T_IN,
        1 => VIRTIO_BLK_T_OUT,
        2 => VIRTIO_BLK_T_FLUSH,
        3 => VIRTIO_BLK_T_GET_ID,
        4 => VIRTIO_BLK_T_DISCARD,
        5 => VIRTIO_BLK_T_WRITE_ZEROES,
        _ => u32::from(k),
    }
}

fn contains(mem: &GuestMemoryMmap, addr: u64) -> bool {
    mem.address_in_range(GuestAddress(addr))
}

fuzz_target!(|input: Input| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l))) else { return };
    // Guest data first; the queue's own structures (at 0) last, so they stay as built.
    for h in &input.headers {
        let at = GuestAddress(u64::from(h.at) % MEM_END);
        let sector = h.huge_sector.unwrap_or(u64::from(h.sector));
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&kind(h.kind).to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        let _ = mem.write_slice(&bytes, at);
    }
    for (at, bytes) in &input.pokes {
        let _ = mem.write_slice(bytes, GuestAddress(u64::from(*at) % MEM_END));
    }
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    for (i, d) in input.descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
        let _ = vq.desc_table().store(i as u16, desc(d));
    }
    let heads: Vec<u16> = input.heads.iter().take(usize::from(QUEUE_SIZE)).map(|h| h % (QUEUE_SIZE + 2)).collect();
    for (i, h) in heads.iter().enumerate() {
        if let Ok(r) = vq.avail().ring().ref_at(i) {
            r.store(u16::to_le(*h));
        }
    }
    vq.avail().idx().store(u16::to_le(heads.len() as u16));
    let Ok(mut queue) = vq.create_queue::<Queue>() else { return };

    // The chains as the backend takes them; each one's descriptors kept for the checks.
    let chains: Vec<Vec<Descriptor>> = std::iter::from_fn(|| queue.pop_descriptor_chain(&mem))
        .take(usize::from(QUEUE_SIZE))
        .map(|c| c.collect())
        .collect();

    let size = 64 * 1024 + usize::from(input.extra_sectors) * 512;
    let disk = Arc::new(MemDisk::new(size));
    let before = disk.changes();
    let dev = BlkDevice::new(disk.clone(), "fuzz-serial-number-0123".into(), input.readonly);
    dev.negotiated(input.flush_negotiated);
    let used = dev.process_batch(chains.iter().map(|c| c.clone().into_iter()), &mem);
    assert_eq!(used.len(), chains.len());

    // MemDisk itself asserts that every range it is given lies inside it.
    let changes = disk.changes();
    if input.readonly {
        assert_eq!(changes, before, "a read-only disk was changed");
    }
    for c in &changes {
        if let Change::Write { len, .. } = *c {
            assert!(len <= MAX_REQUEST_BYTES, "a write of {len} bytes");
        }
    }

    // Where each chain may write: its device-writable descriptors.
    let writable: Vec<Vec<(u64, u64)>> = chains
        .iter()
        .map(|c| c.iter().filter(|d| d.is_write_only()).map(|d| (d.addr().0, u64::from(d.len()))).collect())
        .collect();
    for (i, (chain, &used)) in chains.iter().zip(&used).enumerate() {
        let writable_bytes: u64 = writable[i].iter().map(|w| w.1).sum();
        assert!(u64::from(used) <= writable_bytes, "chain {i} used {used} of {writable_bytes} writable bytes");
        assert!(u64::from(used) <= MAX_REQUEST_BYTES + 1);
        let Some(last) = chain.last() else {
            assert_eq!(used, 0);
            continue;
        };
        let status_at = last.addr().0.checked_add(u64::from(last.len())).and_then(|e| e.checked_sub(1));
        let has_status = last.is_write_only() && last.len() > 0 && status_at.is_some_and(|a| contains(&mem, a));
        if !has_status {
            assert_eq!(used, 0, "chain {i} had no status byte but used {used}");
            continue;
        }
        assert!(used >= 1, "chain {i} has a status byte and got none");
        // The status byte is only checked where no other chain of the batch writes.
        let Some(status_at) = status_at else { continue };
        let shared = writable
            .iter()
            .enumerate()
            .any(|(j, ws)| j != i && ws.iter().any(|&(a, l)| status_at >= a && status_at - a < l));
        if shared {
            continue;
        }
        let Ok(status) = mem.read_obj::<u8>(GuestAddress(status_at)) else { continue };
        assert!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&u32::from(status)),
            "chain {i} status {status}"
        );
        if u32::from(status) != VIRTIO_BLK_S_OK {
            assert_eq!(used, 1, "chain {i} failed with status {status} but reported {used} bytes");
        }
    }
});
