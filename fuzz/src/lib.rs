//! What the fuzz targets share: in-memory stand-ins for the files and disks the parsers read.
//!
//! Each target in `fuzz_targets/` drives one parser of untrusted bytes through the entry the
//! real code uses, and asserts what must hold of whatever it accepts (README.md).

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use livesnap_blk::disk::{self, check_range, total_len, Buf, DiskFile, Format};
use livesnap_blk::snap::store::MetaFile;

/// A metadata file in memory, as the engine's [`MetaFile`] sees a real one.
#[derive(Debug, Default)]
pub struct MemFile(Mutex<Vec<u8>>);

impl MemFile {
    pub fn new(bytes: &[u8]) -> MemFile {
        MemFile(Mutex::new(bytes.to_vec()))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl MetaFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let c = self.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(c.len());
        let n = buf.len().min(c.len() - start);
        buf[..n].copy_from_slice(&c[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut c = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A parser that writes far past what it read is a bug the target should see, not an
        // allocation that takes the fuzzer down.
        assert!(start <= 1 << 26, "write at offset {start}");
        let end = start + buf.len();
        if c.len() < end {
            c.resize(end, 0);
        }
        c[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        assert!(len <= 1 << 26, "file set to {len} bytes");
        self.lock().resize(len as usize, 0);
        Ok(())
    }
}

/// What a [`MemDisk`] was asked to do that changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Write { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Zeroes { offset: u64, len: u64 },
}

/// A disk in memory that insists on being called only with ranges inside it, as the
/// [`DiskFile`] contract says callers check first.
#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    changes: Mutex<Vec<Change>>,
}

impl MemDisk {
    pub fn new(size: usize) -> MemDisk {
        MemDisk { data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()), changes: Mutex::default() }
    }

    pub fn changes(&self) -> Vec<Change> {
        self.changes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn checked(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.size();
        assert!(check_range(size, offset, len).is_ok(), "disk called with {len} bytes at {offset}, size {size}");
        offset as usize..(offset + len) as usize
    }

    fn change(&self, c: Change) {
        self.changes.lock().unwrap_or_else(PoisonError::into_inner).push(c);
    }
}

impl DiskFile for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(PoisonError::into_inner).len() as u64
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        let range = self.checked(offset, total_len(bufs));
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        let mut at = range.start;
        for b in bufs {
            b.copy_from(&data[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
        let len = total_len(bufs);
        let range = self.checked(offset, len);
        self.change(Change::Write { offset, len });
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        let mut at = range.start;
        for b in bufs {
            b.copy_to(&mut data[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }

    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.checked(offset, len);
        self.change(Change::Discard { offset, len });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> disk::Result<()> {
        let range = self.checked(offset, len);
        self.change(Change::Zeroes { offset, len });
        self.data.lock().unwrap_or_else(PoisonError::into_inner)[range].fill(0);
        Ok(())
    }
}

/// The little-endian u64 at `at`, or 0 past the end of `b`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |x| u64::from_le_bytes(x.try_into().unwrap_or_default()))
}
