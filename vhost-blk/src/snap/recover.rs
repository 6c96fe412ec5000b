//! Offline recovery: folds a disk's delta back into its base from the delta's journal, for a
//! state directory whose record no longer reads back (`docs/snapshots.md`, "Recovery").
//!
//! The journal says which ranges of the disk live in the delta; each is copied from the delta
//! (identity-mapped) to the base, which is then flushed. That is what the engine's merge does,
//! without the record: the result holds every write the guest had flushed, as a merge after a
//! crash would. Nothing in the state directory is changed or removed.

use super::extents::ExtentMap;
use super::journal::{self, Journal};
use super::store::MetaFile;
use crate::disk::{self, Buf, DiskFile};

/// Bytes copied per read and write.
const CHUNK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Delta is {delta} bytes but the base is {base}: they are not of the same disk")]
    SizeMismatch { delta: u64, base: u64 },
    #[error("Cannot read the delta's journal")]
    Journal(#[source] journal::Error),
    #[error("Cannot read bytes {start}..{end} of the delta")]
    ReadDelta {
        start: u64,
        end: u64,
        #[source]
        source: disk::Error,
    },
    #[error("Cannot write bytes {start}..{end} of the base")]
    WriteBase {
        start: u64,
        end: u64,
        #[source]
        source: disk::Error,
    },
    #[error("Cannot flush the base")]
    Flush(#[source] disk::Error),
}

/// What a fold copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Folded {
    pub extents: u64,
    pub bytes: u64,
}

/// The ranges of snapshot `snapshot`'s delta that its journal says hold the disk's data.
pub fn delta_map(journal: &dyn MetaFile, snapshot: u64, disk_size: u64) -> Result<ExtentMap, Error> {
    Journal::read(journal, snapshot, disk_size).map_err(Error::Journal)
}

/// Copies every range `journal` maps from `delta` into `base`, then flushes `base`. With
/// `dry_run`, only counts.
pub fn fold(
    delta: &dyn DiskFile,
    journal: &dyn MetaFile,
    snapshot: u64,
    base: &dyn DiskFile,
    dry_run: bool,
) -> Result<Folded, Error> {
    if delta.size() != base.size() {
        return Err(Error::SizeMismatch { delta: delta.size(), base: base.size() });
    }
    let map = delta_map(journal, snapshot, base.size())?;
    let mut done = Folded { extents: 0, bytes: 0 };
    let mut buf = Vec::new();
    for (start, end) in map.iter() {
        done.extents += 1;
        done.bytes += end - start;
        if dry_run {
            continue;
        }
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK);
            buf.resize(n as usize, 0);
            let range = (at, at + n);
            delta.read_vectored_at(&[Buf::from(&mut buf[..])], at).map_err(|source| Error::ReadDelta {
                start: range.0,
                end: range.1,
                source,
            })?;
            base.write_vectored_at(&[Buf::from(&mut buf[..])], at).map_err(|source| Error::WriteBase {
                start: range.0,
                end: range.1,
                source,
            })?;
            at += n;
        }
    }
    if !dry_run {
        base.flush().map_err(Error::Flush)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::store::mem::{Fuse, MemDir};
    use super::super::{BeginOptions, DiskSpec, Options, SnapshotControl, Vm};
    use super::*;

    const SIZE: u64 = 64 << 10;

    fn byte_at(f: &dyn DiskFile, offset: u64) -> u8 {
        let mut b = [0u8; 512];
        f.read_vectored_at(&[Buf::from(&mut b[..])], offset).unwrap();
        b[0]
    }

    fn write(f: &dyn DiskFile, offset: u64, byte: u8) {
        let mut b = vec![byte; 4096];
        f.write_vectored_at(&[Buf::from(&mut b[..])], offset).unwrap();
    }

    #[test]
    fn a_fold_gives_the_base_every_flushed_write_of_the_snapshot_and_keeps_newer_base_writes() {
        let fuse = Arc::new(Fuse::default());
        fuse.arm(i64::MAX);
        let dir = Arc::new(MemDir::new(fuse.clone()));
        let base = MemDir::new_file(fuse, SIZE);
        let opts = Options { granularity: 4096, delta_limit: None, boot_id: "b".into(), background_merge: false };
        let spec = DiskSpec { id: "d".into(), base: base.clone(), base_path: "/mem/base".into() };
        let vm = Vm::open("fold", dir.clone(), vec![spec], opts).unwrap();
        let disk = vm.disk("d").unwrap();
        write(&*disk, 0, 0x11);
        vm.begin(BeginOptions::default()).unwrap();
        write(&*disk, 4096, 0x22);
        write(&*disk, 8192, 0x33);
        disk.flush().unwrap();
        // Merging: a guest write over a range still in the delta goes to the base and takes
        // the range out of the map; the fold must not copy the stale delta over it.
        vm.merge(1).unwrap();
        write(&*disk, 8192, 0x44);
        disk.flush().unwrap();
        vm.shutdown();
        drop((disk, vm));
        assert_eq!(byte_at(&*base, 4096), 0);

        let journal = dir.file("d.map.1").unwrap();
        let delta = dir.file("d.delta.1").unwrap();
        let before = journal.bytes();
        let dry = fold(&*delta, &*journal, 1, &*base, true).unwrap();
        assert_eq!(byte_at(&*base, 4096), 0, "a dry run wrote the base");
        let done = fold(&*delta, &*journal, 1, &*base, false).unwrap();
        assert_eq!(done, dry);
        assert_eq!(done, Folded { extents: 1, bytes: 4096 });
        assert_eq!((byte_at(&*base, 0), byte_at(&*base, 4096), byte_at(&*base, 8192)), (0x11, 0x22, 0x44));
        assert_eq!(journal.bytes(), before, "the fold changed the journal");
        assert!(matches!(fold(&*delta, &*journal, 2, &*base, false), Err(Error::Journal(_))));
    }
}
