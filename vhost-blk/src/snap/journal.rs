//! The delta's extent map on disk: a header and an append-only log of checksummed records.
//!
//! Layout (`docs/delta-format.md` has the table): a 64-byte header (magic, version, snapshot
//! id, disk size, CRC), then 32-byte records `add` / `remove` of a byte range, each with a
//! sequence number and a CRC over the record and the snapshot id. Replay stops at the first
//! record that fails its CRC or breaks the sequence: that is where a crash cut an append, and
//! the file is truncated there before anything is appended again.

use std::io;
use std::sync::Arc;

use super::extents::ExtentMap;
use super::store::MetaFile;

const MAGIC: &[u8; 8] = b"LSNAPJNL";
const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
pub const RECORD_LEN: usize = 32;
/// Journal space allocated ahead of the appends (8192 records) beyond the records already
/// waiting, so that a commit still finds room once the delta's data has filled the filesystem.
const RESERVE: u64 = 256 << 10;

/// What a record says about a range of the virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The range now lives in the delta's data file.
    Add,
    /// The range lives in the base again (merged, or overwritten in the base while merging).
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub op: Op,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Delta map has a damaged header")]
    BadHeader,
    #[error("Delta map belongs to snapshot {found}, expected {expected}")]
    WrongSnapshot { found: u64, expected: u64 },
    #[error("Delta map is for a disk of {found} bytes, this disk has {expected}")]
    WrongSize { found: u64, expected: u64 },
    #[error("Delta map record {seq} covers bytes {start}..{end}, outside the disk")]
    BadRange { seq: u64, start: u64, end: u64 },
    /// Reading or writing the map file failed: the I/O error says why.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    file: Arc<dyn MetaFile>,
    snapshot: u64,
    next_seq: u64,
    /// Where the space allocated ahead ends; `None` where the filesystem cannot allocate
    /// ahead, and appends take their chance.
    reserved_to: Option<u64>,
}

fn crc(snapshot: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&snapshot.to_le_bytes());
    h.update(body);
    h.finalize()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

impl Journal {
    /// Writes a fresh header into an empty `file` and makes it durable.
    pub fn create(file: Arc<dyn MetaFile>, snapshot: u64, disk_size: u64) -> Result<Self, Error> {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&snapshot.to_le_bytes());
        h[24..32].copy_from_slice(&disk_size.to_le_bytes());
        let c = crc(snapshot, &h[0..60]);
        h[60..64].copy_from_slice(&c.to_le_bytes());
        file.set_len(0)?;
        file.write_at(&h, 0)?;
        file.sync()?;
        let mut j = Journal { file, snapshot, next_seq: 0, reserved_to: Some(0) };
        j.reserve_ahead(0)?;
        Ok(j)
    }

    /// Replays `file` into a map, cuts off a torn tail, and leaves the journal ready to append.
    pub fn open(file: Arc<dyn MetaFile>, snapshot: u64, disk_size: u64) -> Result<(Self, ExtentMap), Error> {
        let (map, seq, pos) = Self::replay(&*file, snapshot, disk_size)?;
        if pos != file.byte_len()? {
            file.set_len(pos)?;
            file.sync()?;
        }
        let mut j = Journal { file, snapshot, next_seq: seq, reserved_to: Some(0) };
        // A full filesystem must not keep the disk from opening: the merge frees space.
        let _ = j.reserve_ahead(0);
        Ok((j, map))
    }

    /// Replays `file` into a map without changing it (offline recovery reads it so).
    pub fn read(file: &dyn MetaFile, snapshot: u64, disk_size: u64) -> Result<ExtentMap, Error> {
        Self::replay(file, snapshot, disk_size).map(|(map, ..)| map)
    }

    /// The map, the next sequence number and where the valid records end.
    fn replay(file: &dyn MetaFile, snapshot: u64, disk_size: u64) -> Result<(ExtentMap, u64, u64), Error> {
        let mut h = [0u8; HEADER_LEN as usize];
        if file.read_at(&mut h, 0)? != h.len() || &h[0..8] != MAGIC || u32_at(&h, 8) != VERSION {
            return Err(Error::BadHeader);
        }
        let found = u64_at(&h, 16);
        if u32_at(&h, 60) != crc(found, &h[0..60]) {
            return Err(Error::BadHeader);
        }
        if found != snapshot {
            return Err(Error::WrongSnapshot { found, expected: snapshot });
        }
        let size = u64_at(&h, 24);
        if size != disk_size {
            return Err(Error::WrongSize { found: size, expected: disk_size });
        }
        let len = file.byte_len()?;
        let mut map = ExtentMap::new();
        let mut seq = 0u64;
        let mut pos = HEADER_LEN;
        let mut chunk = vec![0u8; RECORD_LEN * 4096];
        'replay: while pos < len {
            let n = file.read_at(&mut chunk, pos)?;
            let whole = n / RECORD_LEN;
            if whole == 0 {
                break;
            }
            for r in chunk[..whole * RECORD_LEN].chunks_exact(RECORD_LEN) {
                let Some(rec) = decode(snapshot, seq, r) else { break 'replay };
                if rec.start >= rec.end || rec.end > disk_size {
                    return Err(Error::BadRange { seq, start: rec.start, end: rec.end });
                }
                match rec.op {
                    Op::Add => map.insert(rec.start, rec.end),
                    Op::Remove => map.remove(rec.start, rec.end).len() as u64,
                };
                seq += 1;
                pos += RECORD_LEN as u64;
            }
        }
        Ok((map, seq, pos))
    }

    /// Appends `records` and makes them durable. On error nothing counts as appended: the
    /// same records may be appended again, at the same place.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * RECORD_LEN);
        for (i, rec) in records.iter().enumerate() {
            buf.extend_from_slice(&encode(self.snapshot, self.next_seq + i as u64, rec));
        }
        let at = HEADER_LEN + self.next_seq * RECORD_LEN as u64;
        self.file.write_at(&buf, at)?;
        self.file.sync()?;
        self.next_seq += records.len() as u64;
        Ok(())
    }

    /// Bytes of journal, header included.
    pub fn bytes(&self) -> u64 {
        HEADER_LEN + self.next_seq * RECORD_LEN as u64
    }

    /// How many more records the space allocated ahead holds; `None` when the filesystem
    /// cannot allocate ahead.
    pub fn room(&self) -> Option<u64> {
        self.reserved_to.map(|end| end.saturating_sub(self.bytes()) / RECORD_LEN as u64)
    }

    /// Allocates room for `waiting` records and [`RESERVE`] bytes more past the last record,
    /// unless that much is there already. A full filesystem is an error (the room left stays
    /// usable); one that cannot allocate ahead is not.
    pub fn reserve_ahead(&mut self, waiting: u64) -> io::Result<()> {
        let Some(end) = self.reserved_to else { return Ok(()) };
        let want = self.bytes().saturating_add(waiting.saturating_mul(RECORD_LEN as u64)).saturating_add(RESERVE);
        let from = end.max(self.bytes());
        if end >= want {
            return Ok(());
        }
        match self.file.reserve(from, want - from) {
            Ok(()) => {
                self.reserved_to = Some(want);
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                self.reserved_to = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

fn encode(snapshot: u64, seq: u64, rec: &Record) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = match rec.op {
        Op::Add => 1,
        Op::Remove => 2,
    };
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    r[16..24].copy_from_slice(&rec.start.to_le_bytes());
    r[24..32].copy_from_slice(&(rec.end - rec.start).to_le_bytes());
    let c = crc(snapshot, &[&r[0..4], &r[8..32]].concat());
    r[4..8].copy_from_slice(&c.to_le_bytes());
    r
}

fn decode(snapshot: u64, seq: u64, r: &[u8]) -> Option<Record> {
    if u32_at(r, 4) != crc(snapshot, &[&r[0..4], &r[8..32]].concat()) || u64_at(r, 8) != seq {
        return None;
    }
    let op = match u32_at(r, 0) {
        1 => Op::Add,
        2 => Op::Remove,
        _ => return None,
    };
    let start = u64_at(r, 16);
    let end = start.checked_add(u64_at(r, 24))?;
    Some(Record { op, start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Arc<dyn MetaFile> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[test]
    fn replay_rebuilds_the_map_and_cuts_a_torn_tail() {
        let f = file();
        let mut j = Journal::create(f.clone(), 7, 1 << 20).unwrap();
        j.append(&[Record { op: Op::Add, start: 0, end: 8192 }, Record { op: Op::Add, start: 65536, end: 69632 }])
            .unwrap();
        j.append(&[Record { op: Op::Remove, start: 4096, end: 8192 }]).unwrap();
        let good = j.bytes();
        // A torn append: half a record of garbage.
        f.write_at(&[0xaa; 20], good).unwrap();
        let (mut j, map) = Journal::open(f.clone(), 7, 1 << 20).unwrap();
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![(0, 4096), (65536, 69632)]);
        assert_eq!(f.byte_len().unwrap(), good);
        j.append(&[Record { op: Op::Add, start: 4096, end: 8192 }]).unwrap();
        let (_, map) = Journal::open(f, 7, 1 << 20).unwrap();
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![(0, 8192), (65536, 69632)]);
    }

    #[test]
    fn a_valid_record_after_a_torn_one_is_not_replayed() {
        let f = file();
        let mut j = Journal::create(f.clone(), 1, 1 << 20).unwrap();
        j.append(&[Record { op: Op::Add, start: 0, end: 512 }, Record { op: Op::Add, start: 1024, end: 1536 }])
            .unwrap();
        // Corrupt the first record: the second, though intact, must not count.
        f.write_at(&[0xff], HEADER_LEN + 20).unwrap();
        let (_, map) = Journal::open(f, 1, 1 << 20).unwrap();
        assert!(map.is_empty());
    }

    #[test]
    fn a_journal_of_another_snapshot_or_size_is_refused() {
        let f = file();
        Journal::create(f.clone(), 3, 4096).unwrap();
        assert!(matches!(Journal::open(f.clone(), 4, 4096), Err(Error::WrongSnapshot { found: 3, expected: 4 })));
        assert!(matches!(Journal::open(f.clone(), 3, 8192), Err(Error::WrongSize { .. })));
        f.write_at(b"X", 0).unwrap();
        assert!(matches!(Journal::open(f, 3, 4096), Err(Error::BadHeader)));
    }

    #[test]
    fn a_record_outside_the_disk_is_an_error_not_a_panic() {
        let f = file();
        let mut j = Journal::create(f.clone(), 1, 1 << 20).unwrap();
        j.append(&[Record { op: Op::Add, start: 1 << 20, end: 2 << 20 }]).unwrap();
        assert!(matches!(Journal::open(f, 1, 1 << 20), Err(Error::BadRange { .. })));
    }
}
