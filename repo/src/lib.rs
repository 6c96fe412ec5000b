//! livesnap's backup repository: content-addressed chunks and one complete manifest per disk
//! per backup, kept in a [`Store`]: a local directory, or an S3-compatible object store shared by
//! many hosts (feature `s3`); layouts in docs/repository.md. [`Repository::open_or_create`]
//! opens either by [`Location`].
//!
//! Module map:
//!
//! - [`store`]: the [`Store`] trait (chunks put if absent, manifests staged and committed in one
//!   step, what keeps garbage collection from writers) and [`LocalStore`], a directory;
//!   `store::s3`: `S3Store` (feature `s3`), an object store on its own tokio runtime that its
//!   callers (rayon and blocking threads) wait on.
//! - `hash`: [`ChunkHash`], a chunk's name (SHA-256 of its bytes; HMAC-SHA-256 under the
//!   tenant's key when encrypted).
//! - [`crypto`]: per-tenant keys ([`DataKey`], wrapped in key files by a [`Kek`]), keyed
//!   chunk names, sealing and opening (AES-256-GCM).
//! - `chunk`: the chunk file format (header, zstd) and the fetch that checks a chunk before
//!   anything uses it.
//! - `manifest`: the manifest format ([`Manifest`]).
//! - `source`: what a backup reads from ([`Source`], [`FileSource`]); holes are not read.
//! - `qcow2`: [`Qcow2Source`], a qcow2 image read in place, read-only (the frozen base of a
//!   qcow2 disk): only the clusters a read touches, unallocated ones not at all.
//! - `write`: [`Repository::begin_backup`] gives a [`BackupWriter`]: [`BackupWriter::full`]
//!   reads every chunk of a [`Source`], [`BackupWriter::incremental`] only the chunks the
//!   changed extents touch, reusing the parent manifest's hashes for the rest; both write a
//!   complete manifest, so a restore never walks a chain. [`BackupWriter::commit`] makes the
//!   backup appear at once; a writer dropped without it leaves nothing behind.
//! - `read`: [`Repository::list`], [`Repository::info`], [`Repository::get`],
//!   [`Repository::manifest`], [`Repository::latest_manifest`].
//! - `verify`: [`Repository::verify`] (every chunk re-read and re-hashed).
//! - `gc`: [`Repository::delete`], [`Repository::prune`] (keep the last N per VM, then
//!   [`Repository::gc`]: mark and sweep).
//! - `restore`: [`Repository::restore`] writes one disk into a [`Target`] the caller opened
//!   (sparse: zero blocks are not written). Paths and image formats are the caller's.
//! - `reader`: [`DiskReader`], random access to one disk of one backup (live and file
//!   restore): only the chunks a read touches are fetched, each checked, through a cache.
//! - `error`: [`Error`] and [`Corruption`].
//! - `fuzzing`: entry points of the fuzz targets (`fuzz/`) into private parsers; not an API.
//!
//! Chunks of zeros are not stored (the manifest says so), identical chunks are stored once
//! across backups and VMs. Everything read back is hostile: a damaged manifest or chunk is an
//! [`Error`], never a panic and never data handed on unchecked; decompression is bounded by the
//! chunk size.
//!
//! Concurrency: any number of writers, readers, verifies and restores may run at once, in this
//! process or others. In a local directory, garbage collection (and so prune) takes the
//! store's lock exclusively and fails with [`Error::Busy`] while a writer holds it shared: a
//! writer that found a chunk already stored relies on it until its backup is committed, which a
//! sweep in between would break. In an object store shared by hosts nothing locks: a grace
//! period, writers' markers and a check before each commit keep a collection on one host from
//! removing what a writer on another relies on (docs/repository.md). A delete needs no lock. Chunks are read, hashed and compressed on the repository's
//! own rayon thread pool ([`Repository::set_threads`]).

mod chunk;
pub mod crypto;
#[cfg(test)]
mod crypto_tests;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod gc;
mod hash;
mod manifest;
mod qcow2;
mod read;
mod reader;
mod restore;
mod source;
pub mod store;
#[cfg(test)]
mod tests;
mod verify;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use crypto::{DataKey, Kek, KeyId};
pub use error::{Corruption, Error, Result};
pub use gc::{GcReport, PruneReport};
pub use hash::ChunkHash;
pub use manifest::{Consistency, DiskStats, FreezeWindow, Kind, Manifest, ManifestMeta, Place};
pub use qcow2::{Qcow2Error, Qcow2Source};
pub use read::{Backup, BackupInfo, DiskInfo};
pub use reader::{DiskReader, ReaderStats};
pub use restore::{RestoreStats, Target};
pub use source::{FileSource, Source};
#[cfg(feature = "s3")]
pub use store::s3::{Credentials, S3Options, S3Store, S3Url};
pub use store::{LocalStore, Store};
pub use verify::{ChunkFault, ChunkProblem, VerifyReport};
pub use write::{BackupSpec, BackupWriter, Progress};

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
const CONFIG_FORMAT: &str = "livesnap-repository";
const CONFIG_VERSION: u32 = 1;
const MAX_CONFIG_LEN: u64 = 64 * 1024;

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

impl CreateOptions {
    fn check(&self) -> Result<()> {
        let cs = self.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || !cs.is_power_of_two() {
            return Err(Error::InvalidChunkSize(cs));
        }
        if !(1..=19).contains(&self.compression_level) {
            return Err(Error::InvalidLevel(self.compression_level));
        }
        Ok(())
    }
}

/// An open repository. `Sync`: share it between threads.
///
/// It holds its store as an `Arc<dyn Store>`, not as a type parameter: which store a
/// repository is in is a run-time choice (a path today, a URL in livesnapd's config next), the
/// daemon keeps one `Arc<Repository>` whatever it is, and a [`DiskReader`] keeps the store
/// alive without borrowing the repository. A virtual call per chunk costs nothing next to the
/// chunk's I/O.
#[derive(Debug)]
pub struct Repository {
    store: Arc<dyn Store>,
    config: RepoConfig,
    threads: usize,
    pool: rayon::ThreadPool,
    /// VM name → the key its backups are written and read with ([`Repository::set_key`]).
    keys: HashMap<String, Arc<DataKey>>,
}

impl Repository {
    /// Creates a repository in directory `path`, which must not exist or be empty.
    pub fn create(path: impl AsRef<std::path::Path>, options: CreateOptions) -> Result<Repository> {
        options.check()?;
        let store = LocalStore::create(path.as_ref())?;
        Repository::create_in(Arc::new(store), options)
    }

    /// Creates a repository in a store laid out for one (e.g. [`LocalStore::create`]): writes
    /// its config, then opens it.
    pub fn create_in(store: Arc<dyn Store>, options: CreateOptions) -> Result<Repository> {
        options.check()?;
        let config = RepoConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            chunk_size: options.chunk_size,
            hash: "sha256".into(),
            compression: "zstd".into(),
            compression_level: options.compression_level,
            created_unix_us: now_unix_us(),
        };
        let mut json = serde_json::to_vec_pretty(&config).map_err(Error::Serialize)?;
        json.push(b'\n');
        store.put_config(&json)?;
        tracing::info!(location = %store.location(), chunk_size = config.chunk_size, "created a backup repository");
        Repository::open_in(store)
    }

    /// Opens the repository in directory `path`; its config is checked.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Repository> {
        Repository::open_in(Arc::new(LocalStore::open(path.as_ref())))
    }

    /// Opens the repository in `store`; its config is checked.
    pub fn open_in(store: Arc<dyn Store>) -> Result<Repository> {
        let location = store.location();
        let mut buf = Vec::new();
        match store.get_config(MAX_CONFIG_LEN, &mut buf)? {
            store::Fetched::Found => {}
            store::Fetched::Missing => return Err(Error::NotARepository { location }),
            store::Fetched::TooLong(len) => {
                return Err(Error::ConfigInvalid { location, reason: format!("it is {len} bytes long") })
            }
        }
        let config: RepoConfig =
            serde_json::from_slice(&buf).map_err(|source| Error::ConfigParse { location: location.clone(), source })?;
        let invalid = |reason: String| Error::ConfigInvalid { location: location.clone(), reason };
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
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Ok(Repository { store, config, threads, pool: pool(threads)?, keys: HashMap::new() })
    }

    /// Opens the repository at `location`, creating it first when there is nothing there (a
    /// directory that is missing or empty, an object store prefix that holds no object).
    pub fn open_or_create(location: &Location, options: CreateOptions) -> Result<Repository> {
        match location {
            Location::Dir(path) => {
                let fresh = match std::fs::read_dir(path) {
                    Ok(mut rd) => rd.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(_) => false,
                };
                if fresh {
                    Repository::create(path, options)
                } else {
                    Repository::open(path)
                }
            }
            #[cfg(feature = "s3")]
            Location::S3(opts) => {
                let store = Arc::new(S3Store::open(opts)?);
                if store.is_empty()? {
                    Repository::create_in(store, options)
                } else {
                    Repository::open_in(store)
                }
            }
        }
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.store.location()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn chunk_size(&self) -> u64 {
        self.config.chunk_size
    }

    /// Threads that read, hash and compress chunks (default: the CPUs, at most 8).
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        let threads = threads.max(1);
        self.pool = pool(threads)?;
        self.threads = threads;
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sets the key of `vm`'s backups (`None`: unencrypted). Its new backups are encrypted
    /// under it; reading its backups requires it: a backup under another key, or not
    /// encrypted, is refused naming both keys ([`Error::WrongKey`], [`Error::NotEncrypted`]).
    pub fn set_key(&mut self, vm: &str, key: Option<Arc<DataKey>>) {
        match key {
            Some(k) => self.keys.insert(vm.to_owned(), k),
            None => self.keys.remove(vm),
        };
    }

    /// The key of `vm`'s backups, if it has one.
    pub fn key(&self, vm: &str) -> Option<&Arc<DataKey>> {
        self.keys.get(vm)
    }

    /// The key to read backup `vm`/`id` with, found sealed under `found` (`None`: not
    /// encrypted), or why it cannot be read.
    pub(crate) fn key_for(&self, vm: &str, id: &str, found: Option<KeyId>) -> Result<Option<&DataKey>> {
        let mine = self.keys.get(vm).map(|k| &**k);
        Repository::check_key(vm, id, found, mine)?;
        Ok(mine)
    }

    /// Whether backup `vm`/`id`, found sealed under `found`, is read with `mine`.
    pub(crate) fn check_key(vm: &str, id: &str, found: Option<KeyId>, mine: Option<&DataKey>) -> Result<()> {
        match (found, mine) {
            (None, None) => Ok(()),
            (Some(key), None) => Err(Error::KeyMissing { vm: vm.into(), id: id.into(), key }),
            (Some(want), Some(k)) if want != k.id() => {
                Err(Error::WrongKey { vm: vm.into(), id: id.into(), want, have: k.id(), origin: k.origin().into() })
            }
            (Some(_), Some(_)) => Ok(()),
            (None, Some(k)) => {
                Err(Error::NotEncrypted { vm: vm.into(), id: id.into(), key: k.id(), origin: k.origin().into() })
            }
        }
    }
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("repo-{i}"))
        .build()
        .map_err(Error::Threads)
}

/// Where a repository is: a directory, or a prefix of a bucket in an S3-compatible object
/// store (feature `s3`).
#[derive(Clone, Debug)]
pub enum Location {
    Dir(std::path::PathBuf),
    #[cfg(feature = "s3")]
    S3(S3Options),
}

/// VM, disk and backup names become path components and object keys: letters, digits, `.`,
/// `_`, `-`, not beginning with a dot or dash (so never `..`, nor the `.tmp-` of work in
/// progress).
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
