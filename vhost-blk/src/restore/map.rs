//! The restore map, `IMAGE.restore`: which chunks of a live-restored disk are in its image, and
//! which blocks the guest wrote there. Layout and rules: `docs/live-restore.md`.
//!
//! ```text
//! offset        size  field
//! 0             8     magic "LSNAPRST"
//! 8             4     version (1)
//! 12            4     flags: bit 0 = complete
//! 16            8     disk size in bytes
//! 24            8     chunk size in bytes (power of two, 4 KiB ..= 64 MiB)
//! 32            4     block size in bytes (4096)
//! 36            2+2+2 lengths of vm, backup_id, disk (each <= 128)
//! 42            2     zero
//! 44            128   vm (UTF-8, zero padded)
//! 172           128   backup_id
//! 300           128   disk
//! 428           4     CRC-32 of bytes 0..428
//! 432..4096           zero
//! 4096          C     chunk bitmap, bit i (LSB first in byte i/8) = chunk i restored;
//!                     C = ceil(chunks / 8) rounded up to 4096
//! 4096 + C      B     block bitmap, bit j = block j written by the guest, durable at a FLUSH;
//!                     B = ceil(blocks / 8) rounded up to 4096
//! ```
//!
//! Everything the header says lies in its first 512 bytes, so that the one rewrite it ever sees
//! (setting `complete`) is a single sector write. Bits only ever go from 0 to 1, and a bit is
//! written only after what it stands for is durable, so a torn bitmap page leaves a subset of
//! true bits.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::snap::store::MetaFile;

pub const MAGIC: &[u8; 8] = b"LSNAPRST";
pub const VERSION: u32 = 1;
pub const FLAG_COMPLETE: u32 = 1;
/// The granularity of guest-write marks.
pub const BLOCK_SIZE: u64 = 4096;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// The longest vm, backup id or disk name a map holds, in bytes.
pub const MAX_NAME: usize = 128;
/// Bytes of the header; the bitmaps start here.
pub const HEADER_SIZE: u64 = 4096;
const PAGE: u64 = 4096;
const CRC_AT: usize = 428;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create restore map {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open restore map {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Restore map is not one (bad magic)")]
    Magic,
    #[error("Restore map is of version {0}, this backend reads version {VERSION}")]
    Version(u32),
    #[error("Restore map header fails its checksum")]
    Checksum,
    #[error("Restore map has unknown flags {0:#x}")]
    Flags(u32),
    #[error("Chunk size {0} is not a power of two between 4 KiB and 64 MiB")]
    ChunkSize(u64),
    #[error("Block size {0} is not 4096")]
    BlockSize(u64),
    #[error("Disk size {0} is not a positive multiple of 512 bytes")]
    DiskSize(u64),
    #[error("The {field} of the backup is empty, longer than {MAX_NAME} bytes or not UTF-8")]
    Name { field: &'static str },
    #[error("Restore map is {actual} bytes, its header needs {expected}")]
    Length { actual: u64, expected: u64 },
    #[error("Restore map of disk size {map} does not fit an image of {image} bytes")]
    SizeMismatch { map: u64, image: u64 },
    /// Reading or writing the map failed: the I/O error says why.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The backup a disk is restored from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub vm: String,
    pub backup_id: String,
    pub disk: String,
}

/// What a map says, for livesnapd and for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: Identity,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub complete: bool,
}

/// The map of `image`: the same path with ".restore" appended.
pub fn map_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".restore");
    PathBuf::from(p)
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub size: u64,
    pub chunk_size: u64,
    pub id: Identity,
}

fn check_geometry(size: u64, chunk_size: u64) -> Result<(), Error> {
    if !chunk_size.is_power_of_two() || !(BLOCK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(Error::ChunkSize(chunk_size));
    }
    if size == 0 || size % 512 != 0 {
        return Err(Error::DiskSize(size));
    }
    Ok(())
}

fn check_name(s: &str, field: &'static str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(Error::Name { field });
    }
    Ok(())
}

impl Header {
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    pub fn chunk_bitmap_len(&self) -> u64 {
        self.chunks().div_ceil(8).next_multiple_of(PAGE)
    }

    pub fn block_bitmap_len(&self) -> u64 {
        self.blocks().div_ceil(8).next_multiple_of(PAGE)
    }

    pub fn chunk_bitmap_at(&self) -> u64 {
        HEADER_SIZE
    }

    pub fn block_bitmap_at(&self) -> u64 {
        HEADER_SIZE + self.chunk_bitmap_len()
    }

    pub fn file_len(&self) -> u64 {
        self.block_bitmap_at() + self.block_bitmap_len()
    }

    pub fn complete(&self) -> bool {
        self.flags & FLAG_COMPLETE != 0
    }

    pub fn encode(&self) -> Result<[u8; HEADER_SIZE as usize], Error> {
        check_geometry(self.size, self.chunk_size)?;
        let names = [(&self.id.vm, "vm"), (&self.id.backup_id, "backup id"), (&self.id.disk, "disk")];
        for (s, field) in names {
            check_name(s, field)?;
        }
        let mut h = [0u8; HEADER_SIZE as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..32].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[32..36].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        for (i, (s, _)) in names.iter().enumerate() {
            h[36 + 2 * i..38 + 2 * i].copy_from_slice(&(s.len() as u16).to_le_bytes());
            let at = 44 + i * MAX_NAME;
            h[at..at + s.len()].copy_from_slice(s.as_bytes());
        }
        let crc = crc32fast::hash(&h[..CRC_AT]);
        h[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(h)
    }

    /// Decodes a header from hostile bytes.
    pub fn decode(h: &[u8]) -> Result<Header, Error> {
        if h.len() < CRC_AT + 4 || &h[0..8] != MAGIC {
            return Err(Error::Magic);
        }
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        if crc32fast::hash(&h[..CRC_AT]) != u32_at(CRC_AT) {
            return Err(Error::Checksum);
        }
        let flags = u32_at(12);
        if flags & !FLAG_COMPLETE != 0 {
            return Err(Error::Flags(flags));
        }
        let (size, chunk_size, block_size) = (u64_at(16), u64_at(24), u64::from(u32_at(32)));
        if block_size != BLOCK_SIZE {
            return Err(Error::BlockSize(block_size));
        }
        check_geometry(size, chunk_size)?;
        let mut names = Vec::with_capacity(3);
        for (i, field) in ["vm", "backup id", "disk"].into_iter().enumerate() {
            let len = usize::from(u16::from_le_bytes([h[36 + 2 * i], h[37 + 2 * i]]));
            if len == 0 || len > MAX_NAME {
                return Err(Error::Name { field });
            }
            let at = 44 + i * MAX_NAME;
            let s = std::str::from_utf8(&h[at..at + len]).map_err(|_| Error::Name { field })?;
            names.push(s.to_owned());
        }
        let mut names = names.into_iter();
        let mut next = || names.next().unwrap_or_default();
        let id = Identity { vm: next(), backup_id: next(), disk: next() };
        Ok(Header { flags, size, chunk_size, id })
    }
}

/// Creates the map of `image` for a disk of `size` bytes restored in chunks of `chunk_size`:
/// never over an existing file, mode 0600, the header and zeroed bitmaps, the file and its
/// directory synced.
pub fn create_map(image: &Path, id: &Identity, size: u64, chunk_size: u64) -> Result<(), Error> {
    let header = Header { flags: 0, size, chunk_size, id: id.clone() };
    let bytes = header.encode()?;
    let path = map_path(image);
    let create = |source| Error::Create { path: path.clone(), source };
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path).map_err(create)?;
    let written = (|| {
        file.set_len(header.file_len())?;
        MetaFile::write_at(&file, &bytes, 0)?;
        file.sync_all()?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    })();
    if let Err(source) = written {
        // A half-made map must not be taken for a real one; the error says why it is gone.
        let _ = std::fs::remove_file(&path);
        return Err(create(source));
    }
    Ok(())
}

/// Reads the map at `path` (a hostile file: every field is checked).
pub fn read_map(path: &Path) -> Result<MapInfo, Error> {
    let file = File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
    let map = Map::open(Arc::new(file))?;
    Ok(map.info())
}

/// A bitmap in memory, with the pages changed since it was last written.
#[derive(Clone, Debug)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
    ones: u64,
    dirty: BTreeSet<u64>,
}

impl Bits {
    /// `len` clear bits.
    pub fn new(len: u64) -> Bits {
        Bits { words: vec![0; len.div_ceil(64) as usize], len, ones: 0, dirty: BTreeSet::new() }
    }

    fn from_bytes(bytes: &[u8], len: u64) -> Bits {
        let mut words = vec![0u64; len.div_ceil(64) as usize];
        let mut ones = 0;
        for i in 0..len {
            if bytes[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                words[(i / 64) as usize] |= 1 << (i % 64);
                ones += 1;
            }
        }
        Bits { words, len, ones, dirty: BTreeSet::new() }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ones(&self) -> u64 {
        self.ones
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.words[(i / 64) as usize] |= 1 << (i % 64);
        self.ones += 1;
        self.dirty.insert(i / (PAGE * 8));
        true
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize] >> (i % 64);
            if w == u64::MAX >> (i % 64) {
                i = (i / 64 + 1) * 64;
                continue;
            }
            let at = i + u64::from((!w).trailing_zeros());
            return (at < self.len).then_some(at);
        }
        None
    }

    fn page_bytes(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE as usize];
        let first_word = page * PAGE / 8;
        for (k, chunk) in out.chunks_mut(8).enumerate() {
            if let Some(w) = self.words.get(first_word as usize + k) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Writes the changed pages into `file` at `at`, without syncing it.
    fn write_dirty(&mut self, file: &dyn MetaFile, at: u64) -> io::Result<bool> {
        let pages = std::mem::take(&mut self.dirty);
        let any = !pages.is_empty();
        for page in &pages {
            if let Err(e) = file.write_at(&self.page_bytes(*page), at + page * PAGE) {
                self.dirty.extend(pages.iter());
                return Err(e);
            }
        }
        Ok(any)
    }
}

/// An open map: the header and both bitmaps, in memory and in the file.
#[derive(Debug)]
pub struct Map {
    file: Arc<dyn MetaFile>,
    header: Header,
    pub chunks: Bits,
    pub blocks: Bits,
}

impl Map {
    /// Reads and checks a map.
    pub fn open(file: Arc<dyn MetaFile>) -> Result<Map, Error> {
        Self::open_inner(file, None)
    }

    /// Reads and checks the map of an image of `size` bytes: a map of another size is refused
    /// before its bitmaps are read.
    pub fn open_for(file: Arc<dyn MetaFile>, size: u64) -> Result<Map, Error> {
        Self::open_inner(file, Some(size))
    }

    fn open_inner(file: Arc<dyn MetaFile>, image: Option<u64>) -> Result<Map, Error> {
        let mut h = [0u8; HEADER_SIZE as usize];
        let n = file.read_at(&mut h, 0)?;
        let header = Header::decode(&h[..n])?;
        if let Some(image) = image.filter(|s| *s != header.size) {
            return Err(Error::SizeMismatch { map: header.size, image });
        }
        let actual = file.byte_len()?;
        if actual < header.file_len() {
            return Err(Error::Length { actual, expected: header.file_len() });
        }
        let mut cbytes = vec![0u8; header.chunk_bitmap_len() as usize];
        file.read_at(&mut cbytes, header.chunk_bitmap_at())?;
        let mut bbytes = vec![0u8; header.block_bitmap_len() as usize];
        file.read_at(&mut bbytes, header.block_bitmap_at())?;
        let chunks = Bits::from_bytes(&cbytes, header.chunks());
        let blocks = Bits::from_bytes(&bbytes, header.blocks());
        Ok(Map { file, header, chunks, blocks })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn info(&self) -> MapInfo {
        MapInfo {
            id: self.header.id.clone(),
            size: self.header.size,
            chunk_size: self.header.chunk_size,
            chunks_total: self.chunks.len(),
            chunks_done: self.chunks.ones(),
            complete: self.header.complete(),
        }
    }

    /// Writes the changed pages of both bitmaps and syncs the file. The data the new bits
    /// stand for must be durable already.
    pub fn persist(&mut self) -> io::Result<()> {
        let c = self.chunks.write_dirty(&*self.file, self.header.chunk_bitmap_at())?;
        let b = self.blocks.write_dirty(&*self.file, self.header.block_bitmap_at())?;
        if c || b {
            self.file.sync()?;
        }
        Ok(())
    }

    /// Records that the disk is complete (every chunk bit set and durable).
    pub fn set_complete(&mut self) -> Result<(), Error> {
        self.persist()?;
        let mut header = self.header.clone();
        header.flags |= FLAG_COMPLETE;
        let bytes = header.encode()?;
        self.file.write_at(&bytes[..512], 0)?;
        self.file.sync()?;
        self.header = header;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity { vm: "web01".into(), backup_id: "b-17".into(), disk: "vda".into() }
    }

    #[test]
    fn a_created_map_reads_back_empty() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vda.img");
        create_map(&image, &id(), 10 << 20, 4 << 20).unwrap();
        let path = map_path(&image);
        assert_eq!(path, dir.path().join("vda.img.restore"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let info = read_map(&path).unwrap();
        assert_eq!(
            info,
            MapInfo { id: id(), size: 10 << 20, chunk_size: 4 << 20, chunks_total: 3, chunks_done: 0, complete: false }
        );
        // Never over an existing map.
        assert!(matches!(create_map(&image, &id(), 10 << 20, 4 << 20), Err(Error::Create { .. })));
    }

    #[test]
    fn bad_geometry_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x");
        for cs in [0, 3 << 20, 2048, 128 << 20] {
            assert!(matches!(create_map(&image, &id(), 1 << 20, cs), Err(Error::ChunkSize(_))), "{cs}");
        }
        assert!(matches!(create_map(&image, &id(), 0, 4 << 20), Err(Error::DiskSize(0))));
        let long = Identity { vm: "x".repeat(MAX_NAME + 1), ..id() };
        assert!(matches!(create_map(&image, &long, 1 << 20, 4 << 20), Err(Error::Name { field: "vm" })));
        assert!(!map_path(&image).exists());
    }

    #[test]
    fn bits_persist_and_complete_reads_back() {
        let f: Arc<dyn MetaFile> = Arc::new(tempfile::tempfile().unwrap());
        let h = Header { flags: 0, size: 1 << 30, chunk_size: 1 << 20, id: id() };
        f.set_len(h.file_len()).unwrap();
        f.write_at(&h.encode().unwrap(), 0).unwrap();
        let mut m = Map::open(f.clone()).unwrap();
        assert!(m.chunks.set(0) && m.chunks.set(1023) && !m.chunks.set(1024));
        assert!(m.blocks.set(40000));
        m.persist().unwrap();
        let m2 = Map::open(f.clone()).unwrap();
        assert!(m2.chunks.get(0) && m2.chunks.get(1023) && !m2.chunks.get(1));
        assert!(m2.blocks.get(40000) && !m2.blocks.get(39999));
        assert_eq!(m2.chunks.next_clear(0), Some(1));
        assert_eq!(m2.info().chunks_done, 2);
        m.set_complete().unwrap();
        assert!(Map::open(f.clone()).unwrap().info().complete);
        // The map of another disk size is refused before its bitmaps are read.
        assert!(
            matches!(Map::open_for(f, 1 << 20), Err(Error::SizeMismatch { map, image: 1048576 }) if map == 1 << 30)
        );
    }

    #[test]
    fn next_clear_skips_full_words() {
        let mut b = Bits::from_bytes(&[0u8; 32], 200);
        for i in 0..130 {
            b.set(i);
        }
        assert_eq!(b.next_clear(0), Some(130));
        for i in 130..200 {
            b.set(i);
        }
        assert_eq!(b.next_clear(0), None);
    }

    #[test]
    fn hostile_headers_are_errors() {
        let good = Header { flags: 0, size: 1 << 20, chunk_size: 1 << 20, id: id() }.encode().unwrap();
        assert!(Header::decode(&good).is_ok());
        assert!(matches!(Header::decode(&good[..100]), Err(Error::Magic)));
        let mut bad = good;
        bad[200] ^= 1;
        assert!(matches!(Header::decode(&bad), Err(Error::Checksum)));
        // Fields that pass the checksum but say nonsense.
        let reseal = |mut h: [u8; 4096], at: usize, v: &[u8]| {
            h[at..at + v.len()].copy_from_slice(v);
            let crc = crc32fast::hash(&h[..CRC_AT]);
            h[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            h
        };
        assert!(matches!(Header::decode(&reseal(good, 8, &2u32.to_le_bytes())), Err(Error::Version(2))));
        assert!(matches!(Header::decode(&reseal(good, 12, &2u32.to_le_bytes())), Err(Error::Flags(2))));
        assert!(matches!(Header::decode(&reseal(good, 24, &0u64.to_le_bytes())), Err(Error::ChunkSize(0))));
        assert!(matches!(Header::decode(&reseal(good, 32, &512u32.to_le_bytes())), Err(Error::BlockSize(512))));
        assert!(matches!(Header::decode(&reseal(good, 36, &999u16.to_le_bytes())), Err(Error::Name { .. })));
        assert!(matches!(Header::decode(&reseal(good, 44, &[0xff])), Err(Error::Name { .. })));
        // A truncated file: the bitmaps are missing.
        let f: Arc<dyn MetaFile> = Arc::new(tempfile::tempfile().unwrap());
        f.write_at(&good, 0).unwrap();
        assert!(matches!(Map::open(f), Err(Error::Length { .. })));
    }
}
