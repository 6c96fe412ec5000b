//! A qcow2 base read in place for a backup (`Qcow2Source`): the header, the L1 table, L2 tables
//! and clusters of a hostile image.
//!
//! Holds: no panic and no allocation past what the header bounds; a read inside the disk either
//! fails or fills the buffer; a range the source calls a hole reads as zeros; a read past the end
//! fails.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_repo::Source;

/// The most bytes read per input, so that a huge virtual size does not make a run slow.
const BUDGET: u64 = 4 << 20;
const PIECE: u64 = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = livesnap_repo::fuzzing::qcow2_source(data) else { return };
    let size = src.size();
    let mut buf = vec![0u8; PIECE as usize];
    // The start of the disk, then pieces spread over the rest.
    let step = (size / (BUDGET / PIECE)).max(PIECE);
    let mut off = 0u64;
    while off < size && off / step < BUDGET / PIECE {
        let len = PIECE.min(size - off) as usize;
        let hole = src.reads_as_zero(off, len as u64);
        buf[..len].fill(0xa5);
        if src.read_at(&mut buf[..len], off).is_ok() && matches!(hole, Ok(true)) {
            assert!(buf[..len].iter().all(|&b| b == 0), "a hole at {off} read as data");
        }
        off = off.saturating_add(step);
    }
    assert!(src.read_at(&mut [0u8; 1], size).is_err(), "a read past the end succeeded");
});
