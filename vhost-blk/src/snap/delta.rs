//! A snapshot's delta on one disk: a sparse data file at the same offsets as the virtual disk,
//! and the extent map saying which ranges of it hold the disk's current content.
//!
//! Identity mapping keeps a write simple: the bytes go to the same offset of the delta, then
//! the range joins the map in memory. The map reaches the journal only at a commit (the
//! guest's FLUSH, a merge checkpoint), after the data it points to is durable, so the journal
//! never points at data that did not reach the disk.
//!
//! While merging, guest writes go to the base; a write over a range still in the delta takes
//! it out of the map, and the merger copies what is left, chunk by chunk. Writes and the merger
//! exclude each other per range, so a copy never lands over a newer guest write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::extents::ExtentMap;
use super::journal::{Journal, Op, Record};
use crate::disk::{self, Buf, DiskFile};

/// Largest piece the merger copies at once, and so the longest a guest write may wait for it.
pub const MERGE_CHUNK: u64 = 1 << 20;

/// A change the guest makes to a range.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    Write(&'a [Buf<'a>]),
    Zeroes { unmap: bool },
}

impl Change<'_> {
    pub fn apply(&self, target: &dyn DiskFile, offset: u64, len: u64) -> disk::Result<()> {
        match *self {
            Change::Write(bufs) => target.write_vectored_at(bufs, offset),
            Change::Zeroes { unmap } => target.write_zeroes(offset, len, unmap),
        }
    }
}

/// Why a write could not go to the delta.
#[derive(Debug)]
pub enum WriteError {
    /// The delta is full; the snapshot must be abandoned and the write retried on the base.
    Overflow(String),
    Disk(disk::Error),
}

#[derive(Debug, Default)]
struct Inner {
    map: ExtentMap,
    /// Records not yet in the journal, in the order they happened.
    pending: Vec<Record>,
    /// The range the merger is copying.
    merging: Option<(u64, u64)>,
    /// Guest writes to the base over ranges still in the map.
    inflight: Vec<(u64, u64)>,
    /// Records taken out of `pending` by a commit still appending them.
    committing: usize,
    /// Ranges the journal says left the delta since [`Delta::take_released`] last ran.
    released: Vec<(u64, u64)>,
}

#[derive(Debug)]
pub struct Delta {
    pub snapshot: u64,
    pub data: Arc<dyn DiskFile>,
    pub data_name: String,
    pub journal_name: String,
    pub limit: Option<u64>,
    inner: Mutex<Inner>,
    cv: Condvar,
    journal: Mutex<Journal>,
    /// Records the journal's space allocated ahead still holds (`u64::MAX`: no such space).
    journal_room: AtomicU64,
    /// Records not in the journal yet (pending, or being committed), read without the lock.
    waiting: AtomicU64,
    merged: AtomicU64,
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Delta {
    pub fn new(
        snapshot: u64,
        data: Arc<dyn DiskFile>,
        journal: Journal,
        map: ExtentMap,
        names: (String, String),
        limit: Option<u64>,
    ) -> Self {
        Delta {
            snapshot,
            data,
            data_name: names.0,
            journal_name: names.1,
            limit,
            inner: Mutex::new(Inner { map, ..Inner::default() }),
            cv: Condvar::new(),
            journal_room: AtomicU64::new(journal.room().unwrap_or(u64::MAX)),
            waiting: AtomicU64::new(0),
            journal: Mutex::new(journal),
            merged: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes and extents in the map.
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.map.total(), inner.map.len() as u64)
    }

    pub fn merged_bytes(&self) -> u64 {
        self.merged.load(Ordering::Relaxed)
    }

    /// The ranges in the map, `(start, end)`.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.lock().map.iter().collect()
    }

    /// Where each piece of `[offset, offset + len)` is read from: `true` for the delta.
    pub fn plan(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        self.lock().map.split(offset, offset + len)
    }

    /// A guest change while the snapshot is active: into the delta, then into the map.
    pub fn write_active(&self, change: Change<'_>, offset: u64, len: u64) -> Result<(), WriteError> {
        let end = offset + len;
        if let Some(limit) = self.limit {
            let inner = self.lock();
            let new: u64 = inner.map.split(offset, end).iter().filter(|p| !p.2).map(|p| p.1 - p.0).sum();
            if inner.map.total() + new > limit {
                return Err(WriteError::Overflow(format!("the delta reached its limit of {limit} bytes")));
            }
        }
        if !self.journal_has_room(self.waiting.load(Ordering::Relaxed)) {
            return Err(WriteError::Overflow(
                "the delta's journal cannot grow: its filesystem is full (ENOSPC)".into(),
            ));
        }
        let res = match change {
            // Zeroes in the delta: a hole reads as zeroes and costs no space.
            Change::Zeroes { .. } => self.data.write_zeroes(offset, len, true),
            Change::Write(_) => change.apply(&*self.data, offset, len),
        };
        match res {
            Ok(()) => {}
            Err(disk::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC) => {
                return Err(WriteError::Overflow("the delta's filesystem is full (ENOSPC)".into()));
            }
            Err(e) => return Err(WriteError::Disk(e)),
        }
        let mut inner = self.lock();
        inner.map.insert(offset, end);
        inner.pending.push(Record { op: Op::Add, start: offset, end });
        self.note_waiting(&inner);
        Ok(())
    }

    /// A guest change while merging: into the base, taking the range out of the map.
    pub fn write_merging(&self, base: &dyn DiskFile, change: Change<'_>, offset: u64, len: u64) -> disk::Result<()> {
        let range = (offset, offset + len);
        let tracked = {
            let mut inner = self.lock();
            while inner.merging.is_some_and(|m| overlap(m, range)) {
                inner = self.cv.wait(inner).unwrap_or_else(PoisonError::into_inner);
            }
            let tracked = inner.map.overlaps(range.0, range.1);
            if tracked {
                inner.inflight.push(range);
            }
            tracked
        };
        let res = change.apply(base, offset, len);
        if tracked {
            let mut inner = self.lock();
            if let Some(i) = inner.inflight.iter().position(|r| *r == range) {
                inner.inflight.swap_remove(i);
            }
            if res.is_ok() {
                for (s, e) in inner.map.remove(range.0, range.1) {
                    inner.pending.push(Record { op: Op::Remove, start: s, end: e });
                }
                self.note_waiting(&inner);
            }
            drop(inner);
            self.cv.notify_all();
        }
        res
    }

    /// Whether the journal's space allocated ahead holds the `waiting` records not yet in it
    /// and one more (with a margin for writes on other queues between this check and their
    /// record), growing that space first when it runs low. When it cannot, the snapshot is
    /// abandoned before a FLUSH could fail for want of journal space.
    fn journal_has_room(&self, waiting: u64) -> bool {
        const MARGIN: u64 = 256;
        const LOW: u64 = 2048;
        let needed = waiting + 1 + MARGIN;
        let room = self.journal_room.load(Ordering::Relaxed);
        if room >= needed + LOW {
            return true;
        }
        // Low: top the space up, waiting for a commit in progress only when it is short.
        let journal = if room >= needed { self.journal.try_lock().ok() } else { Some(self.journal_lock()) };
        if let Some(mut journal) = journal {
            let _ = journal.reserve_ahead(needed);
            self.journal_room.store(journal.room().unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        self.journal_room.load(Ordering::Relaxed) >= needed
    }

    /// Keeps [`Delta::waiting`] up to date; called under the lock after `pending` changed.
    fn note_waiting(&self, inner: &Inner) {
        self.waiting.store((inner.pending.len() + inner.committing) as u64, Ordering::Relaxed);
    }

    fn journal_lock(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the records so far durable: `sync_data` first makes the data they describe
    /// durable, then they go to the journal. On failure they stay pending.
    pub fn commit(&self, sync_data: impl FnOnce() -> disk::Result<()>) -> disk::Result<()> {
        let mut journal = self.journal_lock();
        let records = {
            let mut inner = self.lock();
            inner.committing = inner.pending.len();
            std::mem::take(&mut inner.pending)
        };
        let records = coalesce(&records);
        let res = sync_data().and_then(|()| journal.append(&records).map_err(disk::Error::Io));
        if res.is_ok() {
            let waiting = self.lock().pending.len() as u64;
            let _ = journal.reserve_ahead(waiting);
        }
        self.journal_room.store(journal.room().unwrap_or(u64::MAX), Ordering::Relaxed);
        let mut inner = self.lock();
        inner.committing = 0;
        if res.is_ok() {
            inner.released.extend(records.iter().filter(|r| r.op == Op::Remove).map(|r| (r.start, r.end)));
        } else {
            let later = std::mem::replace(&mut inner.pending, records);
            inner.pending.extend(later);
        }
        self.note_waiting(&inner);
        res
    }

    /// The ranges the journal durably says left the delta (merged, or overwritten in the base)
    /// since the last call: a crash replays a map without them, so their data may be punched
    /// out once no read that planned with an older map is left.
    pub fn take_released(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.lock().released)
    }

    /// Copies the next chunk of the map into `base`; returns the bytes copied, 0 when the map
    /// is empty.
    pub fn merge_step(&self, base: &dyn DiskFile, buf: &mut Vec<u8>) -> disk::Result<u64> {
        let (start, end) = {
            let mut inner = self.lock();
            loop {
                let Some(chunk) = inner.map.first(MERGE_CHUNK) else { return Ok(0) };
                if inner.inflight.iter().any(|r| overlap(*r, chunk)) {
                    inner = self.cv.wait(inner).unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                inner.merging = Some(chunk);
                break chunk;
            }
        };
        let len = (end - start) as usize;
        buf.resize(len, 0);
        let res = {
            let slice = [Buf::from(&mut buf[..len])];
            self.data.read_vectored_at(&slice, start).and_then(|()| base.write_vectored_at(&slice, start))
        };
        let mut inner = self.lock();
        inner.merging = None;
        if res.is_ok() {
            inner.map.remove(start, end);
            inner.pending.push(Record { op: Op::Remove, start, end });
            self.note_waiting(&inner);
            self.merged.fetch_add(end - start, Ordering::Relaxed);
        }
        drop(inner);
        self.cv.notify_all();
        res.map(|()| end - start)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().map.is_empty()
    }
}

/// Joins consecutive records of the same kind over touching ranges.
fn coalesce(records: &[Record]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    for r in records {
        match out.last_mut() {
            Some(last) if last.op == r.op && last.end == r.start => last.end = r.end,
            _ => out.push(*r),
        }
    }
    out
}
