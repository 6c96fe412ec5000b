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
use crate::crypto::DataKey;
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
    /// Bytes of those chunks as the store held them (compressed, sealed): what was transferred.
    pub bytes_fetched: u64,
    /// Bytes of disk those chunks cover (their plain length).
    pub disk_bytes_fetched: u64,
    /// Chunk reads served from the cache.
    pub cache_hits: u64,
    /// Chunk reads of a chunk of zeros (nothing fetched).
    pub zero_reads: u64,
}

/// One disk of one backup, readable at any offset. `Send + Sync`.
pub struct DiskReader {
    store: Arc<dyn Store>,
    manifest: Manifest,
    key: Option<Arc<DataKey>>,
    cache: Cache<Key, Arc<[u8]>, ByLength>,
    /// Decoders not in use (one per thread that reads at once).
    decoders: Mutex<Vec<Decoder>>,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    fetched_disk_bytes: AtomicU64,
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
        let key = self.key_for(vm, id, manifest.key)?.map(|_| self.keys[vm].clone());
        DiskReader::new(self.store.clone(), manifest, key, cache_bytes)
    }
}

impl DiskReader {
    /// A reader of the disk `manifest` describes, whose chunks are in `store`, sealed under
    /// `key` when the manifest says they are (the key must be that one). The manifest must be
    /// checked already (as [`Repository::manifest`] does).
    pub fn new(
        store: Arc<dyn Store>,
        manifest: Manifest,
        key: Option<Arc<DataKey>>,
        cache_bytes: u64,
    ) -> Result<DiskReader> {
        let meta = &manifest.meta;
        crate::Repository::check_key(&meta.vm, &meta.backup, manifest.key, key.as_deref())?;
        let chunk_size = manifest.meta.chunk_size.max(1);
        let items = usize::try_from(cache_bytes / chunk_size).unwrap_or(usize::MAX).max(1);
        Ok(DiskReader {
            store,
            manifest,
            key,
            cache: Cache::with_weighter(items, cache_bytes, ByLength),
            decoders: Mutex::new(Vec::new()),
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            fetched_disk_bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            zeros: AtomicU64::new(0),
        })
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
            bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
            disk_bytes_fetched: self.fetched_disk_bytes.load(Ordering::Relaxed),
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
        let result = chunk::fetch(&*self.store, &hash, len, &mut out, &mut decoder, self.key.as_deref());
        self.fetched_bytes.fetch_add(decoder.file.len() as u64, Ordering::Relaxed);
        self.fetched_disk_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.decoders.lock().unwrap_or_else(|p| p.into_inner()).push(decoder);
        self.fetched.fetch_add(1, Ordering::Relaxed);
        result.map_err(|f| f.into_error(hash))?;
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::store::{self, Fetched, LocalStore, PendingBackup, StoreLock};
    use crate::tests::{mixed, spec, K64};
    use crate::{CreateOptions, Error};

    /// The local store, counting the chunks read from it.
    #[derive(Debug)]
    struct Counting {
        inner: LocalStore,
        gets: AtomicU64,
        /// Bytes of the chunk files returned.
        bytes: AtomicU64,
    }

    impl Counting {
        fn gets(&self) -> u64 {
            self.gets.load(Ordering::Relaxed)
        }
    }

    impl Store for Counting {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn get_config(&self, max_len: u64, out: &mut Vec<u8>) -> store::Result<Fetched> {
            self.inner.get_config(max_len, out)
        }
        fn put_config(&self, data: &[u8]) -> store::Result<()> {
            self.inner.put_config(data)
        }
        fn has_chunk(&self, hash: &ChunkHash) -> store::Result<bool> {
            self.inner.has_chunk(hash)
        }
        fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> store::Result<bool> {
            self.inner.put_chunk(hash, data)
        }
        fn get_chunk(&self, hash: &ChunkHash, max_len: u64, out: &mut Vec<u8>) -> store::Result<Fetched> {
            self.gets.fetch_add(1, Ordering::Relaxed);
            let r = self.inner.get_chunk(hash, max_len, out);
            self.bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
            r
        }
        fn flush_chunks(&self, hashes: &[ChunkHash]) -> store::Result<()> {
            self.inner.flush_chunks(hashes)
        }
        fn list_chunks(&self) -> store::Result<Vec<(ChunkHash, u64)>> {
            self.inner.list_chunks()
        }
        fn remove_chunk(&self, hash: &ChunkHash) -> store::Result<()> {
            self.inner.remove_chunk(hash)
        }
        fn list_vms(&self) -> store::Result<Vec<String>> {
            self.inner.list_vms()
        }
        fn list_backups(&self, vm: &str) -> store::Result<Vec<String>> {
            self.inner.list_backups(vm)
        }
        fn list_manifests(&self, vm: &str, id: &str) -> store::Result<Option<Vec<String>>> {
            self.inner.list_manifests(vm, id)
        }
        fn get_manifest(
            &self,
            vm: &str,
            id: &str,
            disk: &str,
            max_len: u64,
            out: &mut Vec<u8>,
        ) -> store::Result<Fetched> {
            self.inner.get_manifest(vm, id, disk, max_len, out)
        }
        fn get_manifest_prefix(
            &self,
            vm: &str,
            id: &str,
            disk: &str,
            len: u64,
            out: &mut Vec<u8>,
        ) -> store::Result<Option<u64>> {
            self.inner.get_manifest_prefix(vm, id, disk, len, out)
        }
        fn begin_backup(&self, vm: &str, id: &str) -> store::Result<Box<dyn PendingBackup>> {
            self.inner.begin_backup(vm, id)
        }
        fn remove_backup(&self, vm: &str, id: &str) -> store::Result<bool> {
            self.inner.remove_backup(vm, id)
        }
        fn lock_shared(&self) -> store::Result<StoreLock> {
            self.inner.lock_shared()
        }
        fn lock_exclusive(&self) -> store::Result<StoreLock> {
            self.inner.lock_exclusive()
        }
        fn remove_leftovers(&self) -> store::Result<u64> {
            self.inner.remove_leftovers()
        }
    }

    const CHUNKS: usize = 16;

    /// A repository on a counting store at 64 KiB chunks with backup vm/b1 of disk vda: 16
    /// distinct chunks of mixed data and a short one; chunks 4 and 5 zero.
    fn setup() -> (tempfile::TempDir, Arc<Counting>, Repository, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let local = LocalStore::create(&root).unwrap();
        let store = Arc::new(Counting { inner: local, gets: AtomicU64::new(0), bytes: AtomicU64::new(0) });
        let opts = CreateOptions { chunk_size: K64, ..CreateOptions::default() };
        let repo = Repository::create_in(store.clone(), opts).unwrap();
        let mut data = mixed(CHUNKS * K64 as usize + 777, 5);
        for (k, piece) in data.chunks_mut(K64 as usize).enumerate() {
            piece[1] = k as u8 + 1; // every chunk distinct and non-zero
        }
        data[4 * K64 as usize..6 * K64 as usize].fill(0);
        let mut w = repo.begin_backup(spec("vm", "b1")).unwrap();
        w.full("vda", &data).unwrap();
        w.commit().unwrap();
        (dir, store, repo, data)
    }

    #[test]
    fn random_ranges_read_what_was_backed_up_from_several_threads() {
        let (_dir, _store, repo, data) = setup();
        fn send_and_sync<T: Send + Sync>(_: &T) {}
        let reader = repo.open_disk("vm", "b1", "vda", 4 * K64).unwrap();
        send_and_sync(&reader);
        assert_eq!(reader.size(), data.len() as u64);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (reader, data) = (&reader, &data);
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    for _ in 0..200 {
                        let off = rng.usize(0..data.len());
                        let len = rng.usize(0..=(data.len() - off).min(3 * K64 as usize));
                        let mut buf = vec![0xEE; len];
                        reader.read_at(&mut buf, off as u64).unwrap();
                        assert!(buf == data[off..off + len], "{len} bytes at {off}");
                    }
                });
            }
        });
        // The whole disk in one read, the short last chunk included.
        let mut all = vec![0xEE; data.len()];
        reader.read_at(&mut all, 0).unwrap();
        assert!(all == data);
    }

    #[test]
    fn a_read_fetches_only_the_chunks_it_touches_and_no_zero_chunk() {
        let (_dir, store, repo, data) = setup();
        let reader = repo.open_disk("vm", "b1", "vda", 64 * K64).unwrap();
        let before = store.gets();
        // From the middle of chunk 2 to the middle of chunk 7: 2, 3, 6 and 7 (4 and 5 zero).
        let (off, len) = (2 * K64 + 100, 5 * K64);
        let mut buf = vec![0; len as usize];
        reader.read_at(&mut buf, off).unwrap();
        assert!(buf[..] == data[off as usize..(off + len) as usize]);
        assert_eq!(store.gets() - before, 4);
        let stats = reader.stats();
        assert_eq!((stats.chunks_fetched, stats.cache_hits, stats.zero_reads), (4, 0, 2));
        // What was transferred is what the store returned; the disk bytes are the chunks'.
        assert_eq!(stats.bytes_fetched, store.bytes.load(Ordering::Relaxed));
        assert_eq!(stats.disk_bytes_fetched, 4 * K64);
        // One byte of a zero chunk fetches nothing.
        let mut one = [7u8];
        reader.read_at(&mut one, 5 * K64 + 3).unwrap();
        assert_eq!((one[0], store.gets() - before), (0, 4));
        // Two bytes across the boundary of chunks 9 and 10: those two.
        let mut two = [0u8; 2];
        reader.read_at(&mut two, 10 * K64 - 1).unwrap();
        assert_eq!(store.gets() - before, 6);
        assert_eq!(two, data[10 * K64 as usize - 1..10 * K64 as usize + 1]);
    }

    #[test]
    fn a_chunk_read_again_comes_from_the_cache_unless_there_is_none() {
        let (_dir, store, repo, data) = setup();
        let reader = repo.open_disk("vm", "b1", "vda", 8 * K64).unwrap();
        let mut buf = vec![0; 2 * K64 as usize];
        reader.read_at(&mut buf, 0).unwrap();
        let fetched = store.gets();
        for off in [0, 10, K64 - 1, K64 + 5] {
            reader.read_at(&mut buf[..1000], off).unwrap();
            assert!(buf[..1000] == data[off as usize..off as usize + 1000]);
        }
        assert_eq!(store.gets(), fetched, "no fetch for cached chunks");
        assert_eq!(reader.stats().cache_hits, 5);

        let uncached = repo.open_disk("vm", "b1", "vda", 0).unwrap();
        let before = store.gets();
        for _ in 0..3 {
            uncached.read_at(&mut buf[..10], 0).unwrap();
        }
        assert_eq!(store.gets() - before, 3);
    }

    #[test]
    fn the_cache_holds_no_more_bytes_than_it_was_given() {
        let (_dir, _store, repo, _data) = setup();
        let reader = repo.open_disk("vm", "b1", "vda", 3 * K64).unwrap();
        let mut buf = vec![0; K64 as usize];
        for round in 0..3 {
            for i in 0..CHUNKS as u64 {
                reader.read_at(&mut buf, i * K64).unwrap();
                assert!(reader.cache.weight() <= 3 * K64, "round {round}, chunk {i}: {}", reader.cache.weight());
            }
        }
        assert!(reader.stats().chunks_fetched > CHUNKS as u64, "{:?}", reader.stats());
    }

    #[test]
    fn a_damaged_or_missing_chunk_is_an_error_naming_it_and_no_data() {
        let (_dir, store, repo, data) = setup();
        let m = repo.manifest("vm", "b1", "vda").unwrap();
        let (flipped, gone) = (m.chunks[1].unwrap(), m.chunks[3].unwrap());
        let path = store.inner.chunk_path(&flipped);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        fs::remove_file(store.inner.chunk_path(&gone)).unwrap();

        let reader = repo.open_disk("vm", "b1", "vda", 64 * K64).unwrap();
        let mut buf = vec![0; 100];
        let e = reader.read_at(&mut buf, K64 + 10).unwrap_err();
        assert!(matches!(&e, Error::ChunkCorrupt { hash, .. } if *hash == flipped), "{e}");
        assert!(e.to_string().contains(&flipped.to_string()), "{e}");
        assert!(buf.iter().all(|&b| b == 0), "nothing of the damaged chunk is handed on");
        let e = reader.read_at(&mut buf, 3 * K64).unwrap_err();
        assert!(matches!(&e, Error::ChunkMissing { hash } if *hash == gone), "{e}");
        assert!(e.to_string().contains(&gone.to_string()), "{e}");
        // A failure is not cached: still an error; the good chunks still read.
        assert!(reader.read_at(&mut buf, K64).is_err());
        reader.read_at(&mut buf, 2 * K64).unwrap();
        assert!(buf[..] == data[2 * K64 as usize..2 * K64 as usize + 100]);
    }

    #[test]
    fn a_read_beyond_the_disk_is_refused() {
        let (_dir, _store, repo, data) = setup();
        let reader = repo.open_disk("vm", "b1", "vda", K64).unwrap();
        let size = data.len() as u64;
        let mut buf = [0u8; 10];
        reader.read_at(&mut buf, size - 10).unwrap();
        for off in [size - 9, size, u64::MAX - 3] {
            let e = reader.read_at(&mut buf, off).unwrap_err();
            assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        }
        reader.read_at(&mut [], size).unwrap();
        assert!(matches!(repo.open_disk("vm", "b1", "vdz", K64), Err(Error::DiskNotFound { .. })));
    }
}
