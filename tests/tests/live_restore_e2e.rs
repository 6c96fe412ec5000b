//! Live restore end to end (issue 12, point 3), real processes throughout:
//!
//! 1. A QEMU guest on livesnap-blk appends fsync'd records ([`fsync_log`]) to its ext4 disk, a
//!    256 MiB image that also holds 160 MiB of incompressible data (so that the background copy
//!    has something to copy); `snapctl vm snapshot` backs it up through livesnapd while it
//!    writes (crash-consistent: no agent). The guest stops and powers off.
//! 2. `snapctl backup restore web01 ID --disk vda --to TARGET --live` creates the target and its
//!    restore map; a new livesnap-blk serves the target, and a new guest boots from it at once:
//!    it reads back every record (the journal replay of a crash-consistent image included),
//!    writes a new file into space not restored yet, then appends new records, while livesnapd copies the rest in the background, slowed down
//!    (`restore_bytes_per_sec`) so that the copy is still running.
//! 3. Mid-copy, livesnap-blk is killed with SIGKILL and started again with the same arguments;
//!    QEMU reconnects and the guest goes on writing.
//! 4. The restore completes (snapctl exits 0, the map is gone); the guest stops and unmounts;
//!    the image is `e2fsck`-clean and holds the backup's records and big file, unchanged, the
//!    new file and the new records.
//!
//! Needs `ci/install-deps.sh`, `ci/build-guest.sh` and `cargo build --workspace`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livesnap_tests::daemon::Daemon;
use livesnap_tests::fsync_log::{self, sbin};
use livesnap_tests::guest::{last_report, serial_args, Guest, GuestConfig};
use livesnap_tests::programs;
use serde_json::Value;

const DISK_MIB: u64 = 256;
const FILL_MIB: u64 = 160;
const VM: &str = "web01";
/// The background copy's pace: 160 MiB take ~40 s, long enough to kill the backend mid-copy.
const FEED_BYTES_PER_SEC: u64 = 4 << 20;
/// Hang guard only: TCG is slow and CI machines are busy. Nothing is asserted on a duration.
const WAIT: Duration = Duration::from_secs(300);

/// The first guest: appends records until the host says stop on the second serial port.
const WRITER: &str = r#"set -e
mkdir -p /mnt/data
mount -t ext4 /dev/vda /mnt/data
( while read -r cmd; do
    [ "$cmd" = stop ] && touch /tmp/stop
  done ) </dev/ttyS1 &
set +e
LOG=/mnt/data/records.log
echo WORKLOAD-READY
i=0
while [ ! -e /tmp/stop ]; do
  i=$((i + 1))
@APPEND@done
echo "LAST=$i"
umount /mnt/data
echo WORKLOAD-UNMOUNTED
"#;

/// The guest booted from the live restore: reads every record back (their checksum), writes a
/// new 8 MiB file (fsync'd: into free space, chunks not restored yet), then appends new records
/// after the last one until told to stop. It leaves the big file alone, so
/// that most of it is still to copy when the backend is killed.
const RESTORED: &str = r#"set -e
mkdir -p /mnt/data
mount -t ext4 /dev/vda /mnt/data
( while read -r cmd; do
    [ "$cmd" = stop ] && touch /tmp/stop
  done ) </dev/ttyS1 &
set +e
LOG=/mnt/data/records.log
i=$(wc -l <"$LOG")
echo "READBACK=$i"
echo "READBACK-SUM=$(md5sum <"$LOG" | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/data/new bs=1M count=8 conv=fsync 2>/dev/null || echo NEW-FAILED
echo "NEW-SUM=$(md5sum </mnt/data/new | cut -d' ' -f1)"
echo WORKLOAD-READY
while [ ! -e /tmp/stop ]; do
  i=$((i + 1))
@APPEND@done
echo "LAST=$i"
umount /mnt/data
echo WORKLOAD-UNMOUNTED
"#;

fn run(cmd: &mut Command) -> (i32, String, String) {
    fsync_log::run(cmd, WAIT).unwrap()
}

/// `snapctl --socket SOCKET --json ARGS`, which must succeed: the JSON values it printed.
fn snapctl(socket: &Path, args: &[&str]) -> Vec<Value> {
    let (code, out, err) =
        run(Command::new(programs::snapctl().unwrap()).arg("--socket").arg(socket).arg("--json").args(args));
    assert_eq!(code, 0, "snapctl {args:?} exited {code}: {err}{out}");
    serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("snapctl {args:?}: not JSON ({e}): {out}")))
        .collect()
}

/// Connects to the guest's second serial port, which QEMU listens on.
fn connect(path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < WAIT, "cannot connect to the guest's serial port: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Waits until the console satisfies `f`; its text.
fn wait_console(guest: &Guest, log: &Path, what: &str, f: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = guest.console();
        if f(&text) {
            return text;
        }
        assert!(
            start.elapsed() < WAIT && !text.contains("LIVESNAP-JOB-EXIT="),
            "the guest did not get to {what}; console in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The text after the last `key` on its line.
fn value_after(text: &str, key: &str) -> Option<String> {
    let at = text.rfind(key)? + key.len();
    Some(text[at..].lines().next().unwrap_or("").trim().to_owned())
}

/// livesnap-blk serving `image` as VM web01's disk vda.
fn blk(dir: &Path, image: &Path, state: &str, log: &str) -> Daemon {
    let (disk, control) = (dir.join("vda.sock"), dir.join("control.sock"));
    let mut cmd = Command::new(programs::livesnap_blk().unwrap());
    cmd.args(["--vm", VM, "--disk"])
        .arg(format!("id=vda,image={},socket={}", image.display(), disk.display()))
        .arg("--state-dir")
        .arg(dir.join(state))
        .arg("--control")
        .arg(&control)
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join(log)).unwrap());
    Daemon::spawn("livesnap-blk", cmd, &[&disk, &control]).unwrap()
}

fn guest(dir: &Path, job: &str, console: &str) -> Guest {
    Guest::start(GuestConfig {
        disks: vec![dir.join("vda.sock")],
        job_script: job.replace("@APPEND@", fsync_log::APPEND),
        extra_args: serial_args(&dir.join("serial1.sock")),
        console_log: Some(dir.join(console)),
        timeout: Duration::from_secs(900),
        ..GuestConfig::default()
    })
    .unwrap()
}

/// Tells the guest to stop, waits for its unmount and its exit; the last record it wrote.
fn stop(mut guest: Guest, serial: &mut UnixStream, log: &Path) -> u64 {
    serial.write_all(b"stop\n").unwrap();
    let text = wait_console(&guest, log, "its unmount", |t| t.contains("WORKLOAD-UNMOUNTED"));
    let last = last_report(&text, "LAST=");
    guest.wait_for_console("LIVESNAP-JOB-EXIT=", WAIT).unwrap();
    let run = guest.wait().unwrap();
    assert_eq!(run.exit_code, 0, "the guest's job failed; console in {}", log.display());
    last
}

/// `debugfs -R 'cat PATH' IMAGE`.
fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let out = sbin("debugfs").args(["-R", &format!("cat {path}")]).arg(image).stderr(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "debugfs cat {path} on {}", image.display());
    out.stdout
}

fn md5(data: &[u8]) -> String {
    let mut child = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    fsync_log::wait_child(child, WAIT, what).unwrap()
}

#[test]
fn a_guest_boots_from_a_live_restore_survives_a_backend_kill_and_ends_with_every_record() {
    let dir = tempfile::Builder::new().prefix("livesnap-live-restore").tempdir().unwrap();
    let d = dir.path();
    eprintln!("files in {} (console*.log, livesnapd.log, livesnap-blk.log)", d.display());

    // The source disk: ext4 with 160 MiB of incompressible data in /fill.
    let content = d.join("content");
    std::fs::create_dir(&content).unwrap();
    let (code, _, err) = run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", &format!("count={FILL_MIB}")])
        .arg(format!("of={}", content.join("fill").display())));
    assert_eq!(code, 0, "dd: {err}");
    let image = d.join("web01-vda.raw");
    std::fs::File::create(&image).unwrap().set_len(DISK_MIB << 20).unwrap();
    let (code, _, err) =
        run(sbin("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-L", VM, "-d"]).arg(&content).arg(&image));
    assert_eq!(code, 0, "mkfs.ext4: {err}");
    std::fs::remove_dir_all(&content).unwrap();

    let socket = d.join("livesnapd.sock");
    let config = d.join("livesnapd.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"{r}/repo\"\nsocket = \"{}\"\nstate = \"{r}/livesnapd.redb\"\nrestore_dir = \"{r}\"\n\
             [defaults]\nrestore_bytes_per_sec = {FEED_BYTES_PER_SEC}\n[[vm]]\nname = \"{VM}\"\ncontrol = \"{}\"\n",
            socket.display(),
            d.join("control.sock").display(),
            r = d.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("livesnapd.log")).unwrap();
    let mut cmd = Command::new(programs::livesnapd().unwrap());
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
    let _livesnapd = Daemon::spawn("livesnapd", cmd, &[&socket]).unwrap();

    // 1. The backup of a writing guest.
    let source = blk(d, &image, "blk-state", "livesnap-blk.log");
    let console1 = d.join("console1.log");
    let g = guest(d, WRITER, "console1.log");
    let mut serial = connect(&d.join("serial1.sock"));
    let text = wait_console(&g, &console1, "record 5", |t| last_report(t, "FSYNCED=") >= 5);
    let before = last_report(&text, "FSYNCED=");
    let events = snapctl(&socket, &["vm", "snapshot", VM]);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "the last event is not done: {events:?}");
    let id = done["backup"]["id"].as_str().unwrap().to_owned();
    let after = last_report(&g.console(), "FSYNCED=");
    let last1 = stop(g, &mut serial, &console1);
    drop(source);
    eprintln!("records fsync'd: {before} when the snapshot was asked for, {after} when it was done, {last1} in all");

    // What the backup holds, from a plain restore (after the journal replay a crash-consistent
    // image needs): the records the restored guest must read back.
    let plain = d.join("plain.raw");
    snapctl(&socket, &["backup", "restore", VM, &id, "--disk", "vda", "--to", plain.to_str().unwrap()]);
    let (code, out, err) = run(sbin("e2fsck").arg("-fy").arg(&plain));
    assert!(code == 0 || code == 1, "e2fsck -fy on the plain restore exited {code}:\n{out}{err}");
    let backup_records = debugfs_cat(&plain, "/records.log");
    let n = fsync_log::check_records(&String::from_utf8_lossy(&backup_records)).unwrap();
    assert!(n >= before && n <= after + 1, "the backup holds {n} records ({before} before, {after} after)");
    let fill_sum = md5(&debugfs_cat(&plain, "/fill"));
    std::fs::remove_file(&plain).unwrap();

    // 2. The live restore: the target and its map, then the backend and the guest at once.
    let target = d.join("web01-vda-restored.raw");
    let map = PathBuf::from(format!("{}.restore", target.display()));
    let mut restore = Command::new(programs::snapctl().unwrap())
        .arg("--socket")
        .arg(&socket)
        .args(["backup", "restore", VM, &id, "--disk", "vda", "--to"])
        .arg(&target)
        .arg("--live")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(d.join("snapctl-live.log")).unwrap())
        .stderr(std::fs::File::create(d.join("snapctl-live.err")).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !map.exists() {
        assert!(start.elapsed() < WAIT, "snapctl did not create the restore map {}", map.display());
        assert!(restore.try_wait().unwrap().is_none(), "snapctl --live exited before the map existed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let backend = blk(d, &target, "blk-state-restored", "livesnap-blk.log");
    let console2 = d.join("console2.log");
    let g = guest(d, RESTORED, "console2.log");
    let mut serial = connect(&d.join("serial1.sock"));

    // The guest reads every record back while most of the disk is not copied yet.
    let text = wait_console(&g, &console2, "its read-back", |t| t.contains("WORKLOAD-READY"));
    assert_eq!(last_report(&text, "READBACK="), n, "records the restored guest read back");
    assert_eq!(value_after(&text, "READBACK-SUM=").unwrap(), md5(&backup_records), "the records' checksum");
    let new_sum = value_after(&text, "NEW-SUM=").unwrap();
    assert!(!text.contains("NEW-FAILED"), "the guest could not write its new file");
    let info = livesnap_blk::restore::read_map(&map).unwrap();
    eprintln!("at the guest's read-back: {} of {} chunks restored", info.chunks_done, info.chunks_total);

    // 3. New records, then the backend killed mid-copy and started again.
    wait_console(&g, &console2, "new records", |t| last_report(t, "FSYNCED=") >= n + 3);
    let info = livesnap_blk::restore::read_map(&map).unwrap();
    assert!(
        !info.complete && info.chunks_done < info.chunks_total,
        "the copy is already complete: the kill would not be mid-copy ({info:?})"
    );
    eprintln!("killing livesnap-blk at {} of {} chunks", info.chunks_done, info.chunks_total);
    backend.stop(libc::SIGKILL, WAIT).unwrap();
    let _backend = blk(d, &target, "blk-state-restored", "livesnap-blk.log");
    let at_kill = last_report(&g.console(), "FSYNCED=");
    wait_console(&g, &console2, "records after the restart", |t| last_report(t, "FSYNCED=") >= at_kill + 3);

    // 4. The copy completes; the guest stops.
    let st = wait_exit(&mut restore, "snapctl backup restore --live");
    assert!(st.success(), "snapctl --live failed: {}", std::fs::read_to_string(d.join("snapctl-live.err")).unwrap());
    assert!(!map.exists(), "the restore map is still there after the restore completed");
    let last2 = stop(g, &mut serial, &console2);
    drop(_backend);

    let (code, out, err) = run(sbin("e2fsck").arg("-fn").arg(&target));
    assert_eq!(code, 0, "e2fsck -fn on the restored image:\n{out}{err}");
    let records = debugfs_cat(&target, "/records.log");
    // A damaged record's error quotes it: keep the message short.
    let checked = fsync_log::check_records(&String::from_utf8_lossy(&records))
        .map_err(|e| e.chars().take(300).collect::<String>());
    assert_eq!(checked, Ok(last2), "the final records");
    assert_eq!(&records[..backup_records.len()], &backup_records[..], "the backup's records changed");
    assert_eq!(md5(&debugfs_cat(&target, "/fill")), fill_sum, "the big file changed");
    assert_eq!(md5(&debugfs_cat(&target, "/new")), new_sum, "the file the restored guest wrote changed");
    eprintln!("the image holds the backup's {n} records and {} new ones", last2 - n);
}
