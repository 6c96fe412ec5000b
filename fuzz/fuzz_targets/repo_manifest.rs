//! Repository manifests: the header, JSON metadata, chunk table and checksum of one disk of
//! one backup, read by list, info, restore, verify, incremental backups and the disk reader.
//!
//! Holds: no panic; an accepted manifest has valid names, a chunk per chunk-size piece of its
//! disk whose lengths add up to the disk, a parent only when incremental; the listing parse
//! of its head agrees with the full parse; encoded again it decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_repo::{validate_name, Kind, Manifest};

const CHUNK_SIZE: u64 = 64 << 10;
/// The bytes a listing reads: the 32-byte header and up to 64 KiB of metadata.
const HEAD: usize = 32 + 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let head = &data[..data.len().min(HEAD)];
    let listed = Manifest::decode_meta(head, len, CHUNK_SIZE);
    let Ok(m) = Manifest::decode(data, CHUNK_SIZE) else { return };
    assert_eq!(listed.as_ref().ok(), Some(&m.meta), "listing and full parse disagree: {listed:?}");

    validate_name("VM", &m.meta.vm).unwrap_or_else(|e| panic!("{e}"));
    validate_name("disk", &m.meta.disk).unwrap_or_else(|e| panic!("{e}"));
    validate_name("backup", &m.meta.backup).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.meta.chunk_size, CHUNK_SIZE);
    assert_eq!(m.chunks.len() as u64, m.meta.size.div_ceil(CHUNK_SIZE));
    let total: u64 = (0..m.chunks.len()).map(|i| m.chunk_len(i) as u64).sum();
    assert_eq!(total, m.meta.size);
    assert!((0..m.chunks.len()).all(|i| m.chunk_len(i) > 0 && m.chunk_len(i) as u64 <= CHUNK_SIZE));
    assert!(m.meta.kind == Kind::Incremental || m.meta.parent.is_none());
    if let Some(w) = m.meta.freeze_window {
        assert!(w.thawed_unix_us >= w.frozen_unix_us);
    }

    let again = m.encode().unwrap_or_else(|e| panic!("encode: {e}"));
    let back = Manifest::decode(&again, CHUNK_SIZE).unwrap_or_else(|e| panic!("decode of our own manifest: {e}"));
    assert_eq!(back, m);
    // The chunk table and the checksum scheme are the same bytes whatever the JSON looks like.
    let table = 32 * m.chunks.len();
    assert_eq!(again[again.len() - 32 - table..again.len() - 32], data[data.len() - 32 - table..data.len() - 32]);
});
