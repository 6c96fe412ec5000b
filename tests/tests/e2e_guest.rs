//! End to end: a real Linux guest (QEMU, TCG) mounts ext4 disks served by `livesnap-blk`, reads
//! what the host put there, writes files, syncs and powers off; then the host checks the images
//! with its own tools (`e2fsck`, `debugfs`, `qemu-img`), never on the guest's word alone.
//!
//! Needs `ci/install-deps.sh` (QEMU 7.2, e2fsprogs, ...), `ci/build-guest.sh` (the guest image)
//! and a built `livesnap-blk` (`cargo build -p livesnap-blk`, or set `LIVESNAP_BLK`).
//!
//! Each disk is made on the host as an ext4 file system of [`DISK_MIB`] seeded (`mkfs.ext4 -d`)
//! with `/host/seeded.bin` and `/host/delete-me.txt`; the qcow2 disk is that raw image converted
//! with `qemu-img convert`, which leaves the free space unallocated, so the guest's writes
//! allocate new clusters. The guest, per disk:
//! - prints the disk's serial and the MD5 of `/host/seeded.bin` (the read path; the host compares
//!   with the MD5 of what it wrote),
//! - writes `/guest/hello.txt` and `/guest/data.bin` (3 MiB of pseudo-random bytes the test
//!   puts in the guest's initramfs: generating them in the guest, e.g. with awk, takes minutes
//!   under TCG), deletes `/host/delete-me.txt`, syncs and unmounts,
//! - mounts again read-only with caches dropped and compares `data.bin` with a fresh copy.
//!
//! The host then stops the backend and checks each image: `qemu-img check` (qcow2), `e2fsck -fn`
//! clean, and the files' contents through `debugfs`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{Guest, GuestConfig, GuestFile, GuestRun};
use livesnap_tests::pattern;

const DISK_MIB: u64 = 64;
/// Size of the guest's `data.bin`: not a multiple of the block size, so its last block is
/// partial.
const DATA_LEN: usize = (3 << 20) + 1234;
const SEEDED_LEN: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Raw,
    Qcow2,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// One disk of the guest: `/dev/vd<letter>` served from `image` on `socket`.
#[derive(Debug)]
struct Disk {
    /// The guest's device name, also the backend's disk id (and so the virtio serial).
    dev: String,
    format: Format,
    image: PathBuf,
    socket: PathBuf,
    /// Seed of this disk's `data.bin`.
    seed: u64,
    /// Served with `cache=none` (`O_DIRECT`).
    cache_none: bool,
}

/// A host tool by name: from `PATH`, else from the sbin directories a non-root `PATH` may lack
/// (`mkfs.ext4`, `e2fsck` and `debugfs` live in /usr/sbin).
fn tool(name: &str) -> Command {
    let in_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    if !in_path {
        for d in ["/usr/sbin", "/sbin"] {
            let p = Path::new(d).join(name);
            if p.is_file() {
                return Command::new(p);
            }
        }
    }
    Command::new(name)
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (see ci/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What the host seeds each disk with.
fn seeded_bytes() -> Vec<u8> {
    pattern::random(0x9e37_79b9_7f4a_7c15, SEEDED_LEN)
}

/// What the guest writes to a disk's `/guest/data.bin`; the guest gets it in its initramfs.
fn guest_data(seed: u64) -> Vec<u8> {
    pattern::random(seed, DATA_LEN)
}

fn hello(dev: &str) -> String {
    format!("written by the guest on {dev}\n")
}

fn md5(data: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("data");
    std::fs::write(&f, data).expect("write md5 input");
    let out = run(tool("md5sum").arg(&f));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// Makes an ext4 image of `format` at `dir/<dev>.<format>`, seeded with the host files.
fn make_disk(dir: &Path, dev: &str, format: Format, seed: u64) -> Disk {
    let root = dir.join(format!("{dev}-seed"));
    std::fs::create_dir_all(root.join("host")).expect("mkdir seed");
    std::fs::write(root.join("host/seeded.bin"), seeded_bytes()).expect("write seeded.bin");
    std::fs::write(root.join("host/delete-me.txt"), "the guest deletes this\n").expect("write delete-me");
    let raw = dir.join(format!("{dev}.raw"));
    let f = std::fs::File::create(&raw).expect("create raw image");
    f.set_len(DISK_MIB << 20).expect("size raw image");
    run(tool("mkfs.ext4").args(["-F", "-q", "-d"]).arg(&root).arg(&raw));
    let image = match format {
        Format::Raw => raw,
        Format::Qcow2 => {
            let q = dir.join(format!("{dev}.qcow2"));
            run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&q));
            std::fs::remove_file(&raw).expect("remove raw image");
            q
        }
    };
    Disk { dev: dev.to_string(), format, image, socket: dir.join(format!("{dev}.sock")), seed, cache_none: false }
}

/// One livesnap-blk process serving all `disks`, as one VM's backend.
fn serve(disks: &[Disk]) -> Daemon {
    let mut args = vec!["--vm".to_string(), "e2e".to_string()];
    for d in disks {
        args.push("--disk".into());
        let cache = if d.cache_none { ",cache=none" } else { "" };
        args.push(format!("id={},image={},socket={}{cache}", d.dev, d.image.display(), d.socket.display()));
    }
    let sockets: Vec<&Path> = disks.iter().map(|d| d.socket.as_path()).collect();
    Daemon::livesnap_blk(&args, &sockets).expect("start livesnap-blk")
}

/// The guest's job for `disks`, in their order (vda, vdb, ...).
fn job(disks: &[Disk]) -> String {
    let mut s = String::from("set -eux\n");
    for d in disks {
        let dev = &d.dev;
        let hello = hello(dev);
        let hello = hello.trim_end();
        let _ = write!(
            s,
            r#"
echo "SERIAL-{dev}=$(cat /sys/block/{dev}/serial 2>/dev/null || true)"
mkdir -p /mnt/{dev}
mount -t ext4 /dev/{dev} /mnt/{dev}
echo "SEEDED-MD5-{dev}=$(md5sum </mnt/{dev}/host/seeded.bin | cut -d' ' -f1)"
mkdir -p /mnt/{dev}/guest
echo "{hello}" >/mnt/{dev}/guest/hello.txt
cp /data/{dev}.bin /mnt/{dev}/guest/data.bin
rm /mnt/{dev}/host/delete-me.txt
sync
umount /mnt/{dev}
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/{dev} /mnt/{dev}
cmp /data/{dev}.bin /mnt/{dev}/guest/data.bin
echo "READBACK-{dev}=ok"
umount /mnt/{dev}
"#
        );
    }
    s
}

fn boot(disks: &[Disk], dir: &Path) -> GuestRun {
    let run = Guest::boot(GuestConfig {
        disks: disks.iter().map(|d| d.socket.clone()).collect(),
        job_script: job(disks),
        files: disks
            .iter()
            .map(|d| GuestFile { path: format!("/data/{}.bin", d.dev), contents: guest_data(d.seed), mode: 0o644 })
            .collect(),
        timeout: Duration::from_secs(300),
        console_log: Some(dir.join("console.log")),
        ..GuestConfig::default()
    })
    .expect("guest boots and runs its job");
    eprintln!("guest ran {:?}; console in {}", run.elapsed, dir.join("console.log").display());
    run
}

/// `debugfs -R 'cat PATH'` of a raw ext4 image.
fn debugfs_cat(raw: &Path, path: &str) -> Vec<u8> {
    run(tool("debugfs").arg("-R").arg(format!("cat {path}")).arg(raw)).stdout
}

/// The host's checks of one disk after the guest ran and the backend stopped.
fn check_disk(d: &Disk, guest: &GuestRun, dir: &Path) {
    let ctx = format!("disk {} ({})", d.dev, d.format.name());
    assert_eq!(
        guest.value(&format!("SEEDED-MD5-{}", d.dev)),
        Some(md5(&seeded_bytes()).as_str()),
        "{ctx}: the guest read back what the host seeded"
    );
    assert_eq!(guest.value(&format!("READBACK-{}", d.dev)), Some("ok"), "{ctx}: the guest read back what it wrote");

    let raw = match d.format {
        Format::Raw => d.image.clone(),
        Format::Qcow2 => {
            run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(&d.image));
            let raw = dir.join(format!("{}-check.raw", d.dev));
            run(tool("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&d.image).arg(&raw));
            raw
        }
    };
    run(tool("e2fsck").arg("-fn").arg(&raw));
    assert_eq!(String::from_utf8_lossy(&debugfs_cat(&raw, "/guest/hello.txt")), hello(&d.dev), "{ctx}: hello.txt");
    let data = debugfs_cat(&raw, "/guest/data.bin");
    let want = guest_data(d.seed);
    assert!(
        data == want,
        "{ctx}: data.bin differs ({} bytes, want {}); first difference at byte {:?}",
        data.len(),
        want.len(),
        data.iter().zip(&want).position(|(a, b)| a != b)
    );
    assert!(debugfs_cat(&raw, "/host/seeded.bin") == seeded_bytes(), "{ctx}: seeded.bin changed");
    let ls = run(tool("debugfs").args(["-R", "ls -l /host"]).arg(&raw)).stdout;
    let ls = String::from_utf8_lossy(&ls);
    assert!(ls.contains("seeded.bin") && !ls.contains("delete-me.txt"), "{ctx}: /host is:\n{ls}");
}

/// Boots a guest on a raw and a qcow2 disk served by livesnap-blk, stops the backend with
/// `signal` once the guest is off, and checks both images.
fn guest_writes_reach_images(signal: i32) {
    let dir = tempfile::Builder::new().prefix("livesnap-e2e").tempdir().expect("tempdir");
    let disks = [
        make_disk(dir.path(), "vda", Format::Raw, 0x5eed_0001),
        make_disk(dir.path(), "vdb", Format::Qcow2, 0x5eed_0002),
    ];
    let daemon = serve(&disks);
    let guest = boot(&disks, dir.path());
    assert_eq!(guest.exit_code, 0, "the guest's job failed; console:\n{}", guest.console);
    let status = daemon.stop(signal, Duration::from_secs(30)).expect("backend stops");
    if signal == libc::SIGTERM {
        assert!(status.success(), "backend exited with {status} on SIGTERM");
    }
    for d in &disks {
        assert_eq!(
            guest.value(&format!("SERIAL-{}", d.dev)),
            Some(d.dev.as_str()),
            "the guest sees the disk id as serial"
        );
    }
    for d in &disks {
        check_disk(d, &guest, dir.path());
    }
}

#[test]
fn guest_files_on_raw_and_qcow2_reach_images_after_backend_stop() {
    guest_writes_reach_images(libc::SIGTERM);
}

/// What the guest flushed is on the images even when the backend is killed right after: the
/// backend must not keep flushed data or qcow2 metadata in its own memory.
/// The same guest on a raw disk served with `cache=none`: direct I/O through io_uring, the
/// guest's unaligned buffers bounced (livesnap-blk logs how many at each power of two).
#[test]
fn guest_files_on_a_raw_disk_with_cache_none_reach_the_image() {
    let dir = tempfile::Builder::new().prefix("livesnap-e2e").tempdir_in("/var/tmp").expect("tempdir");
    let mut disk = make_disk(dir.path(), "vda", Format::Raw, 0x5eed_0004);
    disk.cache_none = true;
    let disks = [disk];
    let daemon = serve(&disks);
    let guest = boot(&disks, dir.path());
    assert_eq!(guest.exit_code, 0, "the guest's job failed; console:\n{}", guest.console);
    let status = daemon.stop(libc::SIGTERM, Duration::from_secs(30)).expect("backend stops");
    assert!(status.success(), "backend exited with {status} on SIGTERM");
    check_disk(&disks[0], &guest, dir.path());
}

#[test]
fn guest_flushed_writes_survive_backend_kill() {
    guest_writes_reach_images(libc::SIGKILL);
}

/// QEMU killed while its guest writes: the backend keeps serving, and the next VM on the same
/// socket replays the ext4 journal and finds every file the guest had synced before the kill.
#[test]
fn qemu_killed_mid_write_leaves_the_disk_to_the_next_vm() {
    const FILE_LEN: u64 = 256 << 10;
    let dir = tempfile::Builder::new().prefix("livesnap-e2e-kill").tempdir().expect("tempdir");
    let disks = [make_disk(dir.path(), "vda", Format::Qcow2, 0x5eed_0003)];
    let mut daemon = serve(&disks);
    let sockets = vec![disks[0].socket.clone()];

    let mut writer = Guest::start(GuestConfig {
        disks: sockets.clone(),
        job_script: format!(
            r#"set -eu
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/run
i=0
while true; do
    dd if=/dev/zero of=/mnt/run/f$i bs={FILE_LEN} count=1 2>/dev/null
    sync
    echo "SYNCED=$i"
    i=$((i+1))
done
"#
        ),
        timeout: Duration::from_secs(300),
        console_log: Some(dir.path().join("writer.log")),
        ..GuestConfig::default()
    })
    .expect("writer guest starts");
    writer.wait_for_console("SYNCED=10", Duration::from_secs(240)).expect("the guest syncs files");
    std::thread::sleep(Duration::from_millis(500));
    let console = writer.console();
    drop(writer); // SIGKILL of QEMU, mid-write.
    let synced: u32 =
        console.lines().filter_map(|l| l.trim().strip_prefix("SYNCED=")?.parse().ok()).max().expect("a SYNCED line");
    assert!(daemon.try_wait().expect("daemon status").is_none(), "livesnap-blk died with its VM");

    let reader = Guest::boot(GuestConfig {
        disks: sockets,
        job_script: format!(
            r#"set -eu
mount -t ext4 /dev/vda /mnt
for i in $(seq 0 {synced}); do
    [ "$(stat -c %s /mnt/run/f$i)" = {FILE_LEN} ] || {{ echo "MISSING=$i"; exit 1; }}
done
echo "ALL-SYNCED-PRESENT=yes"
umount /mnt
"#
        ),
        timeout: Duration::from_secs(300),
        console_log: Some(dir.path().join("reader.log")),
        ..GuestConfig::default()
    })
    .expect("reader guest boots");
    assert_eq!(reader.exit_code, 0, "files synced before the kill are missing; console:\n{}", reader.console);
    assert_eq!(reader.value("ALL-SYNCED-PRESENT"), Some("yes"));

    let status = daemon.stop(libc::SIGTERM, Duration::from_secs(30)).expect("backend stops");
    assert!(status.success(), "backend exited with {status}");
    run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(&disks[0].image));
    let raw = dir.path().join("after-kill.raw");
    run(tool("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&disks[0].image).arg(&raw));
    run(tool("e2fsck").arg("-fn").arg(&raw));
    eprintln!("{} files synced before the kill, all present after it", synced + 1);
}
