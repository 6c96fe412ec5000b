//! [`DiskReader`]: random access to one disk of one backup, for live restore and file restore.
//!
//! A read fetches only the chunks its range touches, checks each (length and hash) before any
//! byte of it is used, and serves chunks of zeros without fetching. Fetched chunks are kept in
//! a cache bounded by bytes (quick_cache: concurrent, weighted by chunk length, and one fetch
//! of a chunk at a time however many threads want it). Reads take `&self`: share a reader
//! between threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::chunk::{self, Decoder};
use crate::hash::ChunkHash;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::{Error, Repository, Result};

/// A chunk in the cache: its name and length (a hostile manifest may name one hash at two
/// lengths; each is checked on its own).
type Key = (ChunkHash, usize);

#[derive(Clone, Copy, Debug)]
struct ByLength;

impl Weighter<Key, Arc<[u8]>> for ByLength {
    fn weight(&self, _key: &Key, val: &Arc<[u8]>) -> u64 {
        // Never zero (a zero weight would never be evicted): chunks are never empty anyway.
        val.len().max(1) as u64
    }
}

/// What a [`DiskReader`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Chunks fetched from the store (and checked).
    pub chunks_fetched: u64,
    /// Chunk reads served from the cache.
    pub cache_hits: u64,
    /// Chunk reads of a chunk of zeros (nothing fetched).
    pub zero_reads: u64,
}

/// One disk of one backup, readable at any offset. `Send + Sync`.
pub struct DiskReader {
    store: Arc<dyn Store>,
    manifest: Manifest,
    cache: Cache<Key, Arc<[u8]>, ByLength>,
    /// Decoders not in use (one per thread that reads at once).
    decoders: Mutex<Vec<Decoder>>,
    fetched: AtomicU64,
    hits: AtomicU64,
    zeros: AtomicU64,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReader")
            .field("vm", &self.manifest.meta.vm)
            .field("backup", &self.manifest.meta.backup)
            .field("disk", &self.manifest.meta.disk)
            .field("cache_bytes", &self.cache.capacity())
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// A reader of disk `disk` of backup `vm`/`id` that caches up to `cache_bytes` of chunks
    /// (0: none).
    pub fn open_disk(&self, vm: &str, id: &str, disk: &str, cache_bytes: u64) -> Result<DiskReader> {
        let manifest = self.manifest(vm, id, disk)?;
        Ok(DiskReader::new(self.store.clone(), manifest, cache_bytes))
    }
}

impl DiskReader {
    /// A reader of the disk `manifest` describes, whose chunks are in `store`. The manifest
    /// must be checked already (as [`Repository::manifest`] does).
    pub fn new(store: Arc<dyn Store>, manifest: Manifest, cache_bytes: u64) -> DiskReader {
        let chunk_size = manifest.meta.chunk_size.max(1);
        let items = usize::try_from(cache_bytes / chunk_size).unwrap_or(usize::MAX).max(1);
        DiskReader {
            store,
            manifest,
            cache: Cache::with_weighter(items, cache_bytes, ByLength),
            decoders: Mutex::new(Vec::new()),
            fetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            zeros: AtomicU64::new(0),
        }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.meta.size
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            chunks_fetched: self.fetched.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            zero_reads: self.zeros.load(Ordering::Relaxed),
        }
    }

    /// Fills `buf` with the disk's bytes at `offset..offset + buf.len()`, which must lie
    /// within the disk. On an error, `buf` holds nothing that was not checked, but may be
    /// partly filled.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            let meta = &self.manifest.meta;
            return Err(Error::OutOfRange { disk: meta.disk.clone(), offset, len, size });
        }
        let cs = self.manifest.meta.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let index = (at / cs) as usize;
            let within = (at % cs) as usize;
            let chunk_len = self.manifest.chunk_len(index);
            let n = (chunk_len - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.manifest.chunks[index] {
                None => {
                    self.zeros.fetch_add(1, Ordering::Relaxed);
                    out.fill(0);
                }
                Some(hash) => {
                    let data = self.chunk(hash, chunk_len)?;
                    out.copy_from_slice(&data[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Chunk `hash` of `len` bytes, checked: from the cache or fetched.
    fn chunk(&self, hash: ChunkHash, len: usize) -> Result<Arc<[u8]>> {
        let mut fetched = false;
        let data = self.cache.get_or_insert_with(&(hash, len), || {
            fetched = true;
            self.fetch(hash, len)
        })?;
        if !fetched {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(data)
    }

    fn fetch(&self, hash: ChunkHash, len: usize) -> Result<Arc<[u8]>> {
        let idle = self.decoders.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut decoder = match idle {
            Some(d) => d,
            None => Decoder::new(self.manifest.meta.chunk_size as usize)?,
        };
        let mut out = Vec::with_capacity(len);
        let result = chunk::fetch(&*self.store, &hash, len, &mut out, &mut decoder);
        self.decoders.lock().unwrap_or_else(|p| p.into_inner()).push(decoder);
        self.fetched.fetch_add(1, Ordering::Relaxed);
        result.map_err(|f| f.into_error(hash))?;
        Ok(out.into())
    }
}
