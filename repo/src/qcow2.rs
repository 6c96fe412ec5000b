//! A qcow2 image read in place, read-only, as a backup [`Source`]: the frozen base of a qcow2
//! disk, read without converting it to a raw scratch file first and without ever writing its
//! metadata.
//!
//! Only what a read needs is parsed: the header, the L1 table (read whole at open) and the L2
//! tables (read on demand, kept in a cache bounded in bytes). Refcounts, snapshots and the
//! dirty bit are not looked at: the base is frozen, and its mapping (L1 and L2) is all a read
//! follows. A cluster is standard (at a host offset), compressed (deflate or zstd), all zeros
//! (v3's flag) or unallocated, which reads as zeros: an image with a backing file is refused,
//! as are encryption, an external data file, extended L2 entries, a `corrupt` image and
//! incompatible features this reader does not know. The layout is QEMU's `docs/interop/
//! qcow2.txt`; `docs/repository.md` ("Reading a qcow2 base") says what is used.
//!
//! Every field is checked before it is used: an image is hostile input (it sits where the
//! backend writes for the guest). A bad one gives an [`Qcow2Error`] (wrapped in an
//! `io::Error`), never a panic or a read outside what the header describes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::source::Source;

const MAGIC: u32 = 0x5146_49fb;
/// Bits 9–55 of an L1 or standard L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Incompatible feature bits (header, version 3).
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// QEMU's own bound on the L1 table (`QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Bytes of L2 tables kept in memory.
const L2_CACHE_BYTES: usize = 16 << 20;

/// Why a qcow2 image cannot be read in place.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("Not a qcow2 image (magic {0:#010x})")]
    Magic(u32),
    #[error("Qcow2 version {0} is not 2 or 3")]
    Version(u32),
    #[error("The qcow2 header is invalid: {0}")]
    Header(String),
    #[error("The image has a backing file; a base with one is not read in place")]
    Backing,
    #[error("The image is encrypted (method {0})")]
    Encrypted(u32),
    #[error("The image uses qcow2 features this reader does not: {0}")]
    Features(String),
    #[error("The image is marked corrupt; `qemu-img check -r all` repairs it")]
    Corrupt,
    #[error("The {what} at offset {offset} lies outside the image ({file_size} bytes)")]
    Outside { what: &'static str, offset: u64, file_size: u64 },
    #[error("The {what} at offset {offset} is not aligned to a cluster")]
    Unaligned { what: &'static str, offset: u64 },
    #[error("The compressed cluster at offset {offset} does not decompress to {cluster_size} bytes: {reason}")]
    Compressed { offset: u64, cluster_size: u64, reason: String },
}

impl From<Qcow2Error> for io::Error {
    fn from(e: Qcow2Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    Deflate,
    Zstd,
}

/// Where the bytes of one guest cluster are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Reads as zeros: unallocated (no backing file) or v3's zero flag.
    Zero,
    /// At this host offset, whole.
    Data(u64),
    /// Compressed: the host offset and the bytes to read there.
    Compressed(u64, u64),
}

/// A qcow2 image opened read-only; `Sync`, read from several threads at once.
#[derive(Debug)]
pub struct Qcow2Source {
    file: File,
    file_size: u64,
    size: u64,
    cluster_bits: u32,
    version: u32,
    compression: Compression,
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    host_bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, Arc<Vec<u64>>>,
    /// Insertion order, for eviction.
    order: std::collections::VecDeque<u64>,
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

impl Qcow2Source {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::new(File::open(path)?)
    }

    /// Parses and checks the header and reads the L1 table.
    pub fn new(file: File) -> io::Result<Self> {
        let file_size = file.metadata()?.len();
        let mut h = [0u8; 105];
        let n = read_upto(&file, &mut h, 0)?;
        if n < 72 {
            return Err(Qcow2Error::Header(format!("{n} bytes, shorter than a header")).into());
        }
        let magic = be32(&h, 0);
        if magic != MAGIC {
            return Err(Qcow2Error::Magic(magic).into());
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version).into());
        }
        if be64(&h, 8) != 0 {
            return Err(Qcow2Error::Backing.into());
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Qcow2Error::Header(format!("cluster_bits {cluster_bits} outside 9..=21")).into());
        }
        let size = be64(&h, 24);
        let crypt = be32(&h, 32);
        if crypt != 0 {
            return Err(Qcow2Error::Encrypted(crypt).into());
        }
        let l1_size = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);
        let mut compression = Compression::Deflate;
        if version == 3 {
            if n < 104 {
                return Err(Qcow2Error::Header(format!("{n} bytes, shorter than a version 3 header")).into());
            }
            let incompat = be64(&h, 72);
            if incompat & INCOMPAT_CORRUPT != 0 {
                return Err(Qcow2Error::Corrupt.into());
            }
            let mut refused = Vec::new();
            if incompat & INCOMPAT_DATA_FILE != 0 {
                refused.push("an external data file".to_owned());
            }
            if incompat & INCOMPAT_EXTL2 != 0 {
                refused.push("extended L2 entries".to_owned());
            }
            let unknown = incompat
                & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2);
            if unknown != 0 {
                refused.push(format!("incompatible feature bits {unknown:#x}"));
            }
            if !refused.is_empty() {
                return Err(Qcow2Error::Features(refused.join(", ")).into());
            }
            let header_length = be32(&h, 100);
            if incompat & INCOMPAT_COMPRESSION != 0 {
                if header_length < 105 || n < 105 {
                    return Err(Qcow2Error::Header("a compression type without its header field".into()).into());
                }
                compression = match h[104] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return Err(Qcow2Error::Features(format!("compression type {t}")).into()),
                };
            }
        }
        let cluster = 1u64 << cluster_bits;
        let l2_entries = cluster / 8;
        // The L1 table must cover the virtual size.
        let needed = size.div_ceil(cluster).div_ceil(l2_entries);
        if l1_size < needed || l1_size * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::Header(format!(
                "an L1 table of {l1_size} entries for {size} bytes (needs {needed}, at most {})",
                MAX_L1_BYTES / 8
            ))
            .into());
        }
        if needed > 0 {
            check_place("L1 table", l1_offset, needed * 8, file_size, None)?;
        }
        let mut raw = vec![0u8; (needed * 8) as usize];
        file.read_exact_at(&mut raw, l1_offset)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2Source {
            file,
            file_size,
            size,
            cluster_bits,
            version,
            compression,
            l1,
            l2_cache: Mutex::new(L2Cache::default()),
            host_bytes: AtomicU64::new(raw.len() as u64 + n as u64),
        })
    }

    /// Bytes read from the image file so far: data, compressed data and metadata.
    pub fn host_bytes_read(&self) -> u64 {
        self.host_bytes.load(Ordering::Relaxed)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn pread(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, at)?;
        self.host_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The L2 table at `offset`, from the cache or the file. The cache stays locked while a
    /// table is read, so that threads wanting the same one read it once (L2 reads are rare:
    /// one table maps `cluster_size / 8` clusters).
    fn l2_table(&self, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        let mut cache = self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = cache.tables.get(&offset) {
            return Ok(Arc::clone(t));
        }
        let cs = self.cluster_size();
        check_place("L2 table", offset, cs, self.file_size, Some(cs))?;
        let mut raw = vec![0u8; cs as usize];
        self.pread(&mut raw, offset)?;
        let table: Arc<Vec<u64>> = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        let max = (L2_CACHE_BYTES / cs as usize).max(1);
        while cache.tables.len() >= max {
            let Some(old) = cache.order.pop_front() else { break };
            cache.tables.remove(&old);
        }
        cache.tables.insert(offset, Arc::clone(&table));
        cache.order.push_back(offset);
        Ok(table)
    }

    /// Where guest cluster `index` is.
    fn cluster(&self, index: u64) -> io::Result<Cluster> {
        let l2_entries = self.cluster_size() / 8;
        let l1_entry = self.l1.get((index / l2_entries) as usize).copied().unwrap_or(0);
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Cluster::Zero);
        }
        let entry = self.l2_table(l2_offset)?[(index % l2_entries) as usize];
        if entry & L2_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (offset & 511);
            // The last sector may run past the end of the file (QEMU does not pad it).
            let len = len.min(self.file_size.saturating_sub(offset));
            check_place("compressed cluster", offset, len.max(1), self.file_size, None)?;
            return Ok(Cluster::Compressed(offset, len));
        }
        if self.version >= 3 && entry & L2_ZERO != 0 {
            return Ok(Cluster::Zero);
        }
        match entry & OFFSET_MASK {
            0 => Ok(Cluster::Zero),
            host => {
                let cs = self.cluster_size();
                check_place(
                    "data cluster",
                    host,
                    cs.min(self.file_size.saturating_sub(host)).max(1),
                    self.file_size,
                    Some(cs),
                )?;
                Ok(Cluster::Data(host))
            }
        }
    }

    fn decompress(&self, offset: u64, len: u64, out: &mut [u8]) -> io::Result<()> {
        let mut input = vec![0u8; len as usize];
        self.pread(&mut input, offset)?;
        let cs = self.cluster_size();
        let fail = |reason: String| Qcow2Error::Compressed { offset, cluster_size: cs, reason };
        match self.compression {
            Compression::Deflate => {
                // QEMU writes raw deflate (no zlib header); the data may end before `len`.
                let data = miniz_oxide::inflate::decompress_to_vec_with_limit(&input, cs as usize)
                    .map_err(|e| fail(format!("{:?}", e.status)))?;
                if data.len() as u64 != cs {
                    return Err(fail(format!("{} bytes", data.len())).into());
                }
                out.copy_from_slice(&data);
            }
            Compression::Zstd => {
                use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
                let mut dec = Decoder::new().map_err(|e| fail(e.to_string()))?;
                let mut inb = InBuffer::around(&input);
                let mut outb = OutBuffer::around(&mut *out);
                // Until the cluster is full: what follows the frame in the last sector is padding.
                while outb.pos() < cs as usize {
                    let before = (inb.pos(), outb.pos());
                    dec.run(&mut inb, &mut outb).map_err(|e| fail(e.to_string()))?;
                    if (inb.pos(), outb.pos()) == before {
                        return Err(fail(format!("{} bytes", outb.pos())).into());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads what is there of `buf.len()` bytes at `at`; returns the count.
fn read_upto(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Checks that `len` bytes at `offset` lie in a file of `file_size` bytes (and that `offset`
/// is a multiple of `align`, if given).
fn check_place(what: &'static str, offset: u64, len: u64, file_size: u64, align: Option<u64>) -> io::Result<()> {
    if align.is_some_and(|a| offset % a != 0) {
        return Err(Qcow2Error::Unaligned { what, offset }.into());
    }
    if offset.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(Qcow2Error::Outside { what, offset, file_size }.into());
    }
    Ok(())
}

impl Source for Qcow2Source {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).filter(|&e| e <= self.size).ok_or(io::ErrorKind::UnexpectedEof)?;
        let cs = self.cluster_size();
        let mut pos = off;
        // A run of data clusters contiguous in the file is read with one pread.
        let mut run: Option<(u64, u64, u64)> = None; // (guest start, host start, len)
        let flush_run = |run: &mut Option<(u64, u64, u64)>, buf: &mut [u8]| -> io::Result<()> {
            if let Some((g, h, len)) = run.take() {
                let at = (g - off) as usize;
                // A data cluster at the end of the file may be short: what is missing reads as
                // zeros (QEMU's own rule for the last cluster).
                let have = len.min(self.file_size.saturating_sub(h));
                self.pread(&mut buf[at..at + have as usize], h)?;
                buf[at + have as usize..at + len as usize].fill(0);
            }
            Ok(())
        };
        while pos < end {
            let index = pos >> self.cluster_bits;
            let within = pos & (cs - 1);
            let n = (cs - within).min(end - pos);
            let at = (pos - off) as usize;
            match self.cluster(index)? {
                Cluster::Data(host) => {
                    let h = host + within;
                    match &mut run {
                        Some((g, rh, len)) if *rh + *len == h && *g + *len == pos => *len += n,
                        _ => {
                            flush_run(&mut run, buf)?;
                            run = Some((pos, h, n));
                        }
                    }
                }
                Cluster::Zero => {
                    flush_run(&mut run, buf)?;
                    buf[at..at + n as usize].fill(0);
                }
                Cluster::Compressed(h, len) => {
                    flush_run(&mut run, buf)?;
                    let mut whole = vec![0u8; cs as usize];
                    self.decompress(h, len, &mut whole)?;
                    buf[at..at + n as usize].copy_from_slice(&whole[within as usize..(within + n) as usize]);
                }
            }
            pos += n;
        }
        flush_run(&mut run, buf)
    }

    fn reads_as_zero(&self, off: u64, len: u64) -> io::Result<bool> {
        let end = off.saturating_add(len).min(self.size);
        let cs = self.cluster_size();
        let mut pos = off;
        while pos < end {
            if self.cluster(pos >> self.cluster_bits)? != Cluster::Zero {
                return Ok(false);
            }
            pos = (pos | (cs - 1)) + 1;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(cmd: &str, args: &[&str]) {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `qemu-io -c CMD` on `image` for each of `cmds`.
    fn qemu_io(image: &Path, cmds: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(image.to_str().unwrap());
        run("qemu-io", &args);
    }

    /// What QEMU reads of `image`: `qemu-img convert -O raw`.
    fn qemu_reads(image: &Path, dir: &Path) -> Vec<u8> {
        let raw = dir.join("expected.raw");
        run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
        std::fs::read(raw).unwrap()
    }

    /// Reads all of `src` in pieces of `piece` bytes.
    fn read_all(src: &Qcow2Source, piece: u64) -> Vec<u8> {
        let mut out = vec![0u8; src.size() as usize];
        for (i, c) in out.chunks_mut(piece as usize).enumerate() {
            src.read_at(c, i as u64 * piece).unwrap();
        }
        out
    }

    /// An image with data, zeros (written, discarded), holes, and with `-c` compressed clusters.
    fn image(dir: &Path, name: &str, opts: &str, compressed: bool) -> std::path::PathBuf {
        let p = dir.join(name);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, p.to_str().unwrap(), "8M"]);
        qemu_io(
            &p,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 100k 300k",
                "write -P 0x33 3M 1M",
                "write -z 3200k 64k",
                "discard 3520k 64k",
                "write -P 0x44 8000k 192k",
                "write -P 0x55 5000k 1",
            ],
        );
        if !compressed {
            return p;
        }
        let c = dir.join(format!("c-{name}"));
        run(
            "qemu-img",
            &["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", opts, p.to_str().unwrap(), c.to_str().unwrap()],
        );
        // Overwrite part of a compressed cluster, so that the image mixes both kinds.
        qemu_io(&c, &["write -P 0x66 3100k 8k"]);
        c
    }

    #[test]
    fn reads_what_qemu_reads_for_every_kind_of_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("v3-64k", "cluster_size=65536", false),
            ("v2-64k", "compat=0.10,cluster_size=65536", false),
            ("v3-4k", "cluster_size=4096", false),
            ("v3-2m", "cluster_size=2097152", false),
            ("v3-512", "cluster_size=512", false),
            ("deflate", "cluster_size=65536", true),
            ("zstd", "cluster_size=65536,compression_type=zstd", true),
            ("v2-deflate-4k", "compat=0.10,cluster_size=4096", true),
        ];
        for (name, opts, compressed) in cases {
            let img = image(dir.path(), &format!("{name}.qcow2"), opts, compressed);
            let want = qemu_reads(&img, dir.path());
            let src = Qcow2Source::open(&img).unwrap();
            assert_eq!(src.size(), want.len() as u64, "{name}");
            for piece in [1 << 20, 4096, 3 * 1000] {
                assert!(read_all(&src, piece) == want, "{name}: reads of {piece} bytes differ from qemu-img's");
            }
            let mut rng = fastrand::Rng::with_seed(7);
            for _ in 0..200 {
                let off = rng.u64(..want.len() as u64);
                let len = rng.u64(1..=(want.len() as u64 - off).min(300_000));
                let mut buf = vec![0u8; len as usize];
                src.read_at(&mut buf, off).unwrap();
                assert!(buf[..] == want[off as usize..(off + len) as usize], "{name}: {len} bytes at {off}");
            }
            assert!(src.read_at(&mut [0u8; 2], want.len() as u64 - 1).is_err(), "{name}: past the end");
        }
    }

    #[test]
    fn only_unallocated_and_zero_clusters_read_as_zero_unread() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "z.qcow2", "cluster_size=65536", false);
        let src = Qcow2Source::open(&img).unwrap();
        let k = 1024;
        assert!(!src.reads_as_zero(0, 64 * k).unwrap());
        assert!(src.reads_as_zero(448 * k, 256 * k).unwrap(), "never written");
        assert!(!src.reads_as_zero(384 * k, 64 * k).unwrap(), "holds the end of the write at 100k");
        assert!(!src.reads_as_zero(64 * k, 4 * k).unwrap(), "in a cluster written from 100k");
        assert!(src.reads_as_zero(3200 * k, 64 * k).unwrap(), "written as zeros");
        assert!(src.reads_as_zero(3520 * k, 64 * k).unwrap(), "discarded");
        assert!(!src.reads_as_zero(4992 * k, 64 * k).unwrap(), "one byte written");
        assert!(src.reads_as_zero(6 << 20, 1 << 20).unwrap());
        // A full read of a mostly empty image reads little of the file.
        let before = src.host_bytes_read();
        let mut buf = vec![0u8; 1 << 20];
        src.read_at(&mut buf, 6 << 20).unwrap();
        assert!(src.host_bytes_read() - before <= 64 * k, "an unallocated MiB read the file");
    }

    /// Writes `bytes` at `at` in a copy of `img`; the copy's path.
    fn patched(img: &Path, dir: &Path, name: &str, at: u64, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::copy(img, &p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(bytes, at).unwrap();
        p
    }

    #[test]
    fn hostile_images_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "h.qcow2", "cluster_size=65536", false);
        let err = |p: &Path| match Qcow2Source::open(p) {
            Ok(s) => {
                // Opened: then reading must fail rather than return garbage or panic.
                let mut buf = vec![0u8; s.size().min(8 << 20) as usize];
                s.read_at(&mut buf, 0).expect_err("a hostile image read without error").to_string()
            }
            Err(e) => e.to_string(),
        };
        let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
            ("magic", 0, b"QFI\0".to_vec(), "Not a qcow2 image"),
            ("version", 4, 4u32.to_be_bytes().to_vec(), "version 4"),
            ("backing", 8, 512u64.to_be_bytes().to_vec(), "backing file"),
            ("cluster bits", 20, 30u32.to_be_bytes().to_vec(), "cluster_bits 30"),
            ("encrypted", 32, 1u32.to_be_bytes().to_vec(), "encrypted"),
            ("tiny L1", 36, 0u32.to_be_bytes().to_vec(), "L1 table"),
            ("huge L1", 36, u32::MAX.to_be_bytes().to_vec(), "L1 table"),
            ("L1 outside", 40, (1u64 << 40).to_be_bytes().to_vec(), "outside the image"),
            ("corrupt", 72, 2u64.to_be_bytes().to_vec(), "corrupt"),
            ("external data", 72, 4u64.to_be_bytes().to_vec(), "external data file"),
            ("extended L2", 72, 16u64.to_be_bytes().to_vec(), "extended L2"),
            ("unknown feature", 72, (1u64 << 40).to_be_bytes().to_vec(), "feature bits"),
            ("huge size", 24, (1u64 << 62).to_be_bytes().to_vec(), "L1 table"),
        ];
        for (name, at, bytes, want) in cases {
            let p = patched(&img, dir.path(), name, at, &bytes);
            let e = err(&p);
            assert!(e.contains(want), "{name}: {e}");
        }
        // An L1 entry pointing past the end of the file, then an unaligned one.
        let l1 = {
            let mut h = [0u8; 48];
            std::fs::File::open(&img).unwrap().read_exact_at(&mut h, 0).unwrap();
            be64(&h, 40)
        };
        let p = patched(&img, dir.path(), "l2 outside", l1, &(1u64 << 40).to_be_bytes());
        assert!(err(&p).contains("outside the image"), "{}", err(&p));
        let p = patched(&img, dir.path(), "l2 unaligned", l1, &(0x10200u64).to_be_bytes());
        assert!(err(&p).contains("not aligned"), "{}", err(&p));
        // A truncated image.
        let p = dir.path().join("short");
        std::fs::write(&p, &std::fs::read(&img).unwrap()[..40]).unwrap();
        assert!(err(&p).contains("shorter than a header"), "{}", err(&p));
    }
}
