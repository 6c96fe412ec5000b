//! Restoring a disk of a backup to a new image file: the repository writes the disk into a
//! file opened here; this module owns the paths (a restore never overwrites, and a failed one
//! leaves nothing at the destination) and the image format (qcow2 through `qemu-img convert`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use livesnap_repo::{self as repo, Repository, RestoreStats};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Repo(#[from] repo::Error),
    #[error("`{}` exists already: a restore does not overwrite", .0.display())]
    DestinationExists(PathBuf),
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

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_owned(), source }
}

/// Writes disk `disk` of backup `vm`/`id` to a new raw image `dest`, sparse: zero chunks and
/// zero 4 KiB blocks are holes. The image appears at `dest` only when complete and synced.
pub fn raw(repo: &Repository, vm: &str, id: &str, disk: &str, dest: &Path) -> Result<RestoreStats> {
    let m = repo.manifest(vm, id, disk)?;
    refuse_existing(dest)?;
    let tmp = sibling(dest, "partial");
    let result = write_raw(repo, &m, &tmp).and_then(|stats| {
        fs::rename(&tmp, dest).map_err(io_error("rename", &tmp))?;
        sync_dir(parent_dir(dest))?;
        Ok(stats)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Restores to a new qcow2 image: a raw image beside `dest` first, then
/// `qemu-img convert -O qcow2` (which keeps the holes unallocated).
pub fn qcow2(repo: &Repository, vm: &str, id: &str, disk: &str, dest: &Path) -> Result<RestoreStats> {
    let m = repo.manifest(vm, id, disk)?;
    refuse_existing(dest)?;
    let raw = sibling(dest, "raw");
    let qcow = sibling(dest, "qcow2-partial");
    let result = (|| {
        let stats = write_raw(repo, &m, &raw)?;
        let out = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-t", "writeback"])
            .arg(&raw)
            .arg(&qcow)
            .output()
            .map_err(Error::QemuImgSpawn)?;
        if !out.status.success() {
            return Err(Error::QemuImg {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        File::open(&qcow).and_then(|f| f.sync_all()).map_err(io_error("sync", &qcow))?;
        fs::rename(&qcow, dest).map_err(io_error("rename", &qcow))?;
        sync_dir(parent_dir(dest))?;
        Ok(stats)
    })();
    let _ = fs::remove_file(&raw);
    if result.is_err() {
        let _ = fs::remove_file(&qcow);
    }
    result
}

fn refuse_existing(dest: &Path) -> Result<()> {
    match dest.try_exists() {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::DestinationExists(dest.to_owned())),
        Err(e) => Err(Error::Io { op: "look for", path: dest.to_owned(), source: e }),
    }
}

/// Restores `m` into a new file `path` (the repository sizes it, writes and syncs it).
fn write_raw(repo: &Repository, m: &repo::Manifest, path: &Path) -> Result<RestoreStats> {
    let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(io_error("create", path))?;
    Ok(repo.restore(m, &file)?)
}

/// `dir/.NAME.TAG-PID`, beside `dest`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_dir(dest).join(format!(".{name}.{tag}-{}", std::process::id()))
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `fsync` of a directory, making the rename of the image durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
        let stats = raw(&repo, "vm", "b1", "vda", &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        assert_eq!(stats.bytes_written, data.len() as u64 - 2 * K64 as u64);
        assert!(fs::metadata(&out).unwrap().blocks() * 512 <= data.len() as u64 - K64 as u64, "holes");
        fs::write(&out, b"mine").unwrap();
        assert!(matches!(raw(&repo, "vm", "b1", "vda", &out), Err(Error::DestinationExists(_))));
        assert!(matches!(qcow2(&repo, "vm", "b1", "vda", &out), Err(Error::DestinationExists(_))));
        assert_eq!(fs::read(&out).unwrap(), b"mine", "an existing target is left alone");
        let e = raw(&repo, "vm", "b9", "vda", &dir.path().join("x")).unwrap_err();
        assert!(matches!(e, Error::Repo(repo::Error::BackupNotFound { .. })), "{e}");
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
            ("raw", raw(&repo, "vm", "b1", "vda", &out_dir.join("r.raw"))),
            ("qcow2", qcow2(&repo, "vm", "b1", "vda", &out_dir.join("r.qcow2"))),
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
        qcow2(&repo, "vm", "b1", "vda", &q).unwrap();
        let same =
            Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&q).status();
        assert!(same.unwrap().success());
        assert_eq!(names(&out_dir), ["r.qcow2"]);
    }
}
