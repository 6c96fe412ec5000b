//! A backend restart loses and repeats no request, whatever order requests completed in:
//! livesnap-blk over its real socket, the test VMM doing what QEMU does when its backend dies
//! (keeps the inflight region and the rings, reconnects, restarts each queue from its used
//! index). The backend's test hook (`LIVESNAP_BLK_TEST_DELAY`) holds chosen requests, so that
//! the requests behind them complete first; then the backend is killed with SIGKILL.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livesnap_tests::blk::{BlkQueue, Completion, Request};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::pattern;
use livesnap_tests::programs;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;

const MIB: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const WAIT: Duration = Duration::from_secs(30);
/// Requests on these sectors are held by the first backend (until it is killed).
const HELD: (u64, u64) = (8192, 16384);

fn backend(image: &Path, socket: &Path, hold: bool) -> Daemon {
    let mut cmd = Command::new(programs::livesnap_blk().unwrap());
    cmd.args(["--vm", "inflight-test", "--queues", "2", "--disk"]).arg(format!(
        "id=vda,image={},socket={}",
        image.display(),
        socket.display()
    ));
    if hold {
        cmd.env("LIVESNAP_BLK_TEST_DELAY", format!("ms=3600000,sectors={}-{}", HELD.0, HELD.1));
    }
    Daemon::spawn("livesnap-blk", cmd, &[socket]).unwrap()
}

fn sigkill(d: Daemon) {
    let status = d.stop(libc::SIGKILL, WAIT).unwrap();
    assert!(!status.success());
}

/// A write of 64 KiB at `sector`, its bytes seeded by `seed`.
struct Write {
    queue: usize,
    tag: u16,
    sector: u64,
    data: Vec<u8>,
}

#[test]
fn requests_held_at_a_kill_run_once_on_the_next_backend_before_any_new_one() {
    let dir = tempfile::Builder::new().prefix("livesnap-inflight").tempdir().unwrap();
    let image: PathBuf = dir.path().join("disk.raw");
    std::fs::write(&image, pattern::disk(0, (16 * MIB) as usize)).unwrap();
    let socket = dir.path().join("vda.sock");
    let opts = Options { queues: 2, timeout: WAIT, ..Options::default() };

    let first = backend(&image, &socket, true);
    let mut f = Frontend::connect(&socket, &opts).unwrap();
    assert!(f.inflight().is_some(), "livesnap-blk offers INFLIGHT_SHMFD");
    let mut qs: Vec<BlkQueue> = f.take_queues().into_iter().map(|v| BlkQueue::new(v, 16, 128 << 10).unwrap()).collect();

    // On each queue: a held write first, then writes and reads that complete before it, then a
    // second held write, then more.
    let mut writes = Vec::new();
    let mut held = Vec::new();
    for (q, queue) in qs.iter_mut().enumerate() {
        for i in 0..12u64 {
            let is_held = i == 0 || i == 6;
            let sector = if is_held { HELD.0 + (q as u64 * 2 + i / 6) * 128 } else { (q as u64 * 12 + i) * 128 };
            if i % 3 == 2 {
                queue.submit(&Request::Read { sector, len: 65536 }).unwrap();
                continue;
            }
            let data = pattern::random(q as u64 * 100 + i, 65536);
            let tag = queue.submit(&Request::Write { sector, data: &data }).unwrap();
            if is_held {
                held.push((q, tag));
            }
            writes.push(Write { queue: q, tag, sector, data });
        }
        queue.kick().unwrap();
    }
    // Everything but the held writes completes, out of the order it was submitted in.
    let mut done: Vec<Vec<Completion>> = vec![Vec::new(), Vec::new()];
    for (q, queue) in qs.iter_mut().enumerate() {
        while queue.in_flight() > 2 {
            queue.reap(Some(WAIT), &mut done[q]).unwrap();
        }
        assert!(done[q].iter().all(|c| c.status == OK));
        assert!(!held.iter().any(|&(hq, tag)| hq == q && done[q].iter().any(|c| c.tag == tag)));
    }
    sigkill(first);
    let image_at_kill = std::fs::read(&image).unwrap();
    for &(q, tag) in &held {
        let w = writes.iter().find(|w| w.queue == q && w.tag == tag).unwrap();
        let at = (w.sector * 512) as usize;
        assert_ne!(&image_at_kill[at..at + w.data.len()], &w.data[..], "a held write ran before the kill");
    }

    let _second = backend(&image, &socket, false);
    let vrings: Vec<_> = qs.iter().map(BlkQueue::vring).collect();
    f.reconnect(&socket, &opts, &vrings).unwrap();
    // A new request on each queue: the held writes were resubmitted before it, so they have
    // completed once it has. A completion of any request already completed fails the reap
    // (its head is no longer in flight).
    for (q, queue) in qs.iter_mut().enumerate() {
        let (_, tag) = held.iter().find(|&&(hq, _)| hq == q).copied().unwrap();
        let sector = writes.iter().find(|w| w.queue == q && w.tag == tag).unwrap().sector;
        let probe = queue.request(&Request::Read { sector, len: 65536 }).unwrap();
        assert_eq!(probe.status, OK);
        queue.reap(None, &mut done[q]).unwrap();
        assert_eq!(queue.in_flight(), 0, "queue {q}: held requests were not run again before a new one");
        let w = writes.iter().find(|w| w.queue == q && w.tag == tag).unwrap();
        assert_eq!(probe.data, w.data, "queue {q}: the new read does not see the resubmitted write");
    }
    for &(q, tag) in &held {
        let n = done[q].iter().filter(|c| c.tag == tag).count();
        assert_eq!(n, 1, "held write on queue {q} completed {n} times");
        assert!(done[q].iter().filter(|c| c.tag == tag).all(|c| c.status == OK));
    }
    // The device still works, and the image holds every write.
    for (q, queue) in qs.iter_mut().enumerate() {
        queue.write((200 + q as u64) * 128, &[7; 4096]).unwrap();
        queue.flush().unwrap();
    }
    let img = std::fs::read(&image).unwrap();
    for w in &writes {
        let at = (w.sector * 512) as usize;
        assert!(img[at..at + w.data.len()] == w.data[..], "write at sector {} is missing", w.sector);
    }
}
