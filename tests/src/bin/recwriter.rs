//! `recwriter`: the guest side of `tests/tests/snapshot_e2e.rs`. Writes numbered, checksummed
//! records of [`RECORD`] bytes one at a time, in order, with `O_DIRECT` (no page cache in the
//! way), record `k` at offset `k * RECORD` of a device, until the stop file appears or the
//! device is full; then syncs (a FLUSH) and prints the last record it completed.
//!
//! ```text
//! recwriter DEVICE STOP_FILE [--fsync]
//! ```
//!
//! With `--fsync`, each record is synced (`fdatasync`, a FLUSH) before the next is written.
//!
//! The records are laid out as [`livesnap_tests::record`] says.
//!
//! Only one write is in flight at a time and each starts after the previous one completed, so
//! the device holds, at any instant, a prefix of the sequence (plus at most the record in flight).
//!
//! Console lines (each on its own): `RECWRITER-START size=BYTES`, `RECWRITER-PROGRESS=K` every
//! [`PROGRESS_EVERY`] records (K: records completed), then `RECWRITER-FULL` if the device filled
//! up, `RECWRITER-LAST=K` (the last completed record; -1 for none) once the sync returned.
//! Built as a static binary by `ci/build-recwriter.sh` (the guest has no libc).

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;

use livesnap_proto::error::chain;
use livesnap_tests::record::{self, RECORD};

/// Records between two progress lines.
const PROGRESS_EVERY: u64 = 64;
/// `O_DIRECT` on x86_64 Linux (kept here so the guest binary needs no libc crate).
const O_DIRECT: i32 = 0o40000;

/// A record's buffer, aligned for `O_DIRECT`.
#[repr(C, align(4096))]
struct Aligned([u8; RECORD]);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("Cannot open {device} with O_DIRECT")]
    Open {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot size {device}")]
    Size {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("Write of record {k} failed")]
    Write {
        k: u64,
        #[source]
        source: io::Error,
    },
    #[error("Sync of {device} failed")]
    Sync {
        device: String,
        #[source]
        source: io::Error,
    },
}

fn run(device: &str, stop: &Path, fsync: bool) -> Result<i64, Error> {
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(device)
        .map_err(|source| Error::Open { device: device.into(), source })?;
    let size = dev.seek(SeekFrom::End(0)).map_err(|source| Error::Size { device: device.into(), source })?;
    let capacity = size / RECORD as u64;
    println!("RECWRITER-START size={size}");
    let mut buf = Box::new(Aligned([0; RECORD]));
    let mut done = 0u64;
    while !stop.exists() {
        if done == capacity {
            println!("RECWRITER-FULL");
            break;
        }
        record::fill(&mut buf.0, done);
        dev.write_all_at(&buf.0, done * RECORD as u64).map_err(|source| Error::Write { k: done, source })?;
        if fsync {
            dev.sync_data().map_err(|source| Error::Sync { device: device.into(), source })?;
        }
        done += 1;
        if done % PROGRESS_EVERY == 0 {
            println!("RECWRITER-PROGRESS={done}");
        }
    }
    dev.sync_all().map_err(|source| Error::Sync { device: device.into(), source })?;
    // At most the device's size over 4 KiB: far below i64::MAX.
    Ok(i64::try_from(done).unwrap_or(i64::MAX) - 1)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (device, stop, fsync) = match args.as_slice() {
        [_, device, stop] => (device, stop, false),
        [_, device, stop, flag] if flag == "--fsync" => (device, stop, true),
        _ => {
            eprintln!("usage: recwriter DEVICE STOP_FILE [--fsync]");
            return ExitCode::from(2);
        }
    };
    match run(device, Path::new(stop), fsync) {
        Ok(last) => {
            println!("RECWRITER-LAST={last}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("RECWRITER-ERROR={}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
