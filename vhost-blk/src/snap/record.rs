//! The VM's snapshot record, `snapshot.state`: which snapshot exists, in which phase, and which
//! change-map generations each disk uses. Its rewrite is the commit point of every step (the
//! cut, the start of a merge, its end, a checkpoint).
//!
//! Two 4 KiB slots, written alternately: a slot holds a magic, the write's sequence number,
//! the length and CRC of a JSON body, and the body. Reading takes the valid slot with the
//! higher sequence number, so a torn write of one slot leaves the other, older state.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::store::MetaFile;

const MAGIC: &[u8; 8] = b"LSNAPVM1";
const SLOT: usize = 4096;
const BODY_AT: usize = 24;
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Snapshot record is {0} bytes, more than a slot holds")]
    TooLarge(usize),
    #[error("Snapshot record is of version {0}, this backend reads version {VERSION}")]
    Version(u32),
    #[error("Neither slot of the snapshot record ({0} bytes) passes its magic and checksum checks")]
    NoValidSlot(usize),
    #[error("Snapshot record is unreadable")]
    Decode(#[source] serde_json::Error),
    /// Reading or writing the record file failed: the I/O error says why.
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapPhase {
    Active,
    Merging,
}

/// A snapshot from its cut until its merge is recorded complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapState {
    pub id: u64,
    pub created_unix: u64,
    pub pause_us: u64,
    /// Disks still holding a delta of this snapshot, with their phase.
    pub disks: Vec<(String, SnapPhase)>,
    /// All disks the snapshot was cut on.
    pub cut_disks: Vec<String>,
    pub delta_limit: Option<u64>,
    pub abandoned: Option<String>,
}

/// Change-map generations of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtState {
    pub disk: String,
    /// Generation receiving marks now.
    pub current: u64,
    /// Generation frozen at the last cut, kept until its checkpoint is acknowledged.
    pub frozen: Option<u64>,
    /// The snapshot whose cut froze it (its checkpoint id).
    pub frozen_for: Option<u64>,
    /// The last acknowledged checkpoint (a snapshot id).
    pub checkpoint: Option<u64>,
    /// The snapshot `frozen_for` was abandoned: its base was not kept frozen, so its checkpoint
    /// is refused (the frozen generation joins the next one instead).
    #[serde(default)]
    pub frozen_abandoned: bool,
}

/// Everything persisted about a VM's snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub next_id: u64,
    pub snapshot: Option<SnapState>,
    pub cbt: Vec<CbtState>,
}

impl Default for VmState {
    fn default() -> Self {
        VmState { version: VERSION, next_id: 1, snapshot: None, cbt: Vec::new() }
    }
}

impl VmState {
    pub fn cbt(&self, disk: &str) -> Option<&CbtState> {
        self.cbt.iter().find(|c| c.disk == disk)
    }

    pub fn cbt_mut(&mut self, disk: &str) -> Option<&mut CbtState> {
        self.cbt.iter_mut().find(|c| c.disk == disk)
    }
}

/// Only the version of a record body, read before the rest.
#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

/// The record's file, remembering which slot to write next.
#[derive(Debug)]
pub struct RecordFile {
    file: Arc<dyn MetaFile>,
    seq: u64,
}

fn parse_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    if slot.len() < BODY_AT || &slot[0..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(slot[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(slot[20..24].try_into().ok()?);
    let body = slot.get(BODY_AT..BODY_AT + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&slot[8..20]);
    h.update(body);
    (h.finalize() == crc).then_some((seq, body))
}

impl RecordFile {
    /// Reads the newest valid state; `None` only when the file is empty (never written).
    ///
    /// A file that holds bytes but no valid slot, or a state of another version, is an error:
    /// it is not a new directory, and treating it as one would drop the files it names.
    pub fn open(file: Arc<dyn MetaFile>) -> Result<(Self, Option<VmState>), Error> {
        let mut buf = vec![0u8; 2 * SLOT];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        if buf.is_empty() {
            return Ok((RecordFile { file, seq: 0 }, None));
        }
        let best = buf.chunks(SLOT).filter_map(parse_slot).max_by_key(|(seq, _)| *seq);
        let Some((seq, body)) = best else {
            return Err(Error::NoValidSlot(n));
        };
        // The version first: a newer record may not decode as this version's state at all.
        let version: Versioned = serde_json::from_slice(body).map_err(Error::Decode)?;
        if version.version != VERSION {
            return Err(Error::Version(version.version));
        }
        let state: VmState = serde_json::from_slice(body).map_err(Error::Decode)?;
        Ok((RecordFile { file, seq }, Some(state)))
    }

    /// Writes `state` into the older slot and makes it durable.
    pub fn write(&mut self, state: &VmState) -> Result<(), Error> {
        let body = serde_json::to_vec(state).map_err(Error::Decode)?;
        if body.len() > SLOT - BODY_AT {
            return Err(Error::TooLarge(body.len()));
        }
        let seq = self.seq + 1;
        let mut slot = vec![0u8; SLOT];
        slot[0..8].copy_from_slice(MAGIC);
        slot[8..16].copy_from_slice(&seq.to_le_bytes());
        slot[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        slot[BODY_AT..BODY_AT + body.len()].copy_from_slice(&body);
        let mut h = crc32fast::Hasher::new();
        h.update(&slot[8..20]);
        h.update(&body);
        slot[20..24].copy_from_slice(&h.finalize().to_le_bytes());
        self.file.write_at(&slot, (seq % 2) * SLOT as u64)?;
        self.file.sync()?;
        self.seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_intact_slot_wins() {
        let f: Arc<dyn MetaFile> = Arc::new(tempfile::tempfile().unwrap());
        let (mut r, none) = RecordFile::open(f.clone()).unwrap();
        assert!(none.is_none());
        let mut s = VmState::default();
        r.write(&s).unwrap();
        s.next_id = 2;
        r.write(&s).unwrap();
        assert_eq!(RecordFile::open(f.clone()).unwrap().1.unwrap().next_id, 2);
        // Tear the newer slot (seq 2 lives in slot 0): the older state comes back.
        f.write_at(&[0u8; 100], 30).unwrap();
        let (mut r, got) = RecordFile::open(f.clone()).unwrap();
        assert_eq!(got.unwrap().next_id, 1);
        // The next write goes to the torn slot, not over the good one.
        s.next_id = 3;
        r.write(&s).unwrap();
        assert_eq!(RecordFile::open(f).unwrap().1.unwrap().next_id, 3);
    }

    #[test]
    fn an_empty_file_is_new_but_zeroed_slots_are_an_error() {
        let f: Arc<dyn MetaFile> = Arc::new(tempfile::tempfile().unwrap());
        assert!(RecordFile::open(f.clone()).unwrap().1.is_none());
        let (mut r, _) = RecordFile::open(f.clone()).unwrap();
        r.write(&VmState::default()).unwrap();
        r.write(&VmState::default()).unwrap();
        f.write_at(&vec![0u8; 2 * SLOT], 0).unwrap();
        assert!(matches!(RecordFile::open(f), Err(Error::NoValidSlot(n)) if n == 2 * SLOT));
    }

    #[test]
    fn a_record_of_a_newer_version_is_refused_even_if_its_body_differs() {
        let f: Arc<dyn MetaFile> = Arc::new(tempfile::tempfile().unwrap());
        let (mut r, _) = RecordFile::open(f.clone()).unwrap();
        r.write(&VmState { version: VERSION + 1, ..VmState::default() }).unwrap();
        assert!(matches!(RecordFile::open(f.clone()), Err(Error::Version(v)) if v == VERSION + 1));
        // A body this version cannot decode: the version still says why.
        let body = br#"{"version":2,"snapshots":[]}"#;
        let mut slot = vec![0u8; SLOT];
        slot[0..8].copy_from_slice(MAGIC);
        slot[8..16].copy_from_slice(&9u64.to_le_bytes());
        slot[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        slot[BODY_AT..BODY_AT + body.len()].copy_from_slice(body);
        let mut h = crc32fast::Hasher::new();
        h.update(&slot[8..20]);
        h.update(body);
        slot[20..24].copy_from_slice(&h.finalize().to_le_bytes());
        f.write_at(&slot, SLOT as u64).unwrap();
        assert!(matches!(RecordFile::open(f), Err(Error::Version(2))));
    }
}
