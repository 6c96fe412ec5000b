//! Reading a frozen base: a raw file directly (`pread`, off the guest's I/O path: the backend
//! never writes the base while the snapshot is active), a qcow2 one through `qemu-img convert -U`
//! into a raw scratch file first. Optionally at a bounded rate, so a backup does not starve the
//! host's storage.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livesnap_repo::{FileSource, Source};

/// A base ready to be read, and the scratch file behind it (removed when dropped).
#[derive(Debug)]
pub struct Base {
    source: FileSource,
    _scratch: Option<tempfile::NamedTempFile>,
    limit: Option<RateLimit>,
    /// Once set (the job cancelled), every read fails.
    interrupt: Option<Arc<AtomicBool>>,
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
    #[error("Cannot create a scratch file in `{}`", dir.display())]
    Scratch {
        dir: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot run qemu-img")]
    Spawn(#[source] io::Error),
    #[error("Qemu-img could not read the qcow2 base ({status}): {stderr}")]
    Convert { status: String, stderr: String },
    #[error("The base is {actual} bytes, the backend says the disk is {expected}")]
    Size { expected: u64, actual: u64 },
}

impl Base {
    /// Opens the base at `path` (`format`: "raw" or "qcow2") of a disk of `size` bytes.
    pub fn open(path: &Path, format: &str, size: u64, scratch_dir: &Path, rate: Option<u64>) -> Result<Base, Error> {
        let open = |p: &Path| FileSource::open(p).map_err(|source| Error::Open { path: p.to_owned(), source });
        let (source, scratch) = match format {
            "raw" => (open(path)?, None),
            "qcow2" => {
                let tmp = tempfile::Builder::new()
                    .prefix(".livesnapd-base-")
                    .suffix(".raw")
                    .tempfile_in(scratch_dir)
                    .map_err(|source| Error::Scratch { dir: scratch_dir.to_owned(), source })?;
                // The target is made the disk's size first (-n writes into it; holes read as zeros).
                tmp.as_file().set_len(size).map_err(|source| Error::Open { path: tmp.path().to_owned(), source })?;
                // -U: the backend holds the image open (and locked) for the guest; the base is
                // frozen, so reading it without the lock is safe. -n: write into our file.
                let out = Command::new("qemu-img")
                    .args(["convert", "-U", "-n", "-f", "qcow2", "-O", "raw"])
                    .arg(path)
                    .arg(tmp.path())
                    .output()
                    .map_err(Error::Spawn)?;
                if !out.status.success() {
                    return Err(Error::Convert {
                        status: out.status.to_string(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                (open(tmp.path())?, Some(tmp))
            }
            other => return Err(Error::Format(other.to_owned())),
        };
        if source.size() != size {
            return Err(Error::Size { expected: size, actual: source.size() });
        }
        Ok(Base { source, _scratch: scratch, limit: rate.map(RateLimit::new), interrupt: None })
    }

    /// Makes every read fail with [`Interrupted`] once `flag` is set.
    pub fn interrupted_by(mut self, flag: Arc<AtomicBool>) -> Base {
        self.interrupt = Some(flag);
        self
    }
}

impl Source for Base {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(io::Error::other(Interrupted));
        }
        if let Some(l) = &self.limit {
            l.take(buf.len() as u64);
        }
        self.source.read_at(buf, off)
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
