//! File-level restore: the files of one disk of one backup, read without mounting anything.
//!
//! The disk is a tenant's, so its bytes are hostile: a crafted filesystem must never reach the
//! host's kernel. Everything here is userspace over the repository's random-access
//! [`DiskReader`](livesnap_repo::DiskReader) (only the chunks a read touches are fetched):
//!
//! - [`table`]: the partition table (GPT, MBR with logical partitions) and what a region holds,
//!   named by its magic;
//! - [`Volume`]: the ext4 filesystem of a region, read by `ext4-view`, a read-only ext4 reader
//!   written for untrusted images (checksums checked, no `unsafe`, every length bounded), and
//!   what livesnapd serves of it: a directory's entries, a file's bytes, a tree as a stream of
//!   entries and data ([`Item`]);
//! - [`extract`]: writing such a stream into a directory (snapctl's `get`), confined to it.

pub mod extract;
pub mod table;

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use table::{Region, TableError, TableKind};

/// Deepest tree [`Volume::walk`] descends (a hostile image can make a directory its own
/// descendant; this and the client going away bound such a walk).
pub const MAX_DEPTH: usize = 128;
/// The size of a data piece of a file: a [`Item::Data`] carries at most this many bytes.
pub const PIECE: usize = 256 << 10;
/// The longest path `Volume` accepts from a client.
const MAX_PATH: usize = 4096;

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// A disk image read at any offset: one disk of a backup ([`livesnap_repo::DiskReader`]), or
/// bytes in memory (tests, fuzzing).
pub trait Image: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`, which with `buf`'s length lies within the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BoxedError>;

    /// [`Image::read_at`], checked against the size, its error named.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::PastEnd { offset, len, size: self.size() });
        }
        self.read_at(buf, offset).map_err(|source| Error::Read { offset, len, source })
    }
}

impl Image for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BoxedError> {
        let start = usize::try_from(offset)?;
        let src = start.checked_add(buf.len()).and_then(|end| self.get(start..end)).ok_or("read past the end")?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl Image for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BoxedError> {
        self.as_slice().read_at(buf, offset)
    }
}

impl Image for livesnap_repo::DiskReader {
    fn size(&self) -> u64 {
        livesnap_repo::DiskReader::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BoxedError> {
        Ok(livesnap_repo::DiskReader::read_at(self, buf, offset)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read {len} bytes of the disk at {offset}")]
    Read {
        offset: u64,
        len: u64,
        #[source]
        source: BoxedError,
    },
    #[error("A read of {len} bytes at {offset} is past the disk's end ({size} bytes)")]
    PastEnd { offset: u64, len: u64, size: u64 },
    #[error("The disk's partition table cannot be read")]
    Table(#[source] TableError),
    #[error("The disk has no partition table (it holds {found}): there is no partition {partition}")]
    NoTable { partition: u32, found: String },
    #[error("The disk's {table} has no partition {partition}; it has: {list}")]
    NoSuchPartition { table: TableKind, partition: u32, list: String },
    #[error(
        "The disk's {table} has {count} partitions, none or several holding ext4; choose one with --partition: {list}"
    )]
    ChoosePartition { table: TableKind, count: usize, list: String },
    #[error("{} holds {found}, not ext4", capitalised(.region))]
    NotExt4 { region: String, found: String },
    #[error("{} holds an ext4 filesystem that cannot be read", capitalised(.region))]
    Ext4 {
        region: String,
        #[source]
        source: Ext4Error,
    },
    #[error("Cannot read `{path}` in the backup's filesystem")]
    Path {
        path: String,
        #[source]
        source: Ext4Error,
    },
    #[error("The path `{0}` is not valid: {1}")]
    BadPath(String, &'static str),
    #[error("`{0}` is not a regular file (it is a {1})")]
    NotAFile(String, &'static str),
    #[error("The tree under `{path}` is deeper than {MAX_DEPTH} directories (a loop in a damaged filesystem?)")]
    TooDeep { path: String },
    #[error("The receiver went away")]
    Gone,
    #[error("The bound on the bytes read was reached")]
    ReadLimit,
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
            Kind::Socket => "socket",
        }
    }

    fn of(t: FileType) -> Kind {
        if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_char_dev() {
            Kind::CharDev
        } else if t.is_block_dev() {
            Kind::BlockDev
        } else if t.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }
}

/// A time: seconds since the epoch and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// One entry of the filesystem, as the image says (hostile: a name may hold any byte but `/`
/// and NUL, a symlink's target anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Time,
    pub atime: Time,
    /// A symlink's target; empty otherwise.
    pub target: Vec<u8>,
}

/// One piece of a tree, in order: a directory's entry comes before what it holds, a regular
/// file's entry before its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// `path`: the components below the requested path's parent (the first one is the
    /// requested entry's own name; empty for the root directory).
    Entry { path: Vec<Vec<u8>>, info: FileInfo },
    /// Bytes of the last entry's file at `offset`; ranges of zeros are left out (holes).
    Data { offset: u64, data: Vec<u8> },
}

/// A region of the disk, as ext4-view reads it: offsets relative to its start, never past
/// its end.
struct RegionRead {
    img: Arc<dyn Image>,
    start: u64,
    len: u64,
}

impl Ext4Read for RegionRead {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> Result<(), BoxedError> {
        let n = dst.len() as u64;
        if start_byte.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(format!(
                "a read of {n} bytes at {start_byte} is past the end of the filesystem's region ({} bytes)",
                self.len
            )
            .into());
        }
        self.img.read_exact_at(dst, self.start + start_byte).map_err(|e| Box::new(e) as BoxedError)
    }
}

/// The ext4 filesystem of one region of a disk. Not `Send` (ext4-view shares its state with
/// `Rc`): open it on the thread that uses it.
pub struct Volume {
    fs: Ext4,
    pub region: Region,
    /// File bytes (holes included) reads may still produce; see [`Volume::limit_reads`].
    budget: std::cell::Cell<u64>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("region", &self.region).finish_non_exhaustive()
    }
}

fn describe(img: &dyn Image, parts: &[Region]) -> Result<String, Error> {
    let mut out = Vec::new();
    for p in parts {
        let sig = table::signature(img, p.start, p.len)?.unwrap_or("unknown");
        out.push(format!("{} ({}, {} MiB, {sig})", p.number.unwrap_or(0), p.kind, p.len >> 20));
    }
    Ok(out.join(", "))
}

impl Volume {
    /// The ext4 filesystem of `img`: of partition `partition` (1-based) when given; else the
    /// whole disk when it has no partition table, or the table's only partition, or its only
    /// partition holding ext4.
    pub fn open(img: Arc<dyn Image>, partition: Option<u32>) -> Result<Volume, Error> {
        let whole = || Region { number: None, start: 0, len: img.size(), kind: "disk".into() };
        let region = match (table::partitions(&*img)?, partition) {
            (None, None) => whole(),
            (None, Some(n)) => {
                let found = table::signature(&*img, 0, img.size())?.unwrap_or("no filesystem livesnap knows");
                return Err(Error::NoTable { partition: n, found: found.to_owned() });
            }
            (Some((table, parts)), Some(n)) => match parts.iter().find(|p| p.number == Some(n)) {
                Some(p) => p.clone(),
                None => {
                    let list = if parts.is_empty() { "no partitions".to_owned() } else { describe(&*img, &parts)? };
                    return Err(Error::NoSuchPartition { table, partition: n, list });
                }
            },
            (Some((table, parts)), None) => {
                let mut ext4 = Vec::new();
                for p in &parts {
                    if table::signature(&*img, p.start, p.len)? == Some("ext4") {
                        ext4.push(p);
                    }
                }
                match (parts.len(), ext4.as_slice()) {
                    (1, _) => parts[0].clone(),
                    (_, [only]) => (*only).clone(),
                    _ => {
                        let list = if parts.is_empty() { "none".to_owned() } else { describe(&*img, &parts)? };
                        return Err(Error::ChoosePartition { table, count: parts.len(), list });
                    }
                }
            }
        };
        let found = table::signature(&*img, region.start, region.len)?;
        if found != Some("ext4") {
            let found = found.unwrap_or("no filesystem livesnap knows").to_owned();
            return Err(Error::NotExt4 { region: region.name(), found });
        }
        let read = RegionRead { img, start: region.start, len: region.len };
        let fs = Ext4::load(Box::new(read)).map_err(|source| Error::Ext4 { region: region.name(), source })?;
        Ok(Volume { fs, region, budget: std::cell::Cell::new(u64::MAX) })
    }

    /// Bounds the file bytes (holes included: a hostile inode may claim terabytes of them)
    /// that `read` and `walk` produce from now on; past it they fail with
    /// [`Error::ReadLimit`]. Unbounded by default (livesnapd relies on the client going away).
    pub fn limit_reads(&self, bytes: u64) {
        self.budget.set(bytes);
    }

    /// The entry at `path` (an absolute path in the filesystem), not following a final symlink.
    pub fn stat(&self, path: &str) -> Result<FileInfo, Error> {
        let p = check_path(path)?;
        let meta =
            self.fs.symlink_metadata(p.as_slice()).map_err(|source| Error::Path { path: path.into(), source })?;
        let name = p.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
        self.info(&p, name, &meta).map_err(|source| Error::Path { path: path.into(), source })
    }

    fn info(&self, path: &[u8], name: Vec<u8>, m: &Metadata) -> Result<FileInfo, Ext4Error> {
        let kind = Kind::of(m.file_type());
        let target = if kind == Kind::Symlink { self.fs.read_link(path)?.as_ref().to_vec() } else { Vec::new() };
        let t = |t: ext4_view::Timestamp| Time { secs: t.seconds(), nanos: t.nanoseconds() };
        Ok(FileInfo {
            name,
            kind,
            mode: u32::from(m.mode()),
            uid: m.uid(),
            gid: m.gid(),
            size: if kind == Kind::Dir { 0 } else { m.len() },
            mtime: t(m.modified()),
            atime: t(m.accessed()),
            target,
        })
    }

    /// The entries of the directory at `path`, sorted by name (following symlinks inside the
    /// image to get there); the entry itself when it is not a directory.
    pub fn list(&self, path: &str) -> Result<Vec<FileInfo>, Error> {
        let p = check_path(path)?;
        let meta = self.fs.metadata(p.as_slice()).map_err(|source| Error::Path { path: path.into(), source })?;
        if !meta.is_dir() {
            return Ok(vec![self.stat(path)?]);
        }
        self.list_at(&p)
    }

    /// The entries of the directory at `p` (bytes: names need not be UTF-8), sorted by name.
    fn list_at(&self, p: &[u8]) -> Result<Vec<FileInfo>, Error> {
        let err = |source| Error::Path { path: lossy(p), source };
        let mut out = Vec::new();
        for e in self.fs.read_dir(p).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let child = join(p, &name);
            let m = e.metadata().map_err(|source| Error::Path { path: lossy(&child), source })?;
            out.push(self.info(&child, name, &m).map_err(|source| Error::Path { path: lossy(&child), source })?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Checks that `path` is (or leads through symlinks inside the image to) a regular file.
    pub fn check_file(&self, path: &str) -> Result<(), Error> {
        let p = check_path(path)?;
        let meta = self.fs.metadata(p.as_slice()).map_err(|source| Error::Path { path: path.into(), source })?;
        match Kind::of(meta.file_type()) {
            Kind::File => Ok(()),
            kind => Err(Error::NotAFile(path.into(), kind.as_str())),
        }
    }

    /// The bytes of the regular file at `path` (following symlinks inside the image), in
    /// pieces of at most [`PIECE`] bytes, each given to `sink` with its offset; returns the
    /// file's size.
    pub fn read(&self, path: &str, mut sink: impl FnMut(u64, &[u8]) -> Result<(), Error>) -> Result<u64, Error> {
        let p = check_path(path)?;
        let err = |source| Error::Path { path: path.into(), source };
        let meta = self.fs.metadata(p.as_slice()).map_err(err)?;
        let kind = Kind::of(meta.file_type());
        if kind != Kind::File {
            return Err(Error::NotAFile(path.into(), kind.as_str()));
        }
        self.read_file(&p, |off, data| sink(off, data)).map_err(|e| match e {
            ReadError::Sink(e) => e,
            ReadError::Ext4(source) => err(source),
        })
    }

    fn read_file(&self, path: &[u8], mut sink: impl FnMut(u64, &[u8]) -> Result<(), Error>) -> Result<u64, ReadError> {
        let mut f = self.fs.open(path).map_err(ReadError::Ext4)?;
        let size = f.metadata().len();
        let mut buf = vec![0u8; PIECE];
        let mut offset = 0u64;
        while offset < size {
            let mut filled = 0;
            while filled < buf.len() && offset + (filled as u64) < size {
                let n = f.read_bytes(&mut buf[filled..]).map_err(ReadError::Ext4)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            let left = self.budget.get();
            if left < filled as u64 {
                return Err(ReadError::Sink(Error::ReadLimit));
            }
            self.budget.set(left - filled as u64);
            sink(offset, &buf[..filled]).map_err(ReadError::Sink)?;
            offset += filled as u64;
        }
        Ok(offset)
    }

    /// The tree at `path`: every entry (the requested one first, a directory before what it
    /// holds, siblings by name) and the data of each regular file, holes left out, given to
    /// `sink` in order. Symlinks are entries, never followed. `sink` stops the walk by
    /// returning an error.
    pub fn walk(&self, path: &str, mut sink: impl FnMut(Item) -> Result<(), Error>) -> Result<(), Error> {
        let p = check_path(path)?;
        let root = self.stat(path)?;
        let first = if p == b"/" { Vec::new() } else { vec![root.name.clone()] };
        self.walk_at(&p, first, root, 0, &mut sink)
    }

    fn walk_at(
        &self,
        path: &[u8],
        rel: Vec<Vec<u8>>,
        info: FileInfo,
        depth: usize,
        sink: &mut dyn FnMut(Item) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep { path: lossy(path) });
        }
        let kind = info.kind;
        sink(Item::Entry { path: rel.clone(), info })?;
        match kind {
            Kind::File => {
                let zero = |d: &[u8]| d.iter().all(|&b| b == 0);
                self.read_file(path, |offset, data| {
                    // Holes and zeros alike are left out: the receiver's file is sized at the
                    // end and reads them as zeros.
                    for (i, piece) in data.chunks(64 << 10).enumerate() {
                        if !zero(piece) {
                            let offset = offset + (i as u64) * (64 << 10);
                            sink(Item::Data { offset, data: piece.to_vec() })?;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| match e {
                    ReadError::Sink(e) => e,
                    ReadError::Ext4(source) => Error::Path { path: lossy(path), source },
                })?;
            }
            Kind::Dir => {
                for child in self.list_at(path)? {
                    let child_path = join(path, &child.name);
                    let mut r = rel.clone();
                    r.push(child.name.clone());
                    self.walk_at(&child_path, r, child, depth + 1, sink)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

enum ReadError {
    Sink(Error),
    Ext4(Ext4Error),
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// A client's path, as bytes ext4-view takes: absolute (a relative one is taken from the
/// root), no NUL, at most 4096 bytes, trailing slashes dropped.
fn check_path(path: &str) -> Result<Vec<u8>, Error> {
    if path.len() > MAX_PATH {
        return Err(Error::BadPath(path.chars().take(64).collect(), "longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(Error::BadPath(path.replace('\0', "\\0"), "it holds a NUL byte"));
    }
    let mut p = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        p.push('/');
    }
    p.push_str(path);
    while p.len() > 1 && p.ends_with('/') {
        p.pop();
    }
    if p.split('/').any(|c| c.len() > 255) {
        return Err(Error::BadPath(p, "a name in it is longer than 255 bytes"));
    }
    Ok(p.into_bytes())
}

#[cfg(test)]
mod tests;
