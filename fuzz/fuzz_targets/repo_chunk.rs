//! Repository chunk files: the header and the (zstd-compressed) payload that a restore, a
//! verify, an incremental backup's patch and a live disk reader fetch from the store.
//!
//! The length the manifest expects is taken from the header, so that real chunks get past
//! the length check. Holds: no panic, no allocation past the chunk size; what decodes has
//! exactly the expected length, and encoded again decodes to the same bytes.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use livesnap_repo::fuzzing::ChunkCodec;

/// The smallest chunk size a repository may have is 4 KiB; seeds come from one of 64 KiB.
const CHUNK_SIZE: usize = 64 << 10;

thread_local! {
    static CODEC: RefCell<Option<ChunkCodec>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let expected = data.get(12..16).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    CODEC.with(|c| {
        let mut c = c.borrow_mut();
        let codec = match c.as_mut() {
            Some(codec) => codec,
            None => c.insert(ChunkCodec::new(CHUNK_SIZE).unwrap_or_else(|e| panic!("codec: {e}"))),
        };
        let Ok(out) = codec.decode(data, expected) else { return };
        assert_eq!(out.len(), expected);
        assert!(out.len() <= CHUNK_SIZE);
        if out.is_empty() {
            return;
        }
        let again = codec.encode(&out).unwrap_or_else(|e| panic!("encode: {e}"));
        let back = codec.decode(&again, out.len()).unwrap_or_else(|e| panic!("decode of our own chunk: {e}"));
        assert_eq!(back, out);
    });
});
