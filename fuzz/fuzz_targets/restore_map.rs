//! The live-restore map (`IMAGE.restore`): a header, a restored-chunk bitmap and a guest-write
//! bitmap that livesnap-blk reads at start to resume a live restore.
//!
//! Holds: no panic; an accepted map has a chunk size that is a power of two from 4 KiB to
//! 64 MiB, a disk size that is a positive multiple of 512, names of 1 to 128 bytes, bitmaps
//! that cover the disk and no more bits done than chunks; its header encoded again decodes
//! equal; setting a bit and persisting reads back.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use livesnap_blk::restore::map::{Header, Map, BLOCK_SIZE, MAX_CHUNK_SIZE, MAX_NAME};
use livesnap_fuzz::MemFile;

fuzz_target!(|data: &[u8]| {
    let file = Arc::new(MemFile::new(data));
    let Ok(mut map) = Map::open(file.clone()) else { return };
    let info = map.info();
    assert!(info.chunk_size.is_power_of_two() && (BLOCK_SIZE..=MAX_CHUNK_SIZE).contains(&info.chunk_size));
    assert!(info.size > 0 && info.size % 512 == 0);
    assert_eq!(info.chunks_total, info.size.div_ceil(info.chunk_size));
    assert!(info.chunks_done <= info.chunks_total);
    assert_eq!(map.blocks.len(), info.size.div_ceil(BLOCK_SIZE));
    for s in [&info.id.vm, &info.id.backup_id, &info.id.disk] {
        assert!(!s.is_empty() && s.len() <= MAX_NAME);
    }
    let header = map.header().clone();
    let again = Header::decode(&header.encode().expect("an accepted header encodes")).expect("and decodes");
    assert_eq!(again, header);

    let last = info.chunks_total - 1;
    let was = map.chunks.get(last);
    assert_eq!(map.chunks.set(last), !was);
    map.persist().expect("memory does not fail");
    let reread = Map::open(file).expect("a map written by Map reads back");
    assert!(reread.chunks.get(last));
    assert_eq!(reread.info().chunks_done, info.chunks_done + u64::from(!was));
});
