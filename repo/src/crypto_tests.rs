//! Encrypted backups on tempdirs: what the store holds, tampering with it, wrong and missing
//! keys, and garbage collection without keys.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::tests::{mixed, restore_raw, spec, K64};
use crate::verify::ChunkFault;
use crate::*;

fn key(n: u8) -> Arc<DataKey> {
    Arc::new(DataKey::from_secret(&[n; 32], format!("/etc/livesnap/keys/k{n}.key")))
}

/// A repository at 64 KiB chunks in `dir/repo` whose VMs have the given keys.
fn open(dir: &Path, keys: &[(&str, &Arc<DataKey>)]) -> Repository {
    let root = dir.join("repo");
    let mut repo = if root.exists() {
        Repository::open(&root).unwrap()
    } else {
        Repository::create(&root, CreateOptions { chunk_size: K64, ..CreateOptions::default() }).unwrap()
    };
    for (vm, k) in keys {
        repo.set_key(vm, Some((*k).clone()));
    }
    repo
}

fn backup(repo: &Repository, vm: &str, id: &str, disks: &[(&str, &[u8])]) -> BackupInfo {
    let mut w = repo.begin_backup(spec(vm, id)).unwrap();
    for (disk, data) in disks {
        w.full(disk, &data.to_vec()).unwrap();
    }
    w.commit().unwrap()
}

/// Disk data whose every 64 KiB chunk is distinct and not zero.
fn distinct(chunks: usize, seed: u64) -> Vec<u8> {
    let mut data = mixed(chunks * K64 as usize, seed);
    for (k, piece) in data.chunks_mut(K64 as usize).enumerate() {
        piece[0] = k as u8 + 1;
        piece[1] = seed as u8;
    }
    data
}

fn chunk_path(repo: &Repository, name: &ChunkHash) -> std::path::PathBuf {
    LocalStore::open(repo.location()).chunk_path(name)
}

fn manifest_path(repo: &Repository, vm: &str, id: &str, disk: &str) -> std::path::PathBuf {
    LocalStore::open(repo.location()).manifest_path(vm, id, disk)
}

fn names(repo: &Repository) -> Vec<ChunkHash> {
    let mut v: Vec<_> = repo.store().list_chunks().unwrap().into_iter().map(|c| c.0).collect();
    v.sort();
    v
}

/// Every error's text, causes included.
fn chain(e: &dyn std::error::Error) -> String {
    crate::error::chain(e)
}

#[test]
fn an_encrypted_backup_restores_and_the_store_holds_no_plaintext_nor_plain_names() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(1);
    let repo = open(dir.path(), &[("vm", &k)]);
    let data = mixed(9 * K64 as usize + 333, 3);
    let info = backup(&repo, "vm", "b1", &[("vda", &data)]);
    assert_eq!(info.key, Some(k.id()));

    let out = dir.path().join("r.raw");
    restore_raw(&repo, "vm", "b1", "vda", &out).unwrap();
    assert!(fs::read(&out).unwrap() == data);
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
    let reader = repo.open_disk("vm", "b1", "vda", 0).unwrap();
    let mut buf = vec![0; data.len()];
    reader.read_at(&mut buf, 0).unwrap();
    assert!(buf == data);

    // What the store holds: no text of the disk, no chunk named by its SHA-256, no metadata.
    let m = repo.manifest("vm", "b1", "vda").unwrap();
    let plain: Vec<ChunkHash> = data.chunks(K64 as usize).map(ChunkHash::of).collect();
    let stored = names(&repo);
    assert!(!stored.is_empty());
    for name in &stored {
        assert!(!plain.contains(name), "a chunk is named by its plain SHA-256");
        let file = fs::read(chunk_path(&repo, name)).unwrap();
        assert_eq!(&file[..8], b"LSNAPCHX");
        assert!(!file.windows(15).any(|w| w == b"quick brown fox"), "plaintext in chunk {name}");
    }
    let manifest = fs::read(manifest_path(&repo, "vm", "b1", "vda")).unwrap();
    for needle in [b"\"consistency\"".as_slice(), b"\"size\"", b"application"] {
        assert!(!manifest.windows(needle.len()).any(|w| w == needle), "manifest metadata in the clear");
    }
    assert_eq!(m.key, Some(k.id()));
}

#[test]
fn chunks_are_deduplicated_within_one_key_and_never_across_keys_or_with_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(1), key(2));
    // a and b are one tenant's VMs (one key); c another tenant; d is not encrypted.
    let repo = open(dir.path(), &[("a", &k1), ("b", &k1), ("c", &k2)]);
    let data = distinct(4, 1);
    let mut counts = Vec::new();
    for vm in ["a", "b", "c", "d"] {
        backup(&repo, vm, "b1", &[("vda", &data)]);
        counts.push(names(&repo).len());
    }
    assert_eq!(counts, [4, 4, 8, 12]);
    let name = |vm: &str| repo.manifest(vm, "b1", "vda").unwrap().chunks[0].unwrap();
    assert_eq!(name("a"), name("b"));
    assert_ne!(name("a"), name("c"));
    assert_eq!(name("d"), ChunkHash::of(&data[..K64 as usize]));
}

#[test]
fn a_flipped_byte_anywhere_in_an_encrypted_chunk_is_found_by_verify_restore_and_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path(), &[("vm", &key(1))]);
    let data = distinct(4, 2);
    backup(&repo, "vm", "b1", &[("vda", &data)]);
    let m = repo.manifest("vm", "b1", "vda").unwrap();
    let victim = m.chunks[2].unwrap();
    let path = chunk_path(&repo, &victim);
    let good = fs::read(&path).unwrap();
    // The header (version, key id, nonce), the ciphertext, the tag.
    for at in [9, 13, 25, 40, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        let report = repo.verify("vm", "b1").unwrap();
        assert_eq!(report.problems.len(), 1, "byte {at}: {report:?}");
        let p = &report.problems[0];
        assert_eq!((p.index, p.hash.as_str()), (2, victim.to_string().as_str()));
        let ChunkFault::Corrupt(why) = &p.fault else { panic!("byte {at}: {p:?}") };
        assert!(
            why.contains("authenticate") || why.contains("version") || why.contains("encrypted under key"),
            "byte {at}: {why}"
        );
        let out = dir.path().join("r.raw");
        let e = restore_raw(&repo, "vm", "b1", "vda", &out).unwrap_err();
        assert!(matches!(&e, Error::ChunkCorrupt { hash, .. } if *hash == victim), "byte {at}: {e}");
        assert!(!out.exists());
        let reader = repo.open_disk("vm", "b1", "vda", 0).unwrap();
        let mut buf = vec![0; 100];
        let e = reader.read_at(&mut buf, 2 * K64).unwrap_err();
        assert!(chain(&e).contains(&victim.to_string()), "{e}");
        assert!(buf.iter().all(|&b| b == 0), "no unchecked byte handed out");
    }
    fs::write(&path, &good).unwrap();
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
}

#[test]
fn a_chunk_swapped_for_another_of_the_same_key_is_refused_and_never_restored() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path(), &[("vm", &key(1))]);
    let data = distinct(4, 3);
    backup(&repo, "vm", "b1", &[("vda", &data)]);
    let m = repo.manifest("vm", "b1", "vda").unwrap();
    let (a, b) = (m.chunks[0].unwrap(), m.chunks[3].unwrap());
    // Chunk 3's file, authentic under the key, stored under chunk 0's name.
    fs::copy(chunk_path(&repo, &b), chunk_path(&repo, &a)).unwrap();
    let report = repo.verify("vm", "b1").unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert_eq!(report.problems[0].index, 0);
    let ChunkFault::Corrupt(why) = &report.problems[0].fault else { panic!("{report:?}") };
    assert!(why.contains("does not authenticate") && why.contains("not the chunk"), "{why}");
    let e = restore_raw(&repo, "vm", "b1", "vda", &dir.path().join("r.raw")).unwrap_err();
    assert!(matches!(&e, Error::ChunkCorrupt { hash, .. } if *hash == a), "{e}");
    let reader = repo.open_disk("vm", "b1", "vda", 0).unwrap();
    assert!(reader.read_at(&mut [0; 10], 0).is_err());
}

#[test]
fn a_manifest_replayed_from_an_older_backup_another_disk_or_another_vm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(1);
    // One tenant, two VMs, one key: the key alone does not tell their manifests apart.
    let repo = open(dir.path(), &[("vm", &k), ("vm2", &k)]);
    let (old, new) = (distinct(3, 4), distinct(3, 5));
    backup(&repo, "vm", "b1", &[("vda", &old), ("vdb", &old)]);
    backup(&repo, "vm", "b2", &[("vda", &new), ("vdb", &new)]);
    backup(&repo, "vm2", "b2", &[("vda", &old), ("vdb", &old)]);
    let target = manifest_path(&repo, "vm", "b2", "vda");
    let good = fs::read(&target).unwrap();
    let replays = [
        ("an older backup", manifest_path(&repo, "vm", "b1", "vda")),
        ("another disk", manifest_path(&repo, "vm", "b2", "vdb")),
        ("another VM", manifest_path(&repo, "vm2", "b2", "vda")),
    ];
    for (what, from) in replays {
        fs::copy(&from, &target).unwrap();
        let e = repo.manifest("vm", "b2", "vda").unwrap_err();
        let text = chain(&e);
        assert!(
            matches!(&e, Error::Manifest { vm, id, disk, .. } if vm == "vm" && id == "b2" && disk == "vda"),
            "{what}: {text}"
        );
        assert!(text.contains("does not authenticate"), "{what}: {text}");
        assert!(repo.info("vm", "b2").is_err(), "{what}");
        assert!(repo.verify("vm", "b2").is_err(), "{what}");
        assert!(repo.open_disk("vm", "b2", "vda", 0).is_err(), "{what}");
        let out = dir.path().join("r.raw");
        assert!(restore_raw(&repo, "vm", "b2", "vda", &out).is_err(), "{what}");
        assert!(!out.exists(), "{what}");
    }
    fs::write(&target, &good).unwrap();
    restore_raw(&repo, "vm", "b2", "vda", &dir.path().join("ok.raw")).unwrap();
    assert!(fs::read(dir.path().join("ok.raw")).unwrap() == new);
}

#[test]
fn an_encrypted_manifest_altered_anywhere_is_refused_even_with_its_checksum_redone() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path(), &[("vm", &key(1))]);
    backup(&repo, "vm", "b1", &[("vda", &distinct(4, 6))]);
    let path = manifest_path(&repo, "vm", "b1", "vda");
    let good = fs::read(&path).unwrap();
    let n = good.len();
    let resum = |mut f: Vec<u8>| {
        let body = f.len() - 32;
        let sum = Sha256::digest(&f[..body]);
        f[body..].copy_from_slice(&sum);
        f
    };
    // Two entries of the chunk table swapped: every name still a real chunk of the backup.
    let table = n - 64 - 4 * 32;
    let mut swapped = good.clone();
    let (first, rest) = swapped[table..].split_at_mut(32);
    first.swap_with_slice(&mut rest[64..96]);
    let mut cases = vec![("table entries swapped", resum(swapped))];
    for (what, at) in [("metadata", 60), ("nonce", 33), ("table", table + 5), ("table MAC", n - 40), ("count", 16)] {
        let mut bad = good.clone();
        bad[at] ^= 0x02;
        cases.push((what, resum(bad)));
    }
    for (what, bytes) in cases {
        fs::write(&path, &bytes).unwrap();
        let e = repo.manifest("vm", "b1", "vda").unwrap_err();
        assert!(matches!(e, Error::Manifest { .. }), "{what}: {e}");
        assert!(repo.verify("vm", "b1").is_err(), "{what}");
        assert!(restore_raw(&repo, "vm", "b1", "vda", &dir.path().join("r.raw")).is_err(), "{what}");
    }
    fs::write(&path, &good).unwrap();
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
}

#[test]
fn a_wrong_or_missing_key_is_one_error_naming_the_keys_for_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(1), key(2));
    {
        let repo = open(dir.path(), &[("vm", &k1)]);
        backup(&repo, "vm", "b1", &[("vda", &distinct(2, 7))]);
        backup(&repo, "plain", "b1", &[("vda", &distinct(2, 8))]);
    }
    let out = dir.path().join("r.raw");
    let check = |repo: &Repository, vm: &str, want: &dyn Fn(&Error) -> bool, words: &[String]| {
        let errors: Vec<(&str, Error)> = vec![
            ("info", repo.info(vm, "b1").unwrap_err()),
            ("list", repo.list(Some(vm)).unwrap_err()),
            ("manifest", repo.manifest(vm, "b1", "vda").unwrap_err()),
            ("get", repo.get(vm, "b1").unwrap_err()),
            ("verify", repo.verify(vm, "b1").unwrap_err()),
            ("open_disk", repo.open_disk(vm, "b1", "vda", 0).unwrap_err()),
            ("restore", restore_raw(repo, vm, "b1", "vda", &out).unwrap_err()),
        ];
        for (op, e) in errors {
            assert!(want(&e), "{op}: {e:?}");
            let text = e.to_string();
            for w in words {
                assert!(text.contains(w.as_str()), "{op}: {w:?} not in {text:?}");
            }
        }
    };
    // No key for the VM.
    let repo = open(dir.path(), &[]);
    check(&repo, "vm", &|e| matches!(e, Error::KeyMissing { .. }), &[k1.id().to_string(), "vm/b1".into()]);
    // Listing every VM leaves out what this host has no key for, and lists the rest.
    let all: Vec<_> = repo.list(None).unwrap().into_iter().map(|b| b.vm).collect();
    assert_eq!(all, ["plain"]);
    // Another key.
    let repo = open(dir.path(), &[("vm", &k2)]);
    check(
        &repo,
        "vm",
        &|e| matches!(e, Error::WrongKey { .. }),
        &[k1.id().to_string(), k2.id().to_string(), k2.origin().to_owned()],
    );
    assert!(repo.list(None).is_err(), "a configured VM's wrong key is not passed over");
    // A key given for a VM whose backup is not encrypted: a store could have forged it.
    let repo = open(dir.path(), &[("vm", &k1), ("plain", &k1)]);
    check(&repo, "plain", &|e| matches!(e, Error::NotEncrypted { .. }), &[k1.id().to_string()]);
    // The right key reads it all.
    let repo = open(dir.path(), &[("vm", &k1)]);
    assert!(repo.verify("vm", "b1").unwrap().is_ok());
    assert_eq!(repo.list(None).unwrap().len(), 2);
}

#[test]
fn a_new_key_starts_over_with_a_full_backup_and_an_incremental_refuses_a_parent_under_another() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(1), key(2));
    let data = distinct(3, 9);
    {
        let repo = open(dir.path(), &[("vm", &k1)]);
        backup(&repo, "vm", "b1", &[("vda", &data)]);
    }
    let repo = open(dir.path(), &[("vm", &k2)]);
    assert_eq!(repo.latest_manifest("vm", "vda").unwrap(), None, "no parent under the new key");
    let plain = open(dir.path(), &[]);
    assert_eq!(plain.latest_manifest("vm", "vda").unwrap(), None);
    let parent = open(dir.path(), &[("vm", &k1)]).latest_manifest("vm", "vda").unwrap().unwrap();
    let mut w = repo.begin_backup(spec("vm", "b2")).unwrap();
    let e = w.incremental("vda", &data, &parent, &[(0, 10)]).unwrap_err();
    assert!(
        matches!(e, Error::ParentMismatch { .. }) && e.to_string().contains("another")
            || e.to_string().contains(&k1.id().to_string()),
        "{e}"
    );
    w.full("vda", &data).unwrap();
    w.commit().unwrap();
    assert_eq!(repo.latest_manifest("vm", "vda").unwrap().unwrap().meta.backup, "b2");
}

#[test]
fn gc_without_any_key_keeps_every_chunk_of_encrypted_backups_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(1), key(2));
    let (a, b, c) = (distinct(4, 10), distinct(4, 11), distinct(4, 12));
    {
        let repo = open(dir.path(), &[("a", &k1), ("b", &k2)]);
        backup(&repo, "a", "b1", &[("vda", &a)]);
        backup(&repo, "b", "b1", &[("vda", &b), ("vdb", &c)]);
        backup(&repo, "b", "b2", &[("vda", &b)]);
        backup(&repo, "plain", "b1", &[("vda", &c)]);
        assert_eq!(names(&repo).len(), 16);
    }
    // A host with no key at all collects the shared store.
    let host = open(dir.path(), &[]);
    host.delete("b", "b1").unwrap();
    let report = host.gc().unwrap();
    assert_eq!((report.chunks_removed, report.chunks_kept), (4, 12), "only b1's vdb chunks are garbage");
    let repo = open(dir.path(), &[("a", &k1), ("b", &k2)]);
    for (vm, id) in [("a", "b1"), ("b", "b2"), ("plain", "b1")] {
        assert!(repo.verify(vm, id).unwrap().is_ok(), "{vm}/{id}");
    }
    // A damaged encrypted manifest stops a keyless collection, as a plain one does.
    let path = manifest_path(&repo, "a", "b1", "vda");
    let mut bad = fs::read(&path).unwrap();
    let at = bad.len() - 70;
    bad[at] ^= 1;
    fs::write(&path, &bad).unwrap();
    host.delete("b", "b2").unwrap();
    assert!(host.gc().is_err());
    assert_eq!(names(&repo).len(), 12, "nothing removed");
}

#[test]
fn the_fuzz_entry_points_open_what_they_seal_so_the_targets_reach_their_invariants() {
    let mut codec = crate::fuzzing::ChunkCodec::new(K64 as usize).unwrap();
    let data = mixed(K64 as usize, 13);
    let (name, file) = codec.seal(&data).unwrap();
    assert!(codec.open(&file, &name, data.len()).unwrap() == data);
    let mut other = name;
    other.0[31] ^= 1;
    assert!(codec.open(&file, &other, data.len()).is_err());
    let key_file = crate::fuzzing::fuzz_key_file().unwrap();
    let (info, key) = crate::fuzzing::open_key_file(&key_file);
    assert_eq!(info.unwrap().key, key.unwrap().id());
    let mut bad = key_file.clone();
    bad[60] ^= 1;
    assert!(crate::fuzzing::open_key_file(&bad).1.is_none());
}
