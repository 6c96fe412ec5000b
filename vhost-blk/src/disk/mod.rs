//! Disk images behind one small trait, and the one entry point that opens an image by its format.
//!
//! Nothing here knows about virtio or vhost-user: a disk is a range of bytes that can be read,
//! written, flushed, discarded and zeroed. Guest memory arrives as [`Buf`]s (vm-memory's volatile
//! slices), so the raw backend can hand guest pages straight to `preadv`/`pwritev`; the tests use
//! slices of ordinary vectors. Reads and writes a queue takes at once reach the disk together
//! (`read_batch`, `write_batch`); a raw image serves them through io_uring, with the host's page
//! cache or without it ([`Cache`]).
//!
//! - `raw.rs`: raw files and block devices, buffered or `O_DIRECT`;
//! - `qcow2.rs`: qcow2 through qcow2-rs, behind our own header checks.
//! - `uring.rs`: a queue thread's io_uring, which never leaves an operation in flight.

pub(crate) mod qcow2;
mod raw;
mod uring;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::VolatileSlice;

pub use self::qcow2::Qcow2Disk;
pub use self::raw::RawDisk;

/// A piece of memory a request reads into or writes from.
pub type Buf<'a> = VolatileSlice<'a, ()>;

/// The unit of every offset and length, as in virtio-blk.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot open image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Image {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("Image {} is not a qcow2 image", path.display())]
    NotQcow2 { path: PathBuf },
    #[error("Qcow2 image {} cannot be served: {reason}", path.display())]
    Qcow2Unsupported { path: PathBuf, reason: String },
    #[error("Image {} cannot be opened for direct I/O (cache=none); use cache=writeback", path.display())]
    NoDirectIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Qcow2 image {} cannot be served with cache=none yet; use cache=writeback", path.display())]
    Qcow2NoDirect { path: PathBuf },
    #[error("The qcow2 layer failed")]
    Qcow2(#[source] qcow2_rs::error::Qcow2Error),
    #[error("The qcow2 layer read {read} of {len} bytes")]
    Qcow2ShortRead { read: usize, len: u64 },
    #[error("The disk stopped serving after an internal fault; restart the backend")]
    Failed,
    #[error("Request of {len} bytes at offset {offset} lies outside the disk")]
    OutOfRange { offset: u64, len: u64 },
    #[error("I/O error")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The I/O error that caused this one, if there is one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            Error::Open { source, .. } | Error::NoDirectIo { source, .. } | Error::Io(source) => Some(source),
            Error::Qcow2(e) => Some(e.get_inner()),
            Error::Locked { .. }
            | Error::NotQcow2 { .. }
            | Error::Qcow2NoDirect { .. }
            | Error::Qcow2Unsupported { .. }
            | Error::Qcow2ShortRead { .. }
            | Error::Failed
            | Error::OutOfRange { .. } => None,
        }
    }
}

/// On-disk format of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown image format {s:?} (expected raw or qcow2)")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// How an image is cached on the host; QEMU's names for the same modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// Through the host's page cache (the default).
    #[default]
    Writeback,
    /// `O_DIRECT`: the host's page cache holds none of the image's data; reads and writes go
    /// to the device through io_uring. Raw images only.
    None,
}

impl FromStr for Cache {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "writeback" => Ok(Cache::Writeback),
            "none" => Ok(Cache::None),
            _ => Err(format!("unknown cache mode {s:?} (expected writeback or none)")),
        }
    }
}

impl fmt::Display for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cache::Writeback => "writeback",
            Cache::None => "none",
        })
    }
}

/// What a disk image can do. Every method may be called from several queue threads at once.
///
/// Offsets and lengths are in bytes; callers check them against [`DiskFile::size`] first
/// (see [`check_range`]), implementations check again where a bad range could corrupt data.
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn format(&self) -> Format;
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Makes every completed write visible to another process reading the image file, durable
    /// or not. A raw image needs nothing (the page cache is shared); a format that caches
    /// metadata in memory writes it out.
    fn publish(&self) -> Result<()> {
        Ok(())
    }
    /// Tells the disk that a range is no longer needed; its content becomes unspecified.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zeroes; `unmap` allows freeing its storage.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Runs independent reads, possibly at the same time; one result per read, in order.
    fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<Result<()>> {
        reads.iter().map(|(offset, bufs)| self.read_vectored_at(bufs, *offset)).collect()
    }
    /// Runs independent writes (none overlaps another), possibly at the same time; one result
    /// per write, in order. Every write has completed or failed when this returns, so that a
    /// [`DiskFile::flush`] after it covers each one that succeeded. A disk without a faster way
    /// (the snapshot engine's wrappers) writes them one after the other.
    fn write_batch(&self, writes: &[(u64, &[Buf<'_>])]) -> Vec<Result<()>> {
        writes.iter().map(|(offset, bufs)| self.write_vectored_at(bufs, *offset)).collect()
    }
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len }),
    }
}

/// Total length of `bufs` in bytes.
pub fn total_len(bufs: &[Buf<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Opens the image at `path` as `format`, or as the format its first bytes announce.
///
/// The image is locked (`flock`) exclusively, or shared when `readonly`, so that two backends
/// never write one image.
pub fn open(path: &Path, format: Option<Format>, readonly: bool) -> Result<Arc<dyn DiskFile>> {
    open_with(path, format, readonly, Cache::Writeback)
}

/// [`open`] with a cache mode. [`Cache::None`] opens a raw image a second time with
/// `O_DIRECT`; a qcow2 image with it is refused (its layer does its own buffered I/O).
pub fn open_with(path: &Path, format: Option<Format>, readonly: bool, cache: Cache) -> Result<Arc<dyn DiskFile>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| Error::Open { path: path.to_owned(), source })?;
    crate::sys::lock_file(&file, !readonly).map_err(|source| {
        if source.kind() == io::ErrorKind::WouldBlock {
            Error::Locked { path: path.to_owned() }
        } else {
            Error::Open { path: path.to_owned(), source }
        }
    })?;
    let format = match format {
        Some(f) => f,
        None => detect(&file).map_err(|source| Error::Open { path: path.to_owned(), source })?,
    };
    let open_err = |source| Error::Open { path: path.to_owned(), source };
    Ok(match (format, cache) {
        (Format::Raw, Cache::Writeback) => Arc::new(RawDisk::new(file).map_err(open_err)?),
        (Format::Raw, Cache::None) => {
            let direct = std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(|source| Error::NoDirectIo { path: path.to_owned(), source })?;
            Arc::new(RawDisk::with_cache(file, cache, Some(direct)).map_err(open_err)?)
        }
        (Format::Qcow2, Cache::Writeback) => Arc::new(Qcow2Disk::open(path, file, readonly)?),
        (Format::Qcow2, Cache::None) => return Err(Error::Qcow2NoDirect { path: path.to_owned() }),
    })
}

fn detect(mut file: &File) -> io::Result<Format> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match file.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(if n == magic.len() && magic == QCOW2_MAGIC { Format::Qcow2 } else { Format::Raw })
}
