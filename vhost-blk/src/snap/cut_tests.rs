//! The cut with requests in flight: it holds the guest only while it swaps the modes, and
//! returns once the requests started before it have completed, leaving the base frozen.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::store::FsDir;
use super::*;
use crate::disk::{self, Buf, Format, RawDisk};

/// A raw disk whose writes at offset 0 wait until the test lets them through.
#[derive(Debug)]
struct GatedDisk {
    inner: RawDisk,
    gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl DiskFile for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        if offset == 0 {
            if let Some((inside, go)) = &*self.gate.lock().unwrap() {
                inside.send(()).unwrap();
                go.recv().unwrap();
            }
        }
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> disk::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> disk::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// Writes one 4 KiB block of `byte` at `offset`.
pub(super) fn write(disk: &dyn DiskFile, offset: u64, byte: u8) {
    let mut data = vec![byte; 4096];
    disk.write_vectored_at(&[Buf::from(&mut data[..])], offset).unwrap();
}

fn read_file(path: &std::path::Path, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(path).unwrap(), &mut buf, offset).unwrap();
    buf
}

#[test]
fn a_cut_holds_no_request_behind_a_slow_one_and_returns_once_it_completed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.raw");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    let base = Arc::new(GatedDisk { inner: RawDisk::new(file).unwrap(), gate: Mutex::new(None) });
    let (inside_tx, inside_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *base.gate.lock().unwrap() = Some((inside_tx, go_rx));
    let spec = DiskSpec { id: "vda".into(), base: base.clone(), base_path: path.clone() };
    let store = Arc::new(FsDir::new(&dir.path().join("state")).unwrap());
    let vm = Vm::open("vm", store, vec![spec], Options { background_merge: false, ..Options::default() }).unwrap();
    let disk = vm.disk("vda").unwrap();

    // A write to the base that stays in flight across the cut.
    let slow = {
        let disk = disk.clone();
        std::thread::spawn(move || write(&*disk, 0, 1))
    };
    inside_rx.recv().unwrap();
    let (cut_tx, cut_rx) = mpsc::channel();
    let cutter = {
        let vm = vm.clone();
        std::thread::spawn(move || cut_tx.send(vm.begin(BeginOptions::default())).unwrap())
    };
    // The switch happens at once, although a request is in flight...
    let start = Instant::now();
    while !matches!(vm.shared.disks[0].read_state().mode, Mode::Active(_)) {
        assert!(start.elapsed() < Duration::from_secs(30), "the cut waited for the request in flight before switching");
        std::thread::sleep(Duration::from_millis(1));
    }
    // ...and a new write goes on to the delta while the old one still runs.
    write(&*disk, 1 << 20, 2);
    assert_eq!(read_file(&path, 1 << 20), vec![0; 4096], "a write after the cut reached the base");
    assert!(cut_rx.try_recv().is_err(), "the cut returned before the request from before it completed");

    go_tx.send(()).unwrap();
    slow.join().unwrap();
    let info = cut_rx.recv().unwrap().unwrap();
    cutter.join().unwrap();
    // The write from before the cut is in the frozen base; the one after is not.
    assert_eq!(read_file(&path, 0), vec![1; 4096]);
    assert_eq!(read_file(&path, 1 << 20), vec![0; 4096]);
    let mut got = vec![0u8; 4096];
    disk.read_vectored_at(&[Buf::from(&mut got[..])], 1 << 20).unwrap();
    assert_eq!(got, vec![2; 4096]);
    assert_eq!(info.disks, vec!["vda".to_owned()]);
    vm.shutdown();
}
