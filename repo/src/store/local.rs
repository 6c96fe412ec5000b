//! [`LocalStore`]: a repository in a local directory.
//!
//! ```text
//! ROOT/config.json                      the repository's config
//! ROOT/lock                             flock: writers shared, garbage collection exclusive
//! ROOT/chunks/XX/HASH                   one file per distinct chunk, XX its first byte in hex
//! ROOT/backups/VM/ID/DISK.manifest      the manifest of one disk in one backup
//! ROOT/backups/VM/.tmp-ID-PID-N/        a backup being staged, renamed to ID at commit
//! ROOT/backups/VM/.del-ID-PID-N/        a backup being removed
//! ```
//!
//! Every file is written under a temporary name (`.tmp-` prefix), `fsync`ed and renamed, so a
//! crash leaves either no file of a name or the complete one; leftovers are removed by
//! [`Store::remove_leftovers`]. The directory `fsync` that makes a chunk's rename durable is
//! batched ([`Store::flush_chunks`]).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Error, Fetched, PendingBackup, Result, Store, StoreLock};
use crate::hash::ChunkHash;
use crate::validate_name;

/// Prefix of temporary files and directories.
const TMP_PREFIX: &str = ".tmp-";
/// Prefix of a backup directory being removed.
const DEL_PREFIX: &str = ".del-";
const MANIFEST_SUFFIX: &str = ".manifest";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `PID-N`: unique among the temporary names of this host.
fn unique() -> String {
    format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A repository directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// The store of the repository directory `root` (nothing is read yet).
    pub fn open(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
    }

    /// Lays out a new repository in `root`, which must not exist or be an empty directory.
    /// The config comes last ([`Store::put_config`]): its presence says the rest is there.
    pub fn create(root: impl Into<PathBuf>) -> Result<LocalStore> {
        let root = root.into();
        match fs::read_dir(&root) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::NotEmpty(root));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&root).map_err(|e| Error::io("create", &root, e))?;
            }
            Err(e) => return Err(Error::io("read", &root, e)),
        }
        let chunks = root.join("chunks");
        fs::create_dir(&chunks).map_err(|e| Error::io("create", &chunks, e))?;
        for b in 0..=255u8 {
            let sub = chunks.join(format!("{b:02x}"));
            fs::create_dir(&sub).map_err(|e| Error::io("create", &sub, e))?;
        }
        // The new entries are in `chunks`; the empty subdirectories have nothing to sync.
        sync_dir(&chunks)?;
        let backups = root.join("backups");
        fs::create_dir(&backups).map_err(|e| Error::io("create", &backups, e))?;
        let lock = root.join("lock");
        File::create(&lock).map_err(|e| Error::io("create", &lock, e))?;
        sync_dir(&root)?;
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `chunks/XX`, the directory of chunk `hash`.
    fn chunk_dir(&self, hash: &ChunkHash) -> PathBuf {
        self.root.join("chunks").join(format!("{:02x}", hash.0[0]))
    }

    /// `chunks/XX/HASH`.
    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        self.chunk_dir(hash).join(hash.to_string())
    }

    fn backups_dir(&self) -> PathBuf {
        self.root.join("backups")
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.backups_dir().join(vm)
    }

    fn backup_dir(&self, vm: &str, id: &str) -> PathBuf {
        self.vm_dir(vm).join(id)
    }

    /// `backups/VM/ID/DISK.manifest`.
    pub fn manifest_path(&self, vm: &str, id: &str, disk: &str) -> PathBuf {
        self.backup_dir(vm, id).join(format!("{disk}{MANIFEST_SUFFIX}"))
    }

    fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(Error::Busy);
            }
            return Err(Error::io("lock", &path, e));
        }
        // The flock is released when the file is closed.
        Ok(StoreLock::new(Box::new(file)))
    }

    /// The temporary files among the chunks (leftovers when no writer runs).
    pub fn chunk_leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut temps = Vec::new();
        self.walk_chunks(|path, name, _| {
            if name.starts_with(TMP_PREFIX) {
                temps.push(path.to_owned());
            }
        })?;
        Ok(temps)
    }

    /// Calls `f(path, name, len)` for every entry of the 256 chunk directories.
    fn walk_chunks(&self, mut f: impl FnMut(&Path, &str, u64)) -> Result<()> {
        let dir = self.root.join("chunks");
        for b in 0..=255u8 {
            let sub = dir.join(format!("{b:02x}"));
            let rd = fs::read_dir(&sub).map_err(|e| Error::io("list", &sub, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io("list", &sub, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                f(&entry.path(), name, len);
            }
        }
        Ok(())
    }
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get_config(&self, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        read_whole(&self.root.join("config.json"), max_len, out)
    }

    fn put_config(&self, data: &[u8]) -> Result<()> {
        write_durably(&self.root.join(".config.json.tmp"), &self.root.join("config.json"), data)?;
        sync_dir(&self.root)?;
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        let path = self.chunk_path(hash);
        path.try_exists().map_err(|e| Error::io("look for", &path, e))
    }

    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool> {
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        let tmp = self.chunk_dir(hash).join(format!("{TMP_PREFIX}{hash}-{}", unique()));
        put_new_durably(&tmp, &self.chunk_path(hash), data)
    }

    fn get_chunk(&self, hash: &ChunkHash, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        read_whole(&self.chunk_path(hash), max_len, out)
    }

    fn flush_chunks(&self, hashes: &[ChunkHash]) -> Result<()> {
        let dirs: BTreeSet<u8> = hashes.iter().map(|h| h.0[0]).collect();
        for b in dirs {
            sync_dir(&self.root.join("chunks").join(format!("{b:02x}")))?;
        }
        Ok(())
    }

    fn list_chunks(&self) -> Result<Vec<(ChunkHash, u64)>> {
        let mut chunks = Vec::new();
        self.walk_chunks(|_, name, len| {
            if let Ok(hash) = name.parse::<ChunkHash>() {
                chunks.push((hash, len));
            }
        })?;
        Ok(chunks)
    }

    fn remove_chunk(&self, hash: &ChunkHash) -> Result<()> {
        let path = self.chunk_path(hash);
        fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))
    }

    fn list_vms(&self) -> Result<Vec<String>> {
        list_names(&self.backups_dir())
    }

    fn list_backups(&self, vm: &str) -> Result<Vec<String>> {
        list_names(&self.vm_dir(vm))
    }

    fn list_manifests(&self, vm: &str, id: &str) -> Result<Option<Vec<String>>> {
        let dir = self.backup_dir(vm, id);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("list", &dir, e)),
        };
        let mut disks = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(disk) = name.to_str().and_then(|n| n.strip_suffix(MANIFEST_SUFFIX)) else {
                continue;
            };
            if validate_name("disk", disk).is_ok() {
                disks.push(disk.to_owned());
            }
        }
        disks.sort();
        Ok(Some(disks))
    }

    fn get_manifest(&self, vm: &str, id: &str, disk: &str, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        read_whole(&self.manifest_path(vm, id, disk), max_len, out)
    }

    fn get_manifest_prefix(&self, vm: &str, id: &str, disk: &str, len: u64, out: &mut Vec<u8>) -> Result<Option<u64>> {
        let path = self.manifest_path(vm, id, disk);
        let Some(mut f) = open_if_exists(&path)? else { return Ok(None) };
        let total = f.metadata().map_err(|e| Error::io("read", &path, e))?.len();
        out.clear();
        (&mut f).take(len).read_to_end(out).map_err(|e| Error::io("read", &path, e))?;
        Ok(Some(total))
    }

    fn begin_backup(&self, vm: &str, id: &str) -> Result<Box<dyn PendingBackup>> {
        let vm_dir = self.vm_dir(vm);
        if self.backup_dir(vm, id).exists() {
            return Err(Error::BackupExists { vm: vm.into(), id: id.into() });
        }
        fs::create_dir_all(&vm_dir).map_err(|e| Error::io("create", &vm_dir, e))?;
        let tmp_dir = vm_dir.join(format!("{TMP_PREFIX}{id}-{}", unique()));
        fs::create_dir(&tmp_dir).map_err(|e| Error::io("create", &tmp_dir, e))?;
        Ok(Box::new(LocalPending {
            backups: self.backups_dir(),
            vm: vm.to_owned(),
            id: id.to_owned(),
            tmp_dir,
            committed: false,
        }))
    }

    fn remove_backup(&self, vm: &str, id: &str) -> Result<bool> {
        let dir = self.backup_dir(vm, id);
        if !dir.is_dir() {
            return Ok(false);
        }
        let vm_dir = self.vm_dir(vm);
        let doomed = vm_dir.join(format!("{DEL_PREFIX}{id}-{}", unique()));
        // The rename makes the backup vanish at once; a crash after it leaves a leftover.
        fs::rename(&dir, &doomed).map_err(|e| Error::io("rename", &dir, e))?;
        sync_dir(&vm_dir)?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io("remove", &doomed, e))?;
        Ok(true)
    }

    fn lock_shared(&self) -> Result<StoreLock> {
        self.lock(false)
    }

    fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock(true)
    }

    fn remove_leftovers(&self) -> Result<u64> {
        let mut removed = 0;
        let vms = self.list_vms()?;
        for vm in &vms {
            let vm_dir = self.vm_dir(vm);
            for entry in fs::read_dir(&vm_dir).map_err(|e| Error::io("list", &vm_dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &vm_dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) || name.starts_with(DEL_PREFIX) {
                    let path = entry.path();
                    fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e))?;
                    removed += 1;
                }
            }
        }
        let mut dirty = BTreeSet::new();
        for t in self.chunk_leftovers()? {
            fs::remove_file(&t).map_err(|e| Error::io("remove", &t, e))?;
            removed += 1;
            dirty.extend(t.parent().map(Path::to_owned));
        }
        for d in dirty {
            sync_dir(&d)?;
        }
        for vm in &vms {
            // Only succeeds when empty.
            let _ = fs::remove_dir(self.vm_dir(vm));
        }
        Ok(removed)
    }
}

/// A backup staged in `backups/VM/.tmp-ID-PID-N/`.
#[derive(Debug)]
struct LocalPending {
    backups: PathBuf,
    vm: String,
    id: String,
    tmp_dir: PathBuf,
    committed: bool,
}

impl PendingBackup for LocalPending {
    fn put_manifest(&mut self, disk: &str, data: &[u8]) -> Result<()> {
        let path = self.tmp_dir.join(format!("{disk}{MANIFEST_SUFFIX}"));
        let tmp = self.tmp_dir.join(format!("{TMP_PREFIX}{disk}"));
        write_durably(&tmp, &path, data)
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        sync_dir(&self.tmp_dir)?;
        let vm_dir = self.backups.join(&self.vm);
        let dest = vm_dir.join(&self.id);
        if dest.exists() {
            return Err(Error::BackupExists { vm: self.vm.clone(), id: self.id.clone() });
        }
        fs::rename(&self.tmp_dir, &dest).map_err(|e| Error::io("rename", &self.tmp_dir, e))?;
        self.committed = true;
        sync_dir(&vm_dir)?;
        sync_dir(&self.backups)
    }
}

impl Drop for LocalPending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn open_if_exists(path: &Path) -> Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("open", path, e)),
    }
}

/// Reads file `path` into `out` if it is at most `max_len` bytes long, checked before reading
/// and bounded while reading (the file may grow under us).
fn read_whole(path: &Path, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
    let Some(mut f) = open_if_exists(path)? else { return Ok(Fetched::Missing) };
    let len = f.metadata().map_err(|e| Error::io("read", path, e))?.len();
    if len > max_len {
        return Ok(Fetched::TooLong(len));
    }
    out.clear();
    out.reserve(len as usize);
    (&mut f).take(max_len + 1).read_to_end(out).map_err(|e| Error::io("read", path, e))?;
    if out.len() as u64 > max_len {
        return Ok(Fetched::TooLong(out.len() as u64));
    }
    Ok(Fetched::Found)
}

/// Names of the entries of `dir` that are valid names and directories (not work in
/// progress), sorted; an absent directory has none.
fn list_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if validate_name("entry", name).is_ok() && entry.path().is_dir() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Writes `data` to `tmp`, `fsync`s it and renames it to `dest`. The caller syncs the directory.
fn write_durably(tmp: &Path, dest: &Path, data: &[u8]) -> Result<()> {
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::io("create", tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", tmp, e))?;
        fs::rename(tmp, dest).map_err(|e| Error::io("rename", tmp, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Writes `data` to `tmp`, syncs it, and links it as `dest` unless `dest` exists; `tmp` is
/// removed either way. Whether this call made `dest`: of writers racing to store the same chunk,
/// exactly one is told it did (a rename would tell each of them so, and each would count the
/// chunk as new).
fn put_new_durably(tmp: &Path, dest: &Path, data: &[u8]) -> Result<bool> {
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::io("create", tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", tmp, e))?;
        match fs::hard_link(tmp, dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // A file system without hard links: the rename replaces an identical file.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP)) => {
                fs::rename(tmp, dest).map_err(|e| Error::io("rename", tmp, e))?;
                Ok(true)
            }
            Err(e) => Err(Error::io("link", tmp, e)),
        }
    })();
    let _ = fs::remove_file(tmp);
    result
}

/// `fsync` of a directory, making renames and removals in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync", dir, e))
}
