//! The qcow2 header guard: the checks livesnap-blk makes of an image's first cluster before
//! qcow2-rs (which panics on some malformed images) ever sees it.
//!
//! Holds: no panic; an accepted header has a cluster size and virtual size in range, an L1
//! table that maps the whole disk, tables that end inside u64, a backing file name that lies
//! inside the bytes given; and what is accepted does not depend on bytes past the name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_blk::fuzzing::{Qcow2Header, QCOW2_MAX_VIRTUAL_SIZE};

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Qcow2Header::parse(data) else { return };
    assert!(data.len() >= 512);
    assert_eq!(&data[..4], b"QFI\xfb");
    assert!([2, 3].contains(&be32(data, 4)));
    assert!((9..=21).contains(&h.cluster_bits));
    assert_eq!(h.cluster_bits, be32(data, 20));
    assert!(h.size <= QCOW2_MAX_VIRTUAL_SIZE);
    assert_eq!(h.size, be64(data, 24));
    assert_eq!(be32(data, 32), 0, "an encrypted image was accepted");
    let l1_entries = u64::from(be32(data, 36));
    let per_entry = 1u64 << (2 * h.cluster_bits - 3);
    assert!(l1_entries.saturating_mul(per_entry) >= h.size, "the L1 table cannot map the disk");
    let cluster = 1u64 << h.cluster_bits;
    assert_eq!(be64(data, 40) % cluster, 0);
    assert_eq!(be64(data, 48) % cluster, 0);
    assert!(h.tables_end >= be64(data, 40) + l1_entries * 8);
    if be32(data, 4) == 3 {
        assert_eq!(be64(data, 72), 0, "an incompatible feature was accepted");
    }
    match &h.backing_file {
        None => assert_eq!(be64(data, 8), 0),
        Some(name) => {
            let at = be64(data, 8) as usize;
            assert!(!name.is_empty() && name.len() <= 1023);
            assert_eq!(data.get(at..at + name.len()), Some(name.as_bytes()));
            // Nothing after the name counts.
            let end = at + name.len();
            if end < data.len() {
                let mut cut = data[..end.max(512)].to_vec();
                cut.resize(data.len(), 0xa5);
                assert_eq!(Qcow2Header::parse(&cut).as_ref(), Ok(&h));
            }
        }
    }
});
