//! Reading a frozen base in place, read-only: a raw file with `pread` (holes skipped), a qcow2
//! one through [`Qcow2Source`] (only the clusters a read touches; unallocated ones not at all).
//! Either is off the guest's I/O path: the backend never writes the base while the snapshot is
//! active, and it published a qcow2 base's metadata at the cut. Optionally at a bounded rate, so
//! a backup does not starve the host's storage.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livesnap_repo::{FileSource, Qcow2Source, Source};

/// A base ready to be read.
#[derive(Debug)]
pub struct Base {
    source: Image,
    limit: Option<RateLimit>,
    /// Once set (the job cancelled), every read fails.
    interrupt: Option<Arc<AtomicBool>>,
}

#[derive(Debug)]
enum Image {
    Raw(FileSource),
    Qcow2(Qcow2Source),
}

impl Image {
    fn source(&self) -> &dyn Source {
        match self {
            Image::Raw(s) => s,
            Image::Qcow2(s) => s,
        }
    }
}

/// What a read of a base whose job was cancelled fails with.
#[derive(Debug, thiserror::Error)]
#[error("The job was cancelled: the reading of the base stopped")]
pub struct Interrupted;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the frozen base `{}`", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The base format {0:?} is not raw or qcow2")]
    Format(String),
    #[error("The base is {actual} bytes, the backend says the disk is {expected}")]
    Size { expected: u64, actual: u64 },
}

impl Base {
    /// Opens the base at `path` (`format`: "raw" or "qcow2") of a disk of `size` bytes.
    pub fn open(path: &Path, format: &str, size: u64, rate: Option<u64>) -> Result<Base, Error> {
        let opened = match format {
            "raw" => FileSource::open(path).map(Image::Raw),
            "qcow2" => Qcow2Source::open(path).map(Image::Qcow2),
            other => return Err(Error::Format(other.to_owned())),
        };
        let source = opened.map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let actual = source.source().size();
        if actual != size {
            return Err(Error::Size { expected: size, actual });
        }
        Ok(Base { source, limit: rate.map(RateLimit::new), interrupt: None })
    }

    /// Bytes read from a qcow2 image file so far (data and metadata); `None` for a raw base,
    /// whose reads are the disk's own.
    pub fn image_bytes_read(&self) -> Option<u64> {
        match &self.source {
            Image::Raw(_) => None,
            Image::Qcow2(q) => Some(q.host_bytes_read()),
        }
    }

    /// Makes every read fail with [`Interrupted`] once `flag` is set.
    pub fn interrupted_by(mut self, flag: Arc<AtomicBool>) -> Base {
        self.interrupt = Some(flag);
        self
    }
}

impl Source for Base {
    fn size(&self) -> u64 {
        self.source.source().size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(io::Error::other(Interrupted));
        }
        if let Some(l) = &self.limit {
            l.take(buf.len() as u64);
        }
        self.source.source().read_at(buf, off)
    }

    fn reads_as_zero(&self, off: u64, len: u64) -> io::Result<bool> {
        self.source.source().reads_as_zero(off, len)
    }
}

/// A token bucket shared by the reading threads: `take(n)` sleeps until `n` more bytes fit in
/// the rate since the start.
#[derive(Debug)]
struct RateLimit {
    bytes_per_sec: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimit {
    fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit { bytes_per_sec: bytes_per_sec.max(1), state: Mutex::new((Instant::now(), 0)) }
    }

    fn take(&self, n: u64) {
        let due = {
            let mut s = match self.state.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            s.1 = s.1.saturating_add(n);
            s.0 + Duration::from_secs_f64(s.1 as f64 / self.bytes_per_sec as f64)
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}
