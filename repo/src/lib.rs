//! The backup repository: content-addressed chunks and one manifest per disk per backup.
//!
//! A local directory (layout in docs/repository.md):
//!
//! ```text
//! REPO/config.json                      chunk size, hash, compression, format version
//! REPO/lock                             flock: writers shared, garbage collection exclusive
//! REPO/chunks/XX/HASH                   one file per distinct chunk (SHA-256, zstd)
//! REPO/backups/VM/ID/DISK.manifest      the complete chunk table of one disk in one backup
//! ```
//!
//! - [`Repository::begin_backup`] gives a [`BackupWriter`]: [`BackupWriter::full`] reads every
//!   chunk of a [`Source`], [`BackupWriter::incremental`] only the chunks the changed extents
//!   touch, reusing the parent manifest's hashes for the rest; both write a complete manifest,
//!   so a restore never walks a chain. [`BackupWriter::commit`] makes the backup appear at once
//!   (a directory rename); a writer dropped without it leaves nothing behind.
//! - Chunks of zeros are not stored (the manifest says so), identical chunks are stored once
//!   across backups and VMs.
//! - [`Repository::list`], [`Repository::get`], [`Repository::verify`] (every chunk re-read and
//!   re-hashed), [`Repository::delete`], [`Repository::prune`] (keep the last N per VM, then
//!   [`Repository::gc`]: mark and sweep), [`Repository::restore_raw`] (sparse) and
//!   [`Repository::restore_qcow2`] (through `qemu-img convert`).
//!
//! Every file read back is hostile: a damaged manifest or chunk is an [`Error`], never a panic
//! and never data handed on unchecked; decompression is bounded by the chunk size.
//!
//! Concurrency: any number of writers, readers, verifies and restores may run at once, in
//! this process or others. Garbage collection (and so prune) takes the repository's lock
//! exclusively and fails with [`Error::Busy`] while a writer holds it shared: a writer that
//! found a chunk already stored relies on it until its manifest is written, which a sweep in
//! between would break. A delete needs no lock (it only removes a manifest directory).

mod chunk;
mod manifest;
mod ops;
mod source;
#[cfg(test)]
mod tests;
mod write;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use chunk::ChunkHash;
pub use manifest::{Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta};
pub use ops::{
    Backup, BackupInfo, ChunkFault, ChunkProblem, DiskInfo, GcReport, PruneReport, RestoreStats, VerifyReport,
};
pub use source::{FileSource, Source};
pub use write::{BackupSpec, BackupWriter, Progress};

use chunk::ChunkStore;

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
const CONFIG_FORMAT: &str = "livesnap-repository";
const CONFIG_VERSION: u32 = 1;
const MAX_CONFIG_LEN: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot {op} `{}`", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read disk {disk} of the source at offset {offset}")]
    SourceRead {
        disk: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is not a backup repository (no readable config.json)", path.display())]
    NotARepository {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is not empty: a repository is created in a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("The repository config `{}` is not valid JSON", path.display())]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("The repository config `{}` is invalid: {reason}", path.display())]
    ConfigInvalid { path: PathBuf, reason: String },
    #[error("The chunk size {0} is not a power of two from 4 KiB to 64 MiB")]
    InvalidChunkSize(u64),
    #[error("The zstd level {0} is not from 1 to 19")]
    InvalidLevel(i32),
    #[error("The {what} name {name:?} is invalid: use 1 to 128 letters, digits, '.', '_' or '-', beginning with a letter or digit")]
    InvalidName { what: &'static str, name: String },
    #[error("The repository is busy: a backup is being written or a garbage collection runs")]
    Busy,
    #[error("Backup {vm}/{id} exists already")]
    BackupExists { vm: String, id: String },
    #[error("There is no backup {vm}/{id}")]
    BackupNotFound { vm: String, id: String },
    #[error("Backup {vm}/{id} has no disk {disk}")]
    DiskNotFound { vm: String, id: String, disk: String },
    #[error("Disk {0} was written twice in one backup")]
    DuplicateDisk(String),
    #[error("Backup {vm}/{id} has no disk: nothing to commit")]
    EmptyBackup { vm: String, id: String },
    #[error("The freeze window ends before it begins")]
    InvalidFreezeWindow,
    #[error("The changed extents of disk {disk} are invalid: {reason}")]
    InvalidExtents { disk: String, reason: String },
    #[error("The parent manifest cannot serve disk {disk}: {reason}")]
    ParentMismatch { disk: String, reason: String },
    #[error("The manifest `{}` is damaged", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: Corruption,
    },
    #[error("The manifests of backup {vm}/{id} disagree: {reason}")]
    Inconsistent { vm: String, id: String, reason: String },
    #[error("Chunk {hash} is missing from the repository")]
    ChunkMissing { hash: ChunkHash },
    #[error("Chunk {hash} is damaged")]
    ChunkCorrupt {
        hash: ChunkHash,
        #[source]
        source: Corruption,
    },
    #[error("`{}` exists already: a restore does not overwrite", .0.display())]
    DestinationExists(PathBuf),
    #[error("Cannot run qemu-img")]
    QemuImgSpawn(#[source] io::Error),
    #[error("Converting to qcow2 with qemu-img failed ({status}): {stderr}")]
    QemuImg { status: String, stderr: String },
    #[error("Cannot encode a manifest")]
    Serialize(#[source] serde_json::Error),
}

/// What is wrong with a manifest or chunk file.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    #[error("It is {len} bytes long, shorter than the {min} its header needs")]
    TooShort { len: u64, min: u64 },
    #[error("It is {len} bytes long, more than the {max} allowed")]
    TooLong { len: u64, max: u64 },
    #[error("Its magic number is wrong")]
    BadMagic,
    #[error("Its format version {0} is not supported")]
    UnsupportedVersion(u32),
    #[error("Its {field} is {actual}, expected {expected}")]
    LengthMismatch { field: &'static str, expected: u64, actual: u64 },
    #[error("Its checksum does not match its contents")]
    ChecksumMismatch,
    #[error("Its contents hash to {actual}, not to its name")]
    HashMismatch { actual: String },
    #[error("Its metadata is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("Its payload does not decompress to its data length")]
    Decompress(#[source] io::Error),
    #[error("Its encoding {0} is unknown")]
    UnknownEncoding(u8),
    #[error("It is invalid: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io { op, path: path.to_owned(), source }
    }

    fn manifest(path: &Path, source: Corruption) -> Error {
        Error::Manifest { path: path.to_owned(), source }
    }
}

/// `config.json`: fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Always `livesnap-repository`.
    pub format: String,
    pub version: u32,
    pub chunk_size: u64,
    /// Always `sha256`.
    pub hash: String,
    /// Always `zstd`.
    pub compression: String,
    pub compression_level: i32,
    pub created_unix_us: u64,
}

/// Choices made at [`Repository::create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub chunk_size: u64,
    pub compression_level: i32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions { chunk_size: DEFAULT_CHUNK_SIZE, compression_level: 3 }
    }
}

/// An open repository. `Sync`: share it between threads.
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    config: RepoConfig,
    chunks: ChunkStore,
    threads: usize,
}

impl Repository {
    /// Creates a repository in `path`, which must not exist or be an empty directory.
    pub fn create(path: impl AsRef<Path>, options: CreateOptions) -> Result<Repository> {
        let root = path.as_ref();
        let cs = options.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || !cs.is_power_of_two() {
            return Err(Error::InvalidChunkSize(cs));
        }
        if !(1..=19).contains(&options.compression_level) {
            return Err(Error::InvalidLevel(options.compression_level));
        }
        match fs::read_dir(root) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::NotEmpty(root.to_owned()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
            }
            Err(e) => return Err(Error::io("read", root, e)),
        }
        ChunkStore::create_dirs(&root.join("chunks"))?;
        let backups = root.join("backups");
        fs::create_dir(&backups).map_err(|e| Error::io("create", &backups, e))?;
        let lock = root.join("lock");
        File::create(&lock).map_err(|e| Error::io("create", &lock, e))?;
        let config = RepoConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            chunk_size: cs,
            hash: "sha256".into(),
            compression: "zstd".into(),
            compression_level: options.compression_level,
            created_unix_us: now_unix_us(),
        };
        let mut json = serde_json::to_vec_pretty(&config).map_err(Error::Serialize)?;
        json.push(b'\n');
        // config.json comes last: its presence says the rest is there.
        chunk::sync_dir(root)?;
        chunk::write_durably(&root.join(".config.json.tmp"), &root.join("config.json"), &json)?;
        chunk::sync_dir(root)?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            chunk::sync_dir(parent)?;
        }
        tracing::info!(path = %root.display(), chunk_size = cs, "created a backup repository");
        Repository::open(root)
    }

    /// Opens an existing repository; its config is checked.
    pub fn open(path: impl AsRef<Path>) -> Result<Repository> {
        let root = path.as_ref().to_owned();
        let config_path = root.join("config.json");
        let mut buf = Vec::new();
        File::open(&config_path)
            .and_then(|f| f.take(MAX_CONFIG_LEN).read_to_end(&mut buf))
            .map_err(|source| Error::NotARepository { path: root.clone(), source })?;
        let config: RepoConfig =
            serde_json::from_slice(&buf).map_err(|source| Error::ConfigParse { path: config_path.clone(), source })?;
        let invalid = |reason: String| Error::ConfigInvalid { path: config_path.clone(), reason };
        if config.format != CONFIG_FORMAT {
            return Err(invalid(format!("format {:?} is not {CONFIG_FORMAT:?}", config.format)));
        }
        if config.version != CONFIG_VERSION {
            return Err(invalid(format!("version {} is not supported", config.version)));
        }
        let cs = config.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || !cs.is_power_of_two() {
            return Err(invalid(format!("chunk size {cs} is not a power of two from 4 KiB to 64 MiB")));
        }
        if config.hash != "sha256" || config.compression != "zstd" {
            return Err(invalid(format!(
                "hash {:?} and compression {:?} are not sha256 and zstd",
                config.hash, config.compression
            )));
        }
        if !(1..=19).contains(&config.compression_level) {
            return Err(invalid(format!("zstd level {} is not from 1 to 19", config.compression_level)));
        }
        let chunks = ChunkStore::new(root.join("chunks"), cs as usize, config.compression_level);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Ok(Repository { root, config, chunks, threads })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn chunk_size(&self) -> u64 {
        self.config.chunk_size
    }

    /// Threads that read, hash and compress chunks (default: the CPUs, at most 8).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
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

    fn manifest_path(&self, vm: &str, id: &str, disk: &str) -> PathBuf {
        self.backup_dir(vm, id).join(format!("{disk}{MANIFEST_SUFFIX}"))
    }

    /// Takes the repository lock: shared for writers, exclusive for garbage collection.
    fn lock(&self, exclusive: bool) -> Result<RepoLock> {
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
        Ok(RepoLock { _file: file })
    }
}

const MANIFEST_SUFFIX: &str = ".manifest";

/// A held `flock`, released when the file is closed.
#[derive(Debug)]
struct RepoLock {
    _file: File,
}

/// VM, disk and backup names become path components: letters, digits, `.`, `_`, `-`, not
/// beginning with a dot or dash (so never `..`, nor the `.tmp-` of work in progress).
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName { what, name: name.to_owned() })
    }
}

pub(crate) fn now_unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
