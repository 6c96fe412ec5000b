//! Encrypted repository chunk files (`LSNAPCHX`: key id, nonce, AES-256-GCM ciphertext of a
//! plain chunk file, tag; the name bound as associated data), opened under the fuzz key as a
//! restore, verify, patch or disk reader does. The input is the chunk's name (32 bytes) and its
//! file; the expected length is taken from the inner header's place so that real chunks get
//! past the length check.
//!
//! Holds: no panic, no allocation past the chunk size; what opens has exactly the expected
//! length and is named by its keyed HMAC; sealed again (a new nonce) it opens to the same
//! bytes, and is refused under any other name.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use livesnap_repo::fuzzing::ChunkCodec;
use livesnap_repo::ChunkHash;

const CHUNK_SIZE: usize = 64 << 10;

thread_local! {
    static CODEC: RefCell<Option<ChunkCodec>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((name, file)) = data.split_first_chunk::<32>() else { return };
    let name = ChunkHash(*name);
    // The inner chunk header's data length sits 12 bytes into it, after the 32-byte envelope.
    let expected = file.get(44..48).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    CODEC.with(|c| {
        let mut c = c.borrow_mut();
        let codec = match c.as_mut() {
            Some(codec) => codec,
            None => c.insert(ChunkCodec::new(CHUNK_SIZE).unwrap_or_else(|e| panic!("codec: {e}"))),
        };
        let Ok(out) = codec.open(file, &name, expected) else { return };
        assert_eq!(out.len(), expected);
        assert!(!out.is_empty() && out.len() <= CHUNK_SIZE);
        let (again_name, again) = codec.seal(&out).unwrap_or_else(|e| panic!("seal: {e}"));
        assert_eq!(again_name, name);
        let back = codec.open(&again, &name, out.len()).unwrap_or_else(|e| panic!("open of our own chunk: {e}"));
        assert_eq!(back, out);
        let mut other = name;
        other.0[0] ^= 1;
        assert!(codec.open(&again, &other, out.len()).is_err(), "opened under another name");
    });
});
