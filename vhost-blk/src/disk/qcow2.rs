//! qcow2 images through qcow2-rs's synchronous engine.
//!
//! qcow2-rs panics on some malformed images and asserts when a device with unwritten metadata
//! is dropped. None of that may reach us from an image or a guest, so this module
//! - checks the header itself before qcow2-rs sees the image, and refuses what qcow2-rs cannot
//!   serve safely (incompatible features, encryption, internal snapshots when writable),
//! - resolves backing files against the image's own folder, never the process's cwd,
//! - runs every qcow2-rs call under `catch_unwind`: a panic marks the disk failed, later
//!   requests get an I/O error, and the device is leaked rather than dropped,
//! - serialises calls behind a mutex (`Qcow2Dev` is `Send` but not `Sync`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use futures::executor::block_on;
use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::sync_io::Qcow2IoSync;
use qcow2_rs::utils::qcow2_alloc_dev_sync;
use tracing::error;

use super::{check_range, total_len, Buf, DiskFile, Error, Format, Result, QCOW2_MAGIC};

type Dev = Qcow2Dev<Qcow2IoSync>;

/// Longest backing chain we follow; deeper chains are refused (and loops end here).
const MAX_BACKING_DEPTH: usize = 16;
/// Largest virtual size accepted (qcow2's own limit is 2^61 - 1; QEMU uses 32 PiB).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 55;
const ZERO_CHUNK: usize = 1 << 20;

/// The header fields we check before handing the image to qcow2-rs.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub size: u64,
    pub cluster_bits: u32,
    pub backing_file: Option<String>,
    pub nb_snapshots: u32,
    /// Bytes of the file that the L1 and refcount tables need.
    pub tables_end: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

impl Header {
    /// Parses and checks the first cluster of an image (at least 512 bytes are given).
    pub fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < 512 {
            return Err("image is shorter than a qcow2 header".into());
        }
        if b[..4] != QCOW2_MAGIC {
            return Err("no qcow2 magic".into());
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(format!("qcow2 version {version} is not supported"));
        }
        let cluster_bits = be32(b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!("cluster_bits {cluster_bits} is out of range 9..=21"));
        }
        let size = be64(b, 24);
        if size > MAX_VIRTUAL_SIZE {
            return Err(format!("virtual size {size} is too large"));
        }
        if be32(b, 32) != 0 {
            return Err("encrypted images are not supported".into());
        }
        // Every guest cluster must have an L1 entry, or lookups would run past the table.
        let l1_size = u64::from(be32(b, 36));
        let per_l1_entry = 1u64 << (2 * cluster_bits - 3);
        if l1_size.saturating_mul(per_l1_entry) < size {
            return Err(format!("L1 table of {l1_size} entries cannot map {size} bytes"));
        }
        let (l1_offset, rt_offset) = (be64(b, 40), be64(b, 48));
        if l1_offset % (1 << cluster_bits) != 0 || rt_offset % (1 << cluster_bits) != 0 {
            return Err("L1 or refcount table is not cluster aligned".into());
        }
        let rt_len = u64::from(be32(b, 56)) << cluster_bits;
        let tables_end = match (l1_offset.checked_add(l1_size * 8), rt_offset.checked_add(rt_len)) {
            (Some(l1_end), Some(rt_end)) => l1_end.max(rt_end),
            _ => return Err("L1 or refcount table lies past any possible file end".into()),
        };
        let nb_snapshots = be32(b, 60);
        if version == 3 {
            let incompatible = be64(b, 72);
            if incompatible != 0 {
                return Err(incompatible_reason(incompatible));
            }
            let refcount_order = be32(b, 96);
            if refcount_order > 6 {
                return Err(format!("refcount order {refcount_order} is invalid"));
            }
        }
        let backing_offset = be64(b, 8);
        let backing_len = be32(b, 16) as usize;
        let backing_file = if backing_offset == 0 {
            None
        } else {
            let start = usize::try_from(backing_offset).ok().filter(|&s| s < b.len());
            let name = start
                .and_then(|s| b.get(s..s.checked_add(backing_len)?))
                .filter(|n| !n.is_empty() && n.len() <= 1023)
                .ok_or("backing file name lies outside the header cluster")?;
            Some(String::from_utf8(name.to_vec()).map_err(|_| "backing file name is not UTF-8")?)
        };
        Ok(Header { size, cluster_bits, backing_file, nb_snapshots, tables_end })
    }
}

fn incompatible_reason(bits: u64) -> String {
    let names = [
        (0, "dirty (the image was not closed cleanly: run `qemu-img check -r all` on it)"),
        (1, "corrupt"),
        (2, "external data file"),
        (3, "non-zlib compression"),
        (4, "extended L2 entries"),
    ];
    let mut found: Vec<String> =
        names.iter().filter(|(bit, _)| bits & (1 << bit) != 0).map(|(_, n)| (*n).to_string()).collect();
    let known = names.iter().fold(0u64, |m, (bit, _)| m | 1 << bit);
    if bits & !known != 0 {
        found.push(format!("unknown bits {:#x}", bits & !known));
    }
    format!("incompatible feature(s): {}", found.join(", "))
}

fn read_header(path: &Path, file: &File) -> Result<Header> {
    let mut buf = vec![0u8; 1 << 21];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    if buf.get(..4) != Some(&QCOW2_MAGIC[..]) {
        return Err(Error::NotQcow2 { path: path.to_owned() });
    }
    let header = Header::parse(&buf).map_err(|reason| unsupported(path, reason))?;
    // qcow2-rs would read a missing table as zeroes; QEMU refuses such an image, and so do we.
    let file_len = file.metadata()?.len();
    if header.tables_end > file_len {
        return Err(unsupported(
            path,
            format!("image is truncated: its tables end at {} but the file at {file_len}", header.tables_end),
        ));
    }
    Ok(header)
}

fn unsupported(path: &Path, reason: impl Into<String>) -> Error {
    Error::Qcow2Unsupported { path: path.to_owned(), reason: reason.into() }
}

/// Opens `path` and its backing chain with qcow2-rs; called under `catch_unwind`.
fn open_chain(path: &Path, header: &Header, readonly: bool, depth: usize) -> Result<Dev> {
    let params = Qcow2DevParams::new(9, None, None, readonly, false);
    if depth > 0 {
        params.mark_backing_dev(Some(true));
    }
    let io = Qcow2IoSync::new(path, readonly, false);
    let (mut dev, _) = qcow2_alloc_dev_sync(path, io, &params).map_err(qerr)?;
    if let Some(name) = &header.backing_file {
        if depth + 1 >= MAX_BACKING_DEPTH {
            return Err(unsupported(path, "backing chain is too deep (or loops)"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let back_path: PathBuf = dir.join(name);
        let back_file = File::open(&back_path).map_err(|source| Error::Open { path: back_path.clone(), source })?;
        let back_header = match read_header(&back_path, &back_file) {
            Err(Error::NotQcow2 { .. }) => {
                return Err(unsupported(path, format!("backing file {} is not qcow2", back_path.display())))
            }
            r => r?,
        };
        dev.set_backing_dev(Box::new(open_chain(&back_path, &back_header, true, depth + 1)?));
    }
    Ok(dev)
}

fn qerr(e: qcow2_rs::error::Qcow2Error) -> Error {
    Error::Qcow2(e)
}

#[derive(Debug)]
pub struct Qcow2Disk {
    /// Our own descriptor of the image: holds the lock, and is what `flush` syncs.
    file: File,
    /// `None` once the device is known broken (it is then leaked, not dropped).
    dev: Mutex<Option<Dev>>,
    failed: AtomicBool,
    size: u64,
}

impl Qcow2Disk {
    pub fn open(path: &Path, file: File, readonly: bool) -> Result<Self> {
        let header = read_header(path, &file)?;
        if header.nb_snapshots > 0 && !readonly {
            return Err(unsupported(path, "internal snapshots are only served read-only"));
        }
        let dev = catch_unwind(AssertUnwindSafe(|| -> Result<Dev> {
            let dev = open_chain(path, &header, readonly, 0)?;
            block_on(dev.qcow2_prep_io()).map_err(qerr)?;
            Ok(dev)
        }))
        .map_err(|_| unsupported(path, "qcow2 layer panicked while opening the image"))??;
        let size = header.size - header.size % super::SECTOR_SIZE;
        Ok(Qcow2Disk { file, dev: Mutex::new(Some(dev)), failed: AtomicBool::new(false), size })
    }

    /// Runs `f` on the device, turning a panic into [`Error::Failed`] for good.
    fn with_dev<T>(&self, f: impl FnOnce(&Dev) -> Qcow2Result<T>) -> Result<T> {
        let mut guard = self.dev.lock().unwrap_or_else(PoisonError::into_inner);
        let dev = guard.as_ref().ok_or(Error::Failed)?;
        match catch_unwind(AssertUnwindSafe(|| f(dev))) {
            Ok(r) => r.map_err(qerr),
            Err(_) => {
                error!("qcow2 layer panicked; the disk now fails every request");
                self.failed.store(true, Ordering::Release);
                if let Some(dev) = guard.take() {
                    std::mem::forget(dev);
                }
                Err(Error::Failed)
            }
        }
    }
}

impl DiskFile for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()> {
        let len = total_len(bufs);
        check_range(self.size, offset, len)?;
        let mut data = vec![0u8; len as usize];
        let n = self.with_dev(|dev| block_on(dev.read_at(&mut data, offset)))?;
        if n != data.len() {
            return Err(Error::Qcow2ShortRead { read: n, len });
        }
        let mut pos = 0;
        for b in bufs {
            b.copy_from(&data[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()> {
        let len = total_len(bufs);
        check_range(self.size, offset, len)?;
        let mut data = vec![0u8; len as usize];
        let mut pos = 0;
        for b in bufs {
            b.copy_to(&mut data[pos..pos + b.len()]);
            pos += b.len();
        }
        self.with_dev(|dev| block_on(dev.write_at(&data, offset)))
    }

    fn flush(&self) -> Result<()> {
        // Data first, then the metadata that points at it, then that metadata.
        self.file.sync_data()?;
        if self.with_dev(|dev| Ok(dev.need_flush_meta()))? {
            self.with_dev(|dev| block_on(dev.flush_meta()))?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// qcow2-rs keeps table updates in memory until a flush: the whole flush it is.
    fn publish(&self) -> Result<()> {
        self.flush()
    }

    /// Discard is a hint, and qcow2-rs cannot free clusters: the data stays.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        check_range(self.size, offset, len)?;
        let zeroes = vec![0u8; (len as usize).min(ZERO_CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.with_dev(|dev| block_on(dev.write_at(&zeroes[..n], offset + done)))?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            error!(error = %livesnap_proto::error::chain(&e), "cannot flush qcow2 metadata on close");
        }
        let dev = self.dev.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(dev) = dev {
            if dev.need_flush_meta() {
                // qcow2-rs asserts on dropping unflushed metadata; the image keeps what was
                // flushed, which is all the guest was promised.
                std::mem::forget(dev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let st = Command::new("qemu-img").args(args).status().expect("qemu-img runs");
        assert!(st.success(), "qemu-img {args:?} failed");
    }

    fn header_bytes() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
        std::fs::read(&p).unwrap()[..4096].to_vec()
    }

    #[test]
    fn header_of_a_fresh_image_parses() {
        let h = Header::parse(&header_bytes()).unwrap();
        assert_eq!(h.size, 64 << 20);
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn hostile_headers_are_refused_with_a_reason() {
        let good = header_bytes();
        type Corrupt = fn(&mut Vec<u8>);
        let cases: Vec<(&str, Corrupt)> = vec![
            ("version", |b| b[4..8].copy_from_slice(&7u32.to_be_bytes())),
            ("cluster_bits", |b| b[20..24].copy_from_slice(&40u32.to_be_bytes())),
            ("too large", |b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            ("encrypted", |b| b[32..36].copy_from_slice(&1u32.to_be_bytes())),
            ("L1 table", |b| b[36..40].copy_from_slice(&0u32.to_be_bytes())),
            ("dirty", |b| b[72..80].copy_from_slice(&1u64.to_be_bytes())),
            ("unknown bits", |b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            ("backing file name", |b| {
                b[8..16].copy_from_slice(&4000u64.to_be_bytes());
                b[16..20].copy_from_slice(&500u32.to_be_bytes());
            }),
        ];
        for (what, corrupt) in cases {
            let mut b = good.clone();
            corrupt(&mut b);
            let err = Header::parse(&b).expect_err(what);
            assert!(err.contains(what), "{what}: {err}");
        }
        assert!(Header::parse(&good[..100]).is_err());
    }

    #[test]
    fn writes_allocate_clusters_and_the_image_stays_clean() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
        {
            let disk = crate::disk::open(&p, None, false).unwrap();
            assert_eq!(disk.format(), Format::Qcow2);
            assert_eq!(disk.size(), 16 << 20);
            let mut a: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
            let (lo, hi) = a.split_at_mut(4096);
            disk.write_vectored_at(&[Buf::from(lo), Buf::from(hi)], 5 << 20).unwrap();
            disk.write_zeroes(1 << 20, 65536, false).unwrap();
            disk.flush().unwrap();
            let mut out = vec![0u8; 8192];
            disk.read_vectored_at(&[Buf::from(&mut out[..])], 5 << 20).unwrap();
            assert_eq!(out, a);
            let mut past = vec![0u8; 512];
            assert!(disk.read_vectored_at(&[Buf::from(&mut past[..])], 16 << 20).is_err());
        }
        qemu_img(&["check", "-q", p.to_str().unwrap()]);
        let raw = dir.path().join("d.raw");
        qemu_img(&["convert", "-O", "raw", p.to_str().unwrap(), raw.to_str().unwrap()]);
        let data = std::fs::read(&raw).unwrap();
        let expect: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(&data[5 << 20..(5 << 20) + 8192], &expect[..]);
    }

    #[test]
    fn backing_file_resolves_beside_the_image_not_the_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
        let disk = crate::disk::open(&top, None, false).unwrap();
        let mut out = vec![1u8; 4096];
        disk.read_vectored_at(&[Buf::from(&mut out[..])], 0).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_truncated_image_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1024).unwrap();
        assert!(crate::disk::open(&p, None, false).is_err());
    }
}
