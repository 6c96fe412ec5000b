//! The change map (`ID.cbt.G`): a header and a bitmap that livesnap-blk reopens at start and
//! an incremental backup trusts to list what changed.
//!
//! The generation, granularity and disk size the caller expects come from the header itself
//! (bounded, as the engine's own options are), so that real maps get past the header checks.
//! Holds: no panic; the extents are inside the disk, sorted, disjoint and on block boundaries;
//! the header written back on open reopens to the same extents and the same trust, in this
//! boot; a map left open by another boot is untrusted; a mark is found after a reopen.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use livesnap_blk::snap::cbt::Bitmap;
use livesnap_fuzz::{le64, MemFile};

const BOOT: &str = "fuzz-boot";

fuzz_target!(|data: &[u8]| {
    let gen = le64(data, 16);
    let granularity = le64(data, 24);
    let size = le64(data, 32);
    // The engine's granularity is a power of two from 512 bytes (its option); disks here up to
    // 1 TiB, so that the bitmap stays small.
    if !granularity.is_power_of_two() || granularity < 512 || size > 1 << 40 || size / granularity > 1 << 22 {
        return;
    }
    let file = Arc::new(MemFile::new(data));
    let Ok(bm) = Bitmap::open(file.clone(), gen, granularity, size, BOOT) else { return };
    let extents = bm.extents();
    let mut last_end = 0;
    for (i, &(start, len)) in extents.iter().enumerate() {
        assert!(len > 0);
        assert!(start.checked_add(len).is_some_and(|e| e <= size), "extent {start}+{len} outside {size}");
        assert_eq!(start % granularity, 0);
        assert!(start + len == size || len % granularity == 0);
        assert!(i == 0 || start > last_end, "extents overlap or touch: {extents:?}");
        last_end = start + len;
    }
    let trust = bm.untrusted();
    drop(bm);

    let again = Bitmap::open(file.clone(), gen, granularity, size, BOOT).unwrap_or_else(|e| panic!("reopen: {e}"));
    assert_eq!(again.extents(), extents);
    assert_eq!(again.untrusted(), trust);
    let other_boot = Bitmap::open(file.clone(), gen, granularity, size, "another-boot")
        .unwrap_or_else(|e| panic!("reopen in another boot: {e}"));
    assert!(other_boot.untrusted().is_some(), "a map left open by another boot is trusted");
    drop(other_boot);

    if size > 0 {
        let at = le64(data, data.len().saturating_sub(8)) % size;
        again.mark(at, at + 1).unwrap_or_else(|e| panic!("mark of {at}: {e}"));
        drop(again);
        let marked = Bitmap::open(file, gen, granularity, size, BOOT).unwrap_or_else(|e| panic!("reopen: {e}"));
        let block = at / granularity * granularity;
        assert!(marked.extents().iter().any(|&(s, l)| s <= block && block < s + l), "mark of {at} lost");
    }
});
