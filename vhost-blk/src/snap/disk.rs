//! [`SnapDisk`]: what the virtio layer sees of a disk when snapshots are enabled. It serves the
//! base directly, or base and delta combined.
//!
//! Each request takes a [`Ticket`] when it starts: the mode and change map it runs in, and a
//! token of the mode's epoch. A switch of mode (the cut, the start and the end of a merge)
//! holds new requests off only while it swaps the mode (the lock is never held across I/O), and
//! returns a [`Drain`] of the old epoch: waiting on it waits for the requests that started
//! before the switch, without holding the guest.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use super::cbt::Bitmap;
use super::delta::{Change, Delta, WriteError};
use super::VmShared;
use crate::disk::{self, check_range, total_len, Buf, DiskFile, Format};

#[derive(Clone, Debug)]
pub enum Mode {
    Direct,
    Active(Arc<Delta>),
    Merging(Arc<Delta>),
}

#[derive(Debug)]
pub struct DiskMode {
    pub mode: Mode,
    /// The change-map generation receiving marks.
    pub cbt: Arc<Bitmap>,
    /// Held by every request started in this mode.
    epoch: Arc<()>,
}

impl DiskMode {
    /// Starts a new epoch: requests from now on run in this (changed) mode. The returned drain
    /// waits for the requests of the old one.
    pub fn new_epoch(&mut self) -> Drain {
        Drain(std::mem::replace(&mut self.epoch, Arc::new(())))
    }
}

/// What one request runs in, from its start to its end.
struct Ticket {
    mode: Mode,
    cbt: Arc<Bitmap>,
    _epoch: Arc<()>,
}

/// The requests of a past epoch.
#[derive(Debug)]
pub struct Drain(Arc<()>);

impl Drain {
    /// Waits until every request of the epoch has completed.
    pub fn wait(self) {
        let mut pause = Duration::from_micros(20);
        while Arc::strong_count(&self.0) > 1 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub cuts: AtomicU64,
    pub max_cut_pause_us: AtomicU64,
}

/// One disk of a VM with snapshots enabled.
#[derive(Debug)]
pub struct SnapDisk {
    pub id: String,
    pub base: Arc<dyn DiskFile>,
    pub base_path: PathBuf,
    size: u64,
    state: RwLock<DiskMode>,
    /// The generation frozen at the last cut, until its checkpoint.
    pub frozen: Mutex<Option<Arc<Bitmap>>>,
    /// The last merge this process completed: its snapshot and the bytes it copied.
    pub last_merge: Mutex<Option<(u64, u64)>>,
    pub counters: Counters,
    vm: Mutex<Weak<VmShared>>,
}

/// Splits `bufs` to the `len` bytes starting `skip` bytes in.
fn sub_bufs<'a>(bufs: &[Buf<'a>], mut skip: u64, mut len: u64) -> Vec<Buf<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = b.len() as u64;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(len);
        // Both bounds lie inside `b`, so subslice cannot fail.
        if let Ok(s) = b.subslice(skip as usize, take as usize) {
            out.push(s);
        }
        len -= take;
        skip = 0;
    }
    out
}

impl SnapDisk {
    pub fn new(id: String, base: Arc<dyn DiskFile>, base_path: PathBuf, mode: Mode, cbt: Arc<Bitmap>) -> Self {
        SnapDisk {
            id,
            size: base.size(),
            base,
            base_path,
            state: RwLock::new(DiskMode { mode, cbt, epoch: Arc::new(()) }),
            frozen: Mutex::new(None),
            last_merge: Mutex::new(None),
            counters: Counters::default(),
            vm: Mutex::new(Weak::new()),
        }
    }

    pub fn set_vm(&self, vm: Weak<VmShared>) {
        *self.vm.lock().unwrap_or_else(PoisonError::into_inner) = vm;
    }

    pub fn read_state(&self) -> RwLockReadGuard<'_, DiskMode> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds new requests off (while the guard lives) to change the mode; requests already
    /// started go on in theirs. Call [`DiskMode::new_epoch`] when the mode changes.
    pub fn pause(&self) -> RwLockWriteGuard<'_, DiskMode> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits `delta`'s records after making the base and the delta durable, so that the
    /// journal never points at data that is not: the active phase's FLUSH (base writes from
    /// before the cut, delta writes) and every commit while merging (the merger's copies and
    /// guest writes in the base, active-phase writes in the delta not yet synced).
    pub fn commit_durably(&self, delta: &Delta) -> disk::Result<()> {
        delta.commit(|| {
            self.base.flush()?;
            delta.data.flush()
        })
    }

    /// Punches out of the delta's data file what the journal says left it, once every
    /// request that could still read it there has completed: a merge gives the space back as
    /// it goes (a state directory that filled up gets room for the journal again).
    pub fn release_merged(&self, delta: &Delta) {
        let ranges = delta.take_released();
        if ranges.is_empty() {
            return;
        }
        // Reads plan under the map's lock; one that planned before the ranges left it started
        // in the current epoch.
        let drain = self.pause().new_epoch();
        drain.wait();
        for (start, end) in ranges {
            // Best effort: the space comes back with the delta file at the latest.
            let _ = delta.data.write_zeroes(start, end - start, true);
        }
    }

    fn ticket(&self) -> Ticket {
        let st = self.read_state();
        Ticket { mode: st.mode.clone(), cbt: st.cbt.clone(), _epoch: st.epoch.clone() }
    }

    fn change(&self, change: Change<'_>, offset: u64, len: u64) -> disk::Result<()> {
        check_range(self.size, offset, len)?;
        loop {
            let t = self.ticket();
            t.cbt.mark(offset, offset + len)?;
            let delta = match &t.mode {
                Mode::Direct => return change.apply(&*self.base, offset, len),
                Mode::Merging(d) => return d.write_merging(&*self.base, change, offset, len),
                Mode::Active(d) => d.clone(),
            };
            match delta.write_active(change, offset, len) {
                Ok(()) => return Ok(()),
                Err(WriteError::Disk(e)) => return Err(e),
                Err(WriteError::Overflow(reason)) => {
                    // Abandoning switches the mode; this request must not hold the old one.
                    drop(t);
                    if !self.overflow(delta.snapshot, &reason) {
                        return Err(disk::Error::Failed);
                    }
                }
            }
        }
    }

    /// The delta is full: abandon the snapshot, so that the write goes to the base.
    /// Returns false when the snapshot could not be abandoned; the write then fails.
    fn overflow(&self, snapshot: u64, reason: &str) -> bool {
        let vm = self.vm.lock().unwrap_or_else(PoisonError::into_inner).upgrade();
        vm.is_some_and(|vm| vm.abandon_for_overflow(snapshot, &self.id, reason))
    }

    fn read_piecewise(&self, delta: &Delta, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        for (start, end, in_delta) in delta.plan(offset, total_len(bufs)) {
            let part = sub_bufs(bufs, start - offset, end - start);
            let src: &dyn DiskFile = if in_delta { &*delta.data } else { &*self.base };
            src.read_vectored_at(&part, start)?;
        }
        Ok(())
    }
}

impl DiskFile for SnapDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        self.base.format()
    }

    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        let len = total_len(bufs);
        check_range(self.size, offset, len)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        let t = self.ticket();
        match &t.mode {
            Mode::Direct => self.base.read_vectored_at(bufs, offset),
            Mode::Active(d) | Mode::Merging(d) => self.read_piecewise(d, bufs, offset),
        }
    }

    fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<disk::Result<()>> {
        let t = self.ticket();
        let delta = match &t.mode {
            Mode::Direct => {
                for (_, bufs) in reads {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters.read_bytes.fetch_add(total_len(bufs), Ordering::Relaxed);
                }
                return self.base.read_batch(reads);
            }
            Mode::Active(d) | Mode::Merging(d) => d.clone(),
        };
        // Reads wholly in the base or wholly in the delta still go to their file together.
        let mut results: Vec<Option<disk::Result<()>>> = reads.iter().map(|_| None).collect();
        let (mut base_reads, mut base_idx, mut delta_reads, mut delta_idx) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (offset, bufs)) in reads.iter().enumerate() {
            let len = total_len(bufs);
            if let Err(e) = check_range(self.size, *offset, len) {
                results[i] = Some(Err(e));
                continue;
            }
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
            match delta.plan(*offset, len).as_slice() {
                [(_, _, false)] => {
                    base_reads.push((*offset, *bufs));
                    base_idx.push(i);
                }
                [(_, _, true)] => {
                    delta_reads.push((*offset, *bufs));
                    delta_idx.push(i);
                }
                _ => results[i] = Some(self.read_piecewise(&delta, bufs, *offset)),
            }
        }
        for (i, r) in base_idx.into_iter().zip(self.base.read_batch(&base_reads)) {
            results[i] = Some(r);
        }
        for (i, r) in delta_idx.into_iter().zip(delta.data.read_batch(&delta_reads)) {
            results[i] = Some(r);
        }
        drop(t);
        results.into_iter().map(|r| r.unwrap_or(Err(disk::Error::Failed))).collect()
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        let len = total_len(bufs);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.written_bytes.fetch_add(len, Ordering::Relaxed);
        self.change(Change::Write(bufs), offset, len)
    }

    fn flush(&self) -> disk::Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let t = self.ticket();
        match &t.mode {
            Mode::Direct => self.base.flush(),
            // Writes to the base from before the cut are covered by this flush too. While
            // merging, the delta may still hold writes of the active phase not yet synced (the
            // switch to merging commits nothing): syncing it costs nothing once it is clean.
            Mode::Active(d) | Mode::Merging(d) => self.commit_durably(d),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        check_range(self.size, offset, len)?;
        let t = self.ticket();
        match &t.mode {
            Mode::Direct => {
                t.cbt.mark(offset, offset + len)?;
                self.base.discard(offset, len)
            }
            // Discarded content is unspecified: keeping it is allowed and keeps the base frozen
            // and the delta small.
            Mode::Active(_) | Mode::Merging(_) => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> disk::Result<()> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.change(Change::Zeroes { unmap }, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_bufs_cuts_across_buffer_boundaries() {
        let (mut a, mut b) = (vec![1u8; 4], vec![2u8; 4]);
        let bufs = [Buf::from(&mut a[..]), Buf::from(&mut b[..])];
        let part = sub_bufs(&bufs, 2, 4);
        assert_eq!(part.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![2, 2]);
        let mut out = [0u8; 2];
        part[1].copy_to(&mut out[..]);
        assert_eq!(out, [2, 2]);
        assert!(sub_bufs(&bufs, 8, 0).is_empty());
    }
}
