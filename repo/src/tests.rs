//! Tests of the repository on tempdirs. `measure_*` tests are ignored by default: they print
//! numbers (`cargo nextest run -p livesnap-repo --run-ignored only --no-capture measure`).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::*;

pub(crate) const K64: u64 = 64 << 10;

pub(crate) fn new_repo(chunk_size: u64) -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let repo =
        Repository::create(dir.path().join("repo"), CreateOptions { chunk_size, ..CreateOptions::default() }).unwrap();
    (dir, repo)
}

pub(crate) fn spec(vm: &str, id: &str) -> BackupSpec {
    BackupSpec {
        vm: vm.into(),
        id: id.into(),
        consistency: Consistency::Application,
        freeze_window: Some(FreezeWindow { frozen_unix_us: 1_000, thawed_unix_us: 41_000 }),
        created_unix_us: None,
    }
}

/// Disk-like data: 64 KiB stretches of noise, zeros, text and repeated blocks.
pub(crate) fn mixed(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; size];
    for (k, piece) in out.chunks_mut(K64 as usize).enumerate() {
        match rng.u8(0..4) {
            0 => rng.fill(piece),
            1 => {}
            2 => {
                let text = format!("record {k} of seed {seed}: the quick brown fox jumps over the lazy dog\n");
                for (b, t) in piece.iter_mut().zip(text.bytes().cycle()) {
                    *b = t;
                }
            }
            _ => {
                let mut block = [0u8; 512];
                rng.fill(&mut block);
                for (b, t) in piece.iter_mut().zip(block.iter().cycle()) {
                    *b = *t;
                }
            }
        }
    }
    out
}

fn write_file(path: &Path, data: &[u8]) -> FileSource {
    fs::write(path, data).unwrap();
    FileSource::open(path).unwrap()
}

fn stored_chunks(repo: &Repository) -> Vec<ChunkHash> {
    let mut v: Vec<_> = repo.store.list_chunks().unwrap().into_iter().map(|c| c.0).collect();
    v.sort();
    v
}

/// The repository's directory, to damage its files.
fn local(repo: &Repository) -> LocalStore {
    LocalStore::open(repo.location())
}

/// Restores a disk to a new raw file `dest` as a caller does: removed when the restore fails.
pub(crate) fn restore_raw(repo: &Repository, vm: &str, id: &str, disk: &str, dest: &Path) -> Result<RestoreStats> {
    let m = repo.manifest(vm, id, disk)?;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dest.display()));
    let result = repo.restore(&m, &file);
    if result.is_err() {
        fs::remove_file(dest).unwrap();
    }
    result
}

fn full_backup(repo: &Repository, vm: &str, id: &str, disk: &str, src: &dyn Source) -> DiskStats {
    let mut w = repo.begin_backup(spec(vm, id)).unwrap();
    let stats = w.full(disk, src).unwrap();
    w.commit().unwrap();
    stats
}

#[test]
fn full_backup_of_an_odd_size_restores_byte_for_byte_and_sparse() {
    let (dir, repo) = new_repo(K64);
    // 10 chunks and a short one; chunks 3 and 4 zero.
    let size = 10 * K64 as usize + 12_345;
    let mut data = mixed(size, 7);
    data[3 * K64 as usize..5 * K64 as usize].fill(0);
    data[K64 as usize] = 1; // chunk 1 is never all zero
    let src = write_file(&dir.path().join("disk.raw"), &data);
    let stats = full_backup(&repo, "web01", "b1", "vda", &src);
    assert_eq!(stats.bytes_read, size as u64);
    assert_eq!(stats.chunks_read, 11);
    assert!(stats.chunks_zero >= 2);

    let m = repo.manifest("web01", "b1", "vda").unwrap();
    assert_eq!(m.chunks.len(), 11);
    assert_eq!((m.chunks[3], m.chunks[4]), (None, None));
    assert_eq!(m.chunk_len(10), 12_345);
    assert_eq!(m.meta.kind, Kind::Full);
    assert_eq!(m.meta.freeze_window.map(|w| w.duration_us()), Some(40_000));

    let out = dir.path().join("restored.raw");
    let r = restore_raw(&repo, "web01", "b1", "vda", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), data);
    assert!(r.bytes_written < size as u64 - 2 * K64);
    // The zero chunks are holes.
    assert!(fs::metadata(&out).unwrap().blocks() * 512 < size as u64 - K64);
}

#[test]
fn an_all_zero_disk_stores_no_chunk_and_restores_as_a_hole() {
    let (dir, repo) = new_repo(K64);
    let data = vec![0u8; 5 * K64 as usize + 100];
    let stats = full_backup(&repo, "vm", "b1", "vda", &data);
    assert_eq!((stats.chunks_zero, stats.chunks_new), (6, 0));
    assert!(stored_chunks(&repo).is_empty());
    let out = dir.path().join("r.raw");
    let r = restore_raw(&repo, "vm", "b1", "vda", &out).unwrap();
    assert_eq!(r.bytes_written, 0);
    assert_eq!(fs::metadata(&out).unwrap().blocks(), 0);
    assert_eq!(fs::read(&out).unwrap(), data);
}

#[test]
fn incremental_of_chunk_aligned_changes_reads_only_them_and_restores_both_states() {
    let (dir, repo) = new_repo(K64);
    let size = 32 * K64 as usize;
    let old = mixed(size, 1);
    let path = dir.path().join("disk.raw");
    let src = write_file(&path, &old);
    full_backup(&repo, "vm", "b1", "vda", &src);

    let mut new = old.clone();
    let extents = [(2 * K64, 2 * K64), (7 * K64, K64), (31 * K64, K64)];
    let mut rng = fastrand::Rng::with_seed(99);
    for &(off, len) in &extents {
        rng.fill(&mut new[off as usize..(off + len) as usize]);
    }
    let src = write_file(&path, &new);
    let parent = repo.latest_manifest("vm", "vda").unwrap().unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &extents).unwrap();
    w.commit().unwrap();
    assert_eq!(stats.bytes_changed, 4 * K64);
    assert_eq!(stats.chunks_read, 4);
    let ratio = stats.bytes_read as f64 / stats.bytes_changed as f64;
    assert!(ratio <= 1.1, "bytes read / bytes changed = {ratio}");

    let m = repo.manifest("vm", "b2", "vda").unwrap();
    assert_eq!(m.meta.kind, Kind::Incremental);
    assert_eq!(m.meta.parent.as_deref(), Some("b1"));
    assert_eq!(m.chunks.len(), 32);
    for i in [0, 1, 4, 5, 6, 8, 30] {
        assert_eq!(m.chunks[i], parent.chunks[i], "chunk {i} is reused");
    }
    let r2 = dir.path().join("b2.raw");
    restore_raw(&repo, "vm", "b2", "vda", &r2).unwrap();
    assert_eq!(fs::read(&r2).unwrap(), new);
    let r1 = dir.path().join("b1.raw");
    restore_raw(&repo, "vm", "b1", "vda", &r1).unwrap();
    assert_eq!(fs::read(&r1).unwrap(), old);
    assert!(repo.verify("vm", "b2").unwrap().is_ok());
}

#[test]
fn incremental_of_scattered_64k_extents_restores_right_and_reports_its_ratio() {
    let chunk = 256 << 10;
    let (dir, repo) = new_repo(chunk);
    let size = 16 << 20;
    let old = mixed(size, 3);
    let path = dir.path().join("disk.raw");
    full_backup(&repo, "vm", "b1", "vda", &write_file(&path, &old));

    // 4% of the 64 KiB blocks, chosen at random.
    let mut rng = fastrand::Rng::with_seed(5);
    let blocks = size as u64 / K64;
    let mut picked: Vec<u64> = (0..blocks / 25).map(|_| rng.u64(0..blocks)).collect();
    picked.sort();
    picked.dedup();
    let mut new = old.clone();
    let extents: Vec<(u64, u64)> = picked.iter().map(|b| (b * K64, K64)).collect();
    for &(off, len) in &extents {
        rng.fill(&mut new[off as usize..(off + len) as usize]);
    }
    let src = write_file(&path, &new);
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &extents).unwrap();
    w.commit().unwrap();
    eprintln!(
        "64 KiB-granular scattered extents ({} of {blocks} blocks) at {} KiB chunks: read {} KiB for {} KiB changed, ratio {:.2}",
        extents.len(),
        chunk >> 10,
        stats.bytes_read >> 10,
        stats.bytes_changed >> 10,
        stats.bytes_read as f64 / stats.bytes_changed as f64
    );
    let distinct_chunks = {
        let mut c: Vec<u64> = picked.iter().map(|b| b * K64 / chunk).collect();
        c.dedup();
        c.len() as u64
    };
    assert_eq!(stats.chunks_read, distinct_chunks);
    // Scattered blocks are patched into the parent's chunks: only they are read.
    assert_eq!(stats.chunks_patched, distinct_chunks, "{stats:?}");
    assert_eq!(stats.bytes_read, stats.bytes_changed, "{stats:?}");
    let out = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b2", "vda", &out).unwrap();
    assert!(fs::read(&out).unwrap() == new);
}

#[test]
fn incremental_patches_small_changes_into_the_parent_chunk_and_reads_only_them() {
    let cs = 256usize << 10;
    let (dir, repo) = new_repo(cs as u64);
    let mut old = vec![0u8; 4 * cs];
    let mut rng = fastrand::Rng::with_seed(41);
    rng.fill(&mut old[..cs]);
    rng.fill(&mut old[2 * cs..]);
    let path = dir.path().join("disk.raw");
    full_backup(&repo, "vm", "b1", "vda", &write_file(&path, &old));
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    assert_eq!(parent.chunks[1], None);
    // The parent's chunk 3 is damaged: its patch falls back to reading the chunk whole.
    let p3 = local(&repo).chunk_path(&parent.chunks[3].unwrap());
    let mut bytes = fs::read(&p3).unwrap();
    bytes[100] ^= 1;
    fs::write(&p3, bytes).unwrap();

    let mut new = old.clone();
    // 100 bytes of chunk 0, 4 KiB of (zero) chunk 1, most of chunk 2, 10 bytes of chunk 3.
    let extents = [(1000u64, 100u64), (cs as u64 + 8192, 4096), (2 * cs as u64, 200 << 10), (3 * cs as u64 + 5, 10)];
    for &(off, len) in &extents {
        rng.fill(&mut new[off as usize..(off + len) as usize]);
    }
    let src = write_file(&path, &new);
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &extents).unwrap();
    w.commit().unwrap();
    assert_eq!((stats.chunks_read, stats.chunks_patched), (4, 3));
    assert_eq!(stats.bytes_read, 100 + 4096 + (200 << 10) + cs as u64);
    let out = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b2", "vda", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), new);
    assert!(repo.verify("vm", "b2").unwrap().is_ok());
}

#[test]
fn incremental_with_unaligned_extents_and_a_grown_disk_restores_right() {
    let (dir, repo) = new_repo(K64);
    let old = mixed(5 * K64 as usize + 1000, 11);
    let path = dir.path().join("disk.raw");
    full_backup(&repo, "vm", "b1", "vda", &write_file(&path, &old));

    // Grown to 7 chunks and a bit; a write across the boundary of chunks 0 and 1.
    let mut new = old.clone();
    new.resize(7 * K64 as usize + 3, 0);
    let n = new.len();
    new[n - 3..].copy_from_slice(b"end");
    new[K64 as usize - 10..K64 as usize + 10].fill(0xAB);
    let extents = [(K64 - 10, 20), (n as u64 - 3, 3)];
    let src = write_file(&path, &new);
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &extents).unwrap();
    w.commit().unwrap();
    // Chunks 0 and 1 (the write), 5 (was short), 6 and 7 (new).
    assert_eq!(stats.chunks_read, 5);
    assert_eq!(stats.bytes_changed, 23);
    let out = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b2", "vda", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), new);

    // And shrunk back to an odd size.
    let small = new[..2 * K64 as usize + 7].to_vec();
    let src = write_file(&path, &small);
    let parent = repo.manifest("vm", "b2", "vda").unwrap();
    let mut w = repo.begin_backup(spec("vm", "b3")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &[]).unwrap();
    w.commit().unwrap();
    assert_eq!(stats.chunks_read, 1);
    let out = dir.path().join("r3.raw");
    restore_raw(&repo, "vm", "b3", "vda", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), small);
}

#[test]
fn incremental_rereads_a_parent_chunk_that_is_no_longer_stored() {
    let (dir, repo) = new_repo(K64);
    let data = mixed(4 * K64 as usize, 21);
    let path = dir.path().join("disk.raw");
    let src = write_file(&path, &data);
    full_backup(&repo, "vm", "b1", "vda", &src);
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    let lost = parent.chunks.iter().flatten().next().copied().unwrap();
    fs::remove_file(local(&repo).chunk_path(&lost)).unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &[]).unwrap();
    w.commit().unwrap();
    assert!(stats.chunks_read >= 1);
    assert!(repo.verify("vm", "b2").unwrap().is_ok());
    // The chunk read again has the same name: the parent is whole again too.
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
}

#[test]
fn bad_extents_and_a_foreign_parent_are_refused() {
    let (dir, repo) = new_repo(K64);
    let data = mixed(4 * K64 as usize, 2);
    let src = write_file(&dir.path().join("d"), &data);
    full_backup(&repo, "vm", "b1", "vda", &src);
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let unsorted = [(2 * K64, 10), (0, 10)];
    assert!(matches!(w.incremental("vda", &src, &parent, &unsorted), Err(Error::InvalidExtents { .. })));
    let beyond = [(4 * K64 - 5, 10)];
    assert!(matches!(w.incremental("vda", &src, &parent, &beyond), Err(Error::InvalidExtents { .. })));
    let overflow = [(u64::MAX, 10)];
    assert!(matches!(w.incremental("vda", &src, &parent, &overflow), Err(Error::InvalidExtents { .. })));
    assert!(matches!(w.incremental("vdb", &src, &parent, &[]), Err(Error::ParentMismatch { .. })));
    // A failed disk is not part of the backup: nothing to commit.
    assert!(matches!(w.commit(), Err(Error::EmptyBackup { .. })));
    assert!(repo.list(Some("vm")).unwrap().len() == 1);
}

#[test]
fn identical_data_of_two_vms_is_stored_once() {
    let (_dir, repo) = new_repo(K64);
    let data = mixed(16 * K64 as usize, 4);
    let a = full_backup(&repo, "vm-a", "b1", "vda", &data);
    let before = stored_chunks(&repo);
    let b = full_backup(&repo, "vm-b", "b1", "root", &data);
    assert!(a.chunks_new > 0);
    assert_eq!(b.chunks_new, 0);
    assert_eq!(b.bytes_stored, 0);
    assert_eq!(stored_chunks(&repo), before);
    let distinct: std::collections::HashSet<_> =
        repo.manifest("vm-a", "b1", "vda").unwrap().chunks.into_iter().flatten().collect();
    assert_eq!(before.len(), distinct.len());
    assert_eq!(repo.list(None).unwrap().iter().map(|b| b.vm.as_str()).collect::<Vec<_>>(), ["vm-a", "vm-b"]);
}

#[test]
fn concurrent_writers_of_the_same_data_both_commit_whole_backups() {
    let (_dir, repo) = new_repo(K64);
    let data = mixed(32 * K64 as usize, 31);
    std::thread::scope(|s| {
        for vm in ["vm-a", "vm-b", "vm-c"] {
            let (repo, data) = (&repo, &data);
            s.spawn(move || full_backup(repo, vm, "b1", "vda", data));
        }
    });
    for vm in ["vm-a", "vm-b", "vm-c"] {
        assert!(repo.verify(vm, "b1").unwrap().is_ok());
    }
    let distinct: std::collections::HashSet<_> =
        repo.manifest("vm-a", "b1", "vda").unwrap().chunks.into_iter().flatten().collect();
    assert_eq!(stored_chunks(&repo).len(), distinct.len());
    assert!(local(&repo).chunk_leftovers().unwrap().is_empty());
}

#[test]
fn verify_finds_a_flipped_byte_and_a_missing_chunk_and_restore_refuses_them() {
    let (dir, repo) = new_repo(K64);
    let mut data = mixed(8 * K64 as usize, 8);
    for (k, piece) in data.chunks_mut(K64 as usize).enumerate() {
        piece[0] = k as u8 + 1; // every chunk distinct and non-zero
    }
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    w.full("vda", &data).unwrap();
    w.full("vdb", &data[..3 * K64 as usize].to_vec()).unwrap();
    w.commit().unwrap();
    assert!(repo.verify("vm", "b1").unwrap().is_ok());

    let m = repo.manifest("vm", "b1", "vda").unwrap();
    let flipped = m.chunks[5].unwrap();
    let gone = m.chunks[1].unwrap();
    let p = local(&repo).chunk_path(&flipped);
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&p, bytes).unwrap();
    fs::remove_file(local(&repo).chunk_path(&gone)).unwrap();

    let report = repo.verify("vm", "b1").unwrap();
    let found: Vec<_> = report.problems.iter().map(|p| (p.disk.as_str(), p.index, p.offset)).collect();
    // Chunk 1 of vda is chunk 1 of vdb too.
    assert_eq!(found, [("vda", 1, K64), ("vda", 5, 5 * K64), ("vdb", 1, K64)]);
    assert_eq!(report.problems[0].fault, ChunkFault::Missing);
    assert!(matches!(report.problems[1].fault, ChunkFault::Corrupt(_)), "{:?}", report.problems[1]);
    assert_eq!(report.problems[1].hash, flipped.to_string());

    let out = dir.path().join("r.raw");
    let e = restore_raw(&repo, "vm", "b1", "vda", &out).unwrap_err();
    assert!(matches!(e, Error::ChunkMissing { .. } | Error::ChunkCorrupt { .. }), "{e}");
    assert!(!out.exists());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no partial file is left");
}

#[test]
fn hostile_chunk_files_are_errors_and_decompression_is_bounded() {
    let (_dir, repo) = new_repo(K64);
    let data = mixed(K64 as usize, 9);
    let mut data = data;
    data[0] = 1;
    full_backup(&repo, "vm", "b1", "vda", &data);
    let hash = repo.manifest("vm", "b1", "vda").unwrap().chunks[0].unwrap();
    let path = local(&repo).chunk_path(&hash);
    let good = fs::read(&path).unwrap();

    let header = |encoding: u8, data_len: u32, payload: &[u8]| {
        let mut f = b"LSNAPCHK".to_vec();
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&[encoding, 0]);
        f.extend_from_slice(&data_len.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    };
    // A zstd bomb: 64 MiB of zeros claiming to be a 64 KiB chunk.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..10].to_vec()),
        ("empty", Vec::new()),
        ("bad magic", [b"XXXXXXXX".as_slice(), &good[8..]].concat()),
        ("zstd bomb", header(1, K64 as u32, &bomb)),
        ("data length beyond chunk size", header(0, 1 << 30, &[0; 16])),
        ("unknown encoding", header(7, K64 as u32, &good[24..])),
        ("garbage payload", header(1, K64 as u32, &[0xFF; 100])),
        ("other content", header(0, K64 as u32, &vec![3u8; K64 as usize])),
        ("huge file", vec![0u8; 1 << 20]),
    ];
    for (what, bytes) in cases {
        fs::write(&path, &bytes).unwrap();
        let report = repo.verify("vm", "b1").unwrap();
        assert_eq!(report.problems.len(), 1, "{what}");
        assert!(matches!(report.problems[0].fault, ChunkFault::Corrupt(_)), "{what}: {:?}", report.problems[0]);
    }
}

#[test]
fn prune_keeps_the_last_n_and_gc_removes_only_unreferenced_chunks() {
    let (_dir, repo) = new_repo(K64);
    let shared = mixed(4 * K64 as usize, 100);
    for i in 0..4u64 {
        let mut data = shared.clone();
        data.extend(mixed(2 * K64 as usize, 200 + i));
        let mut s = spec("vm", &format!("b{i}"));
        s.created_unix_us = Some(1_000 + i);
        let mut w = repo.begin_backup(s).unwrap();
        w.full("vda", &data).unwrap();
        w.commit().unwrap();
    }
    full_backup(&repo, "other", "x", "vda", &mixed(2 * K64 as usize, 300));
    let report = repo.prune("vm", NonZeroUsize::new(2).unwrap()).unwrap();
    assert_eq!(report.deleted, ["b0", "b1"]);
    assert_eq!(report.kept, ["b2", "b3"]);
    assert!(report.gc.chunks_removed > 0);

    let ids: Vec<_> = repo.list(None).unwrap().into_iter().map(|b| format!("{}/{}", b.vm, b.id)).collect();
    assert_eq!(ids, ["other/x", "vm/b2", "vm/b3"]);
    let mut referenced = std::collections::BTreeSet::new();
    for b in repo.list(None).unwrap() {
        for m in repo.get(&b.vm, &b.id).unwrap().manifests {
            referenced.extend(m.chunks.into_iter().flatten());
        }
        assert!(repo.verify(&b.vm, &b.id).unwrap().is_ok());
    }
    assert_eq!(stored_chunks(&repo), referenced.into_iter().collect::<Vec<_>>());
    let again = repo.gc().unwrap();
    assert_eq!((again.chunks_removed, again.leftovers_removed), (0, 0));
}

#[test]
fn a_writer_dropped_before_commit_leaves_no_backup_and_gc_takes_its_chunks() {
    let (_dir, repo) = new_repo(K64);
    let data = mixed(4 * K64 as usize, 12);
    {
        let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
        w.full("vda", &data).unwrap();
        assert!(matches!(repo.gc(), Err(Error::Busy)));
        assert!(matches!(repo.prune("vm", NonZeroUsize::MIN), Err(Error::Busy)));
    }
    assert!(repo.list(None).unwrap().is_empty());
    assert!(matches!(repo.info("vm", "b1"), Err(Error::BackupNotFound { .. })));
    assert!(!stored_chunks(&repo).is_empty());
    repo.gc().unwrap();
    assert!(stored_chunks(&repo).is_empty());
}

#[test]
fn gc_removes_leftovers_of_a_crash() {
    let (_dir, repo) = new_repo(K64);
    full_backup(&repo, "vm", "b1", "vda", &mixed(2 * K64 as usize, 13));
    let vm_dir = local(&repo).root().join("backups").join("vm");
    fs::create_dir(vm_dir.join(".tmp-b2-1-0")).unwrap();
    fs::write(vm_dir.join(".tmp-b2-1-0").join("vda.manifest"), b"half").unwrap();
    fs::create_dir(vm_dir.join(".del-b0-1-0")).unwrap();
    let tmp_chunk = local(&repo).root().join("chunks").join("ab").join(".tmp-ab00-1-0");
    fs::write(&tmp_chunk, b"torn").unwrap();
    assert_eq!(repo.list(None).unwrap().len(), 1);
    let report = repo.gc().unwrap();
    assert_eq!(report.leftovers_removed, 3);
    assert_eq!(report.chunks_removed, 0);
    assert!(!tmp_chunk.exists());
    assert_eq!(fs::read_dir(&vm_dir).unwrap().count(), 1);
}

#[test]
fn delete_removes_one_backup_and_gc_frees_its_chunks_only() {
    let (_dir, repo) = new_repo(K64);
    full_backup(&repo, "vm", "b1", "vda", &mixed(2 * K64 as usize, 14));
    let keep = stored_chunks(&repo);
    full_backup(&repo, "vm", "b2", "vda", &mixed(2 * K64 as usize, 15));
    repo.delete("vm", "b2").unwrap();
    assert!(matches!(repo.delete("vm", "b2"), Err(Error::BackupNotFound { .. })));
    repo.gc().unwrap();
    assert_eq!(stored_chunks(&repo), keep);
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
}

#[test]
fn damaged_manifests_are_errors_never_panics_and_stop_gc() {
    let (_dir, repo) = new_repo(K64);
    full_backup(&repo, "vm", "b1", "vda", &mixed(3 * K64 as usize + 5, 16));
    let path = local(&repo).manifest_path("vm", "b1", "vda");
    let good = fs::read(&path).unwrap();
    let chunks_before = stored_chunks(&repo);

    // A well-formed manifest with garbage metadata and a correct checksum.
    let resealed = |meta: &[u8], count: u64, table: &[u8]| {
        let mut f = b"LSNAPMAN".to_vec();
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        f.extend_from_slice(&count.to_le_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(meta);
        f.extend_from_slice(table);
        let sum = ChunkHash::of(&f);
        f.extend_from_slice(&sum.0);
        f
    };
    let meta_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let meta: serde_json::Value = serde_json::from_slice(&good[32..32 + meta_len]).unwrap();
    let table = &good[32 + meta_len..good.len() - 32];
    let with = |key: &str, v: serde_json::Value| {
        let mut m = meta.clone();
        m[key] = v;
        serde_json::to_vec(&m).unwrap()
    };
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    let mut flipped_table = good.clone();
    let n = flipped_table.len();
    flipped_table[n - 40] ^= 1;
    // Listing reads headers and metadata only: it sees all but a damaged table or checksum.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("half", good[..good.len() / 2].to_vec()),
        ("flipped metadata byte", flipped),
        ("flipped table byte", flipped_table),
        ("bad magic", [b"LSNAPXXX".as_slice(), &good[8..]].concat()),
        ("version 9", [&good[..8], &9u32.to_le_bytes()[..], &good[12..]].concat()),
        ("garbage json", resealed(b"{not json", 4, table)),
        ("wrong chunk count", resealed(&good[32..32 + meta_len], 3, &table[..96])),
        ("huge chunk count", resealed(&good[32..32 + meta_len], u64::MAX / 16, table)),
        ("wrong chunk size", resealed(&with("chunk_size", 4096.into()), 4, table)),
        ("other vm", resealed(&with("vm", "intruder".into()), 4, table)),
        ("path in name", resealed(&with("disk", "../../etc".into()), 4, table)),
        ("size overflow", resealed(&with("size", u64::MAX.into()), 4, table)),
    ];
    for (what, bytes) in cases {
        fs::write(&path, &bytes).unwrap();
        let e = repo.manifest("vm", "b1", "vda").unwrap_err();
        assert!(matches!(e, Error::Manifest { .. }), "{what}: {e}");
        assert!(repo.get("vm", "b1").is_err(), "{what}");
        assert!(repo.verify("vm", "b1").is_err(), "{what}");
        assert!(restore_raw(&repo, "vm", "b1", "vda", &_dir.path().join("x")).is_err(), "{what}");
        assert!(repo.gc().is_err(), "{what}");
        if what != "flipped table byte" {
            assert!(repo.list(None).is_err(), "{what}");
            assert!(repo.info("vm", "b1").is_err(), "{what}");
        }
        assert_eq!(stored_chunks(&repo), chunks_before, "{what}: gc removed nothing");
    }
    let e = repo.manifest("vm", "b1", "vda").unwrap_err();
    let chain = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>();
    assert!(chain[0].starts_with("The manifest"), "{chain:?}");
    assert!(chain.len() >= 2, "{chain:?}");
}

#[test]
fn names_that_are_not_plain_path_components_are_refused() {
    let (_dir, repo) = new_repo(K64);
    for bad in ["", "..", ".tmp-x", "a/b", "-x", "x y", &"x".repeat(129)] {
        assert!(matches!(repo.begin_backup(spec(bad, "b")), Err(Error::InvalidName { .. })), "{bad:?}");
        assert!(matches!(repo.begin_backup(spec("vm", bad)), Err(Error::InvalidName { .. })), "{bad:?}");
    }
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    assert!(matches!(w.full("../x", &vec![1u8; 10]), Err(Error::InvalidName { .. })));
    w.full("vda", &vec![1u8; 10]).unwrap();
    assert!(matches!(w.full("vda", &vec![1u8; 10]), Err(Error::DuplicateDisk(_))));
    w.commit().unwrap();
    assert!(matches!(repo.begin_backup(spec("vm", "b1")), Err(Error::BackupExists { .. })));
}

#[test]
fn a_repository_reopens_with_its_config_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    assert!(matches!(
        Repository::create(&root, CreateOptions { chunk_size: 3 << 20, ..Default::default() }),
        Err(Error::InvalidChunkSize(_))
    ));
    let repo = Repository::create(&root, CreateOptions::default()).unwrap();
    assert_eq!(repo.chunk_size(), DEFAULT_CHUNK_SIZE);
    drop(repo);
    assert_eq!(Repository::open(&root).unwrap().config().chunk_size, 4 << 20);
    assert!(matches!(Repository::create(&root, CreateOptions::default()), Err(Error::NotEmpty(_))));
    assert!(matches!(Repository::open(dir.path()), Err(Error::NotARepository { .. })));
    let config = root.join("config.json");
    fs::write(&config, b"{\"format\":").unwrap();
    assert!(matches!(Repository::open(&root), Err(Error::ConfigParse { .. })));
    let text = serde_json::json!({"format": "livesnap-repository", "version": 1, "chunk_size": 12345,
        "hash": "sha256", "compression": "zstd", "compression_level": 3, "created_unix_us": 0});
    fs::write(&config, text.to_string()).unwrap();
    assert!(matches!(Repository::open(&root), Err(Error::ConfigInvalid { .. })));
}

#[test]
fn a_failing_source_fails_the_disk_with_its_offset() {
    struct Failing;
    impl Source for Failing {
        fn size(&self) -> u64 {
            4 * K64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            if off == 2 * K64 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            buf.fill(1);
            Ok(())
        }
    }
    let (_dir, repo) = new_repo(K64);
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    let e = w.full("vda", &Failing).unwrap_err();
    assert!(matches!(e, Error::SourceRead { offset, .. } if offset == 2 * K64), "{e}");
}

#[test]
fn a_store_that_fails_to_put_a_chunk_fails_the_disk_with_its_error_and_commits_nothing() {
    let (dir, repo) = new_repo(K64);
    // Every chunk's directory is gone: each put fails (ENOTDIR).
    let chunks = dir.path().join("repo/chunks");
    fs::remove_dir_all(&chunks).unwrap();
    fs::write(&chunks, b"").unwrap();
    let data = mixed(40 * K64 as usize, 3);
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    let e = w.full("vda", &data).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    assert!(matches!(w.commit(), Err(Error::EmptyBackup { .. })));
    assert_eq!(repo.list(Some("vm")).unwrap().len(), 0);
}

#[test]
fn a_chunk_decoded_into_a_buffer_that_held_a_longer_one_is_exactly_its_bytes() {
    let long = mixed(K64 as usize, 5);
    // Short ones, compressed (zstd) and stored as they are (noise).
    let text: Vec<u8> = b"a short last chunk, compressible ".iter().copied().cycle().take(1000).collect();
    let mut noise = vec![0u8; 1000];
    fastrand::Rng::with_seed(9).fill(&mut noise);
    let mut encoder = chunk::Encoder::new(3).unwrap();
    let mut decoder = chunk::Decoder::new(K64 as usize).unwrap();
    let mut out = Vec::new();
    for short in [&text, &noise] {
        for data in [&long, short] {
            let file = encoder.encode(data, None, &ChunkHash::of(data)).unwrap().to_vec();
            chunk::decode(&file, K64 as usize, data.len(), &mut out, decoder.decompressor()).unwrap();
            assert!(out == *data);
        }
    }
}

/// A target that records the calls it gets, writing into a file.
#[derive(Debug)]
struct Recording {
    file: fs::File,
    calls: std::sync::Mutex<Vec<&'static str>>,
}

impl Target for Recording {
    fn set_size(&self, size: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("set_size");
        self.file.set_len(size)
    }
    fn write_data(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("write_data");
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }
    fn finish(&self) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("finish");
        self.file.sync_all()
    }
    fn start_writeback(&self) {
        self.calls.lock().unwrap().push("start_writeback");
    }
}

#[test]
fn restore_starts_writeback_while_it_writes_and_finishes_after_every_write() {
    let (dir, repo) = new_repo(K64);
    // 20 chunks, none with a zero block.
    let data: Vec<u8> = (0..20 * K64 as usize).map(|i| (i % 251) as u8 | 1).collect();
    full_backup(&repo, "vm", "b1", "vda", &data);
    let path = dir.path().join("restored.raw");
    let target = Recording { file: fs::File::create(&path).unwrap(), calls: Default::default() };
    let m = repo.manifest("vm", "b1", "vda").unwrap();
    let stats = repo.restore(&m, &target).unwrap();
    assert_eq!(stats.bytes_written, data.len() as u64);
    assert!(fs::read(&path).unwrap() == data);
    let calls = target.calls.into_inner().unwrap();
    assert_eq!(calls.first(), Some(&"set_size"));
    assert_eq!(calls.last(), Some(&"finish"));
    assert_eq!(calls.iter().filter(|c| **c == "finish").count(), 1);
    assert!(calls.contains(&"start_writeback"), "{calls:?}");
}

#[test]
fn progress_reaches_the_total() {
    let (_dir, repo) = new_repo(K64);
    let data = mixed(5 * K64 as usize + 3, 17);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    let s = seen.clone();
    w.set_progress(Box::new(move |disk, done, total| s.lock().unwrap().push((disk.to_owned(), done, total))));
    w.full("vda", &data).unwrap();
    w.commit().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().any(|(d, done, total)| d == "vda" && *done == *total && *total == data.len() as u64));
}

#[test]
fn progress_counts_a_chunk_only_once_it_is_stored() {
    let (dir, repo) = new_repo(K64);
    // 8 distinct chunks, none zero.
    let data: Vec<u8> = (0..8 * K64 as usize).map(|i| (i % 251) as u8 | 1).collect();
    let chunks = dir.path().join("repo/chunks");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
    let s = seen.clone();
    w.set_progress(Box::new(move |_, _, _| {
        // Counted under the lock: the k-th call to take it counts after k puts.
        let mut seen = s.lock().unwrap();
        seen.push(walk(&chunks).iter().filter(|p| !p.contains(".tmp-")).count());
    }));
    w.full("vda", &data).unwrap();
    w.commit().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 8);
    for (k, stored) in seen.iter().enumerate() {
        assert!(*stored > k, "progress call {} saw {stored} chunks stored: {seen:?}", k + 1);
    }
}

fn mib_per_s(bytes: u64, since: Instant) -> f64 {
    bytes as f64 / (1 << 20) as f64 / since.elapsed().as_secs_f64()
}

/// The measurements' source: 512 MiB of mixed data in a file under `$MEASURE_DIR` (default: the
/// temporary directory).
fn measure_source() -> (tempfile::TempDir, usize, FileSource) {
    let dir =
        tempfile::tempdir_in(std::env::var_os("MEASURE_DIR").map_or_else(std::env::temp_dir, PathBuf::from)).unwrap();
    let size = 512usize << 20;
    let path = dir.path().join("disk.raw");
    fs::write(&path, mixed(size, 42)).unwrap();
    let src = FileSource::open(&path).unwrap();
    (dir, size, src)
}

/// Prints the throughput of a full backup of a 512 MiB file of mixed data, of a second one
/// (everything deduplicated), of verify and of a restore.
#[test]
#[ignore = "measurement: run with --run-ignored only --no-capture"]
fn measure_throughput_of_a_512_mib_full_backup() {
    let (dir, size, src) = measure_source();
    // Out of the page cache as far as possible: the source is a disk, not memory.
    let _ = Command::new("sh").args(["-c", "sync; echo 1 > /proc/sys/vm/drop_caches"]).status();
    // Where a single thread's time goes, per stage, over the same 4 MiB chunks.
    {
        let cs = DEFAULT_CHUNK_SIZE as usize;
        let mut buf = vec![0u8; cs];
        let (mut read, mut hash, mut zero, mut compress, mut sync) = (0f64, 0f64, 0f64, 0f64, 0f64);
        let (mut hmac, mut seal) = (0f64, 0f64);
        let key = DataKey::from_secret(&[7; 32], "measure");
        let nonce = [0u8; crate::crypto::NONCE_LEN];
        let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(cs));
        for i in 0..size / cs {
            let t = Instant::now();
            src.read_at(&mut buf, (i * cs) as u64).unwrap();
            read += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(chunk::is_zero(&buf));
            zero += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(ChunkHash::of(&buf));
            hash += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(key.chunk_name(&buf));
            hmac += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let n = compressor.compress_to_buffer(&buf, &mut out).unwrap();
            compress += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut sealed = out[..n].to_vec();
            std::hint::black_box(key.seal(&nonce, b"aad", &mut sealed));
            seal += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let p = dir.path().join(format!("sync{i}"));
            fs::write(&p, &out[..n]).unwrap();
            fs::File::open(&p).unwrap().sync_all().unwrap();
            sync += t.elapsed().as_secs_f64();
        }
        let rate = |s: f64| size as f64 / (1 << 20) as f64 / s;
        eprintln!(
            "stages, one thread, MiB/s of source: read (cold) {:.0}, zero check {:.0}, sha256 {:.0}, hmac-sha256 (encrypted names) {:.0}, zstd-3 {:.0}, \
             aes-256-gcm of the compressed chunk (copy included) {:.0}, write+fsync of the compressed chunk {:.0}",
            rate(read), rate(zero), rate(hash), rate(hmac), rate(compress), rate(seal), rate(sync)
        );
        for i in 0..size / cs {
            let _ = fs::remove_file(dir.path().join(format!("sync{i}")));
        }
        let _ = Command::new("sh").args(["-c", "sync; echo 1 > /proc/sys/vm/drop_caches"]).status();
    }
    for threads in [1, 2, 4] {
        let root = dir.path().join(format!("repo{threads}"));
        let mut repo = Repository::create(&root, CreateOptions::default()).unwrap();
        repo.set_threads(threads).unwrap();
        let t = Instant::now();
        let s = full_backup(&repo, "vm", "b1", "vda", &src);
        let full = mib_per_s(size as u64, t);
        let t = Instant::now();
        full_backup(&repo, "vm", "b2", "vda", &src);
        let dedup = mib_per_s(size as u64, t);
        let t = Instant::now();
        assert!(repo.verify("vm", "b1").unwrap().is_ok());
        let verify = mib_per_s(size as u64, t);
        let t = Instant::now();
        restore_raw(&repo, "vm", "b1", "vda", &dir.path().join(format!("r{threads}.raw"))).unwrap();
        let restore = mib_per_s(size as u64, t);
        eprintln!(
            "threads {threads}: full backup {full:.0} MiB/s (stored {} MiB of 512, {} zero chunks of {}), \
             second full (dedup) {dedup:.0} MiB/s, verify {verify:.0} MiB/s, restore {restore:.0} MiB/s",
            s.bytes_stored >> 20,
            s.chunks_zero,
            s.chunks_read
        );
        if threads == 2 {
            measure_incremental_ratios(&repo, &src);
        }
    }
    measure_encrypted_against_plain(dir.path(), &src);
}

/// Full backup, verify and restore of the same 512 MiB, plain and encrypted, alternating (two
/// rounds each, so neither always runs first on a warmer cache), at the CPUs' thread count.
fn measure_encrypted_against_plain(dir: &Path, src: &FileSource) {
    let size = src.size();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let mut rates = [[0f64; 3]; 2];
    for round in 0..2 {
        for (e, encrypted) in [false, true].into_iter().enumerate() {
            let root = dir.join(format!("repo-enc{e}-{round}"));
            let mut repo = Repository::create(&root, CreateOptions::default()).unwrap();
            repo.set_threads(threads).unwrap();
            if encrypted {
                repo.set_key("vm", Some(std::sync::Arc::new(DataKey::from_secret(&[7; 32], "measure"))));
            }
            let t = Instant::now();
            full_backup(&repo, "vm", "b1", "vda", src);
            let backup = mib_per_s(size, t);
            let t = Instant::now();
            assert!(repo.verify("vm", "b1").unwrap().is_ok());
            let verify = mib_per_s(size, t);
            let out = dir.join(format!("r-enc{e}-{round}.raw"));
            let t = Instant::now();
            restore_raw(&repo, "vm", "b1", "vda", &out).unwrap();
            let restore = mib_per_s(size, t);
            for (k, r) in [backup, verify, restore].into_iter().enumerate() {
                rates[e][k] += r / 2.0;
            }
            fs::remove_file(&out).unwrap();
            fs::remove_dir_all(&root).unwrap();
        }
    }
    let [plain, enc] = rates;
    eprintln!(
        "threads {threads}, mean of 2 rounds, MiB/s plain / encrypted (ratio): full backup {:.0} / {:.0} ({:.2}), \
         verify {:.0} / {:.0} ({:.2}), restore {:.0} / {:.0} ({:.2})",
        plain[0],
        enc[0],
        enc[0] / plain[0],
        plain[1],
        enc[1],
        enc[1] / plain[1],
        plain[2],
        enc[2],
        enc[2] / plain[2]
    );
}

/// bytes read / bytes changed of incremental backups of the 512 MiB disk at 4 MiB chunks, for
/// chunk-aligned and for scattered 64 KiB-granular extents.
fn measure_incremental_ratios(repo: &Repository, src: &FileSource) {
    let size = src.size();
    let parent = repo.manifest("vm", "b1", "vda").unwrap();
    let cs = repo.chunk_size();
    let mut n = 0;
    let mut run = |what: &str, extents: Vec<(u64, u64)>| {
        n += 1;
        let mut w = repo.begin_backup(spec("vm", &format!("i{n}"))).unwrap();
        let t = Instant::now();
        let s = w.incremental("vda", src, &parent, &extents).unwrap();
        let secs = t.elapsed().as_secs_f64();
        w.commit().unwrap();
        eprintln!(
            "incremental, {what}: changed {} KiB in {} extents, read {} KiB ({} chunks, {} patched), ratio {:.2}, {:.0} ms",
            s.bytes_changed >> 10, extents.len(), s.bytes_read >> 10, s.chunks_read, s.chunks_patched,
            s.bytes_read as f64 / s.bytes_changed as f64, secs * 1000.0
        );
    };
    let mut rng = fastrand::Rng::with_seed(1234);
    let chunks = size / cs;
    let mut aligned: Vec<u64> = (0..chunks / 10).map(|_| rng.u64(0..chunks)).collect();
    aligned.sort();
    aligned.dedup();
    run("10% of the chunks, chunk-aligned", aligned.iter().map(|c| (c * cs, cs)).collect());
    for permille in [1u64, 10, 100] {
        let blocks = size / K64;
        let mut picked: Vec<u64> = (0..blocks * permille / 1000).map(|_| rng.u64(0..blocks)).collect();
        picked.sort();
        picked.dedup();
        run(
            &format!("{}% of the 64 KiB blocks, scattered at random", permille as f64 / 10.0),
            picked.iter().map(|b| (b * K64, K64)).collect(),
        );
    }
    let blocks = size / K64;
    let start = rng.u64(0..blocks - 1600);
    run("a run of 100 MiB at a random 64 KiB boundary", vec![(start * K64, 1600 * K64)]);
}

#[test]
fn chunks_compressed_at_the_highest_level_read_back_within_the_window_limit() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions { chunk_size: 256 << 10, compression_level: 19 };
    let repo = Repository::create(dir.path().join("repo"), opts).unwrap();
    let data = mixed(512 << 10, 77);
    let stats = full_backup(&repo, "vm", "b1", "vda", &data);
    assert!(stats.bytes_stored < data.len() as u64);
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
    let out = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b1", "vda", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), data);
}

#[test]
fn an_unreadable_chunk_is_reported_with_its_whole_chain() {
    let (dir, repo) = new_repo(K64);
    let mut data = mixed(2 * K64 as usize, 18);
    data[0] = 1;
    full_backup(&repo, "vm", "b1", "vda", &data);
    let hash = repo.manifest("vm", "b1", "vda").unwrap().chunks[0].unwrap();
    let path = local(&repo).chunk_path(&hash);
    // A directory where the chunk file was: it opens, but does not read.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();

    let report = repo.verify("vm", "b1").unwrap();
    let ChunkFault::Unreadable(reason) = &report.problems[0].fault else { panic!("{report:?}") };
    assert!(reason.starts_with(&format!("Cannot read `{}`: ", path.display())), "{reason}");
    assert!(reason.ends_with("Is a directory (os error 21)"), "{reason}");

    let e = restore_raw(&repo, "vm", "b1", "vda", &dir.path().join("r.raw")).unwrap_err();
    let chain = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>();
    assert_eq!(chain[0], format!("Cannot read chunk {hash}"));
    assert_eq!(chain[1], format!("Cannot read `{}`", path.display()));
    assert_eq!(chain[2], "Is a directory (os error 21)");
}

/// `qemu-img`/`qemu-io` with `args`, which must succeed.
fn qemu(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn backups_of_a_qcow2_base_read_only_its_allocated_then_its_changed_clusters() {
    let (dir, repo) = new_repo(16 * K64);
    let img = dir.path().join("base.qcow2");
    let imgs = img.to_str().unwrap();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", imgs, "256M"]);
    // 16 MiB allocated, in 8 pieces of 2 MiB spread over the disk.
    let writes: Vec<String> = (0..8u64).map(|i| format!("write -P {} {}M 2M", i + 1, i * 31 + 3)).collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(imgs);
    qemu("qemu-io", &args);
    let expected = |name: &str| {
        let raw = dir.path().join(name);
        qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", imgs, raw.to_str().unwrap()]);
        fs::read(raw).unwrap()
    };

    let src = Qcow2Source::open(&img).unwrap();
    let stats = full_backup(&repo, "vm", "b1", "vda", &src);
    let allocated = 16u64 << 20;
    let host = src.host_bytes_read();
    eprintln!("full: {host} bytes read from the image for {allocated} allocated ({} logical)", stats.bytes_read);
    assert!(host as f64 <= 1.1 * allocated as f64, "a full backup read {host} bytes for {allocated} allocated");
    let r1 = dir.path().join("b1.raw");
    restore_raw(&repo, "vm", "b1", "vda", &r1).unwrap();
    assert!(fs::read(&r1).unwrap() == expected("e1.raw"), "the full backup restores what qemu-img reads");

    // 1 MiB changed: 16 clusters, some where data was, some new.
    let mut rng = fastrand::Rng::with_seed(5);
    let mut extents: Vec<(u64, u64)> = (0..16).map(|_| (rng.u64(0..4096) * K64, K64)).collect();
    extents.sort();
    extents.dedup();
    let writes: Vec<String> = extents.iter().map(|(o, l)| format!("write -P 0xee {o} {l}")).collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(imgs);
    qemu("qemu-io", &args);
    let src = Qcow2Source::open(&img).unwrap();
    let parent = repo.latest_manifest("vm", "vda").unwrap().unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let stats = w.incremental("vda", &src, &parent, &extents).unwrap();
    w.commit().unwrap();
    let host = src.host_bytes_read();
    eprintln!("incremental: {host} bytes read from the image for {} changed", stats.bytes_changed);
    assert!(
        host as f64 <= 1.1 * stats.bytes_changed as f64,
        "an incremental read {host} bytes for {} changed",
        stats.bytes_changed
    );
    let r2 = dir.path().join("b2.raw");
    restore_raw(&repo, "vm", "b2", "vda", &r2).unwrap();
    assert!(fs::read(&r2).unwrap() == expected("e2.raw"), "the incremental restores what qemu-img reads");
}

#[test]
fn a_full_backup_of_a_sparse_raw_file_does_not_read_its_holes() {
    let (dir, repo) = new_repo(16 * K64);
    let path = dir.path().join("sparse.raw");
    let f = fs::File::create(&path).unwrap();
    f.set_len(64 << 20).unwrap();
    let data = mixed(2 << 20, 3);
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 40 << 20).unwrap();
    f.sync_all().unwrap();
    let src = FileSource::open(&path).unwrap();
    let stats = full_backup(&repo, "vm", "b1", "vda", &src);
    // File systems allocate in blocks and may report data a little around what was written.
    assert!(stats.bytes_read <= 4 << 20, "read {} bytes of a file holding 2 MiB", stats.bytes_read);
    let r = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b1", "vda", &r).unwrap();
    assert!(fs::read(&r).unwrap() == fs::read(&path).unwrap());
}

#[test]
fn of_writers_racing_to_store_one_chunk_exactly_one_stores_it() {
    let (dir, repo) = new_repo(K64);
    let store = local(&repo);
    for round in 0..20u8 {
        let data = vec![round; 4096];
        let hash = ChunkHash(<sha2::Sha256 as sha2::Digest>::digest(&data).into());
        let barrier = std::sync::Barrier::new(8);
        let stored: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        usize::from(store.put_chunk(&hash, &data).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(stored, 1, "round {round}: {stored} writers were told they stored the chunk");
    }
    let leftovers: Vec<_> = walk(&dir.path().join("repo/chunks")).into_iter().filter(|p| p.contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Every file path under `dir`.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Full backup and restore against their limits on this machine, same bytes, same run (issue
/// 15, point 5): the backup against SHA-256 and zstd at the repository's level over the
/// page-cached source on all cores in-process (no store); the restore against a plain sparse copy
/// of the same image (4 MiB reads, zero 4 KiB blocks skipped, non-zero ones written, fsync).
/// Five rounds, alternating; medians. Each timed phase begins on a settled file system
/// ([`settle`]), so none pays for what an earlier one left dirty or removed.
#[test]
#[ignore = "a measurement: prints numbers"]
fn measure_backup_and_restore_against_their_limits() {
    use rayon::prelude::*;
    // Five, not three: on a machine shared with builds one slow phase is common.
    const ROUNDS: usize = 5;
    let (dir, size, src) = measure_source();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cs = DEFAULT_CHUNK_SIZE as usize;
    let level = CreateOptions::default().compression_level;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    // MiB/s and the process's CPU seconds of one phase, begun on a settled file system.
    let phase = |f: &mut dyn FnMut()| {
        settle(dir.path());
        let (t, cpu) = (Instant::now(), cpu_seconds());
        f();
        (mib_per_s(size as u64, t), cpu_seconds() - cpu)
    };
    let (mut backup, mut limit, mut restore, mut copy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // The limit: read (page cache), SHA-256 and zstd of every chunk, all cores.
        limit.push(phase(&mut || {
            pool.install(|| {
                (0..size / cs).into_par_iter().for_each_init(
                    || (vec![0u8; cs], zstd::bulk::Compressor::new(level).unwrap(), Vec::with_capacity(cs + cs / 8)),
                    |(buf, z, out), i| {
                        src.read_at(buf, (i * cs) as u64).unwrap();
                        if !chunk::is_zero(buf) {
                            std::hint::black_box(ChunkHash::of(buf));
                            out.resize(zstd::zstd_safe::compress_bound(cs), 0);
                            let n = z.compress_to_buffer(buf, out).unwrap();
                            std::hint::black_box(n);
                        }
                    },
                )
            })
        }));
        let root = dir.path().join(format!("repo{round}"));
        let mut repo = Repository::create(&root, CreateOptions::default()).unwrap();
        repo.set_threads(threads).unwrap();
        backup.push(phase(&mut || {
            full_backup(&repo, "vm", "b1", "vda", &src);
        }));

        let to = dir.path().join(format!("r{round}.raw"));
        restore.push(phase(&mut || {
            restore_raw(&repo, "vm", "b1", "vda", &to).unwrap();
        }));
        fs::remove_file(&to).unwrap();
        let to = dir.path().join(format!("c{round}.raw"));
        copy.push(phase(&mut || {
            let out = fs::File::create(&to).unwrap();
            out.set_len(size as u64).unwrap();
            let mut buf = vec![0u8; cs];
            for i in 0..size / cs {
                src.read_at(&mut buf, (i * cs) as u64).unwrap();
                for (k, block) in buf.chunks(4096).enumerate() {
                    if !chunk::is_zero(block) {
                        std::os::unix::fs::FileExt::write_all_at(&out, block, (i * cs + k * 4096) as u64).unwrap();
                    }
                }
            }
            out.sync_all().unwrap();
        }));
        fs::remove_file(&to).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
    let medians = |v: Vec<(f64, f64)>| {
        let (rates, cpus): (Vec<f64>, Vec<f64>) = v.into_iter().unzip();
        (median(rates), median(cpus))
    };
    let ((b, bc), (l, lc), (r, rc), (c, cc)) = (medians(backup), medians(limit), medians(restore), medians(copy));
    eprintln!(
        "{threads} threads, 512 MiB, medians of {ROUNDS} rounds, MiB/s: full backup {b:.0} against sha256+zstd-{level} {l:.0} \
         ({:.2}×); restore {r:.0} against a sparse copy {c:.0} ({:.2}×); CPU seconds: backup {bc:.2}, limit {lc:.2}, \
         restore {rc:.2}, copy {cc:.2}",
        b / l,
        r / c
    );
}

/// `syncfs` of the file system that holds `dir`: writes back what is dirty there and commits
/// its journal, with the removals (and, mounted with `discard`, their discards) of earlier
/// phases.
fn settle(dir: &Path) {
    use std::os::fd::AsRawFd;
    let d = fs::File::open(dir).unwrap();
    // SAFETY: a system call on a descriptor we own for its duration; no memory is passed.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    assert_eq!(rc, 0, "syncfs: {}", std::io::Error::last_os_error());
}

/// User and system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes one rusage into the pointer it is given, which points at one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: getrusage succeeded: it filled `usage`.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
