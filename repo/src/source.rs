//! What a backup reads from: a disk image (the frozen base), a file, a block device.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A readable disk of a fixed size. `read_at` fills the whole buffer or fails; it takes `&self`
/// so that several chunks can be read at once from different threads.
pub trait Source: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `off..off + buf.len()`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Whether every byte of `off..off + len` reads as zero without being stored (a hole in a
    /// sparse file, an unallocated qcow2 cluster), so that a backup need not read it. `false`
    /// when unsure: the range is then read and its zeros found the usual way.
    fn reads_as_zero(&self, off: u64, len: u64) -> io::Result<bool> {
        let _ = (off, len);
        Ok(false)
    }
}

/// A file or block device read with `pread`. The size is taken once, at open.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::new(File::open(path)?)
    }

    /// The size is found by seeking to the end, which works for block devices too (their
    /// metadata length is 0).
    pub fn new(mut file: File) -> io::Result<Self> {
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileSource { file, size })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    /// A hole: no data from `off` to past the range (`SEEK_DATA`). Block devices and file
    /// systems without holes report data everywhere.
    fn reads_as_zero(&self, off: u64, len: u64) -> io::Result<bool> {
        let Ok(start) = libc::off_t::try_from(off) else { return Ok(false) };
        // SAFETY: lseek(2) on a descriptor we own; it moves only the file offset, which no
        // read here uses (every read is positioned).
        let next = unsafe { libc::lseek(self.file.as_raw_fd(), start, libc::SEEK_DATA) };
        if next < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `off`.
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(true),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(next as u64 >= off.saturating_add(len))
    }
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let start = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).filter(|&end| end <= self.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, off)
    }
}

impl<S: Source + ?Sized> Source for &S {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        (**self).read_at(buf, off)
    }
}
