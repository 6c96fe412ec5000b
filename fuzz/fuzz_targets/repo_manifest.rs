//! Repository manifests: the header, JSON metadata, chunk table and checksum of one disk of
//! one backup, read by list, info, restore, verify, incremental backups and the disk reader;
//! encrypted ones (version 2: sealed metadata, MACed table) opened under the fuzz key at
//! web01/b3/vda; and the keyless read of the chunk names that garbage collection marks by.
//!
//! Holds: no panic; an accepted manifest has valid names, a chunk per chunk-size piece of its
//! disk whose lengths add up to the disk, a parent only when incremental; the listing parse
//! of its head agrees with the full parse; the keyless chunk names are its table; encoded
//! again it decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_repo::fuzzing::fuzz_key;
use livesnap_repo::{validate_name, Kind, Manifest, Place};

const CHUNK_SIZE: u64 = 64 << 10;
/// The bytes a listing reads: the 32-byte header and up to 64 KiB of metadata.
const HEAD: usize = 32 + 64 * 1024 + 28;
const PLACE: Place<'static> = Place { vm: "web01", id: "b3", disk: "vda" };

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let head = &data[..data.len().min(HEAD)];
    let key = fuzz_key();
    let names = Manifest::chunk_names(data);
    let (listed, m) = match Manifest::decode(data, CHUNK_SIZE) {
        Ok(m) => (Manifest::decode_meta(head, len, CHUNK_SIZE), m),
        Err(_) => match Manifest::open(data, CHUNK_SIZE, &key, &PLACE) {
            Ok(m) => {
                assert_eq!(m.key, Some(key.id()));
                assert_eq!((m.meta.vm.as_str(), m.meta.backup.as_str(), m.meta.disk.as_str()), ("web01", "b3", "vda"));
                (Manifest::open_meta(head, len, CHUNK_SIZE, &key, &PLACE), m)
            }
            Err(_) => return,
        },
    };
    assert_eq!(listed.as_ref().ok(), Some(&m.meta), "listing and full parse disagree: {listed:?}");
    assert_eq!(names.as_ref().ok(), Some(&m.chunks), "gc's keyless read disagrees: {names:?}");

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

    let sealed = m.key.map(|_| &key);
    let again = m.encode(sealed).unwrap_or_else(|e| panic!("encode: {e}"));
    let back = match sealed {
        None => Manifest::decode(&again, CHUNK_SIZE),
        Some(k) => Manifest::open(&again, CHUNK_SIZE, k, &PLACE),
    }
    .unwrap_or_else(|e| panic!("decode of our own manifest: {e}"));
    assert_eq!(back, m);
    // The chunk table is the same bytes whatever the JSON looks like (before the checksum, and
    // the MAC of an encrypted one).
    let table = 32 * m.chunks.len();
    let tail = if sealed.is_some() { 64 } else { 32 };
    assert_eq!(
        again[again.len() - tail - table..again.len() - tail],
        data[data.len() - tail - table..data.len() - tail]
    );
});
