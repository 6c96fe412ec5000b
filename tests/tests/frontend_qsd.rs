//! The test VMM against a real `qemu-storage-daemon`: proves the frontend, the virtqueue driver
//! and the virtio-blk requests right before they are used to judge livesnap-blk.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use livesnap_tests::blk::{self, BlkQueue, Completion, Request, SECTOR_SIZE};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::pattern::seeded as pattern;
use tempfile::TempDir;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const IMAGE_SIZE: u64 = 16 << 20;

/// A raw image of `IMAGE_SIZE` bytes in a tempdir, served by qemu-storage-daemon with 2 queues.
struct Setup {
    dir: TempDir,
    daemon: Daemon,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        let daemon = Daemon::qemu_storage_daemon(&image, "raw", &dir.path().join("vhost.sock"), 2).unwrap();
        Setup { dir, daemon }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    fn connect_with(&self, opts: &Options) -> (Frontend, Vec<BlkQueue>) {
        let mut fe = Frontend::connect(&self.dir.path().join("vhost.sock"), opts).unwrap();
        let qs = fe.take_queues().into_iter().map(|v| BlkQueue::new(v, 8, 1 << 20).unwrap()).collect();
        (fe, qs)
    }

    fn connect(&self) -> (Frontend, Vec<BlkQueue>) {
        self.connect_with(&Options { queues: 2, ..Options::default() })
    }
}

#[test]
fn config_and_features_describe_the_image() {
    let s = Setup::new();
    let (fe, mut qs) = s.connect();
    let cfg = fe.config();
    assert_eq!(cfg.capacity * SECTOR_SIZE, IMAGE_SIZE);
    assert_eq!(cfg.num_queues, 2);
    assert_eq!(cfg.blk_size, 512);
    assert!(fe.max_queues() >= 2);
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_RING_F_EVENT_IDX] {
        assert_ne!(fe.features() & 1 << bit, 0, "feature bit {bit} not negotiated");
    }
    assert_eq!(fe.features() & !fe.offered_features(), 0, "acked a feature that was not offered");
    assert!(!qs[0].get_id().unwrap().is_empty());
}

/// Writes through each queue, reads back through the other, and checks the file itself.
fn write_read_on_both_queues(event_idx: bool) {
    let s = Setup::new();
    let (fe, mut qs) = s.connect_with(&Options { queues: 2, event_idx, ..Options::default() });
    assert_eq!(fe.features() & 1 << VIRTIO_RING_F_EVENT_IDX != 0, event_idx);
    let small = [pattern(1, 4096), pattern(2, 4096)];
    let big = pattern(3, 1 << 20);
    qs[0].write(8, &small[0]).unwrap();
    qs[1].write(16, &small[1]).unwrap();
    qs[1].write(2048, &big).unwrap();
    // Requests after the ring index wrapped once on queue 0 (queue size 256).
    for i in 0..300u64 {
        qs[0].write(4096 + i % 8, &pattern(i as u8, 512)).unwrap();
    }
    qs[0].flush().unwrap();
    assert_eq!(qs[1].read(8, 4096).unwrap(), small[0]);
    assert_eq!(qs[0].read(16, 4096).unwrap(), small[1]);
    assert_eq!(qs[0].read(2048, 1 << 20).unwrap(), big);
    assert_eq!(qs[1].read(4096 + 299 % 8, 512).unwrap(), pattern(299u64 as u8, 512));

    let file = File::open(s.image()).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 8 * SECTOR_SIZE).unwrap();
    assert_eq!(buf, small[0]);
    file.read_exact_at(&mut buf, 16 * SECTOR_SIZE).unwrap();
    assert_eq!(buf, small[1]);
}

#[test]
fn write_then_read_back_on_both_queues_with_event_idx() {
    write_read_on_both_queues(true);
}

#[test]
fn write_then_read_back_on_both_queues_without_event_idx() {
    write_read_on_both_queues(false);
}

#[test]
fn write_zeroes_and_discard_succeed_and_zeroes_read_back() {
    let s = Setup::new();
    let (_fe, mut qs) = s.connect();
    let q = &mut qs[0];
    q.write(0, &pattern(7, 8192)).unwrap();
    q.write_zeroes(0, 8, false).unwrap();
    assert_eq!(q.read(0, 8192).unwrap()[..4096], [0u8; 4096]);
    assert_eq!(q.read(8, 4096).unwrap(), pattern(7, 8192)[4096..]);
    q.discard(8, 8).unwrap();
    q.flush().unwrap();
}

#[test]
fn request_beyond_capacity_gets_ioerr() {
    let s = Setup::new();
    let (fe, mut qs) = s.connect();
    let end = fe.config().capacity;
    let resp = qs[0].request(&Request::Read { sector: end, len: 512 }).unwrap();
    assert_eq!(u32::from(resp.status), VIRTIO_BLK_S_IOERR);
    let err = qs[0].write(end - 1, &[0u8; 1024]).unwrap_err();
    assert!(matches!(err, blk::Error::Status { request: "write", .. }), "{err}");
    // The queue still works afterwards.
    assert_eq!(qs[0].read(0, 512).unwrap(), vec![0u8; 512]);
}

/// Each queue from its own thread, 8 requests in flight, completions reaped in batches.
#[test]
fn many_requests_in_flight_on_two_threads() {
    let s = Setup::new();
    let (_fe, qs) = s.connect();
    let threads: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(n, mut q)| {
            std::thread::spawn(move || {
                let base = n as u64 * 8192;
                let wait = Some(Duration::from_secs(10));
                let mut done: Vec<Completion> = Vec::new();
                // Write 400 distinct 4 KiB blocks with up to 8 in flight, then read them all back.
                for phase in 0..2 {
                    let (mut next, mut completed, mut tags) = (0u64, 0, vec![0u64; 8]);
                    while completed < 400 {
                        while next < 400 && q.free_slots() > 0 {
                            let sector = base + next * 8;
                            let data = pattern(next as u8 ^ n as u8, 4096);
                            let req = match phase {
                                0 => Request::Write { sector, data: &data },
                                _ => Request::Read { sector, len: 4096 },
                            };
                            let tag = q.submit(&req).unwrap();
                            tags[usize::from(tag)] = next;
                            next += 1;
                        }
                        q.kick().unwrap();
                        done.clear();
                        q.reap(wait, &mut done).unwrap();
                        for c in &done {
                            assert_eq!(u32::from(c.status), VIRTIO_BLK_S_OK);
                            if phase == 1 {
                                let i = tags[usize::from(c.tag)];
                                let mut got = vec![0u8; 4096];
                                vm_memory::Bytes::read_slice(q.vring().mem().as_ref(), &mut got, q.slot_data(c.tag))
                                    .unwrap();
                                assert_eq!(got, pattern(i as u8 ^ n as u8, 4096), "block {i} of queue {n}");
                            }
                        }
                        completed += done.len();
                    }
                    assert_eq!(q.in_flight(), 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn reconnect_after_drop_keeps_data_and_works() {
    let s = Setup::new();
    let (fe, mut qs) = s.connect();
    qs[1].write(100, &pattern(9, 4096)).unwrap();
    drop(qs);
    drop(fe);
    for round in 0..2u8 {
        let (_fe, mut qs) = s.connect();
        assert_eq!(qs[0].read(100, 4096).unwrap(), pattern(9 + round, 4096));
        qs[1].write(100, &pattern(10 + round, 4096)).unwrap();
    }
}

#[test]
fn stopped_backend_times_out_instead_of_hanging() {
    let s = Setup::new();
    let (_fe, qs) = s.connect_with(&Options { queues: 2, timeout: Duration::from_millis(300), ..Options::default() });
    let mut q = qs.into_iter().next().unwrap();
    let pid = s.daemon.pid().unwrap() as libc::pid_t;
    // SAFETY: signals to the daemon this test spawned.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let err = q.read(0, 512).unwrap_err();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(matches!(err, blk::Error::Timeout(_)), "{err}");
    // The late completion is still delivered once the backend runs again.
    let mut done = Vec::new();
    q.reap(Some(Duration::from_secs(5)), &mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(u32::from(done[0].status), VIRTIO_BLK_S_OK);
}
