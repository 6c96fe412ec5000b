//! [`Repository::restore`]: one disk of one backup written into a [`Target`] the caller
//! opened. Where the target is, whether it may be overwritten and what image format it ends
//! up in are the caller's business.
//!
//! The pool's threads fetch, check (decompress and hash) and write chunks, each chunk checked
//! before any of its bytes is written; one more thread asks the target to start writing back
//! what was written so far every [`WRITEBACK_EVERY`] chunks written ([`Target::start_writeback`]),
//! so the device works while the checks go on and the final `fsync` has little left to do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use rayon::prelude::*;
use serde::Serialize;

use crate::chunk::{self, Decoder};
use crate::manifest::Manifest;
use crate::{Error, Repository, Result};

/// Blocks of this size that are all zeros are not written: they stay holes.
const HOLE_BLOCK: usize = 4096;

/// Chunks written between two calls of [`Target::start_writeback`] (32 MiB of 4 MiB chunks).
const WRITEBACK_EVERY: u64 = 8;

/// Where a restore writes: positioned writes, from several threads at once.
pub trait Target: Sync {
    /// Called once, before any write, with the disk's size (a file: `set_len`, which leaves
    /// holes).
    fn set_size(&self, size: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_data(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Called once, after every write: makes them durable.
    fn finish(&self) -> io::Result<()>;
    /// A hint, called from a thread of its own while the writes go on: what was written so far
    /// may go to the device now, without waiting for it (by default, nothing). Durability is
    /// still [`Target::finish`]'s.
    fn start_writeback(&self) {}
}

impl Target for File {
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.set_len(size)
    }

    fn write_data(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    fn finish(&self) -> io::Result<()> {
        self.sync_all()
    }

    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)` of the whole file: writeback of its dirty pages
    /// starts; what it fails to start, `finish`'s `fsync` writes.
    fn start_writeback(&self) {
        // SAFETY: a system call on a descriptor borrowed for its duration; no memory is passed.
        let _ = unsafe { libc::sync_file_range(self.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreStats {
    pub size: u64,
    /// Bytes written; the rest of the image is holes.
    pub bytes_written: u64,
    pub chunks_read: u64,
}

impl Repository {
    /// Writes the disk `manifest` describes (from [`Repository::manifest`]) into `target`,
    /// sparse: zero chunks and zero 4 KiB blocks are not written. Each chunk is checked
    /// before it is written; the first bad chunk fails the restore, and what was
    /// written by then is the caller's to discard.
    pub fn restore(&self, manifest: &Manifest, target: &dyn Target) -> Result<RestoreStats> {
        let m = manifest;
        let disk = &m.meta.disk;
        let key = self.key_for(&m.meta.vm, &m.meta.backup, m.key)?;
        target.set_size(m.meta.size).map_err(|source| Error::TargetResize {
            disk: disk.clone(),
            size: m.meta.size,
            source,
        })?;
        let jobs: Vec<(usize, crate::ChunkHash)> =
            m.chunks.iter().enumerate().filter_map(|(i, c)| c.map(|h| (i, h))).collect();
        let written = AtomicU64::new(0);
        let cs = self.chunk_size() as usize;
        let store = &*self.store;
        // The writeback thread is woken (at most one wake-up waiting) each time another
        // WRITEBACK_EVERY chunks are written, and ends when `wake` is dropped.
        let chunks_written = AtomicU64::new(0);
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        std::thread::scope(|s| {
            s.spawn(move || {
                while woken.recv().is_ok() {
                    target.start_writeback();
                }
            });
            let result = self.pool.install(|| {
                jobs.par_iter().try_for_each_init(
                    || None::<(Decoder, Vec<u8>)>,
                    |state, &(i, hash)| -> Result<()> {
                        let (decoder, buf) = match state {
                            Some(s) => s,
                            None => state.insert((Decoder::new(cs)?, Vec::new())),
                        };
                        chunk::fetch(store, &hash, m.chunk_len(i), buf, decoder, key)
                            .map_err(|f| f.into_error(hash))?;
                        let base = i as u64 * m.meta.chunk_size;
                        let mut bytes = 0;
                        for (start, end) in nonzero_runs(buf, HOLE_BLOCK) {
                            let offset = base + start as u64;
                            target.write_data(&buf[start..end], offset).map_err(|source| Error::TargetWrite {
                                disk: disk.clone(),
                                offset,
                                source,
                            })?;
                            bytes += (end - start) as u64;
                        }
                        written.fetch_add(bytes, Ordering::Relaxed);
                        if bytes > 0
                            && chunks_written.fetch_add(1, Ordering::Relaxed) % WRITEBACK_EVERY == WRITEBACK_EVERY - 1
                        {
                            // Full: a wake-up is waiting already.
                            let _ = wake.try_send(());
                        }
                        Ok(())
                    },
                )
            });
            drop(wake);
            result
        })?;
        target.finish().map_err(|source| Error::TargetSync { disk: disk.clone(), source })?;
        Ok(RestoreStats { size: m.meta.size, bytes_written: written.into_inner(), chunks_read: jobs.len() as u64 })
    }
}

/// The runs of `buf` made of `block`-sized pieces that are not all zero, as `(start, end)`.
fn nonzero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, piece) in buf.chunks(block).enumerate() {
        if chunk::is_zero(piece) {
            continue;
        }
        let (start, end) = (k * block, k * block + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}
