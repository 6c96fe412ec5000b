//! Restoring a disk of a backup to a new image file inside livesnapd's restore directory: the
//! repository writes the disk into a file opened here; this module owns the paths and the image
//! format (qcow2 through `qemu-img convert`).
//!
//! Any client with the token may ask for a restore, so the path it names is hostile: it is
//! resolved beneath the restore directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! (no `..` out of it, no symlink anywhere on the way, no `/proc` magic link), the image is
//! written to a new hidden file beside the target and renamed over nothing
//! (`renameat2(RENAME_NOREPLACE)`): a restore never overwrites, and a failed one leaves nothing
//! at the destination.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use livesnap_repo::{self as repo, Repository, RestoreStats};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Repo(#[from] repo::Error),
    #[error("`{}` exists already: a restore does not overwrite", .0.display())]
    DestinationExists(PathBuf),
    #[error("The target `{}` is not a file name inside the restore directory `{}`: {why}", target.display(), dir.display())]
    OutsideRestoreDir { target: PathBuf, dir: PathBuf, why: &'static str },
    #[error("The target's directory `{}` does not exist, is not a directory or has a symlink in its path", .0.display())]
    NoSuchDirectory(PathBuf),
    #[error("This kernel has no openat2 (Linux 5.6 or later): restores are refused rather than resolved unsafely")]
    NoOpenat2,
    #[error("Cannot {op} `{}`", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot run qemu-img")]
    QemuImgSpawn(#[source] io::Error),
    #[error("Converting to qcow2 with qemu-img failed ({status}): {stderr}")]
    QemuImg { status: String, stderr: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> Error + 'a {
    move |e| Error::Io { op, path: path.to_owned(), source: e.into() }
}

/// How every path beneath the restore directory is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Where an image is restored to: a directory beneath the restore directory, opened, and a
/// plain file name in it.
#[derive(Debug)]
pub struct Destination {
    dir: OwnedFd,
    name: OsString,
    /// The whole path, for messages.
    path: PathBuf,
}

impl Destination {
    /// Resolves `target` beneath `restore_dir`: a relative path, or an absolute one that starts
    /// with `restore_dir`; no `..`, no symlink. The directory must exist; the file must not.
    pub fn resolve(restore_dir: &Path, target: &Path) -> Result<Destination> {
        let outside = |why| Error::OutsideRestoreDir { target: target.to_owned(), dir: restore_dir.to_owned(), why };
        let rel = if target.is_absolute() {
            target.strip_prefix(restore_dir).map_err(|_| outside("an absolute path must start with it"))?
        } else {
            target
        };
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(outside("`..` is refused")),
                Component::RootDir | Component::Prefix(_) => return Err(outside("not a relative path")),
            }
        }
        let Some(name) = parts.pop() else { return Err(outside("no file name")) };
        if name.as_bytes().len() > 200 {
            return Err(outside("the file name is longer than 200 bytes"));
        }
        let path = restore_dir.join(rel);
        let root = rustix::fs::open(restore_dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_error("open the restore directory", restore_dir))?;
        let sub: PathBuf = parts.iter().collect();
        let sub = if sub.as_os_str().is_empty() { PathBuf::from(".") } else { sub };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = match rustix::fs::openat2(&root, &sub, flags, Mode::empty(), RESOLVE) {
            Ok(fd) => fd,
            Err(Errno::NOSYS) => return Err(Error::NoOpenat2),
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => {
                return Err(Error::NoSuchDirectory(restore_dir.join(&sub)))
            }
            Err(e) => return Err(io_error("open", &restore_dir.join(&sub))(e)),
        };
        let dest = Destination { dir, name: name.to_owned(), path };
        dest.refuse_existing()?;
        Ok(dest)
    }

    /// The whole path of the image to be.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails early when the target exists (the rename is what guarantees it; this only spares
    /// a restore that would fail at its end).
    pub fn refuse_existing(&self) -> Result<()> {
        match rustix::fs::statat(&self.dir, &*self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(Error::DestinationExists(self.path.clone())),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_error("look for", &self.path)(e)),
        }
    }

    /// `.NAME.TAG-PID`, beside the target.
    fn sibling(&self, tag: &str) -> OsString {
        let mut s = OsString::from(".");
        s.push(&self.name);
        s.push(format!(".{tag}-{}", std::process::id()));
        s
    }

    /// Creates the new file `name` in the destination's directory, never following a link.
    fn create(&self, name: &OsStr) -> Result<File> {
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, name, flags, Mode::from_raw_mode(0o600))
            .map_err(io_error("create", &self.path.with_file_name(name)))?;
        Ok(File::from(fd))
    }

    fn remove(&self, name: &OsStr) {
        let _ = rustix::fs::unlinkat(&self.dir, name, AtFlags::empty());
    }

    /// Renames `name` to the target if the target still does not exist, and makes it durable.
    fn publish(&self, name: &OsStr) -> Result<()> {
        match rustix::fs::renameat_with(&self.dir, name, &self.dir, &*self.name, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Err(Error::DestinationExists(self.path.clone())),
            Err(e) => return Err(io_error("rename into", &self.path)(e)),
        }
        // An O_PATH descriptor cannot be synced: open the directory itself, through it.
        rustix::fs::openat(&self.dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .and_then(rustix::fs::fsync)
            .map_err(io_error("sync the directory of", &self.path))
    }
}

/// Writes disk `disk` of backup `vm`/`id` to a new raw image at `dest`, sparse: zero chunks and
/// zero 4 KiB blocks are holes. The image appears only when complete and synced.
pub fn raw(repo: &Repository, vm: &str, id: &str, disk: &str, dest: &Destination) -> Result<RestoreStats> {
    let m = repo.manifest(vm, id, disk)?;
    dest.refuse_existing()?;
    let tmp = dest.sibling("partial");
    let result = write_raw(repo, &m, dest, &tmp).and_then(|(_, stats)| {
        dest.publish(&tmp)?;
        Ok(stats)
    });
    if result.is_err() {
        dest.remove(&tmp);
    }
    result
}

/// Restores to a new qcow2 image: a raw image beside the target first, then
/// `qemu-img convert -O qcow2` (which keeps the holes unallocated), both files handed to
/// qemu-img as this process's descriptors, so that it resolves no path of the client's.
pub fn qcow2(repo: &Repository, vm: &str, id: &str, disk: &str, dest: &Destination) -> Result<RestoreStats> {
    let m = repo.manifest(vm, id, disk)?;
    dest.refuse_existing()?;
    let raw = dest.sibling("raw");
    let qcow = dest.sibling("qcow2-partial");
    let result = (|| {
        let (raw_file, stats) = write_raw(repo, &m, dest, &raw)?;
        let qcow_file = dest.create(&qcow)?;
        convert_to_qcow2(&raw_file, &qcow_file)?;
        qcow_file.sync_all().map_err(|source| Error::Io { op: "sync", path: dest.path.clone(), source })?;
        dest.publish(&qcow)?;
        Ok(stats)
    })();
    dest.remove(&raw);
    if result.is_err() {
        dest.remove(&qcow);
    }
    result
}

/// Writes the raw image `raw` as qcow2 into `qcow` (both open; `qemu-img` reaches them through
/// /proc/self/fd).
fn convert_to_qcow2(raw: &std::fs::File, qcow: &std::fs::File) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-t", "writeback"])
        .arg(fd_path(raw))
        .arg(fd_path(qcow))
        .output()
        .map_err(Error::QemuImgSpawn)?;
    if !out.status.success() {
        return Err(Error::QemuImg {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Creates the target empty, sized `size`: a sparse raw file, or a qcow2 image with nothing
/// allocated (`qemu-img convert` of the sparse raw file, as [`qcow2`] does). Never overwrites;
/// the file appears whole (renamed into place) and synced. Mode 0600, owned by livesnapd's
/// user: livesnap-blk opens its images before it drops its privileges.
pub fn empty(dest: &Destination, format: crate::daemon::model::ImageFormat, size: u64) -> Result<()> {
    use crate::daemon::model::ImageFormat;
    dest.refuse_existing()?;
    let raw = dest.sibling("raw");
    let qcow = dest.sibling("qcow2-partial");
    let result = (|| {
        let raw_file = dest.create(&raw)?;
        let io = |op| move |source| Error::Io { op, path: dest.path.clone(), source };
        raw_file.set_len(size).map_err(io("size"))?;
        match format {
            ImageFormat::Raw => {
                raw_file.sync_all().map_err(io("sync"))?;
                dest.publish(&raw)
            }
            ImageFormat::Qcow2 => {
                let qcow_file = dest.create(&qcow)?;
                convert_to_qcow2(&raw_file, &qcow_file)?;
                qcow_file.sync_all().map_err(io("sync"))?;
                dest.publish(&qcow)
            }
        }
    })();
    if result.is_err() || format == ImageFormat::Qcow2 {
        dest.remove(&raw);
    }
    if result.is_err() {
        dest.remove(&qcow);
    }
    result
}

impl Destination {
    /// Removes the target (a live restore whose map could not be created).
    pub fn remove_target(&self) {
        self.remove(&self.name.clone());
    }
}

/// A path that names `f` itself for a child process (`/proc/PID/fd/N` of this process).
fn fd_path(f: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_fd().as_raw_fd()))
}

/// Restores `m` into the new file `name` of the destination (the repository sizes it, writes
/// and syncs it); the file stays open for a caller that reads it back.
fn write_raw(repo: &Repository, m: &repo::Manifest, dest: &Destination, name: &OsStr) -> Result<(File, RestoreStats)> {
    let file = dest.create(name)?;
    let stats = repo.restore(m, &file)?;
    Ok((file, stats))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use livesnap_repo::{BackupSpec, Consistency, CreateOptions};

    const K64: usize = 64 << 10;

    /// A repository at 64 KiB chunks holding backup vm/b1 of `data` as disk vda.
    fn backed_up(dir: &Path, data: &[u8]) -> Repository {
        let opts = CreateOptions { chunk_size: K64 as u64, ..CreateOptions::default() };
        let repo = Repository::create(dir.join("repo"), opts).unwrap();
        let spec = BackupSpec {
            vm: "vm".into(),
            id: "b1".into(),
            consistency: Consistency::Crash,
            freeze_window: None,
            created_unix_us: None,
        };
        let mut w = repo.begin_backup(spec).unwrap();
        w.full("vda", &data.to_vec()).unwrap();
        w.commit().unwrap();
        repo
    }

    /// 8 chunks of noise, chunks 2 and 3 zero, 100 bytes more.
    fn data() -> Vec<u8> {
        let mut data = vec![0u8; 8 * K64 + 100];
        fastrand::Rng::with_seed(3).fill(&mut data);
        data[2 * K64..4 * K64].fill(0);
        data
    }

    fn dest(dir: &Path, name: &str) -> Destination {
        Destination::resolve(dir, Path::new(name)).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn raw_restore_is_sparse_and_refuses_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let data = data();
        let repo = backed_up(dir.path(), &data);
        let out = dir.path().join("r.raw");
        let stats = raw(&repo, "vm", "b1", "vda", &dest(dir.path(), "r.raw")).unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        assert_eq!(stats.bytes_written, data.len() as u64 - 2 * K64 as u64);
        assert!(fs::metadata(&out).unwrap().blocks() * 512 <= data.len() as u64 - K64 as u64, "holes");
        let other = dir.path().join("other.raw");
        let late = dest(dir.path(), "other.raw");
        fs::write(&other, b"mine").unwrap();
        let e = Destination::resolve(dir.path(), Path::new("other.raw")).unwrap_err();
        assert!(matches!(e, Error::DestinationExists(_)), "{e}");
        // Created between the request and the rename: still not overwritten.
        assert!(matches!(raw(&repo, "vm", "b1", "vda", &late), Err(Error::DestinationExists(_))));
        assert!(matches!(qcow2(&repo, "vm", "b1", "vda", &late), Err(Error::DestinationExists(_))));
        assert_eq!(fs::read(&other).unwrap(), b"mine", "an existing target is left alone");
        let e = raw(&repo, "vm", "b9", "vda", &dest(dir.path(), "x")).unwrap_err();
        assert!(matches!(e, Error::Repo(repo::Error::BackupNotFound { .. })), "{e}");
    }

    #[test]
    fn a_target_resolves_only_to_a_new_file_beneath_the_restore_directory() {
        let top = tempfile::tempdir().unwrap();
        let rd = top.path().join("restore");
        fs::create_dir_all(rd.join("sub")).unwrap();
        fs::create_dir(top.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(top.path().join("elsewhere"), rd.join("link")).unwrap();
        std::os::unix::fs::symlink("sub", rd.join("inlink")).unwrap();
        std::os::unix::fs::symlink(top.path().join("elsewhere/x.raw"), rd.join("dangling.raw")).unwrap();
        let ok = |t: &str| Destination::resolve(&rd, Path::new(t)).map(|d| d.path().to_owned());
        assert_eq!(ok("a.raw").unwrap(), rd.join("a.raw"));
        assert_eq!(ok("./sub/a.raw").unwrap(), rd.join("sub/a.raw"));
        assert_eq!(ok(&rd.join("sub/a.raw").to_string_lossy()).unwrap(), rd.join("sub/a.raw"), "absolute inside");
        for (t, what) in [
            ("../a.raw", "`..`"),
            ("sub/../../a.raw", "`..` further in"),
            ("/etc/passwd", "absolute outside"),
            ("", "no name"),
            (".", "no name"),
            ("sub/", "a directory"),
        ] {
            let e = ok(t).unwrap_err();
            assert!(matches!(e, Error::OutsideRestoreDir { .. } | Error::DestinationExists(_)), "{what}: {e}");
        }
        let e = ok(&top.path().join("elsewhere/a.raw").to_string_lossy()).unwrap_err();
        assert!(matches!(e, Error::OutsideRestoreDir { .. }), "a sibling directory: {e}");
        for t in ["link/a.raw", "inlink/a.raw", "missing/a.raw", "sub/a.raw/b.raw"] {
            let e = ok(t).unwrap_err();
            assert!(matches!(e, Error::NoSuchDirectory(_)), "{t}: {e}");
        }
        let e = ok("dangling.raw").unwrap_err();
        assert!(matches!(e, Error::DestinationExists(_)), "a symlink as the name is an existing file: {e}");
        // A symlink put where the target will be after the check is not followed either.
        let dir = tempfile::tempdir().unwrap();
        let repo = backed_up(dir.path(), &data());
        let d = Destination::resolve(&rd, Path::new("late.raw")).unwrap();
        std::os::unix::fs::symlink(top.path().join("elsewhere/late.raw"), rd.join("late.raw")).unwrap();
        assert!(matches!(raw(&repo, "vm", "b1", "vda", &d), Err(Error::DestinationExists(_))));
        assert!(names(&top.path().join("elsewhere")).is_empty(), "nothing written through the link");
    }

    #[test]
    fn a_failed_restore_leaves_no_target_and_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let repo = backed_up(dir.path(), &data());
        let m = repo.manifest("vm", "b1", "vda").unwrap();
        let chunks = dir.path().join("repo").join("chunks");
        let victim = m.chunks[5].unwrap().to_string();
        fs::remove_file(chunks.join(&victim[..2]).join(&victim)).unwrap();
        let out_dir = dir.path().join("out");
        fs::create_dir(&out_dir).unwrap();
        for (what, result) in [
            ("raw", raw(&repo, "vm", "b1", "vda", &dest(&out_dir, "r.raw"))),
            ("qcow2", qcow2(&repo, "vm", "b1", "vda", &dest(&out_dir, "r.qcow2"))),
        ] {
            let e = result.unwrap_err();
            assert!(matches!(e, Error::Repo(repo::Error::ChunkMissing { .. })), "{what}: {e}");
            assert!(names(&out_dir).is_empty(), "{what}: {:?}", names(&out_dir));
        }
    }

    #[test]
    fn qcow2_restore_compares_identical_and_leaves_only_the_image() {
        if !Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success()) {
            eprintln!("qemu-img is not installed: qcow2 restore not tested");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = data();
        let repo = backed_up(dir.path(), &data);
        let src = dir.path().join("disk.raw");
        fs::write(&src, &data).unwrap();
        let out_dir = dir.path().join("out");
        fs::create_dir(&out_dir).unwrap();
        let q = out_dir.join("r.qcow2");
        qcow2(&repo, "vm", "b1", "vda", &dest(&out_dir, "r.qcow2")).unwrap();
        let same =
            Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&q).status();
        assert!(same.unwrap().success());
        assert_eq!(names(&out_dir), ["r.qcow2"]);
    }

    #[test]
    fn an_empty_target_is_sized_like_the_disk_allocates_nothing_and_never_overwrites() {
        use crate::daemon::model::ImageFormat;
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * K64 as u64;
        empty(&dest(dir.path(), "e.raw"), ImageFormat::Raw, size).unwrap();
        let m = fs::metadata(dir.path().join("e.raw")).unwrap();
        assert_eq!((m.len(), m.blocks()), (size, 0), "sparse, sized like the disk");
        assert_eq!(m.mode() & 0o777, 0o600);
        let late = dest(dir.path(), "late.raw");
        fs::write(dir.path().join("late.raw"), b"mine").unwrap();
        assert!(matches!(empty(&late, ImageFormat::Raw, size), Err(Error::DestinationExists(_))));
        assert_eq!(fs::read(dir.path().join("late.raw")).unwrap(), b"mine");
        if !Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success()) {
            eprintln!("qemu-img is not installed: the empty qcow2 target not tested");
            return;
        }
        empty(&dest(dir.path(), "e.qcow2"), ImageFormat::Qcow2, size).unwrap();
        let out = Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(dir.path().join("e.qcow2"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("\"data\": true"), "nothing allocated: {text}");
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(dir.path().join("e.qcow2"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("\"virtual-size\": {size}")));
        assert_eq!(names(dir.path()), ["e.qcow2", "e.raw", "late.raw"], "no partial file left");
    }
}
