//! File-level restore through real processes: a disk image with a GPT, an empty first
//! partition and ext4 (made by `mkfs.ext4 -d` from a directory) in the second, backed up into a
//! repository (plain, and encrypted under a VM's key), then livesnapd serving it and `snapctl
//! backup files ... ls | cat | get` run against it. The disk is mostly holes around ~100 MiB of
//! data; getting a 1 MiB file out of it must fetch well under 1 % of it.
//!
//! Needs `cargo build -p livesnap-control` first; `mkfs.ext4` (e2fsprogs) and `sfdisk` (fdisk).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use livesnap_repo::{BackupSpec, Consistency, CreateOptions, FileSource, Location, Repository};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::programs;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The disk: "multi-GiB", mostly holes.
const DISK: u64 = 8 * GIB;
/// Where the ext4 partition (2) starts: sector 10240.
const PART: u64 = 10240 * 512;
const BACKUP: &str = "b1";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut v);
    v
}

/// The tenant's tree: the 1 MiB file among ~96 MiB of other files, symlinks absolute and
/// relative, odd modes and times, a deep directory.
fn tree(dir: &Path) {
    for d in 0..8 {
        let sub = dir.join(format!("other/d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..12 {
            std::fs::write(sub.join(format!("f{f}")), random(MIB as usize, d * 100 + f)).unwrap();
        }
    }
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("deep/a/b/c/d/e")).unwrap();
    std::fs::write(tree.join("deep/a/b/c/d/e/leaf"), b"leaf\n").unwrap();
    std::fs::write(tree.join("big.bin"), random(MIB as usize, 7)).unwrap();
    std::fs::write(tree.join("hostname"), b"web01\n").unwrap();
    std::fs::write(tree.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(tree.join("script.sh"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::fs::set_permissions(tree.join("hostname"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(tree.join("deep"), std::fs::Permissions::from_mode(0o710)).unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("evil")).unwrap();
    std::os::unix::fs::symlink("../../../../../../tmp/outside", tree.join("deep/up")).unwrap();
    std::os::unix::fs::symlink("hostname", tree.join("link")).unwrap();
    run(Command::new("touch").args(["-d", "2001-02-03 04:05:06"]).arg(tree.join("big.bin")));
    run(Command::new("touch").args(["-h", "-d", "2003-04-05 06:07:08"]).arg(tree.join("evil")));
}

/// The disk image: GPT, partition 1 (4 MiB, zeros), partition 2 ext4 of the tree.
fn image(dir: &Path, src: &Path) -> PathBuf {
    let img = dir.join("vda.raw");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let mut c = Command::new("sfdisk").arg("-q").arg(&img).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(
        &mut c.stdin.take().unwrap(),
        b"label: gpt\nstart=2048, size=8192, type=L\nstart=10240, type=L\n",
    )
    .unwrap();
    assert!(c.wait().unwrap().success());
    let fs_kib = (DISK - PART - MIB) / 1024;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("offset={PART}"))
        .arg("-d")
        .arg(src)
        .arg(&img)
        .arg(format!("{fs_kib}k")));
    img
}

/// Runs snapctl against `socket`: exit code, stdout, stderr.
fn snapctl(socket: &Path, args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new(programs::snapctl().unwrap())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("snapctl {args:?}: {:?}\n{err}", out.status);
    (out.status.code().unwrap_or(-1), out.stdout, err)
}

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(out)))
}

/// Compares what `get` wrote under `got` with the source under `want`: kinds, contents, modes,
/// mtimes (seconds: mkfs.ext4 -d keeps no more) and symlink targets, recursively.
fn same_tree(want: &Path, got: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(want), names(got), "{}", got.display());
    for name in names(want) {
        let (w, g) = (want.join(&name), got.join(&name));
        let (mw, mg) = (w.symlink_metadata().unwrap(), g.symlink_metadata().unwrap());
        assert_eq!(mw.file_type(), mg.file_type(), "{}", g.display());
        assert_eq!(mw.mtime(), mg.mtime(), "mtime of {}", g.display());
        if mw.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&w).unwrap(), std::fs::read_link(&g).unwrap(), "{}", g.display());
            continue;
        }
        assert_eq!(mw.mode() & 0o7777, mg.mode() & 0o7777, "mode of {}", g.display());
        if mw.is_dir() {
            same_tree(&w, &g);
        } else {
            assert!(std::fs::read(&w).unwrap() == std::fs::read(&g).unwrap(), "content of {}", g.display());
        }
    }
}

#[test]
fn files_come_out_of_a_backup_fetching_only_what_they_need() {
    let dir = tempfile::Builder::new().prefix("livesnap-files").tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    tree(&src);
    let img = image(d, &src);

    // The keys: VM `sealed` has its backups encrypted.
    let k = |n: &str| d.join(n).display().to_string();
    let livesnapd = |args: &[&str]| run(Command::new(programs::livesnapd().unwrap()).args(args));
    livesnapd(&["key", "create-kek", &k("kek")]);
    livesnapd(&["key", "create", "--kek", &k("kek"), &k("sealed.key")]);

    // The backups, written straight into the repository from the image (no guest needed).
    {
        let mut repo = Repository::open_or_create(&Location::Dir(d.join("repo")), CreateOptions::default()).unwrap();
        let kek = livesnap_repo::Kek::load(&d.join("kek")).unwrap();
        let key = livesnap_repo::crypto::load_key_file(&d.join("sealed.key"), &kek).unwrap();
        repo.set_key("sealed", Some(Arc::new(key)));
        let source = FileSource::open(&img).unwrap();
        for vm in ["plain", "sealed"] {
            let spec = BackupSpec {
                vm: vm.into(),
                id: BACKUP.into(),
                consistency: Consistency::Crash,
                freeze_window: None,
                created_unix_us: None,
            };
            let mut w = repo.begin_backup(spec).unwrap();
            w.full("vda", &source).unwrap();
            w.commit().unwrap();
        }
    }
    std::fs::remove_file(&img).unwrap();

    let socket = d.join("livesnapd.sock");
    let config = d.join("livesnapd.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"{r}\"\nsocket = \"{s}\"\nstate = \"{st}\"\nkek = \"{kek}\"\n\
             [[vm]]\nname = \"plain\"\ncontrol = \"{r}/none.sock\"\n\
             [[vm]]\nname = \"sealed\"\ncontrol = \"{r}/none2.sock\"\nkey = \"{key}\"\n",
            r = d.join("repo").display(),
            s = socket.display(),
            st = d.join("livesnapd.redb").display(),
            kek = k("kek"),
            key = k("sealed.key"),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("livesnapd.log")).unwrap();
    let mut cmd = Command::new(programs::livesnapd().unwrap());
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
    let _daemon = Daemon::spawn("livesnapd", cmd, &[&socket]).unwrap();

    for vm in ["plain", "sealed"] {
        // One 1 MiB file: only the chunks it needs (partition table, superblock and group
        // descriptors, the journal's superblock, inode table, directories, the file's data).
        let out = d.join(format!("out-{vm}"));
        std::fs::create_dir(&out).unwrap();
        let (code, stdout, _) = snapctl(
            &socket,
            &[
                "--json",
                "backup",
                "files",
                vm,
                BACKUP,
                "--disk",
                "vda",
                "get",
                "/tree/big.bin",
                "--to",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0);
        let j = json(&stdout);
        let done = &j["done"];
        let (fetched, stored, size) = (
            done["disk_bytes_fetched"].as_u64().unwrap(),
            done["bytes_fetched"].as_u64().unwrap(),
            done["disk_size"].as_u64().unwrap(),
        );
        assert_eq!((size, done["partition"].as_u64().unwrap()), (DISK, 2));
        let pct = fetched as f64 * 100.0 / size as f64;
        eprintln!(
            "{vm}: get of a 1 MiB file fetched {} chunks, {fetched} bytes of the {size}-byte disk ({pct:.3} %), \
             {stored} bytes from the store",
            done["chunks_fetched"]
        );
        assert!(pct < 0.5, "{vm}: {fetched} of {size} bytes fetched ({pct:.3} %)");
        assert!(std::fs::read(out.join("big.bin")).unwrap() == std::fs::read(src.join("tree/big.bin")).unwrap());
        let m = out.join("big.bin").metadata().unwrap();
        assert_eq!(m.mtime(), src.join("tree/big.bin").metadata().unwrap().mtime());
    }

    // The whole tree (the partition chosen by itself: the only ext4 one), compared with its
    // source; the symlinks come out as symlinks, never followed.
    let out = d.join("out-tree");
    std::fs::create_dir(&out).unwrap();
    let (code, stdout, _) = snapctl(
        &socket,
        &["backup", "files", "plain", BACKUP, "--disk", "vda", "get", "/tree", "--to", out.to_str().unwrap()],
    );
    assert_eq!(code, 0);
    let text = String::from_utf8_lossy(&stdout);
    assert!(text.contains("got /tree into"), "{text}");
    same_tree(&src.join("tree"), &out.join("tree"));
    assert!(!Path::new("/tmp/outside").exists());
    // Nothing is overwritten: the same get again is refused at the first existing name.
    let (code, _, err) = snapctl(
        &socket,
        &["backup", "files", "plain", BACKUP, "--disk", "vda", "get", "/tree", "--to", out.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");

    // ls and cat.
    let (code, stdout, _) = snapctl(&socket, &["backup", "files", "plain", BACKUP, "--disk", "vda", "ls", "/tree"]);
    assert_eq!(code, 0);
    let text = String::from_utf8_lossy(&stdout);
    assert!(text.contains("evil -> /etc") && text.contains("-rwxr-x--x") && text.contains("1048576"), "{text}");
    let (code, stdout, _) = snapctl(
        &socket,
        &["backup", "files", "sealed", BACKUP, "--disk", "vda", "--partition", "2", "cat", "/tree/link"],
    );
    assert_eq!((code, stdout.as_slice()), (0, &b"web01\n"[..]));

    // What cannot be read says what it is, with the exit codes of the API's codes.
    let (code, _, err) =
        snapctl(&socket, &["backup", "files", "plain", BACKUP, "--disk", "vda", "--partition", "1", "ls", "/"]);
    assert_eq!(code, 5);
    assert!(err.contains("Partition 1 holds nothing (zeros), not ext4"), "{err}");
    let (code, _, err) =
        snapctl(&socket, &["backup", "files", "plain", BACKUP, "--disk", "vda", "--partition", "3", "ls", "/"]);
    assert_eq!(code, 4);
    assert!(err.contains("has no partition 3"), "{err}");
    let (code, _, _) = snapctl(&socket, &["backup", "files", "plain", BACKUP, "--disk", "vda", "cat", "/no/such"]);
    assert_eq!(code, 4);
    let (code, _, err) = snapctl(&socket, &["backup", "files", "plain", BACKUP, "--disk", "vda", "cat", "/tree"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a regular file"), "{err}");
    let (code, _, _) = snapctl(&socket, &["backup", "files", "plain", "nope", "--disk", "vda", "ls", "/"]);
    assert_eq!(code, 4);
    let log = std::fs::read_to_string(d.join("livesnapd.log")).unwrap();
    assert!(log.contains("files read from a backup"), "{log}");
}
