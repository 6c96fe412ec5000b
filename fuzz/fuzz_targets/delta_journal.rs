//! The delta journal (`ID.map.N`): the header and the append-only log of extent records that
//! a restarted livesnap-blk, or `livesnap-blk recover`, replays into the delta's map.
//!
//! The snapshot id and disk size the caller expects are taken from the header itself, so that
//! real journals get past the header checks. Holds: no panic; the replayed map never reaches
//! outside the disk and is sorted and disjoint; the read-only replay and the one that opens
//! for appending agree; opening cuts the file at the end of the valid records and reopening
//! gives the same map; a record appended after the replay is found by the next one.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use livesnap_blk::snap::journal::{Journal, Op, Record, HEADER_LEN, RECORD_LEN};
use livesnap_blk::snap::store::MetaFile;
use livesnap_fuzz::{le64, MemFile};

fn extents(map: &livesnap_blk::snap::extents::ExtentMap) -> Vec<(u64, u64)> {
    map.iter().collect()
}

fuzz_target!(|data: &[u8]| {
    let (snapshot, disk_size) = (le64(data, 16), le64(data, 24));
    let read_only = MemFile::new(data);
    let replayed = Journal::read(&read_only, snapshot, disk_size);
    assert_eq!(read_only.bytes(), data, "a read-only replay changed the file");
    let file = Arc::new(MemFile::new(data));
    let opened = Journal::open(file.clone(), snapshot, disk_size);
    let (mut journal, map) = match (replayed, opened) {
        (Ok(a), Ok((j, b))) => {
            assert_eq!(extents(&a), extents(&b), "the two replays disagree");
            (j, b)
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!("one replay failed: {:?} vs {:?}", a.err(), b.err()),
    };
    let got = extents(&map);
    let mut last_end = 0;
    for (i, &(start, end)) in got.iter().enumerate() {
        assert!(start < end, "empty extent {start}..{end}");
        assert!(end <= disk_size, "extent {start}..{end} outside a disk of {disk_size}");
        assert!(i == 0 || start > last_end, "extents overlap or touch: {got:?}");
        last_end = end;
    }
    assert_eq!(map.total(), got.iter().map(|(s, e)| e - s).sum::<u64>());

    // Cut at the end of the valid records, and the cut file replays to the same map.
    let len = file.byte_len().unwrap_or(0);
    assert!(len >= HEADER_LEN && (len - HEADER_LEN) % RECORD_LEN as u64 == 0, "cut at {len}");
    assert!(len <= data.len() as u64);
    assert_eq!(journal.bytes(), len);
    assert_eq!(file.bytes()[..], data[..len as usize]);

    // Appending one more record: the next replay has it.
    if disk_size > 0 {
        let start = le64(data, data.len().saturating_sub(8)) % disk_size;
        let rec = Record { op: Op::Add, start, end: disk_size };
        journal.append(&[rec]).unwrap_or_else(|e| panic!("append: {e}"));
        let (_, again) = Journal::open(file.clone(), snapshot, disk_size).unwrap_or_else(|e| panic!("reopen: {e}"));
        let mut want = map.clone();
        want.insert(start, disk_size);
        assert_eq!(extents(&again), extents(&want));
    }
});
