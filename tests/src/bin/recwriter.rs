//! `recwriter`: the guest side of `tests/tests/snapshot_e2e.rs`. Writes numbered, checksummed
//! records of [`RECORD`] bytes one at a time, in order, with `O_DIRECT` (no page cache in the
//! way), record `k` at offset `k * RECORD` of a device, until the stop file appears or the
//! device is full; then syncs (a FLUSH) and prints the last record it completed.
//!
//! ```text
//! recwriter DEVICE STOP_FILE
//! ```
//!
//! Record `k`, every integer little-endian:
//!
//! | offset | size | what |
//! |---:|---:|---|
//! | 0 | 8 | magic `LSREC01\0` |
//! | 8 | 8 | `k` |
//! | 16 | 4072 | payload: xorshift64 started at `k * 0x9E3779B97F4A7C15 + 1`, as 8-byte words |
//! | 4088 | 8 | FNV-1a 64 of bytes 0..4088 |
//!
//! Only one write is in flight at a time and each starts after the previous one completed, so
//! the device holds, at any instant, a prefix of the sequence (plus at most the record in flight).
//!
//! Console lines (each on its own): `RECWRITER-START size=BYTES`, `RECWRITER-PROGRESS=K` every
//! [`PROGRESS_EVERY`] records (K: records completed), then `RECWRITER-FULL` if the device filled
//! up, `RECWRITER-LAST=K` (the last completed record; -1 for none) once the sync returned.
//! Built as a static binary by `ci/build-recwriter.sh` (the guest has no libc).

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;

/// Bytes per record (and per write).
const RECORD: usize = 4096;
/// Records between two progress lines.
const PROGRESS_EVERY: u64 = 64;
/// `O_DIRECT` on x86_64 Linux (kept here so the guest binary needs no libc crate).
const O_DIRECT: i32 = 0o40000;
const MAGIC: &[u8; 8] = b"LSREC01\0";

/// A record's buffer, aligned for `O_DIRECT`.
#[repr(C, align(4096))]
struct Aligned([u8; RECORD]);

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Record `k` into `buf` (`RECORD` bytes).
fn fill(buf: &mut [u8], k: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&k.to_le_bytes());
    let mut x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    for w in buf[16..RECORD - 8].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let h = fnv1a64(&buf[..RECORD - 8]);
    buf[RECORD - 8..].copy_from_slice(&h.to_le_bytes());
}

fn run(device: &str, stop: &Path) -> Result<i64, String> {
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(device)
        .map_err(|e| format!("cannot open {device} with O_DIRECT: {e}"))?;
    let size = dev.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size {device}: {e}"))?;
    let capacity = size / RECORD as u64;
    println!("RECWRITER-START size={size}");
    let mut buf = Box::new(Aligned([0; RECORD]));
    let mut done = 0u64;
    while !stop.exists() {
        if done == capacity {
            println!("RECWRITER-FULL");
            break;
        }
        fill(&mut buf.0, done);
        dev.write_all_at(&buf.0, done * RECORD as u64).map_err(|e| format!("write of record {done} failed: {e}"))?;
        done += 1;
        if done % PROGRESS_EVERY == 0 {
            println!("RECWRITER-PROGRESS={done}");
        }
    }
    dev.sync_all().map_err(|e| format!("sync of {device} failed: {e}"))?;
    // At most the device's size over 4 KiB: far below i64::MAX.
    Ok(i64::try_from(done).unwrap_or(i64::MAX) - 1)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, device, stop] = args.as_slice() else {
        eprintln!("usage: recwriter DEVICE STOP_FILE");
        return ExitCode::from(2);
    };
    match run(device, Path::new(stop)) {
        Ok(last) => {
            println!("RECWRITER-LAST={last}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("RECWRITER-ERROR={e}");
            ExitCode::FAILURE
        }
    }
}
