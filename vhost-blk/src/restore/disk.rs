//! [`RestoreDisk`]: a disk whose image is being filled from a backup while the guest uses it.
//!
//! Two views of the same bits: what is *visible* (in memory: a chunk whose bytes are in the
//! image, written or not yet synced; a block the guest wrote) routes requests; what is *durable*
//! (the [`Map`]) is only ever written by [`RestoreDisk::commit`], which takes the bits set so far,
//! syncs the image, then writes and syncs them. So marks always follow durable data.
//!
//! A fill of chunk i and guest writes into chunk i while it is not restored exclude each other
//! (a striped lock), so the backup's bytes never land over a guest write: the fill writes only
//! the blocks the guest has not written.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::map::{self, Bits, Map, MapInfo, BLOCK_SIZE};
use crate::disk::{self, check_range, total_len, Buf, DiskFile, Format};
use crate::snap::store::MetaFile;

/// Lock stripes shared by the chunks (chunk i uses stripe i % STRIPES).
const STRIPES: usize = 64;

#[derive(Clone, Debug)]
pub struct Options {
    /// How long a guest request waits for a chunk before it fails.
    pub wait: Duration,
    /// Background wants kept outstanding.
    pub window: usize,
    /// A fill commits once the chunks filled since the last commit hold this many bytes...
    pub commit_bytes: u64,
    /// ...or the oldest of them was filled this long ago (the feed's idle tick, a FLUSH and the
    /// last chunk commit as well).
    pub commit_age: Duration,
    /// How long the background leaves a chunk the feed could not provide before asking again.
    pub retry: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            wait: Duration::from_secs(10),
            window: 16,
            commit_bytes: 256 << 20,
            commit_age: Duration::from_secs(1),
            retry: Duration::from_secs(2),
        }
    }
}

/// What the feed answers for one chunk.
#[derive(Debug)]
pub enum Answer {
    Data(Vec<u8>),
    Zero,
    Error(String),
}

/// What the backend sends to its feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedMsg {
    Want {
        chunks: Vec<u64>,
        urgent: bool,
    },
    /// Every chunk is in; the feed ends.
    Complete,
}

/// An answer the backend does not take; nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("Chunk {chunk} lies outside the disk ({chunks} chunks)")]
    OutOfRange { chunk: u64, chunks: u64 },
    #[error("Chunk {0} was not wanted")]
    NotWanted(u64),
    #[error("Chunk {chunk} has {actual} bytes, it should have {expected}")]
    Length { chunk: u64, expected: u64, actual: u64 },
    #[error("This feed was replaced by a newer one")]
    Stale,
    #[error("Cannot fill chunk {chunk}")]
    Fill {
        chunk: u64,
        #[source]
        source: disk::Error,
    },
    #[error("Cannot record restored chunks")]
    Commit(#[source] disk::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Map(#[from] map::Error),
    #[error("Restore map {} says the disk has {map} bytes, the image has {image}", path.display())]
    Size { path: PathBuf, map: u64, image: u64 },
}

/// A disk's restore state for status.
#[derive(Clone, Debug)]
pub struct RestoreStatus {
    pub info: MapInfo,
    pub map_path: PathBuf,
    pub fed: bool,
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Guest requests that had to wait for a chunk, and for how long in total.
    pub waits: AtomicU64,
    pub wait_us: AtomicU64,
    pub wait_failures: AtomicU64,
    pub filled_chunks: AtomicU64,
    pub commits: AtomicU64,
}

#[derive(Debug)]
struct Feed {
    gen: u64,
    tx: mpsc::UnboundedSender<FeedMsg>,
}

#[derive(Debug)]
struct State {
    /// Chunks whose bytes are in the image (synced or not).
    restored: Bits,
    /// Blocks the guest wrote in chunks not restored when it wrote them.
    written: Bits,
    /// Visible bits not yet durable in the map.
    pending_chunks: Vec<u64>,
    pending_blocks: Vec<u64>,
    /// The bytes of `pending_chunks`, and when the first of them was filled.
    pending_bytes: u64,
    pending_since: Option<Instant>,
    feed: Option<Feed>,
    next_gen: u64,
    /// Chunks asked of the current feed and not answered: true when urgent.
    wanted: HashMap<u64, bool>,
    /// Guest requests waiting, per chunk.
    waiting: HashMap<u64, usize>,
    /// Error answers received, per chunk: a waiter that sees the count change fails.
    errors: HashMap<u64, u64>,
    /// Chunks the feed could not provide, and when: the background leaves them alone for a
    /// while (a new feed asks at once).
    skip: HashMap<u64, Instant>,
    /// Where the background looks for the next chunk to want.
    cursor: u64,
}

/// One disk under live restore. A [`DiskFile`] over the image.
#[derive(Debug)]
pub struct RestoreDisk {
    image: Arc<dyn DiskFile>,
    map_path: PathBuf,
    size: u64,
    chunk_size: u64,
    opts: Options,
    state: Mutex<State>,
    changed: Condvar,
    /// The durable bits; held for the whole of a commit, so that commits are ordered.
    map: Mutex<Map>,
    stripes: Vec<RwLock<()>>,
    /// Every chunk is durable and the map says so: the disk is the plain image.
    complete: AtomicBool,
    /// `State::restored` again, readable without the lock: a read over restored chunks (the
    /// common case once the guest has touched its working set) takes no lock. Bits only go
    /// from 0 to 1, each set after its chunk's bytes are in the image.
    restored_fast: Vec<AtomicU64>,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(msg: String) -> disk::Error {
    disk::Error::Io(io::Error::other(msg))
}

/// Opens the restore state of `image` if it has a map: `None` when there is none, or when it
/// says the restore is complete (the disk is then a plain image).
pub fn open(image_path: &Path, image: Arc<dyn DiskFile>, opts: Options) -> Result<Option<RestoreDisk>, OpenError> {
    let path = map::map_path(image_path);
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(map::Error::Open { path, source }.into()),
    };
    let map = Map::open_for(Arc::new(file), image.size())?;
    if map.header().complete() {
        info!(map = %path.display(), "restore map says the restore is complete; serving the plain image");
        return Ok(None);
    }
    RestoreDisk::new(image, map, path, opts).map(Some)
}

impl RestoreDisk {
    /// Wraps `image` under `map` (the map file's path only names it in status).
    pub fn new(image: Arc<dyn DiskFile>, map: Map, map_path: PathBuf, opts: Options) -> Result<Self, OpenError> {
        let h = map.header().clone();
        if h.size != image.size() {
            return Err(OpenError::Size { path: map_path, map: h.size, image: image.size() });
        }
        let state = State {
            restored: map.chunks.clone(),
            written: map.blocks.clone(),
            pending_chunks: Vec::new(),
            pending_blocks: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            feed: None,
            next_gen: 1,
            wanted: HashMap::new(),
            waiting: HashMap::new(),
            errors: HashMap::new(),
            skip: HashMap::new(),
            cursor: 0,
        };
        let complete = h.complete() || map.chunks.ones() == map.chunks.len();
        let restored_fast: Vec<AtomicU64> = (0..map.chunks.len().div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        for c in (0..map.chunks.len()).filter(|&c| map.chunks.get(c)) {
            restored_fast[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Relaxed);
        }
        let disk = RestoreDisk {
            image,
            map_path,
            size: h.size,
            chunk_size: h.chunk_size,
            opts,
            state: Mutex::new(state),
            changed: Condvar::new(),
            map: Mutex::new(map),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            complete: AtomicBool::new(false),
            restored_fast,
            counters: Counters::default(),
        };

        if complete {
            // Every chunk was durable but the header was not rewritten yet.
            disk.finish().map_err(|e| match e {
                disk::Error::Io(source) => OpenError::Map(map::Error::Io(source)),
                other => OpenError::Map(map::Error::Io(io::Error::other(other.to_string()))),
            })?;
        }
        Ok(disk)
    }

    pub fn image(&self) -> &Arc<dyn DiskFile> {
        &self.image
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk_size;
        (start, (start + self.chunk_size).min(self.size))
    }

    /// The chunks `[offset, offset + len)` touches.
    fn mark_fast(&self, c: u64) {
        if let Some(w) = self.restored_fast.get((c / 64) as usize) {
            w.fetch_or(1 << (c % 64), Ordering::Release);
        }
    }

    /// Every chunk `offset..offset + len` touches is restored, as the lock-free copy says.
    fn restored_fast(&self, offset: u64, len: u64) -> bool {
        self.chunks_of(offset, len).all(|c| {
            self.restored_fast.get((c / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
        })
    }

    fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.chunk_size..(offset + len - 1) / self.chunk_size + 1
    }

    fn stripe(&self, c: u64) -> &RwLock<()> {
        &self.stripes[(c % STRIPES as u64) as usize]
    }

    pub fn status(&self) -> RestoreStatus {
        let mut info = lock(&self.map).info();
        info.complete |= self.is_complete();
        RestoreStatus { info, map_path: self.map_path.clone(), fed: lock(&self.state).feed.is_some() }
    }

    // ---- the feed ----

    /// Attaches a new feed, replacing the one before (its stream ends). Everything not yet
    /// answered is wanted again from this one.
    pub fn attach(&self) -> (u64, mpsc::UnboundedReceiver<FeedMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = lock(&self.state);
        let gen = st.next_gen;
        st.next_gen += 1;
        st.wanted.clear();
        st.skip.clear();
        st.feed = Some(Feed { gen, tx });
        if self.is_complete() {
            Self::send(&mut st, FeedMsg::Complete);
            st.feed = None;
            return (gen, rx);
        }
        let mut urgent: Vec<u64> = st.waiting.keys().copied().filter(|c| !st.restored.get(*c)).collect();
        urgent.sort_unstable();
        if !urgent.is_empty() {
            for c in &urgent {
                st.wanted.insert(*c, true);
            }
            Self::send(&mut st, FeedMsg::Want { chunks: urgent, urgent: true });
        }
        self.top_up(&mut st);
        info!(feed = gen, "restore feed attached");
        (gen, rx)
    }

    /// The feed `gen` went away: what it did not answer is wanted from the next one.
    pub fn detach(&self, gen: u64) {
        let mut st = lock(&self.state);
        if st.feed.as_ref().is_some_and(|f| f.gen == gen) {
            st.feed = None;
            st.wanted.clear();
            info!(feed = gen, "restore feed detached");
        }
    }

    fn send(st: &mut State, msg: FeedMsg) {
        if let Some(f) = &st.feed {
            if f.tx.send(msg).is_err() {
                st.feed = None;
                st.wanted.clear();
            }
        }
    }

    /// Keeps `window` background wants outstanding, in chunk order from the cursor.
    fn top_up(&self, st: &mut State) {
        if st.feed.is_none() {
            return;
        }
        let retry = self.opts.retry;
        st.skip.retain(|_, at| at.elapsed() < retry);
        let outstanding = st.wanted.values().filter(|u| !**u).count();
        let mut more = Vec::new();
        let start = st.cursor.min(st.restored.len());
        let (mut from, mut wrapped) = (start, false);
        while outstanding + more.len() < self.opts.window {
            let c = match st.restored.next_clear(from) {
                Some(c) if !(wrapped && c >= start) => c,
                _ if wrapped => break,
                _ => {
                    (from, wrapped) = (0, true);
                    continue;
                }
            };
            from = c + 1;
            if !st.wanted.contains_key(&c) && !st.skip.contains_key(&c) {
                more.push(c);
            }
        }
        if let Some(&last) = more.last() {
            st.cursor = last + 1;
            for c in &more {
                st.wanted.insert(*c, false);
            }
            Self::send(st, FeedMsg::Want { chunks: more, urgent: false });
        }
    }

    /// Takes one answer of feed `gen`. Checks it, fills the chunk (or fails its waiters), and
    /// commits when the fills pending hold [`Options::commit_bytes`] or the oldest is
    /// [`Options::commit_age`] old (unless a commit is under way: it took the older fills, the
    /// next answer or tick commits the rest), or when every chunk is visible.
    ///
    /// Answers of one feed may be taken on several threads at once: a fill excludes only the
    /// guest writes into its own chunk, and a commit never holds the fills back.
    pub fn answer(&self, gen: u64, chunk: u64, mut answer: Answer) -> Result<(), AnswerError> {
        let chunks = self.chunks();
        {
            let st = lock(&self.state);
            if st.feed.as_ref().is_none_or(|f| f.gen != gen) {
                return Err(AnswerError::Stale);
            }
            if chunk >= chunks {
                return Err(AnswerError::OutOfRange { chunk, chunks });
            }
            if !st.wanted.contains_key(&chunk) {
                return Err(AnswerError::NotWanted(chunk));
            }
        }
        let (start, end) = self.chunk_range(chunk);
        if let Answer::Data(d) = &answer {
            if d.len() as u64 != end - start {
                return Err(AnswerError::Length { chunk, expected: end - start, actual: d.len() as u64 });
            }
        }
        if let Answer::Error(e) = answer {
            let mut st = lock(&self.state);
            debug!(chunk, error = %e, "the feed could not provide a chunk");
            st.wanted.remove(&chunk);
            *st.errors.entry(chunk).or_insert(0) += 1;
            st.skip.insert(chunk, Instant::now());
            self.changed.notify_all();
            self.top_up(&mut st);
            return Ok(());
        }
        self.fill(chunk, &mut answer).map_err(|source| AnswerError::Fill { chunk, source })?;
        let due = {
            let mut st = lock(&self.state);
            self.top_up(&mut st);
            st.pending_bytes >= self.opts.commit_bytes
                || st.pending_since.is_some_and(|t| t.elapsed() >= self.opts.commit_age)
        };
        if self.all_visible() {
            self.commit().map_err(AnswerError::Commit)?;
        } else if due {
            let committed = match self.map.try_lock() {
                Ok(map) => self.commit_locked(map),
                Err(std::sync::TryLockError::Poisoned(p)) => self.commit_locked(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => Ok(()),
            };
            committed.map_err(AnswerError::Commit)?;
        }
        Ok(())
    }

    /// Called when the feed is idle: commits the fills not yet durable, and asks again for the
    /// chunks whose retry delay passed.
    pub fn tick(&self) -> disk::Result<()> {
        self.commit()?;
        let mut st = lock(&self.state);
        self.top_up(&mut st);
        Ok(())
    }

    fn all_visible(&self) -> bool {
        let st = lock(&self.state);
        st.restored.ones() == st.restored.len()
    }

    /// Writes chunk `c`'s bytes into every block the guest has not written.
    fn fill(&self, c: u64, answer: &mut Answer) -> disk::Result<()> {
        let _excl = self.stripe(c).write().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = self.chunk_range(c);
        let runs = {
            let st = lock(&self.state);
            if st.restored.get(c) {
                return Ok(());
            }
            // Maximal runs of blocks the guest has not written.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut b = start / BLOCK_SIZE;
            while b * BLOCK_SIZE < end {
                let (bs, be) = (b * BLOCK_SIZE, ((b + 1) * BLOCK_SIZE).min(end));
                if !st.written.get(b) {
                    match runs.last_mut() {
                        Some(r) if r.1 == bs => r.1 = be,
                        _ => runs.push((bs, be)),
                    }
                }
                b += 1;
            }
            runs
        };
        for (rs, re) in runs {
            match answer {
                Answer::Data(d) => {
                    let part = &mut d[(rs - start) as usize..(re - start) as usize];
                    self.image.write_vectored_at(&[Buf::from(part)], rs)?;
                }
                Answer::Zero => self.image.write_zeroes(rs, re - rs, false)?,
                Answer::Error(_) => return Ok(()),
            }
        }
        let mut st = lock(&self.state);
        st.restored.set(c);
        self.mark_fast(c);
        st.pending_chunks.push(c);
        st.pending_bytes += end - start;
        st.pending_since.get_or_insert_with(Instant::now);
        st.wanted.remove(&c);
        self.counters.filled_chunks.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
        Ok(())
    }

    /// Makes the visible bits durable: takes them, syncs the image, writes and syncs the map.
    /// When every chunk is durable, records the restore complete.
    pub fn commit(&self) -> disk::Result<()> {
        self.commit_locked(lock(&self.map))
    }

    /// [`Self::commit`], the map's lock taken. The bits are taken before the image's sync: a
    /// chunk filled while it runs is left to the next commit.
    fn commit_locked(&self, mut map: MutexGuard<'_, Map>) -> disk::Result<()> {
        let (chunks, blocks, bytes, since) = {
            let mut st = lock(&self.state);
            (
                std::mem::take(&mut st.pending_chunks),
                std::mem::take(&mut st.pending_blocks),
                std::mem::take(&mut st.pending_bytes),
                st.pending_since.take(),
            )
        };
        let result = (|| {
            self.image.flush()?;
            if chunks.is_empty() && blocks.is_empty() {
                return Ok(false);
            }
            for c in &chunks {
                map.chunks.set(*c);
            }
            for b in &blocks {
                map.blocks.set(*b);
            }
            map.persist()?;
            self.counters.commits.fetch_add(1, Ordering::Relaxed);
            Ok(map.chunks.ones() == map.chunks.len())
        })();
        match result {
            Ok(true) => {
                drop(map);
                self.finish()
            }
            Ok(false) => Ok(()),
            Err(e) => {
                // Nothing was lost: put the bits back for the next commit (the map's own pages
                // stay dirty as well).
                let mut st = lock(&self.state);
                st.pending_chunks.extend(chunks);
                st.pending_blocks.extend(blocks);
                st.pending_bytes += bytes;
                st.pending_since = match (st.pending_since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Err(e)
            }
        }
    }

    /// Every chunk is durable: records it in the header, and the disk is the plain image.
    fn finish(&self) -> disk::Result<()> {
        let mut map = lock(&self.map);
        if !map.header().complete() {
            map.set_complete().map_err(|e| match e {
                map::Error::Io(e) => disk::Error::Io(e),
                other => io_error(other.to_string()),
            })?;
        }
        self.complete.store(true, Ordering::Release);
        let mut st = lock(&self.state);
        Self::send(&mut st, FeedMsg::Complete);
        st.feed = None;
        st.wanted.clear();
        self.changed.notify_all();
        info!(map = %self.map_path.display(), "live restore complete");
        Ok(())
    }

    // ---- guest requests ----

    /// Whether `[s, e)` inside chunk `c` needs the chunk's data: it is not restored and some
    /// block of the range was not written by the guest.
    fn needs(&self, st: &State, c: u64, s: u64, e: u64) -> bool {
        if st.restored.get(c) {
            return false;
        }
        (s / BLOCK_SIZE..e.div_ceil(BLOCK_SIZE)).any(|b| !st.written.get(b))
    }

    /// Wants urgently every chunk `[offset, offset + len)` needs, then waits for them.
    fn ensure(&self, offset: u64, len: u64, partial_blocks_only: bool) -> disk::Result<()> {
        if self.restored_fast(offset, len) {
            return Ok(());
        }
        let needed = {
            let mut st = lock(&self.state);
            let mut urgent = Vec::new();
            let needed = self.want(&mut st, offset, len, partial_blocks_only, &mut urgent);
            Self::want_urgently(&mut st, urgent);
            needed
        };
        self.wait_for(&needed, Instant::now())
    }

    /// Registers a request for `[offset, offset + len)` as waiting for the chunks it needs, and
    /// adds those not yet wanted urgently of the feed to `urgent`. Returns the chunks to wait
    /// for, each with its error count (see [`Self::wait_for`]).
    fn want(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        partial_blocks_only: bool,
        urgent: &mut Vec<u64>,
    ) -> Vec<(u64, u64)> {
        let mut needed = Vec::new();
        for c in self.chunks_of(offset, len) {
            let (cs, ce) = self.chunk_range(c);
            let (s, e) = (offset.max(cs), (offset + len).min(ce));
            let need = if partial_blocks_only {
                // A write needs the chunk only where it covers part of a block.
                !st.restored.get(c) && (!self.block_edge(s) || !self.block_edge(e))
            } else {
                self.needs(st, c, s, e)
            };
            if !need {
                continue;
            }
            *st.waiting.entry(c).or_insert(0) += 1;
            let errors = st.errors.get(&c).copied().unwrap_or(0);
            needed.push((c, errors));
            if st.wanted.get(&c) != Some(&true) && st.feed.is_some() {
                st.wanted.insert(c, true);
                urgent.push(c);
            }
        }
        needed
    }

    /// Sends one urgent want for `chunks`, if any.
    fn want_urgently(st: &mut State, mut chunks: Vec<u64>) {
        if !chunks.is_empty() {
            chunks.sort_unstable();
            chunks.dedup();
            Self::send(st, FeedMsg::Want { chunks, urgent: true });
        }
    }

    /// Waits until every chunk of `needed` (registered by [`Self::want`]) is visible, at most
    /// [`Options::wait`] from `started`; fails at once for a chunk whose error count changed
    /// (the feed answered it with an error). Unregisters the request.
    fn wait_for(&self, needed: &[(u64, u64)], started: Instant) -> disk::Result<()> {
        if needed.is_empty() {
            return Ok(());
        }
        let deadline = started + self.opts.wait;
        let mut result = Ok(());
        let mut st = lock(&self.state);
        for &(c, errors) in needed {
            if result.is_err() {
                break;
            }
            loop {
                if st.restored.get(c) {
                    break;
                }
                if st.errors.get(&c).copied().unwrap_or(0) != errors {
                    result = Err(io_error(format!("chunk {c} of the backup could not be read")));
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    result = Err(disk::Error::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("chunk {c} of the backup did not arrive in {:?}", self.opts.wait),
                    )));
                    break;
                }
                st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
            }
        }
        for &(c, _) in needed {
            if let Some(n) = st.waiting.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    st.waiting.remove(&c);
                }
            }
        }
        drop(st);
        self.counters.waits.fetch_add(1, Ordering::Relaxed);
        self.counters.wait_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if result.is_err() {
            self.counters.wait_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Whether `x` is a block boundary (or the end of the disk).
    fn block_edge(&self, x: u64) -> bool {
        x % BLOCK_SIZE == 0 || x == self.size
    }

    /// Runs a guest change of `[offset, offset + len)`: chunks it covers only partly at a block
    /// are filled first; in the others it marks the blocks it wrote, under the stripe locks.
    fn change(&self, offset: u64, len: u64, apply: impl FnOnce() -> disk::Result<()>) -> disk::Result<()> {
        check_range(self.size, offset, len)?;
        if self.is_complete() || len == 0 {
            return apply();
        }
        self.ensure(offset, len, true)?;
        let chunks: Vec<u64> = {
            let st = lock(&self.state);
            self.chunks_of(offset, len).filter(|c| !st.restored.get(*c)).collect()
        };
        let mut stripes: Vec<usize> = chunks.iter().map(|c| (c % STRIPES as u64) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> =
            stripes.iter().map(|i| self.stripes[*i].read().unwrap_or_else(PoisonError::into_inner)).collect();
        apply()?;
        let mut st = lock(&self.state);
        for c in chunks {
            if st.restored.get(c) {
                continue;
            }
            let (cs, ce) = self.chunk_range(c);
            let (s, e) = (offset.max(cs), (offset + len).min(ce));
            for b in s / BLOCK_SIZE..e.div_ceil(BLOCK_SIZE) {
                if st.written.set(b) {
                    st.pending_blocks.push(b);
                }
            }
        }
        Ok(())
    }
}

impl DiskFile for RestoreDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        self.image.format()
    }

    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        let len = total_len(bufs);
        check_range(self.size, offset, len)?;
        if !self.is_complete() {
            self.ensure(offset, len, false)?;
        }
        self.image.read_vectored_at(bufs, offset)
    }

    /// Every chunk the batch's reads need is wanted in one urgent want before any read waits,
    /// so that the feed fetches them together.
    fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<disk::Result<()>> {
        if self.is_complete() {
            return self.image.read_batch(reads);
        }
        let started = Instant::now();
        let mut results: Vec<Option<disk::Result<()>>> = reads.iter().map(|_| None).collect();
        let mut needed: Vec<Option<Vec<(u64, u64)>>> = reads.iter().map(|_| None).collect();
        let mut to_want = Vec::new();
        for (i, (offset, bufs)) in reads.iter().enumerate() {
            let len = total_len(bufs);
            match check_range(self.size, *offset, len) {
                Ok(()) if self.restored_fast(*offset, len) => needed[i] = Some(Vec::new()),
                Ok(()) => to_want.push((i, *offset, len)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !to_want.is_empty() {
            let mut st = lock(&self.state);
            let mut urgent = Vec::new();
            for (i, offset, len) in to_want {
                needed[i] = Some(self.want(&mut st, offset, len, false, &mut urgent));
            }
            Self::want_urgently(&mut st, urgent);
        }
        let mut ready = Vec::new();
        let mut ready_idx = Vec::new();
        for (i, n) in needed.iter().enumerate() {
            let Some(n) = n else { continue };
            match self.wait_for(n, started) {
                Ok(()) => {
                    ready.push(reads[i]);
                    ready_idx.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in ready_idx.into_iter().zip(self.image.read_batch(&ready)) {
            results[i] = Some(r);
        }
        results.into_iter().map(|r| r.unwrap_or(Err(disk::Error::Failed))).collect()
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        self.change(offset, total_len(bufs), || self.image.write_vectored_at(bufs, offset))
    }

    fn flush(&self) -> disk::Result<()> {
        if self.is_complete() {
            return self.image.flush();
        }
        self.commit()
    }

    fn publish(&self) -> disk::Result<()> {
        self.image.publish()
    }

    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        check_range(self.size, offset, len)?;
        if self.is_complete() {
            return self.image.discard(offset, len);
        }
        // Discarded content is unspecified: in chunks not restored the backup's bytes may as
        // well stay what it reads. Restored chunks pass it on.
        let st = lock(&self.state);
        let runs: Vec<(u64, u64)> = self
            .chunks_of(offset, len)
            .filter(|c| st.restored.get(*c))
            .map(|c| {
                let (cs, ce) = self.chunk_range(c);
                (offset.max(cs), (offset + len).min(ce))
            })
            .collect();
        drop(st);
        for (s, e) in runs {
            self.image.discard(s, e - s)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> disk::Result<()> {
        self.change(offset, len, || self.image.write_zeroes(offset, len, unmap))
    }
}

/// Opens a map on any [`MetaFile`] (the tests' crash-prone memory).
pub fn open_on(
    image: Arc<dyn DiskFile>,
    file: Arc<dyn MetaFile>,
    map_path: PathBuf,
    opts: Options,
) -> Result<Option<RestoreDisk>, OpenError> {
    let map = Map::open(file)?;
    if map.header().complete() {
        return Ok(None);
    }
    RestoreDisk::new(image, map, map_path, opts).map(Some)
}

/// Logs an answer the backend refused: a chunk answered twice (wanted in the background, then
/// urgently) or by a replaced feed is routine; anything else is the feeder's bug.
pub fn warn_refused(disk: &str, e: &AnswerError) {
    match e {
        AnswerError::NotWanted(_) | AnswerError::Stale => debug!(disk, error = %e, "restore feed answer ignored"),
        _ => warn!(disk, error = %e, "restore feed answer ignored"),
    }
}
