//! livesnap-blk over its real vhost-user socket, driven by the test VMM: the data path on every
//! queue, raw and qcow2, hostile chains, frontends that come and go, and SIGTERM.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_tests::blk::{BlkQueue, Completion, Request};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options, Vring};
use livesnap_tests::pattern::disk as pattern;
use livesnap_tests::virtq::Descriptor;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const WAIT: Duration = Duration::from_secs(30);

/// A livesnap-blk process serving one disk.
struct Served {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    daemon: Daemon,
}

/// Serves a fresh image of `size` bytes whose bytes are `pattern(offset)`; `qcow2` converts it.
fn serve(size: u64, qcow2: bool, options: &str) -> Served {
    let dir = tempfile::Builder::new().prefix("livesnap-sock").tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, pattern(0, size as usize)).unwrap();
    let image = if qcow2 {
        let q = dir.path().join("disk.qcow2");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", path(&raw), path(&q)]);
        q
    } else {
        raw
    };
    let socket = dir.path().join("vda.sock");
    let args = vec![
        "--vm".into(),
        "socket-test".into(),
        "--queues".into(),
        "2".into(),
        "--disk".into(),
        format!("id=vda,image={},socket={}{options}", image.display(), socket.display()),
    ];
    let daemon = Daemon::livesnap_blk(&args, &[&socket]).unwrap();
    Served { dir, image, socket, daemon }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn connect(s: &Served, queues: u16) -> (Frontend, Vec<BlkQueue>) {
    let mut f = Frontend::connect(&s.socket, &Options { queues, timeout: WAIT, ..Options::default() }).unwrap();
    let qs = f.take_queues().into_iter().map(|v| BlkQueue::new(v, 16, MIB as u32).unwrap()).collect();
    (f, qs)
}

fn connect_raw(s: &Served, queues: u16) -> (Frontend, Vec<Vring>) {
    let mut f = Frontend::connect(&s.socket, &Options { queues, timeout: WAIT, ..Options::default() }).unwrap();
    let vrings = f.take_queues();
    (f, vrings)
}

#[test]
fn config_and_features_describe_the_disk() {
    let s = serve(8 * MIB, false, "");
    let (f, _) = connect_raw(&s, 2);
    let c = f.config();
    assert_eq!(c.capacity, 8 * MIB / 512);
    assert_eq!((c.blk_size, c.num_queues, c.wce), (512, 2, 1));
    assert!(c.seg_max >= 1 && c.max_discard_seg >= 1 && c.max_write_zeroes_seg >= 1);
    assert!(c.write_zeroes_may_unmap);
    let offered = f.offered_features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert!(offered & (1 << bit) != 0, "feature bit {bit} not offered");
    }
    assert_eq!(offered & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f.max_queues(), 2);
}

#[test]
fn writes_on_one_queue_read_back_on_the_other_and_land_in_the_image() {
    let s = serve(16 * MIB, false, "");
    let (_f, mut qs) = connect(&s, 2);
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 13 + 5) as u8).collect();
    qs[0].write(2048, &data).unwrap();
    assert_eq!(qs[1].read(2048, data.len() as u32).unwrap(), data);
    assert_eq!(qs[1].read(0, 4096).unwrap(), pattern(0, 4096));
    qs[0].flush().unwrap();
    assert_eq!(qs[1].get_id().unwrap(), "vda");
    let image = std::fs::read(&s.image).unwrap();
    assert_eq!(&image[2048 * 512..2048 * 512 + data.len()], &data[..]);
    assert_eq!(&image[..2048 * 512], &pattern(0, 2048 * 512)[..]);
    assert_eq!(
        &image[2048 * 512 + data.len()..],
        &pattern((2048 * 512 + data.len()) as u64, image.len() - 2048 * 512 - data.len())[..]
    );
}

/// Both queues hammer disjoint halves of the disk at once; the disk ends up exactly as a
/// plain in-memory model says.
#[test]
fn concurrent_queues_keep_every_write() {
    const SIZE: u64 = 32 * MIB;
    for qcow2 in [false, true] {
        let s = serve(SIZE, qcow2, "");
        let (_f, qs) = connect(&s, 2);
        let halves: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = qs
                .into_iter()
                .enumerate()
                .map(|(q, mut queue)| {
                    scope.spawn(move || {
                        let base = q as u64 * SIZE / 2;
                        let mut model = pattern(base, (SIZE / 2) as usize);
                        let mut rng = fastrand::Rng::with_seed(q as u64);
                        let mut in_flight = Vec::new();
                        for i in 0..600u32 {
                            let off = rng.u64(..SIZE / 2 / 4096) * 4096;
                            let len = 4096 * rng.usize(1..=4);
                            let len = len.min((SIZE / 2 - off) as usize);
                            let data = vec![(i % 250 + 1) as u8 ^ q as u8; len];
                            model[off as usize..off as usize + len].copy_from_slice(&data);
                            // Keep up to 8 in flight; overlapping writes on one queue are
                            // ordered by waiting for the older one first.
                            queue.submit(&Request::Write { sector: (base + off) / 512, data: &data }).unwrap();
                            queue.kick().unwrap();
                            in_flight.push(());
                            if in_flight.len() == 8 || i % 37 == 0 {
                                let mut done: Vec<Completion> = Vec::new();
                                while queue.in_flight() > 0 {
                                    queue.reap(Some(WAIT), &mut done).unwrap();
                                }
                                assert!(done.iter().all(|c| c.status == OK), "{done:?}");
                                in_flight.clear();
                            }
                        }
                        let mut done = Vec::new();
                        while queue.in_flight() > 0 {
                            queue.reap(Some(WAIT), &mut done).unwrap();
                        }
                        assert!(done.iter().all(|c| c.status == OK));
                        queue.flush().unwrap();
                        for chunk in 0..(SIZE / 2 / MIB) {
                            let got = queue.read((base + chunk * MIB) / 512, MIB as u32).unwrap();
                            assert!(
                                got == model[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize],
                                "queue {q} chunk {chunk}"
                            );
                        }
                        model
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let status = s.daemon.stop(libc::SIGTERM, WAIT).unwrap();
        assert!(status.success());
        let raw = if qcow2 {
            assert!(qemu_img(&["check", path(&s.image)]).contains("No errors"));
            let out = s.dir.path().join("out.raw");
            qemu_img(&["convert", "-O", "raw", path(&s.image), path(&out)]);
            out
        } else {
            s.image.clone()
        };
        let image = std::fs::read(raw).unwrap();
        assert!(image[..(SIZE / 2) as usize] == halves[0][..], "qcow2={qcow2}: first half differs");
        assert!(image[(SIZE / 2) as usize..] == halves[1][..], "qcow2={qcow2}: second half differs");
    }
}

#[test]
fn discard_and_write_zeroes_work_on_raw_and_qcow2() {
    for qcow2 in [false, true] {
        let s = serve(4 * MIB, qcow2, "");
        let (_f, mut qs) = connect(&s, 1);
        let q = &mut qs[0];
        q.write_zeroes(8, 16, true).unwrap();
        q.write_zeroes(64, 8, false).unwrap();
        q.discard(128, 8).unwrap();
        assert_eq!(q.read(8, 16 * 512).unwrap(), vec![0u8; 16 * 512], "qcow2={qcow2}");
        assert_eq!(q.read(64, 8 * 512).unwrap(), vec![0u8; 8 * 512]);
        assert_eq!(q.read(0, 8 * 512).unwrap(), pattern(0, 8 * 512));
        assert_eq!(q.read(24, 40 * 512).unwrap(), pattern(24 * 512, 40 * 512));
        let past =
            q.request(&Request::WriteZeroes { sector: 4 * MIB / 512 - 4, num_sectors: 8, unmap: false }).unwrap();
        assert_eq!(past.status, IOERR);
    }
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_bytes() {
    let s = serve(MIB, false, ",readonly=on");
    let (f, mut qs) = connect(&s, 1);
    assert!(f.offered_features() & (1 << VIRTIO_BLK_F_RO) != 0);
    let q = &mut qs[0];
    for req in [
        Request::Write { sector: 0, data: &[0xaa; 512] },
        Request::WriteZeroes { sector: 0, num_sectors: 8, unmap: true },
        Request::Discard { sector: 0, num_sectors: 8 },
    ] {
        assert_eq!(q.request(&req).unwrap().status, IOERR, "{req:?}");
    }
    assert_eq!(q.read(0, 4096).unwrap(), pattern(0, 4096));
    q.flush().unwrap();
    assert_eq!(std::fs::read(&s.image).unwrap(), pattern(0, MIB as usize));
}

/// Places a chain of raw descriptors (linked in order unless `next` is given) and waits for it.
fn raw_chain(v: &mut Vring, descs: &[(u64, u32, u16)]) -> Option<u32> {
    let ids = v.queue_mut().alloc_descs(descs.len()).unwrap();
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let (flags, next) = match ids.get(i + 1) {
            Some(&n) => (flags | VRING_DESC_F_NEXT as u16, n),
            None => (flags, 0),
        };
        v.queue_mut().write_desc(ids[i], Descriptor { addr, len, flags, next }).unwrap();
    }
    v.queue_mut().push_avail(ids[0]).unwrap();
    v.notify().unwrap();
    v.wait_used(WAIT).unwrap().map(|u| u.len)
}

#[test]
fn hostile_chains_get_a_status_or_nothing_and_never_stop_the_device() {
    let s = serve(MIB, false, "");
    let (f, mut vrings) = connect_raw(&s, 2);
    let mem_end = f.mem().last_addr().0 + 1;
    let mem = f.mem().clone();
    let v = &mut vrings[0];
    let (base, _) = v.buffers();
    let (hdr, data, status) = (base.0, base.0 + 4096, base.0 + 8192);
    const W: u16 = VRING_DESC_F_WRITE as u16;
    let header = |kind: u32, sector: u64| {
        mem.write_obj(kind.to_le(), GuestAddress(hdr)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(hdr + 8)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    };
    let status_byte = || mem.read_obj::<u8>(GuestAddress(status)).unwrap();
    let capacity = MIB / 512;

    // (what, type, sector, chain, expected used length, expected status byte)
    type Case = (&'static str, u32, u64, Vec<(u64, u32, u16)>, Option<u32>, u8);
    let cases: [Case; 9] = [
        ("unknown type", 0x99, 0, vec![(hdr, 16, 0), (status, 1, W)], Some(1), UNSUPP),
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            capacity - 1,
            vec![(hdr, 16, 0), (data, 1024, W), (status, 1, W)],
            Some(1),
            IOERR,
        ),
        (
            "write past the end",
            VIRTIO_BLK_T_OUT,
            capacity,
            vec![(hdr, 16, 0), (data, 512, 0), (status, 1, W)],
            Some(1),
            IOERR,
        ),
        ("huge sector", VIRTIO_BLK_T_IN, u64::MAX, vec![(hdr, 16, 0), (data, 512, W), (status, 1, W)], Some(1), IOERR),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(hdr, 16, 0), (mem_end + 4096, 512, W), (status, 1, W)],
            Some(1),
            IOERR,
        ),
        ("partial sector", VIRTIO_BLK_T_OUT, 0, vec![(hdr, 16, 0), (data, 100, 0), (status, 1, W)], Some(1), IOERR),
        ("short header", VIRTIO_BLK_T_IN, 0, vec![(hdr, 8, 0), (status, 1, W)], Some(1), IOERR),
        ("read-only status", VIRTIO_BLK_T_IN, 0, vec![(hdr, 16, 0), (data, 512, W), (status, 1, 0)], Some(0), 0xee),
        ("status outside memory", VIRTIO_BLK_T_IN, 0, vec![(hdr, 16, 0), (mem_end - 1, 2, W)], Some(0), 0xee),
    ];
    for (what, kind, sector, descs, used, expect) in cases {
        header(kind, sector);
        assert_eq!(raw_chain(v, &descs), used, "{what}: used length");
        assert_eq!(status_byte(), expect, "{what}: status");
    }

    // A chain that loops back on itself ends after the queue's size, with nowhere to report.
    header(VIRTIO_BLK_T_IN, 0);
    let ids = v.queue_mut().alloc_descs(2).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    v.queue_mut().write_desc(ids[0], Descriptor { addr: hdr, len: 16, flags: next, next: ids[1] }).unwrap();
    v.queue_mut().write_desc(ids[1], Descriptor { addr: data, len: 512, flags: next | W, next: ids[0] }).unwrap();
    v.queue_mut().push_avail(ids[0]).unwrap();
    v.notify().unwrap();
    assert!(v.wait_used(WAIT).unwrap().is_some(), "looping chain never completed");

    // A head index outside the table is skipped; the next request on the queue still works.
    v.queue_mut().push_avail(9999).unwrap();
    header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(raw_chain(v, &[(hdr, 16, 0), (data, 512, W), (status, 1, W)]), Some(513));
    assert_eq!(status_byte(), OK);

    // Queue 0 wrecked for good: its available index jumps past the ring.
    let idx = v.queue().used_idx().unwrap();
    v.queue_mut().set_avail_idx(idx.wrapping_add(5000)).unwrap();
    v.kick().unwrap();
    // ... and queue 1 serves as if nothing happened.
    let mut q1 = BlkQueue::new(vrings.pop().unwrap(), 4, 65536).unwrap();
    assert_eq!(q1.read(0, 4096).unwrap(), pattern(0, 4096));
    drop(q1);
    drop(vrings);
    drop(f);
    // The process survived all of it and serves the next frontend.
    let (_f, mut qs) = connect(&s, 1);
    assert_eq!(qs[0].read(8, 512).unwrap(), pattern(4096, 512));
}

#[test]
fn next_frontend_is_served_after_a_disconnect() {
    let mut s = serve(4 * MIB, true, "");
    for round in 0..3u8 {
        let queues = if round == 1 { 1 } else { 2 };
        let (f, mut qs) = connect(&s, queues);
        if round > 0 {
            assert_eq!(qs[0].read(u64::from(round - 1) * 8, 4096).unwrap(), vec![round; 4096], "round {round}");
        }
        let last = qs.len() - 1;
        qs[last].write(u64::from(round) * 8, &[round + 1; 4096]).unwrap();
        // No flush, no goodbye: the frontend just goes away mid-session.
        drop(qs);
        drop(f);
    }
    assert!(s.daemon.try_wait().unwrap().is_none(), "livesnap-blk exited after a disconnect");
}

/// SIGTERM while requests are in flight: every request the backend completed is in the image
/// and the process exits 0.
#[test]
fn sigterm_lets_taken_requests_complete_and_exits_zero() {
    let s = serve(16 * MIB, false, "");
    let (_f, mut qs) = connect(&s, 2);
    let mut submitted = Vec::new();
    for (q, queue) in qs.iter_mut().enumerate() {
        for i in 0..16u64 {
            let sector = (q as u64 * 16 + i) * 128;
            let byte = (q * 16 + i as usize + 1) as u8;
            let tag = queue.submit(&Request::Write { sector, data: &[byte; 65536] }).unwrap();
            submitted.push((q, tag, sector, byte));
        }
        queue.kick().unwrap();
    }
    let pid = libc::pid_t::try_from(s.daemon.pid().unwrap()).unwrap();
    // SAFETY: kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut done: Vec<Vec<Completion>> = vec![Vec::new(), Vec::new()];
    for (q, queue) in qs.iter_mut().enumerate() {
        while queue.in_flight() > 0 && queue.reap(Some(Duration::from_secs(2)), &mut done[q]).is_ok() {}
    }
    let status = s.daemon.stop(libc::SIGTERM, WAIT).unwrap();
    assert!(status.success(), "exit status {status}");
    // Confined, the process may not remove its socket (Landlock allows it nothing outside its
    // state directory and images); either way nothing listens on it any more.
    match std::os::unix::net::UnixStream::connect(&s.socket) {
        Ok(_) => panic!("something still listens on {}", s.socket.display()),
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused),
            "connecting to the stopped backend's socket: {e}"
        ),
    }
    let image = std::fs::read(&s.image).unwrap();
    let mut completed = 0;
    for (q, tag, sector, byte) in submitted {
        let Some(c) = done[q].iter().find(|c| c.tag == tag) else { continue };
        assert_eq!(c.status, OK);
        let at = (sector * 512) as usize;
        assert!(image[at..at + 65536].iter().all(|&b| b == byte), "completed write at sector {sector} is missing");
        completed += 1;
    }
    eprintln!("{completed} of 32 writes completed before the shutdown");
}

/// A loop device, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = std::process::Command::new("losetup").args(["-f", "--show", path(file)]).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Block devices take the BLKDISCARD / BLKZEROOUT path instead of fallocate.
#[test]
fn block_device_is_served_with_its_own_discard_and_zeroing() {
    let dir = tempfile::Builder::new().prefix("livesnap-blkdev").tempdir().unwrap();
    let backing = dir.path().join("backing.raw");
    std::fs::write(&backing, pattern(0, 8 * MIB as usize)).unwrap();
    let dev = Loop::attach(&backing);
    let socket = dir.path().join("vdb.sock");
    let args = vec![
        "--vm".into(),
        "blkdev-test".into(),
        "--disk".into(),
        format!("id=vdb,image={},socket={},format=raw", dev.0, socket.display()),
    ];
    let daemon = Daemon::livesnap_blk(&args, &[&socket]).unwrap();
    let (f, mut qs) = {
        let mut f = Frontend::connect(&socket, &Options { queues: 1, timeout: WAIT, ..Options::default() }).unwrap();
        let qs: Vec<BlkQueue> = f.take_queues().into_iter().map(|v| BlkQueue::new(v, 4, MIB as u32).unwrap()).collect();
        (f, qs)
    };
    assert_eq!(f.config().capacity, 8 * MIB / 512);
    let q = &mut qs[0];
    q.write(16, &[0x77; 8192]).unwrap();
    q.write_zeroes(64, 16, false).unwrap();
    q.write_zeroes(128, 16, true).unwrap();
    q.discard(256, 16).unwrap();
    q.flush().unwrap();
    assert_eq!(q.read(16, 8192).unwrap(), vec![0x77; 8192]);
    assert_eq!(q.read(64, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(q.read(128, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(q.read(0, 8192).unwrap(), pattern(0, 8192));
    drop(qs);
    drop(f);
    assert!(daemon.stop(libc::SIGTERM, WAIT).unwrap().success());
    drop(dev);
    let image = std::fs::read(&backing).unwrap();
    assert!(image[16 * 512..16 * 512 + 8192].iter().all(|&b| b == 0x77));
    assert!(image[64 * 512..64 * 512 + 8192].iter().all(|&b| b == 0));
    assert!(image[128 * 512..128 * 512 + 8192].iter().all(|&b| b == 0));
    assert_eq!(&image[..8192], &pattern(0, 8192)[..]);
}

/// Runs livesnap-blk expecting it to refuse to start; returns its stderr.
fn refused(args: &[String]) -> String {
    let out =
        std::process::Command::new(livesnap_tests::programs::livesnap_blk().unwrap()).args(args).output().unwrap();
    assert!(!out.status.success(), "livesnap-blk {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_backend_on_the_same_image_is_refused() {
    let s = serve(MIB, false, "");
    let other = s.dir.path().join("other.sock");
    let err = refused(&[
        "--vm".into(),
        "intruder".into(),
        "--disk".into(),
        format!("id=vda,image={},socket={}", s.image.display(), other.display()),
    ]);
    assert!(err.contains("in use by another process"), "{err}");
    let (_f, mut qs) = connect(&s, 1);
    assert_eq!(qs[0].read(0, 512).unwrap(), pattern(0, 512));
}

#[test]
fn bad_arguments_and_images_fail_with_a_readable_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let garbage = dir.path().join("garbage.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.resize(4096, 0xff);
    std::fs::write(&garbage, &bytes).unwrap();
    let raw = dir.path().join("good.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    for (disk, expect) in [
        (format!("id=vda,image={}/missing.raw,socket={}", dir.path().display(), sock.display()), "Cannot open image"),
        (format!("id=vda,image={},socket={}", garbage.display(), sock.display()), "cannot be served"),
        (format!("id=vda,image={},socket=/nonexistent-dir/s.sock", raw.display()), "Cannot listen on"),
        (format!("id=vda,image={},socket={},format=vmdk", garbage.display(), sock.display()), "unknown image format"),
    ] {
        let err = refused(&["--vm".into(), "bad".into(), "--disk".into(), disk.clone()]);
        assert!(err.contains(expect), "{disk}: {err}");
        assert!(!err.contains("panicked"), "{disk}: {err}");
    }
}
