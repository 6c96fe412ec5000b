//! Changed-block tracking: one persistent bitmap per disk and generation.
//!
//! A bit covers `granularity` bytes of the virtual disk. A write sets its bits and writes them
//! to the bitmap's file *before* the data goes to the disk, so a write that reached the disk is
//! always in the file too; after a crash of the process the page cache still holds both. A
//! crash of the whole host can lose bitmap pages whose data pages survived: the header records
//! the boot it was opened in, and a map left open by an earlier boot is no longer trusted.
//!
//! Layout (`docs/delta-format.md`): a 4 KiB header (magic, version, flags, generation,
//! granularity, disk size, boot id, the reason it is untrusted, CRC), then the bitmap, bit `i`
//! of byte `i / 8` for block `i`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::store::MetaFile;

const MAGIC: &[u8; 8] = b"LSNAPCBT";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
const FLAG_UNTRUSTED: u32 = 1;
const FLAG_OPEN: u32 = 2;
const MAX_REASON: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Change map has a damaged header")]
    BadHeader,
    #[error("Change map is generation {found}, expected {expected}")]
    WrongGeneration { found: u64, expected: u64 },
    #[error("Change map describes a disk of {found} bytes, this disk has {expected}")]
    WrongSize { found: u64, expected: u64 },
    /// Reading or writing the map file failed: the I/O error says why.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The id of the running boot of the host, as the kernel reports it.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

#[derive(Debug)]
struct Trust {
    untrusted: Option<String>,
    /// The file's header says untrusted, durably: a restart cannot take the map for whole.
    recorded: bool,
}

/// One generation of a disk's change map.
#[derive(Debug)]
pub struct Bitmap {
    gen: u64,
    granularity: u64,
    size: u64,
    boot_id: String,
    words: Vec<AtomicU64>,
    file: Arc<dyn MetaFile>,
    /// Held while bits are written to the file, and guards the trust.
    trust: Mutex<Trust>,
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

impl Bitmap {
    fn blocks(size: u64, granularity: u64) -> u64 {
        size.div_ceil(granularity)
    }

    /// Creates generation `gen` in the empty `file`, all clear; `untrusted` says why it cannot
    /// be trusted from the start, if so.
    pub fn create(
        file: Arc<dyn MetaFile>,
        gen: u64,
        granularity: u64,
        size: u64,
        untrusted: Option<String>,
        boot_id: &str,
    ) -> Result<Self, Error> {
        let nwords = Self::blocks(size, granularity).div_ceil(64);
        let bm = Bitmap {
            gen,
            granularity,
            size,
            boot_id: boot_id.to_owned(),
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            file,
            trust: Mutex::new(Trust { untrusted, recorded: false }),
        };
        bm.file.set_len(0)?;
        bm.file.set_len(HEADER_LEN + nwords * 8)?;
        bm.write_header(true)?;
        Ok(bm)
    }

    /// Opens generation `gen` from `file` and marks it open in this boot.
    pub fn open(file: Arc<dyn MetaFile>, gen: u64, granularity: u64, size: u64, boot_id: &str) -> Result<Self, Error> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        if file.read_at(&mut h, 0)? != h.len()
            || &h[0..8] != MAGIC
            || u32_at(&h, 8) != VERSION
            || u32_at(&h, 4092) != crc32fast::hash(&h[0..4092])
        {
            return Err(Error::BadHeader);
        }
        let flags = u32_at(&h, 12);
        let found = u64_at(&h, 16);
        if found != gen {
            return Err(Error::WrongGeneration { found, expected: gen });
        }
        if u64_at(&h, 24) != granularity {
            return Err(Error::BadHeader);
        }
        let found_size = u64_at(&h, 32);
        if found_size != size {
            return Err(Error::WrongSize { found: found_size, expected: size });
        }
        let old_boot = String::from_utf8_lossy(&h[41..41 + usize::from(h[40]).min(64)]).into_owned();
        let reason_len = usize::from(u16::from_le_bytes([h[106], h[107]])).min(MAX_REASON);
        let mut untrusted =
            (flags & FLAG_UNTRUSTED != 0).then(|| String::from_utf8_lossy(&h[128..128 + reason_len]).into_owned());
        if untrusted.is_none() && flags & FLAG_OPEN != 0 && old_boot != boot_id {
            untrusted = Some(
                "the host restarted while the disk was in use; writes not yet flushed may have reached the disk untracked"
                    .into(),
            );
        }
        let nwords = Self::blocks(size, granularity).div_ceil(64);
        let mut body = vec![0u8; (nwords * 8) as usize];
        if file.read_at(&mut body, HEADER_LEN)? != body.len() {
            untrusted.get_or_insert_with(|| "the change map file is truncated".into());
        }
        let words = body.chunks_exact(8).map(|w| AtomicU64::new(u64_at(w, 0))).collect();
        let bm = Bitmap {
            gen,
            granularity,
            size,
            boot_id: boot_id.to_owned(),
            words,
            file,
            trust: Mutex::new(Trust { untrusted, recorded: false }),
        };
        bm.write_header(true)?;
        Ok(bm)
    }

    fn write_header(&self, open: bool) -> io::Result<()> {
        let mut trust = self.trust.lock().unwrap_or_else(PoisonError::into_inner);
        self.write_header_locked(&mut trust, open)
    }

    fn write_header_locked(&self, trust: &mut Trust, open: bool) -> io::Result<()> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = if open { FLAG_OPEN } else { 0 };
        if trust.untrusted.is_some() {
            flags |= FLAG_UNTRUSTED;
        }
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.gen.to_le_bytes());
        h[24..32].copy_from_slice(&self.granularity.to_le_bytes());
        h[32..40].copy_from_slice(&self.size.to_le_bytes());
        let boot = self.boot_id.as_bytes();
        let blen = boot.len().min(64);
        h[40] = blen as u8;
        h[41..41 + blen].copy_from_slice(&boot[..blen]);
        if let Some(reason) = &trust.untrusted {
            let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
            h[106..108].copy_from_slice(&(r.len() as u16).to_le_bytes());
            h[128..128 + r.len()].copy_from_slice(r);
        }
        let c = crc32fast::hash(&h[0..4092]);
        h[4092..4096].copy_from_slice(&c.to_le_bytes());
        self.file.write_at(&h, 0)?;
        self.file.sync()?;
        trust.recorded = trust.untrusted.is_some();
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.gen
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Why the map may miss writes, if it may.
    pub fn untrusted(&self) -> Option<String> {
        self.trust.lock().unwrap_or_else(PoisonError::into_inner).untrusted.clone()
    }

    /// Records that the map may miss writes from now on, durably if the file allows; whether
    /// the file says so.
    pub fn distrust(&self, reason: &str) -> bool {
        let mut trust = self.trust.lock().unwrap_or_else(PoisonError::into_inner);
        if trust.untrusted.is_none() {
            trust.untrusted = Some(reason.to_owned());
        }
        if !trust.recorded {
            if let Err(e) = self.write_header_locked(&mut trust, true) {
                tracing::error!(error = %livesnap_proto::error::chain(&e), "cannot record that the change map is untrusted");
            }
        }
        trust.recorded
    }

    fn block_range(&self, start: u64, end: u64) -> (u64, u64) {
        (start / self.granularity, end.div_ceil(self.granularity))
    }

    fn is_set(&self, block: u64) -> bool {
        self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Records that bytes `[start, end)` are about to change. Call before writing them; an
    /// error means the write must not happen: neither the bits nor the map's distrust reached
    /// the file, so a restart would take the map for whole and miss the write.
    ///
    /// A bit is set in memory only after the file holds it: a second writer of the same block
    /// that finds the bit set (and skips the file) can rely on the file having it.
    pub fn mark(&self, start: u64, end: u64) -> io::Result<()> {
        if start >= end.min(self.size) {
            return Ok(());
        }
        let (first, last) = self.block_range(start, end.min(self.size));
        if (first..last).all(|b| self.is_set(b)) {
            return Ok(());
        }
        let trust = self.trust.lock().unwrap_or_else(PoisonError::into_inner);
        let (w0, w1) = (first / 64, (last - 1) / 64 + 1);
        let mut masks = Vec::with_capacity((w1 - w0) as usize);
        let mut bytes = Vec::with_capacity(((w1 - w0) * 8) as usize);
        for w in w0..w1 {
            let lo = (w * 64).max(first);
            let hi = ((w + 1) * 64).min(last);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << (lo % 64) };
            // Other writers change these words only under `trust`, which is held.
            let v = self.words[w as usize].load(Ordering::Acquire) | mask;
            masks.push(mask);
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let written = self.file.write_at(&bytes, HEADER_LEN + w0 * 8);
        if written.is_ok() {
            for (w, mask) in (w0..w1).zip(masks) {
                self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            }
        }
        if let Err(e) = written {
            drop(trust);
            tracing::error!(error = %livesnap_proto::error::chain(&e), "cannot write the change map");
            if !self.distrust("a change map write failed") {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sets every block set in `other` too, durably.
    pub fn absorb(&self, other: &Bitmap) -> Result<(), Error> {
        if let Some(reason) = other.untrusted() {
            self.distrust(&reason);
        }
        let _trust = self.trust.lock().unwrap_or_else(PoisonError::into_inner);
        let mut body = Vec::with_capacity(self.words.len() * 8);
        for (mine, theirs) in self.words.iter().zip(&other.words) {
            body.extend_from_slice(&(mine.load(Ordering::Acquire) | theirs.load(Ordering::Acquire)).to_le_bytes());
        }
        // As in `mark`: into the file first, then into memory.
        let written = self.file.write_at(&body, HEADER_LEN).and_then(|()| self.file.sync());
        for (mine, theirs) in self.words.iter().zip(&other.words) {
            mine.fetch_or(theirs.load(Ordering::Acquire), Ordering::AcqRel);
        }
        written.map_err(Error::from)
    }

    /// The changed ranges, `(offset, length)` in bytes, sorted and coalesced.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let blocks = Self::blocks(self.size, self.granularity);
        for b in 0..blocks {
            if !self.is_set(b) {
                continue;
            }
            let start = b * self.granularity;
            let end = (start + self.granularity).min(self.size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Makes the bits durable and records a clean close.
    pub fn close(&self) -> Result<(), Error> {
        self.file.sync()?;
        self.write_header(false)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Arc<dyn MetaFile> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    /// A file whose writes wait until the test lets them through (`gate`), or fail at or past
    /// `fail_from` once `failing` is set.
    #[derive(Debug)]
    struct TestFile {
        inner: std::fs::File,
        gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
        fail_from: u64,
        failing: std::sync::atomic::AtomicBool,
    }

    impl TestFile {
        fn new(fail_from: u64) -> Arc<TestFile> {
            Arc::new(TestFile {
                inner: tempfile::tempfile().unwrap(),
                gate: Mutex::new(None),
                fail_from,
                failing: Default::default(),
            })
        }
    }

    impl MetaFile for TestFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            MetaFile::read_at(&self.inner, buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.failing.load(Ordering::Relaxed) && offset >= self.fail_from {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if let Some((writing, go)) = &*self.gate.lock().unwrap() {
                writing.send(()).unwrap();
                go.recv().unwrap();
            }
            MetaFile::write_at(&self.inner, buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            MetaFile::sync(&self.inner)
        }
        fn byte_len(&self) -> io::Result<u64> {
            self.inner.byte_len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            MetaFile::set_len(&self.inner, len)
        }
    }

    #[test]
    fn a_bit_shows_as_set_only_once_the_file_holds_it() {
        let f = TestFile::new(0);
        let bm = Arc::new(Bitmap::create(f.clone(), 1, 4096, 1 << 20, None, "b").unwrap());
        let (writing_tx, writing_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        *f.gate.lock().unwrap() = Some((writing_tx, go_rx));
        let marker = {
            let bm = bm.clone();
            std::thread::spawn(move || bm.mark(8192, 12288).unwrap())
        };
        writing_rx.recv().unwrap();
        // A second writer of block 2 now must not skip the file: the bit is not in it yet.
        assert!(!bm.is_set(2), "the bit was visible before the change map file held it");
        go_tx.send(()).unwrap();
        marker.join().unwrap();
        assert!(bm.is_set(2));
    }

    #[test]
    fn marks_survive_a_reopen_without_close_in_the_same_boot() {
        let f = file();
        let bm = Bitmap::create(f.clone(), 5, 65536, 10 << 20, None, "boot-a").unwrap();
        bm.mark(0, 512).unwrap();
        bm.mark(65536 * 3 + 100, 65536 * 5).unwrap();
        bm.mark((10 << 20) - 512, 10 << 20).unwrap();
        drop(bm);
        let bm = Bitmap::open(f, 5, 65536, 10 << 20, "boot-a").unwrap();
        assert_eq!(bm.untrusted(), None);
        assert_eq!(bm.extents(), vec![(0, 65536), (65536 * 3, 65536 * 2), ((10 << 20) - 65536, 65536)]);
    }

    #[test]
    fn a_map_left_open_by_an_earlier_boot_is_untrusted_and_a_closed_one_is_not() {
        let f = file();
        let bm = Bitmap::create(f.clone(), 1, 4096, 1 << 20, None, "boot-a").unwrap();
        bm.mark(0, 4096).unwrap();
        drop(bm);
        let bm = Bitmap::open(f.clone(), 1, 4096, 1 << 20, "boot-b").unwrap();
        assert!(bm.untrusted().unwrap().contains("host restarted"));

        let g = file();
        let bm = Bitmap::create(g.clone(), 1, 4096, 1 << 20, None, "boot-a").unwrap();
        bm.close().unwrap();
        let bm = Bitmap::open(g, 1, 4096, 1 << 20, "boot-b").unwrap();
        assert_eq!(bm.untrusted(), None);
    }

    #[test]
    fn untrust_persists_with_its_reason() {
        let f = file();
        let bm = Bitmap::create(f.clone(), 2, 4096, 1 << 20, Some("no map before".into()), "b").unwrap();
        bm.close().unwrap();
        let bm = Bitmap::open(f, 2, 4096, 1 << 20, "b").unwrap();
        assert_eq!(bm.untrusted().as_deref(), Some("no map before"));
    }

    #[test]
    fn a_damaged_or_foreign_header_is_an_error() {
        let f = file();
        Bitmap::create(f.clone(), 2, 4096, 1 << 20, None, "b").unwrap();
        assert!(matches!(Bitmap::open(f.clone(), 3, 4096, 1 << 20, "b"), Err(Error::WrongGeneration { .. })));
        assert!(matches!(Bitmap::open(f.clone(), 2, 4096, 2 << 20, "b"), Err(Error::WrongSize { .. })));
        f.write_at(&[1], 30).unwrap();
        assert!(matches!(Bitmap::open(f, 2, 4096, 1 << 20, "b"), Err(Error::BadHeader)));
    }

    #[test]
    fn absorb_unions_bits_and_distrust() {
        let a = Bitmap::create(file(), 1, 4096, 1 << 20, None, "b").unwrap();
        let b = Bitmap::create(file(), 2, 4096, 1 << 20, Some("why".into()), "b").unwrap();
        a.mark(0, 4096).unwrap();
        b.mark(8192, 12288).unwrap();
        a.absorb(&b).unwrap();
        assert_eq!(a.extents(), vec![(0, 4096), (8192, 4096)]);
        assert_eq!(a.untrusted().as_deref(), Some("why"));
    }

    #[test]
    fn a_failed_bit_write_is_recorded_as_distrust_or_fails_the_write() {
        // The bits cannot be written, the header can: the write may go on, and a restart finds
        // the map untrusted (the next backup is full).
        let f = TestFile::new(HEADER_LEN);
        let bm = Bitmap::create(f.clone(), 1, 4096, 1 << 20, None, "b").unwrap();
        f.failing.store(true, Ordering::Relaxed);
        bm.mark(0, 4096).unwrap();
        assert!(bm.untrusted().is_some());
        drop(bm);
        f.failing.store(false, Ordering::Relaxed);
        let bm = Bitmap::open(f, 1, 4096, 1 << 20, "b").unwrap();
        assert_eq!(bm.untrusted().as_deref(), Some("a change map write failed"));

        // Nothing can be written: the write must not happen, now or on a second try, or a
        // restart would take the map for whole and miss it.
        let f = TestFile::new(0);
        let bm = Bitmap::create(f.clone(), 1, 4096, 1 << 20, None, "b").unwrap();
        f.failing.store(true, Ordering::Relaxed);
        assert!(bm.mark(8192, 12288).is_err());
        assert!(!bm.is_set(2), "a bit the file does not hold shows as set");
        assert!(bm.mark(8192, 12288).is_err(), "a second write of the block skipped the file");
    }
}
