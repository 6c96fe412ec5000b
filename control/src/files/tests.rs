//! The volume on real images: ext4 made by `mkfs.ext4 -d` from a directory, on the whole disk
//! or in a GPT or MBR partition written by `sfdisk`; damaged images read to an error, never a
//! panic.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::extract::Extractor;
use super::*;

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A tree with what a tenant's filesystem may hold: files (one sparse), a deep directory,
/// symlinks absolute and relative with `..`, a fifo, a hard link, odd modes and times.
pub(crate) fn tree(dir: &Path) {
    let w = |p: &str, d: &[u8]| std::fs::write(dir.join(p), d).unwrap();
    std::fs::create_dir_all(dir.join("etc/deep/a/b/c")).unwrap();
    w("etc/hostname", b"web01\n");
    w("etc/deep/a/b/c/leaf", b"leaf");
    w("data.bin", &(0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
    let f = std::fs::File::create(dir.join("sparse")).unwrap();
    f.set_len(40 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", 40 * MIB - 4).unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("evil")).unwrap();
    std::os::unix::fs::symlink("../../../../outside", dir.join("etc/up")).unwrap();
    std::fs::hard_link(dir.join("etc/hostname"), dir.join("hardlink")).unwrap();
    run(Command::new("mkfifo").arg(dir.join("fifo")));
    std::fs::set_permissions(dir.join("etc/hostname"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(dir.join("etc/deep"), std::fs::Permissions::from_mode(0o750)).unwrap();
    run(Command::new("touch").args(["-h", "-d", "2001-02-03 04:05:06.5"]).arg(dir.join("data.bin")));
    run(Command::new("touch").args(["-h", "-d", "2002-02-03 04:05:06"]).arg(dir.join("evil")));
}

/// An image of `size` bytes: `table` "gpt" or "dos" with a small first partition (zeros) and
/// the ext4 in the second, from sector 10240; "none": ext4 on the whole disk.
pub(crate) fn image(src: &Path, table: &str, size: u64) -> Vec<u8> {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let (offset, fs_size) = if table == "none" {
        (0, size)
    } else {
        let script = format!("label: {table}\nstart=2048, size=8192, type=83\nstart=10240, type=83\n");
        let script = if table == "gpt" { script.replace("type=83", "type=L") } else { script };
        let mut c = Command::new("sfdisk").arg("-q").arg(&img).stdin(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
        // The last 1 MiB stays free for GPT's backup table.
        (10240 * 512, size - 10240 * 512 - MIB)
    };
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("offset={offset}"))
        .arg("-d")
        .arg(src)
        .arg(&img)
        .arg(format!("{}k", fs_size / 1024)));
    std::fs::read(&img).unwrap()
}

fn vol(img: Vec<u8>, partition: Option<u32>) -> Result<Volume, Error> {
    Volume::open(Arc::new(img), partition)
}

fn chain(e: &dyn std::error::Error) -> String {
    livesnap_proto::error::chain(e)
}

#[test]
fn gpt_mbr_and_bare_disks_list_and_read_the_same_tree() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    for table in ["gpt", "dos", "none"] {
        let v = vol(image(src.path(), table, 96 * MIB), None).unwrap();
        assert_eq!(v.region.number, if table == "none" { None } else { Some(2) }, "{table}");
        let names: Vec<String> = v.list("/").unwrap().into_iter().map(|i| String::from_utf8(i.name).unwrap()).collect();
        assert_eq!(names, ["data.bin", "etc", "evil", "fifo", "hardlink", "lost+found", "sparse"], "{table}");
        let mut got = Vec::new();
        assert_eq!(
            v.read("/etc/hostname", |_, d| {
                got.extend_from_slice(d);
                Ok(())
            })
            .unwrap(),
            6
        );
        assert_eq!(got, b"web01\n");
        let evil = v.stat("/evil").unwrap();
        assert_eq!((evil.kind, evil.target.as_slice()), (Kind::Symlink, &b"/etc"[..]));
        // `cat` follows symlinks inside the image only: /evil/hostname is the image's.
        let mut got = Vec::new();
        v.read("/evil/hostname", |_, d| {
            got.extend_from_slice(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, b"web01\n");
    }
}

#[test]
fn partitions_that_hold_no_ext4_say_what_they_hold() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let mut img = image(src.path(), "gpt", 96 * MIB);
    let e = vol(img.clone(), Some(1)).unwrap_err();
    assert_eq!(e.to_string(), "Partition 1 holds nothing (zeros), not ext4");
    let e = vol(img.clone(), Some(7)).unwrap_err();
    assert!(matches!(e, Error::NoSuchPartition { partition: 7, .. }), "{e}");
    assert!(e.to_string().contains("2 (linux, "), "{e}");
    img[2048 * 512..2048 * 512 + 4].copy_from_slice(b"XFSB");
    assert_eq!(vol(img.clone(), Some(1)).unwrap_err().to_string(), "Partition 1 holds xfs, not ext4");
    // Partition 2 made an LVM physical volume: no ext4 left, so no default either.
    let p2 = 10240 * 512;
    img[p2 + 1080..p2 + 1082].fill(0);
    img[p2 + 512 + 24..p2 + 512 + 32].copy_from_slice(b"LVM2 001");
    assert_eq!(
        vol(img.clone(), Some(2)).unwrap_err().to_string(),
        "Partition 2 holds an LVM physical volume, not ext4"
    );
    let e = vol(img, None).unwrap_err();
    assert!(matches!(e, Error::ChoosePartition { count: 2, .. }), "{e}");
    // Random bytes: nothing known.
    let mut rnd = vec![0u8; 8 << 20];
    rnd.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]);
    let e = vol(rnd, None).unwrap_err();
    assert_eq!(e.to_string(), "The disk holds no filesystem livesnap knows, not ext4");
}

#[test]
fn a_table_pointing_past_the_disks_end_is_refused() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let mut img = image(src.path(), "dos", 96 * MIB);
    // Partition 2's length made larger than the disk.
    img[446 + 16 + 12..446 + 16 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = vol(img, Some(2)).unwrap_err();
    assert!(chain(&e).contains("Partition 2 (sectors 10240 to"), "{}", chain(&e));
}

#[test]
fn a_tree_comes_out_as_it_went_in() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let v = vol(image(src.path(), "gpt", 96 * MIB), None).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut x = Extractor::new(out.path()).unwrap();
    v.walk("/", |item| x.item(item).map_err(|e| Error::BadPath(e.to_string(), "extract"))).unwrap();
    let r = x.finish().unwrap();
    assert_eq!(r.warnings.len(), 1, "the fifo is skipped: {:?}", r.warnings);
    assert!(!out.path().join("fifo").exists());
    for p in ["etc/hostname", "etc/deep/a/b/c/leaf", "data.bin", "sparse", "hardlink"] {
        let (a, b) = (src.path().join(p), out.path().join(p));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{p}");
        let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
        assert_eq!(ma.mode(), mb.mode(), "{p}");
        // mke2fs -d keeps whole seconds only (the extractor's own test checks nanoseconds).
        assert_eq!(ma.mtime(), mb.mtime(), "{p}");
    }
    // Holes stay holes.
    assert!(out.path().join("sparse").metadata().unwrap().blocks() < 1024);
    for (p, target) in [("evil", "/etc"), ("etc/up", "../../../../outside")] {
        assert_eq!(std::fs::read_link(out.path().join(p)).unwrap(), Path::new(target));
    }
    let m = out.path().join("evil").symlink_metadata().unwrap();
    assert_eq!(m.mtime(), src.path().join("evil").symlink_metadata().unwrap().mtime());
    let d = out.path().join("etc/deep").metadata().unwrap();
    assert_eq!(d.mode() & 0o7777, 0o750);
    // A single file under its own name.
    let one = tempfile::tempdir().unwrap();
    let mut x = Extractor::new(one.path()).unwrap();
    v.walk("/etc/hostname", |item| x.item(item).map_err(|e| Error::BadPath(e.to_string(), "extract"))).unwrap();
    x.finish().unwrap();
    assert_eq!(std::fs::read(one.path().join("hostname")).unwrap(), b"web01\n");
}

#[test]
fn damaged_images_read_to_errors_never_panics() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let clean = image(src.path(), "none", 16 * MIB);
    // The superblock's magic gone, its checksum broken.
    let mut img = clean.clone();
    img[1024 + 0x60] ^= 0xFF;
    let e = vol(img, None).unwrap_err();
    assert!(matches!(e, Error::Ext4 { .. }), "{e}");
    assert_eq!(e.to_string(), "The disk holds an ext4 filesystem that cannot be read");
    // Bytes flipped across the metadata (first 2 MiB): whatever opens is walked to its end or
    // to an error.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut opened, mut walked) = (0, 0);
    for _ in 0..60 {
        let mut img = clean.clone();
        for _ in 0..8 {
            let at = (next() % (2 * MIB)) as usize;
            img[at] ^= (next() as u8) | 1;
        }
        let Ok(v) = vol(img, None) else { continue };
        opened += 1;
        let mut n = 0u64;
        if v.walk("/", |_| {
            n += 1;
            Ok(())
        })
        .is_ok()
        {
            walked += 1;
        }
    }
    assert!(opened > 0, "no damaged image opened: the walk was never tried");
    eprintln!("{opened} of 60 damaged images opened, {walked} walked to the end");
}

#[test]
fn the_fuzz_seeds_are_images_that_open_and_walk() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/files_volume");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        let (&sel, img) = bytes.split_last().unwrap();
        let partition = (sel % 4 != 0).then_some(u32::from(sel % 4));
        let v = vol(img.to_vec(), partition).unwrap();
        let mut names = Vec::new();
        v.walk("/", |item| {
            if let Item::Entry { path, .. } = item {
                names.push(path.last().cloned().unwrap_or_default());
            }
            Ok(())
        })
        .unwrap();
        assert!(names.iter().any(|n| n == b"hostname"), "{names:?}");
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn a_tree_deeper_than_the_bound_is_refused_and_one_within_it_walks() {
    let src = tempfile::tempdir().unwrap();
    let mut deep = src.path().join("ok");
    for _ in 0..MAX_DEPTH - 1 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    let mut deeper = src.path().join("deep");
    for _ in 0..MAX_DEPTH + 1 {
        deeper.push("d");
    }
    std::fs::create_dir_all(&deeper).unwrap();
    let v = vol(image(src.path(), "none", 16 * MIB), None).unwrap();
    let mut n = 0;
    v.walk("/ok", |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, MAX_DEPTH);
    let e = v.walk("/deep", |_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::TooDeep { .. }), "{e}");
}
