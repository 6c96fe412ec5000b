//! Writing a tree of a backup's files ([`Item`]s, from livesnapd's `GetFiles`) into a
//! directory, confined to it.
//!
//! The names, kinds and symlink targets come from a tenant's filesystem: hostile. Nothing is
//! ever written outside the target directory:
//! - each name is one path component: not empty, not `.` or `..`, no `/` or NUL;
//! - every directory on the way is opened from the target's descriptor with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so a symlink the
//!   tree made (or one that appeared since) is never followed, nor a `..`;
//! - the entry itself is created relative to its directory's descriptor, never over an
//!   existing name (`O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`): a symlink is made
//!   as a symlink with its target as the image says (absolute, `..` or not), and nothing here
//!   opens through it afterwards;
//! - owner, mode and times are set on the open file (`fchown`, `fchmod`, `futimens`) or with
//!   `AT_SYMLINK_NOFOLLOW`; a directory's once everything beneath it is written.
//!
//! Owners are set only when running as root (otherwise the files are the caller's, and the
//! [`Report`] says so). Set-user-ID and set-group-ID bits are dropped: a tenant's binaries do
//! not become privileged programs on the host. Fifos, device nodes and sockets are skipped,
//! each with a warning. Hard links come out as separate copies (the reader sees names, not
//! inode numbers). Data ranges that are zeros arrive as holes: files stay sparse.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::fs::{Gid, Uid};

use super::{FileInfo, Item, Kind, Time};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the target directory `{}`", .0.display())]
    Target(PathBuf, #[source] io::Error),
    #[error("Cannot {op} `{}`", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` exists already: get does not overwrite", .0.display())]
    Exists(PathBuf),
    #[error("The backup holds a name that cannot be written safely, {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("Data for `{}` at {offset} (+{len}) is past its size {size}", path.display())]
    PastSize { path: PathBuf, offset: u64, len: u64, size: u64 },
    #[error("Data arrived with no regular file open")]
    StrayData,
}

pub type Result<T> = std::result::Result<T, Error>;

/// What an extraction wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file data written (holes not counted).
    pub bytes: u64,
    /// Whether owners were set (only as root).
    pub owners_set: bool,
    /// Entries skipped or changed, one line each.
    pub warnings: Vec<String>,
}

struct OpenFile {
    file: File,
    path: PathBuf,
    info: FileInfo,
}

/// Writes a stream of [`Item`]s beneath a directory.
pub struct Extractor {
    root: OwnedFd,
    root_path: PathBuf,
    as_root: bool,
    /// Directories made, with their metadata, set at the end (deepest first).
    dirs: Vec<(PathBuf, FileInfo)>,
    current: Option<OpenFile>,
    report: Report,
}

impl std::fmt::Debug for Extractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extractor").field("root", &self.root_path).field("report", &self.report).finish()
    }
}

fn ts(t: Time) -> Timespec {
    Timespec { tv_sec: t.secs, tv_nsec: i64::from(t.nanos.min(999_999_999)) }
}

fn times(info: &FileInfo) -> Timestamps {
    Timestamps { last_access: ts(info.atime), last_modification: ts(info.mtime) }
}

/// Owner ids as the kernel takes them: `u32::MAX` (`-1`) means "unchanged", never an owner.
fn owner(info: &FileInfo) -> (Option<Uid>, Option<Gid>) {
    let uid = (info.uid != u32::MAX).then(|| Uid::from_raw_unchecked(info.uid));
    let gid = (info.gid != u32::MAX).then(|| Gid::from_raw_unchecked(info.gid));
    (uid, gid)
}

/// One component of a path from the image: a name that stays in its directory.
fn check_name(name: &[u8]) -> Result<&OsStr> {
    let bad = |why| Err(Error::BadName { name: String::from_utf8_lossy(name).into_owned(), why });
    if name.is_empty() {
        return bad("an empty name");
    }
    if name == b"." || name == b".." {
        return bad("`.` and `..` are not names");
    }
    if name.contains(&b'/') {
        return bad("a name holding `/`");
    }
    if name.contains(&0) {
        return bad("a name holding a NUL byte");
    }
    if name.len() > 255 {
        return bad("a name longer than 255 bytes");
    }
    Ok(OsStr::from_bytes(name))
}

impl Extractor {
    /// Writes beneath `dir`, which must be an existing directory.
    pub fn new(dir: &Path) -> Result<Extractor> {
        let root = rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::Target(dir.to_owned(), e.into()))?;
        Ok(Extractor {
            root,
            root_path: dir.to_owned(),
            as_root: rustix::process::geteuid().is_root(),
            dirs: Vec::new(),
            current: None,
            report: Report::default(),
        })
    }

    /// The directory `rel` (relative, checked names) beneath the target, opened without
    /// following any symlink or leaving the target.
    fn open_dir(&self, rel: &Path) -> Result<OwnedFd> {
        let path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        rustix::fs::openat2(
            &self.root,
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(|e| Error::Io { op: "open the directory", path: self.root_path.join(rel), source: e.into() })
    }

    /// Takes the next item of the stream.
    pub fn item(&mut self, item: Item) -> Result<()> {
        match item {
            Item::Data { offset, data } => {
                let cur = self.current.as_mut().ok_or(Error::StrayData)?;
                let len = data.len() as u64;
                if offset.checked_add(len).is_none_or(|end| end > cur.info.size) {
                    return Err(Error::PastSize { path: cur.path.clone(), offset, len, size: cur.info.size });
                }
                cur.file.write_all_at(&data, offset).map_err(|source| Error::Io {
                    op: "write",
                    path: cur.path.clone(),
                    source,
                })?;
                self.report.bytes += len;
                Ok(())
            }
            Item::Entry { path, info } => {
                self.close_file()?;
                self.entry(&path, info)
            }
        }
    }

    fn entry(&mut self, components: &[Vec<u8>], info: FileInfo) -> Result<()> {
        let Some((name, parents)) = components.split_last() else {
            // The root of the filesystem: its contents go straight into the target, whose own
            // metadata is the operator's and stays.
            if info.kind != Kind::Dir {
                return Err(Error::BadName { name: String::new(), why: "an empty path for something not a directory" });
            }
            return Ok(());
        };
        let mut rel = PathBuf::new();
        for c in parents {
            rel.push(check_name(c)?);
        }
        let name = check_name(name)?;
        let dir = self.open_dir(&rel)?;
        rel.push(name);
        let shown = self.root_path.join(&rel);
        let exists = |e: rustix::io::Errno, op| {
            if e == rustix::io::Errno::EXIST {
                Error::Exists(shown.clone())
            } else {
                Error::Io { op, path: shown.clone(), source: e.into() }
            }
        };
        match info.kind {
            Kind::Dir => {
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| exists(e, "create the directory"))?;
                self.report.dirs += 1;
                self.dirs.push((rel, info));
            }
            Kind::File => {
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| exists(e, "create"))?;
                self.report.files += 1;
                self.current = Some(OpenFile { file: File::from(fd), path: shown, info });
            }
            Kind::Symlink => {
                if info.target.is_empty() || info.target.contains(&0) {
                    self.report
                        .warnings
                        .push(format!("{}: a symlink with an empty or NUL-holding target, skipped", shown.display()));
                    return Ok(());
                }
                rustix::fs::symlinkat(OsStr::from_bytes(&info.target), &dir, name)
                    .map_err(|e| exists(e, "create the symlink"))?;
                self.report.symlinks += 1;
                if self.as_root {
                    let (u, g) = owner(&info);
                    rustix::fs::chownat(&dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| Error::Io {
                        op: "set the owner of",
                        path: shown.clone(),
                        source: e.into(),
                    })?;
                }
                rustix::fs::utimensat(&dir, name, &times(&info), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| Error::Io {
                    op: "set the times of",
                    path: shown,
                    source: e.into(),
                })?;
            }
            Kind::Fifo | Kind::CharDev | Kind::BlockDev | Kind::Socket => {
                self.report.warnings.push(format!("{}: a {}, skipped", shown.display(), info.kind.as_str()));
            }
        }
        Ok(())
    }

    /// Owner, then mode (a chown clears set-ID bits), then times, on an open descriptor.
    fn set_meta(&mut self, fd: impl AsFd, path: &Path, info: &FileInfo) -> Result<()> {
        let io = |op| move |e: rustix::io::Errno| Error::Io { op, path: path.to_owned(), source: e.into() };
        if self.as_root {
            let (u, g) = owner(info);
            rustix::fs::fchown(&fd, u, g).map_err(io("set the owner of"))?;
        }
        if info.mode & 0o6000 != 0 {
            self.report.warnings.push(format!("{}: set-user-ID/set-group-ID bits dropped", path.display()));
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(info.mode & 0o1777)).map_err(io("set the mode of"))?;
        rustix::fs::futimens(&fd, &times(info)).map_err(io("set the times of"))?;
        Ok(())
    }

    fn close_file(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else { return Ok(()) };
        // The size last: a file whose tail is a hole (or zeros) is extended without writing.
        cur.file.set_len(cur.info.size).map_err(|source| Error::Io { op: "size", path: cur.path.clone(), source })?;
        self.set_meta(&cur.file, &cur.path, &cur.info)
    }

    /// Closes the last file and sets every directory's owner, mode and times, deepest first
    /// (writing into a directory changes its mtime).
    pub fn finish(mut self) -> Result<Report> {
        self.close_file()?;
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, info) in dirs.iter().rev() {
            let fd = self.open_dir(rel)?;
            self.set_meta(fd, &self.root_path.join(rel), info)?;
        }
        self.report.owners_set = self.as_root;
        Ok(self.report)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn info(name: &str, kind: Kind, size: u64) -> FileInfo {
        FileInfo {
            name: name.as_bytes().to_vec(),
            kind,
            mode: 0o640,
            uid: 1234,
            gid: 2345,
            size,
            mtime: Time { secs: 1_000_000_000, nanos: 5 },
            atime: Time { secs: 1_100_000_000, nanos: 0 },
            target: Vec::new(),
        }
    }

    fn entry(path: &[&str], info: FileInfo) -> Item {
        Item::Entry { path: path.iter().map(|c| c.as_bytes().to_vec()).collect(), info }
    }

    #[test]
    fn a_tree_comes_out_with_its_metadata_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(t.path()).unwrap();
        let mut d = info("d", Kind::Dir, 0);
        d.mode = 0o750;
        x.item(entry(&["d"], d)).unwrap();
        x.item(entry(&["d", "f"], info("f", Kind::File, 3 << 20))).unwrap();
        x.item(Item::Data { offset: 1 << 20, data: vec![7; 10] }).unwrap();
        let mut l = info("l", Kind::Symlink, 0);
        l.target = b"/etc/passwd".to_vec();
        x.item(entry(&["d", "l"], l)).unwrap();
        let r = x.finish().unwrap();
        assert_eq!((r.files, r.dirs, r.symlinks, r.bytes), (1, 1, 1, 10));
        let f = std::fs::metadata(t.path().join("d/f")).unwrap();
        assert_eq!(f.len(), 3 << 20);
        assert!(f.blocks() * 512 < 1 << 20, "the file is not sparse: {} blocks", f.blocks());
        assert_eq!(f.mode() & 0o7777, 0o640);
        assert_eq!((f.mtime(), f.mtime_nsec(), f.atime()), (1_000_000_000, 5, 1_100_000_000));
        assert_eq!(&std::fs::read(t.path().join("d/f")).unwrap()[1 << 20..(1 << 20) + 10], &[7; 10]);
        assert_eq!(std::fs::read_link(t.path().join("d/l")).unwrap(), Path::new("/etc/passwd"));
        let dm = std::fs::metadata(t.path().join("d")).unwrap();
        assert_eq!((dm.mode() & 0o7777, dm.mtime()), (0o750, 1_000_000_000));
        if r.owners_set {
            assert_eq!((f.uid(), f.gid()), (1234, 2345));
        }
    }

    #[test]
    fn hostile_names_and_symlinked_directories_never_lead_outside() {
        let outside = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(t.path()).unwrap();
        // A symlink to a directory outside, then a file "through" it: refused, nothing outside.
        let mut evil = info("evil", Kind::Symlink, 0);
        evil.target = outside.path().as_os_str().as_bytes().to_vec();
        x.item(entry(&["evil"], evil)).unwrap();
        let e = x.item(entry(&["evil", "passwd"], info("passwd", Kind::File, 1))).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        // `..`, `/` in a name, an empty name: refused by name.
        for bad in [&["..", "x"][..], &["a/b"], &[""], &["."]] {
            let e = x.item(entry(bad, info("x", Kind::File, 1))).unwrap_err();
            assert!(matches!(e, Error::BadName { .. }), "{bad:?}: {e}");
        }
        // A name that exists already is never overwritten, nor written through when a symlink.
        let e = x.item(entry(&["evil"], info("evil", Kind::File, 1))).unwrap_err();
        assert!(matches!(e, Error::Exists(_)), "{e}");
        // Data past the file's size is refused.
        x.item(entry(&["small"], info("small", Kind::File, 4))).unwrap();
        let e = x.item(Item::Data { offset: 2, data: vec![1; 3] }).unwrap_err();
        assert!(matches!(e, Error::PastSize { .. }), "{e}");
        // A fifo is skipped with a warning; set-ID bits are dropped with one.
        x.item(entry(&["p"], info("p", Kind::Fifo, 0))).unwrap();
        let mut s = info("s", Kind::File, 0);
        s.mode = 0o4755;
        x.item(entry(&["s"], s)).unwrap();
        let r = x.finish().unwrap();
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(!t.path().join("p").exists());
        assert_eq!(std::fs::metadata(t.path().join("s")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "something was written outside");
    }
}
