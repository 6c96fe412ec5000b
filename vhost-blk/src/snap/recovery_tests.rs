//! Start-up tells a new state directory from one whose record does not read back: a record
//! with no valid slot, of a newer version, or missing/empty beside deltas, journals or change
//! maps stops `Vm::open` with an error, and every file stays as it was.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::record::{self, RecordFile, VmState};
use super::store::mem::{Fuse, MemDir, MemFile};
use super::store::{Dir, MetaFile};
use super::*;
use crate::disk::Buf;

const SIZE: u64 = 64 << 10;

fn opts() -> Options {
    Options { granularity: 4096, delta_limit: None, boot_id: "boot".into(), background_merge: false }
}

fn open(dir: &Arc<MemDir>, base: &Arc<MemFile>) -> Result<Vm, Error> {
    let spec = DiskSpec { id: "d".into(), base: base.clone(), base_path: "/mem/base".into() };
    Vm::open("recovery", dir.clone(), vec![spec], opts())
}

fn write(vm: &Vm, offset: u64, byte: u8) {
    let mut data = vec![byte; 4096];
    vm.disk("d").unwrap().write_vectored_at(&[Buf::from(&mut data[..])], offset).unwrap();
}

fn read(vm: &Vm, offset: u64) -> u8 {
    let mut data = vec![0u8; 4096];
    vm.disk("d").unwrap().read_vectored_at(&[Buf::from(&mut data[..])], offset).unwrap();
    assert!(data.iter().all(|&b| b == data[0]));
    data[0]
}

/// Every file of the directory with its bytes.
fn files(dir: &MemDir) -> BTreeMap<String, Vec<u8>> {
    dir.list().unwrap().into_iter().map(|n| (n.clone(), dir.file(&n).unwrap().bytes())).collect()
}

/// A directory whose snapshot 1 is active and holds a flushed write (0xbb at 8 KiB) that the
/// base does not have.
fn active_snapshot() -> (Arc<MemDir>, Arc<MemFile>) {
    let fuse = Arc::new(Fuse::default());
    fuse.arm(i64::MAX);
    let dir = Arc::new(MemDir::new(fuse.clone()));
    let base = MemDir::new_file(fuse, SIZE);
    let vm = open(&dir, &base).unwrap();
    write(&vm, 8192, 0xaa);
    vm.begin(BeginOptions::default()).unwrap();
    write(&vm, 8192, 0xbb);
    vm.disk("d").unwrap().flush().unwrap();
    vm.shutdown();
    drop(vm);
    let names: Vec<_> = files(&dir).into_keys().collect();
    assert_eq!(names, ["d.cbt.0", "d.cbt.1", "d.delta.1", "d.map.1", "snapshot.state"]);
    (dir, base)
}

fn record(dir: &MemDir) -> Arc<dyn MetaFile> {
    dir.open("snapshot.state").unwrap().unwrap()
}

/// Opens and expects a refusal that left every file as it was; returns the error.
fn refused(dir: &Arc<MemDir>, base: &Arc<MemFile>) -> Error {
    let before = files(dir);
    let base_before = base.bytes();
    let err = open(dir, base).map(|_| ()).unwrap_err();
    assert_eq!(files(dir), before, "a refused start changed the state directory");
    assert_eq!(base.bytes(), base_before, "a refused start changed the base");
    let text = livesnap_proto::error::chain(&err);
    assert!(text.contains("Recovery"), "{text}");
    err
}

#[test]
fn zeroed_record_slots_refuse_to_open_and_keep_the_delta() {
    let (dir, base) = active_snapshot();
    let good = dir.file("snapshot.state").unwrap().bytes();
    record(&dir).write_at(&vec![0u8; good.len()], 0).unwrap();
    let err = refused(&dir, &base);
    assert!(matches!(err, Error::RecordUnreadable { source: record::Error::NoValidSlot(_), .. }), "{err:?}");
    // The record restored, the write made in the snapshot is still there.
    record(&dir).write_at(&good, 0).unwrap();
    let vm = open(&dir, &base).unwrap();
    assert_eq!(read(&vm, 8192), 0xbb);
}

#[test]
fn a_missing_or_empty_record_beside_deltas_refuses_to_open() {
    let (dir, base) = active_snapshot();
    let good = dir.file("snapshot.state").unwrap().bytes();
    record(&dir).set_len(0).unwrap();
    assert!(matches!(refused(&dir, &base), Error::RecordMissing { .. }));
    dir.remove("snapshot.state").unwrap();
    let err = refused(&dir, &base);
    let Error::RecordMissing { files, .. } = err else { panic!("{err:?}") };
    assert_eq!(files, ["d.cbt.0", "d.cbt.1", "d.delta.1", "d.map.1"]);
    dir.create("snapshot.state").unwrap().write_at(&good, 0).unwrap();
    assert_eq!(read(&open(&dir, &base).unwrap(), 8192), 0xbb);
}

#[test]
fn a_record_of_a_newer_version_refuses_to_open() {
    let (dir, base) = active_snapshot();
    let (mut rec, state) = RecordFile::open(record(&dir)).unwrap();
    let newer = VmState { version: record::VERSION + 1, ..state.unwrap() };
    rec.write(&newer).unwrap();
    let err = refused(&dir, &base);
    assert!(matches!(err, Error::RecordUnreadable { source: record::Error::Version(2), .. }), "{err:?}");
}

#[test]
fn a_change_map_alone_without_a_record_refuses_to_open() {
    let fuse = Arc::new(Fuse::default());
    fuse.arm(i64::MAX);
    let dir = Arc::new(MemDir::new(fuse.clone()));
    let base = MemDir::new_file(fuse, SIZE);
    dir.create("d.cbt.3").unwrap().write_at(b"anything", 0).unwrap();
    assert!(matches!(refused(&dir, &base), Error::RecordMissing { .. }));
}

#[test]
fn a_kill_at_any_step_of_the_first_start_leaves_a_directory_that_opens() {
    for budget in 0.. {
        let fuse = Arc::new(Fuse::default());
        fuse.arm(budget);
        let dir = Arc::new(MemDir::new(fuse.clone()));
        let base = MemDir::new_file(fuse.clone(), SIZE);
        let first = open(&dir, &base);
        // A kill: completed writes survive in the page cache.
        dir.crash(&mut |_| Some(usize::MAX));
        fuse.arm(i64::MAX);
        let vm = open(&dir, &base).unwrap_or_else(|e| panic!("budget {budget}: {}", livesnap_proto::error::chain(&e)));
        drop(vm);
        if first.is_ok() {
            break;
        }
    }
}
