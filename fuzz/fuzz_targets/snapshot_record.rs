//! The snapshot record (`snapshot.state`): two checksummed slots of JSON that livesnap-blk
//! reads at start to learn which snapshot, deltas and change maps exist.
//!
//! Holds: no panic; an empty file is the only "new directory"; a state that reads back is of
//! this version, and written again it reads back equal, or is refused whole when it no longer
//! fits a slot; the next write into the file it came from reads back.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use livesnap_blk::snap::record::{Error, RecordFile, VERSION};
use livesnap_fuzz::MemFile;

fuzz_target!(|data: &[u8]| {
    let file = Arc::new(MemFile::new(data));
    let Ok((mut record, state)) = RecordFile::open(file.clone()) else { return };
    let Some(state) = state else {
        assert!(data.is_empty(), "{} bytes read as a new directory", data.len());
        return;
    };
    assert_eq!(state.version, VERSION);

    let fresh = Arc::new(MemFile::default());
    let (mut copy, none) = RecordFile::open(fresh.clone()).unwrap_or_else(|e| panic!("empty file: {e}"));
    assert!(none.is_none());
    // Written again it may be longer (fields a record may leave out are written): then it is
    // refused whole, never cut.
    match copy.write(&state) {
        Ok(()) => {}
        Err(Error::TooLarge(_)) => return,
        Err(e) => panic!("write: {e}"),
    }
    let (_, back) = RecordFile::open(fresh).unwrap_or_else(|e| panic!("reread: {e}"));
    assert_eq!(back.as_ref(), Some(&state));

    // The next write goes to the other slot; a torn one then still leaves this state.
    let mut next = state.clone();
    next.next_id = next.next_id.wrapping_add(1);
    match record.write(&next) {
        Ok(()) => {}
        Err(Error::TooLarge(_)) => return,
        Err(e) => panic!("write: {e}"),
    }
    let (_, after) = RecordFile::open(file.clone()).unwrap_or_else(|e| panic!("reread: {e}"));
    assert_eq!(after.as_ref(), Some(&next));
});
