//! The state directory's space: one that fills up (a real tmpfs) abandons the snapshot, fails
//! no write and no FLUSH (the journal writes into space allocated ahead), and the merge
//! completes, giving the delta's space back as it goes; the space allocated ahead grows with
//! the records waiting, so that many writes without a FLUSH abandon nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::cut_tests::write;
use super::store::FsDir;
use super::*;
use crate::disk::{Buf, RawDisk};

const BLOCK: u64 = 4096;

/// A tmpfs of `size` mounted on `dir` (the test runs as root, as CI does), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs (the test needs root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_owned())
    }

    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of that plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs(3) reads a NUL-terminated path and fills the struct we pass.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A raw base image of `size` bytes in `dir`: its path and the disk.
fn raw_base(dir: &Path, size: u64) -> (PathBuf, Arc<RawDisk>) {
    let path = dir.join("base.raw");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(size).unwrap();
    (path, Arc::new(RawDisk::new(file).unwrap()))
}

fn read(disk: &dyn DiskFile, offset: u64) -> u8 {
    let mut data = vec![0u8; BLOCK as usize];
    disk.read_vectored_at(&[Buf::from(&mut data[..])], offset).unwrap();
    assert!(data.iter().all(|&b| b == data[0]), "block at {offset} is torn");
    data[0]
}

#[test]
fn a_full_state_directory_abandons_the_snapshot_fails_no_flush_and_the_merge_gives_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, base) = raw_base(dir.path(), 32 << 20);
    let state = dir.path().join("state");
    let fs = Tmpfs::mount(&state, "4M");
    let spec = DiskSpec { id: "vda".into(), base, base_path: path.clone() };
    let store = Arc::new(FsDir::new(&state).unwrap());
    let vm = Vm::open("vm", store, vec![spec], Options { background_merge: false, ..Options::default() }).unwrap();
    let disk = vm.disk("vda").unwrap();
    let snap = vm.begin(BeginOptions::default()).unwrap();
    let merging = || matches!(vm.shared.disks[0].read_state().mode, Mode::Merging(_));

    // Every other block, so that no two records join: one page of delta each, one record each,
    // a FLUSH every 64 writes. The writes after the abandon go to the base.
    let mut expect: Vec<(u64, u8)> = Vec::new();
    for i in 0u64.. {
        assert!(i < 2048, "4 MiB of state directory took more than 8 MiB of writes without an abandon");
        let (offset, byte) = (i * 2 * BLOCK, (i % 251) as u8 + 1);
        write(&*disk, offset, byte);
        expect.push((offset, byte));
        if i % 64 == 63 {
            disk.flush().unwrap();
        }
        if merging() {
            break;
        }
    }
    let status = vm.status();
    let reason = status.disks[0].abandoned.clone().unwrap_or_default();
    assert!(reason.contains("ENOSPC"), "abandoned for {reason:?}");
    assert_eq!(status.snapshot.map(|s| s.id), Some(snap.id));

    // Not a page left.
    let mut filler = std::fs::File::create(state.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[0xee; BLOCK as usize]).is_ok() {}
    assert_eq!(fs.free_bytes(), 0);

    // The guest overwrites 300 blocks still in the delta (300 records) and flushes: the
    // journal holds their records in its space allocated ahead.
    for (n, (offset, byte)) in expect.iter_mut().take(300).enumerate() {
        *byte = 0x80 | (n % 64) as u8;
        write(&*disk, *offset, *byte);
    }
    disk.flush().expect("a FLUSH while merging failed on a full state directory");

    // Each merge checkpoint punches what it recorded out of the delta: space comes back.
    assert!(vm.merge_some(100).unwrap());
    let freed = fs.free_bytes();
    assert!(freed >= 100 * BLOCK, "100 blocks merged and recorded gave back only {freed} bytes");
    while vm.merge_some(100).unwrap() {}
    assert!(vm.status().snapshot.is_none(), "the merge did not complete");
    let left: Vec<_> = std::fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().starts_with("vda.delta") || n.to_string_lossy().starts_with("vda.map")),
        "delta files left after the merge: {left:?}"
    );
    for &(offset, byte) in &expect {
        assert_eq!(read(&*disk, offset), byte, "block at {offset} after the merge");
    }
    vm.shutdown();
    drop(vm);
    let image = std::fs::read(&path).unwrap();
    for &(offset, byte) in &expect {
        assert!(image[offset as usize..(offset + BLOCK) as usize].iter().all(|&b| b == byte), "base at {offset}");
    }
    drop((disk, filler));
    drop(fs);
}

/// The journal's space allocated ahead grows with the records waiting for a commit: a guest that
/// writes far more blocks than the reserve holds records, without a FLUSH, keeps its snapshot.
#[test]
fn many_writes_without_a_flush_keep_the_snapshot() {
    const WRITES: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let (path, base) = raw_base(dir.path(), WRITES * 2 * BLOCK);
    let spec = DiskSpec { id: "vda".into(), base, base_path: path.clone() };
    let store = Arc::new(FsDir::new(&dir.path().join("state")).unwrap());
    let vm = Vm::open("vm", store, vec![spec], Options { background_merge: false, ..Options::default() }).unwrap();
    let disk = vm.disk("vda").unwrap();
    vm.begin(BeginOptions::default()).unwrap();
    for i in 0..WRITES {
        write(&*disk, i * 2 * BLOCK, (i % 251) as u8 + 1);
    }
    assert!(
        matches!(vm.shared.disks[0].read_state().mode, Mode::Active(_)),
        "{WRITES} writes without a FLUSH abandoned the snapshot: {:?}",
        vm.status().disks[0].abandoned
    );
    disk.flush().unwrap();
    while vm.merge_some(1000).unwrap() {}
    for i in (0..WRITES).step_by(97) {
        assert_eq!(read(&*disk, i * 2 * BLOCK), (i % 251) as u8 + 1);
    }
    vm.shutdown();
}
