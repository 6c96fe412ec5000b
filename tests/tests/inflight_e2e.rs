//! End to end: a real guest keeps writing while its backend is killed and restarted, with
//! requests completing out of order; nothing the guest completed may be lost, nothing may be
//! reordered, and the guest sees no I/O error and no hang.
//!
//! The guest (QEMU, TCG, `reconnect=1` on each vhost-user socket) runs four `recwriter --fsync`
//! (`tests/src/bin/recwriter.rs`), one per disk: numbered, checksummed 4 KiB records written
//! one at a time with `O_DIRECT`, each followed by a FLUSH; and beside each an `O_DIRECT`
//! reader. The host drops the images' pages from its cache all along, so reads go to the
//! device. livesnap-blk runs with its test hook (`LIVESNAP_BLK_TEST_DELAY`): every fourth
//! request of a queue is held 40 ms while the others complete, so completions are out of order
//! whenever a kill comes. The backend is killed with SIGKILL [`KILLS`] times and stopped once
//! with SIGTERM (an upgrade), each time restarted; then the guest stops its writers, which sync
//! and print their last record. Each image must hold exactly records `0..=last`, in order, and
//! nothing after them.
//!
//! The same test runs against qemu-storage-daemon's vhost-user-blk export (one process: the
//! daemon is killed and restarted), side by side; it is ignored by default (see there).
//!
//! Needs `ci/install-deps.sh`, `ci/build-guest.sh`, `ci/build-recwriter.sh` and a built
//! `livesnap-blk`.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{serial_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;
use livesnap_tests::record::{record, RECORD};

const DISKS: [&str; 4] = ["vda", "vdb", "vdc", "vdd"];
const DISK_MIB: u64 = 64;
/// Backend kills with SIGKILL; one SIGTERM follows.
const KILLS: usize = 5;
/// Records each writer completes between two restarts.
const BETWEEN: u64 = 128;
/// For hangs only: TCG is slow and CI machines are busy.
const WAIT: Duration = Duration::from_secs(300);

const JOB: &str = r#"set -e
exec 3</dev/ttyS1
( read -r line <&3; echo "STOP-READ=$line"; touch /tmp/stop ) &
for d in vda vdb vdc vdd; do
  ( /usr/bin/recwriter /dev/$d /tmp/stop --fsync; echo "EXIT=$?" ) 2>&1 | while read -r l; do echo "$d-$l"; done &
  ( while [ ! -e /tmp/stop ]; do
      dd if=/dev/$d of=/dev/null bs=64k count=8 iflag=direct 2>/dev/null || echo "$d-READ-ERROR"
    done ) &
done
echo STOP-LISTENING
wait
"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    LivesnapBlk,
    StorageDaemon,
}

struct Setup {
    images: Vec<PathBuf>,
    sockets: Vec<PathBuf>,
}

impl Setup {
    fn start(&self, backend: Backend) -> Daemon {
        let sockets: Vec<&Path> = self.sockets.iter().map(PathBuf::as_path).collect();
        match backend {
            Backend::LivesnapBlk => {
                let mut cmd = Command::new(programs::livesnap_blk().unwrap());
                cmd.args(["--vm", "inflight-e2e", "--queues", "2"]);
                for ((name, image), socket) in DISKS.iter().zip(&self.images).zip(&self.sockets) {
                    cmd.arg("--disk").arg(format!("id={name},image={},socket={}", image.display(), socket.display()));
                }
                cmd.env("LIVESNAP_BLK_TEST_DELAY", "ms=40,every=4");
                Daemon::spawn("livesnap-blk", cmd, &sockets).unwrap()
            }
            Backend::StorageDaemon => {
                let mut cmd = Command::new("qemu-storage-daemon");
                for (i, (image, socket)) in self.images.iter().zip(&self.sockets).enumerate() {
                    cmd.arg("--blockdev")
                        .arg(format!(
                            "driver=file,node-name=file{i},filename={},cache.direct=off,aio=threads",
                            image.display()
                        ))
                        .arg("--blockdev")
                        .arg(format!("driver=raw,node-name=disk{i},file=file{i}"))
                        .arg("--export")
                        .arg(format!(
                            "type=vhost-user-blk,id=exp{i},node-name=disk{i},addr.type=unix,addr.path={},writable=on,num-queues=2",
                            socket.display()
                        ));
                }
                Daemon::spawn("qemu-storage-daemon", cmd, &sockets).unwrap()
            }
        }
    }
}

/// Records `disk`'s writer has reported complete.
fn progress(console: &str, disk: &str) -> u64 {
    livesnap_tests::guest::last_report(console, &format!("{disk}-RECWRITER-PROGRESS="))
}

/// Waits until every writer has reported `records` more than in `from`.
fn wait_all(guest: &Guest, from: &[u64], records: u64) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let console = guest.console();
        let now: Vec<u64> = DISKS.iter().map(|d| progress(&console, d)).collect();
        if now.iter().zip(from).all(|(n, f)| *n >= f + records) {
            return now;
        }
        assert!(
            !console.contains("LIVESNAP-JOB-EXIT=") && start.elapsed() < WAIT,
            "the writers did not get {records} records past {from:?} (at {now:?}): a hang? console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops the images' clean pages from the host's cache until told to stop, so that the
/// backend's reads go to the disk.
fn evict_pages(images: &[PathBuf], stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let files: Vec<File> = images.iter().map(|i| File::open(i).unwrap()).collect();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for f in &files {
                // SAFETY: fadvise on a descriptor we own; no memory is passed.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Records `0..n` valid in order, then only zeros: returns `n`, or what is wrong.
fn scan(image: &Path) -> Result<u64, String> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(image).unwrap());
    let mut block = vec![0u8; RECORD];
    let blocks = DISK_MIB << 20 >> 12;
    let mut records = None;
    for i in 0..blocks {
        f.read_exact(&mut block).unwrap();
        match records {
            None if block == record(i) => {}
            None => records = Some(i),
            Some(_) => {}
        }
        if records.is_some() && block.iter().any(|&b| b != 0) {
            return Err(format!("block {i} after the prefix of {records:?} records is not zeros"));
        }
    }
    Ok(records.unwrap_or(blocks))
}

fn restarts_lose_and_reorder_nothing(backend: Backend) {
    let dir = tempfile::Builder::new().prefix("livesnap-inflight-e2e").tempdir().unwrap();
    let d = dir.path();
    let setup = Setup {
        images: DISKS.iter().map(|n| d.join(format!("{n}.raw"))).collect(),
        sockets: DISKS.iter().map(|n| d.join(format!("{n}.sock"))).collect(),
    };
    for image in &setup.images {
        File::create(image).unwrap().set_len(DISK_MIB << 20).unwrap();
    }
    let stop_sock = d.join("stop.sock");
    let mut daemon = Some(setup.start(backend));
    let console_log = d.join("console.log");
    let mut guest = Guest::start(GuestConfig {
        disks: setup.sockets.clone(),
        job_script: JOB.into(),
        files: vec![GuestFile {
            path: "/usr/bin/recwriter".into(),
            contents: std::fs::read(programs::recwriter_static().unwrap()).unwrap(),
            mode: 0o755,
        }],
        extra_args: serial_args(&stop_sock),
        console_log: Some(console_log.clone()),
        timeout: Duration::from_secs(1800),
        ..GuestConfig::default()
    })
    .unwrap();
    eprintln!("console in {}", console_log.display());
    guest.wait_for_console("STOP-LISTENING", WAIT).unwrap();
    let evicting = Arc::new(AtomicBool::new(false));
    let evictor = evict_pages(&setup.images, evicting.clone());

    let mut at = wait_all(&guest, &[0; 4], BETWEEN);
    for round in 0..=KILLS {
        let signal = if round < KILLS { libc::SIGKILL } else { libc::SIGTERM };
        let status = daemon.take().unwrap().stop(signal, WAIT).unwrap();
        eprintln!("round {round}: {backend:?} stopped with signal {signal} ({status}) with the writers at {at:?}");
        if signal == libc::SIGTERM {
            assert!(status.success(), "{backend:?} exited with {status} on SIGTERM");
        }
        daemon = Some(setup.start(backend));
        at = wait_all(&guest, &at, BETWEEN);
    }

    let mut stop = UnixStream::connect(&stop_sock).unwrap();
    stop.write_all(b"stop\n").unwrap();
    let ended = guest.wait().unwrap();
    evicting.store(true, Ordering::Relaxed);
    evictor.join().unwrap();
    let console = &ended.console;
    assert_eq!(ended.exit_code, 0, "{console}");
    for bad in ["I/O error", "READ-ERROR", "RECWRITER-ERROR", "RECWRITER-FULL"] {
        assert!(!console.contains(bad), "the guest saw {bad:?}:\n{console}");
    }
    let status = daemon.take().unwrap().stop(libc::SIGTERM, WAIT).unwrap();
    assert!(status.success(), "{backend:?} exited with {status}");
    for (disk, image) in DISKS.iter().zip(&setup.images) {
        assert_eq!(ended.value(&format!("{disk}-EXIT")), Some("0"), "{console}");
        let last: i64 = ended.value(&format!("{disk}-RECWRITER-LAST")).unwrap().parse().unwrap();
        let held = scan(image).unwrap_or_else(|e| panic!("{disk}: {e}"));
        eprintln!("{disk}: the guest completed records 0..={last}; the image holds 0..{held}");
        assert_eq!(
            i64::try_from(held).unwrap(),
            last + 1,
            "{disk}: the image does not hold exactly the records completed"
        );
    }
}

#[test]
fn livesnap_blk_restarted_under_out_of_order_completions_loses_and_reorders_nothing() {
    restarts_lose_and_reorder_nothing(Backend::LivesnapBlk);
}

/// qemu-storage-daemon 7.2 offers no `INFLIGHT_SHMFD`: a restart resumes each queue from its
/// used index and is right only while requests completed in order. Run with
/// `--run-ignored ignored-only` to compare; here it passed one run of two, and in the other a
/// disk hung for good after the daemon's SIGTERM restart (the other three went on).
#[test]
#[ignore = "qemu-storage-daemon 7.2 offers no INFLIGHT_SHMFD: a disk hangs after some restarts"]
fn qemu_storage_daemon_restarted_under_writers_loses_and_reorders_nothing() {
    restarts_lose_and_reorder_nothing(Backend::StorageDaemon);
}
