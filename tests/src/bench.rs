//! What the benchmarks (`blkbench`, `snapbench`) share: sizes on the command line, the test file
//! and the state of its page cache, livesnap-blk started on it and reached through the test
//! VMM, and the statistics they print.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::ValueEnum;

use crate::blk::{BlkQueue, SECTOR_SIZE};
use crate::daemon::Daemon;
use crate::frontend::{Frontend, Options};
use crate::load::TIMEOUT;
use crate::pattern;

/// Queues of the device, and worker threads of every load.
pub const QUEUES: usize = 2;

/// `s` in bytes, with an optional suffix K, M or G (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

/// How the test file's page cache is filled before the measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PageCache {
    /// The large folios that writing the file sequentially leaves.
    Large,
    /// 4 KiB folios, as a guest's random reads leave them: dropped, then every 4 KiB block
    /// read back in random order.
    Small,
}

/// The directory of a run: `dir`, or a new one under /var/tmp (removed when the returned
/// guard is dropped).
pub fn work_dir(dir: Option<&Path>, prefix: &str) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match dir {
        Some(d) => (d.to_path_buf(), None),
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir_in("/var/tmp")?;
            (tmp.path().to_path_buf(), Some(tmp))
        }
    })
}

/// Creates `size` bytes of non-zero data at `path`, synced, so that every block is allocated
/// and cached, and leaves the page cache as `cache` says.
pub fn prepare_file(path: &Path, size: u64, cache: PageCache) -> Result<File> {
    let file = (|| {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let chunk = pattern::disk(0, 1 << 20);
        for off in (0..size).step_by(chunk.len()) {
            file.write_all_at(&chunk, off)?;
        }
        file.sync_all()?;
        io::Result::Ok(file)
    })()
    .with_context(|| format!("cannot prepare {}", path.display()))?;
    if cache == PageCache::Small {
        refill_cache_small(&file, size).context("cannot refill the page cache")?;
    }
    Ok(file)
}

/// Refills the page cache of `file` with 4 KiB folios: drops it, then reads every 4 KiB block
/// in a random order without readahead (which would allocate large folios again).
fn refill_cache_small(file: &File, size: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let advise = |advice| {
        // SAFETY: posix_fadvise(2) on a descriptor we own; no memory is passed.
        match unsafe { libc::posix_fadvise(fd, 0, 0, advice) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    };
    advise(libc::POSIX_FADV_DONTNEED)?;
    advise(libc::POSIX_FADV_RANDOM)?;
    let blocks = size / 4096;
    let mut rng = fastrand::Rng::with_seed(1);
    let mut buf = vec![0u8; 4096];
    // Random blocks with repeats; a final sweep catches the ones never drawn.
    for _ in 0..blocks {
        file.read_exact_at(&mut buf, rng.u64(..blocks.max(1)) * 4096)?;
    }
    for off in (0..size).step_by(4096) {
        file.read_exact_at(&mut buf, off)?;
    }
    advise(libc::POSIX_FADV_NORMAL)
}

/// livesnap-blk serving the raw `image` of VM `bench` as disk `vda` on `socket`, with
/// [`QUEUES`] queues and the arguments `extra`; it must create `socket` and every path of
/// `also`.
pub fn livesnap_blk(image: &Path, socket: &Path, extra: &[String], also: &[&Path]) -> Result<Daemon> {
    let mut args = vec![
        "--vm".to_string(),
        "bench".to_string(),
        "--disk".to_string(),
        format!("id=vda,image={},socket={},format=raw", image.display(), socket.display()),
        "--queues".to_string(),
        QUEUES.to_string(),
    ];
    args.extend_from_slice(extra);
    let sockets: Vec<&Path> = [socket].into_iter().chain(also.iter().copied()).collect();
    Daemon::livesnap_blk(&args, &sockets).context("livesnap-blk did not start")
}

/// Connects the test VMM to the backend on `socket`, whose device must be `size` bytes, and
/// sets up its [`QUEUES`] queues with `slots` request slots of `slot_size` bytes each.
pub fn connect(socket: &Path, size: u64, slots: u16, slot_size: u32) -> Result<(Frontend, Vec<BlkQueue>)> {
    let opts = Options { queues: QUEUES as u16, mem_size: 48 << 20, timeout: TIMEOUT, ..Options::default() };
    let mut fe = Frontend::connect(socket, &opts).context("cannot set up the device")?;
    let capacity = fe.config().capacity;
    ensure!(capacity * SECTOR_SIZE == size, "device capacity {capacity} sectors, file {size} bytes");
    let queues =
        fe.take_queues().into_iter().map(|v| BlkQueue::new(v, slots, slot_size)).collect::<Result<Vec<_>, _>>()?;
    Ok((fe, queues))
}

/// The median of `v` (the upper one of an even count), if `v` is not empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The value at percentile `p` of `v` (nearest rank); NaN if `v` is empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(i.clamp(1, v.len().max(1)) - 1).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_overflow() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("17179869184G").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }
}
