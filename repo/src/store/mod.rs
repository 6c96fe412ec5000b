//! Where a repository keeps its objects: the [`Store`] trait, [`LocalStore`], a directory, and
//! `S3Store`, an S3-compatible object store (feature `s3`); the layouts in docs/repository.md.
//!
//! A store holds whole byte strings addressed by key and knows nothing of their format: chunk
//! files (named by [`ChunkHash`]), the manifests of backups (by VM, backup id and disk) and the
//! repository's config. Everything it hands back is checked by the repository before use
//! (lengths, checksums, hashes), so a store need not be trusted with integrity, only asked to
//! be honest about absence and failure.
//!
//! What every implementation must give:
//!
//! - **Chunks** are put if absent: a chunk of a name that exists is never rewritten (the
//!   name is the content's hash), and a put returns whether it wrote. After
//!   [`Store::flush_chunks`] returns, the chunks put are durable and visible to every reader.
//! - **A backup becomes visible in one step.** [`Store::begin_backup`] gives a
//!   [`PendingBackup`] that stages the manifests; [`PendingBackup::commit`] publishes all of them
//!   at once (a reader sees all the backup's manifests or none), and only after the repository
//!   flushed the chunks they name. Dropped without a commit, a pending backup leaves nothing
//!   visible; what it staged is removed then or by [`Store::remove_leftovers`].
//! - **Garbage collection never removes a chunk a writer relies on.** A writer relies on a
//!   chunk it found stored from that moment until its backup is committed, and holds
//!   [`Store::lock_shared`] all that time; a collection runs through [`Store::begin_gc`], by
//!   default holding [`Store::lock_exclusive`]. Both fail at once with [`Error::Busy`] rather
//!   than wait. A store that cannot lock says in [`GcRun`] which chunks a collection may take
//!   and which uncommitted manifests it must honour.
//!
//! How the local directory gives them: a chunk is a file written under a temporary name,
//! synced and renamed, the renames made durable by a sync of their directories
//! ([`Store::flush_chunks`]); a backup is staged in a temporary directory renamed to its id at
//! commit; the locks are an `flock` of the file `lock`, which holds between processes of one
//! host.
//!
//! How [`S3Store`] (feature `s3`) gives them, to many hosts sharing a bucket: each chunk,
//! manifest and the config is an object; a put-if-absent is a HEAD and then a PUT (chunks are
//! named by their content, so two hosts racing write the same bytes; conditional PUTs are not
//! relied on, as Garage ignores `If-None-Match`), durable when it answers, so flushing is
//! nothing; a backup's manifests are put under their final keys and the backup becomes visible
//! by one last object, its commit, which listing and reading require. No lock holds across
//! hosts, so [`Store::lock_shared`] and [`Store::lock_exclusive`] give nothing there; instead
//! a writer's marker, a collection's record and a grace period on the store's clock (a chunk a
//! writer finds older than half of it is written again; a collection removes only chunks older
//! than it and keeps every manifest of a VM a writer works on; a writer checks its chunks
//! after any collection that overlapped it). The rule and why it holds: docs/repository.md,
//! "Many hosts, one bucket".

mod local;
#[cfg(feature = "s3")]
pub mod s3;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use local::LocalStore;
#[cfg(feature = "s3")]
pub use s3::S3Store;

use crate::hash::ChunkHash;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot {op} `{}`", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is not empty: a repository is created in a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("The repository is busy: a backup is being written or a garbage collection runs")]
    Busy,
    #[error("Backup {vm}/{id} exists already")]
    BackupExists { vm: String, id: String },
    #[error("`{url}` is not a repository location: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("Cannot read the credentials file `{}`", path.display())]
    Credentials {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The credentials file `{}` has mode {mode:03o}: it must be readable by its owner only (0600)", path.display())]
    CredentialsMode { path: PathBuf, mode: u32 },
    #[error("The credentials file `{}` is invalid: {reason}", path.display())]
    CredentialsInvalid { path: PathBuf, reason: String },
    #[error("The object store {0} is not empty: a repository is created under a new or empty prefix")]
    NotEmptyPrefix(String),
    #[cfg(feature = "s3")]
    #[error("Cannot set up the object store client for `{url}`")]
    S3Client {
        url: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[cfg(feature = "s3")]
    /// `object` is `` `s3://BUCKET/KEY` at ENDPOINT ``.
    #[error("Cannot {op} {object}")]
    S3 {
        op: &'static str,
        object: String,
        #[source]
        source: s3::Remote,
    },
    #[cfg(feature = "s3")]
    /// `store` is `bucket BUCKET at ENDPOINT`.
    #[error("The object store refused the credentials for {store} (a wrong key or secret, or no access)")]
    S3Denied {
        store: String,
        #[source]
        source: s3::Remote,
    },
    #[error("Cannot start the object store's I/O threads")]
    Runtime(#[source] io::Error),
    #[error("The object store's I/O threads have stopped")]
    Stopped,
    #[error("`{0}` vanished right after it was written")]
    Vanished(String),
    #[error("`{key}` is invalid: {reason}")]
    Invalid { key: String, reason: String },
    /// `backup` is `VM/ID`.
    #[error("Backup {backup} took {secs} s, more than half the repository's grace period of {grace_secs} s: not committed, as a garbage collection may have removed chunks it relies on")]
    TooSlow { backup: String, secs: u64, grace_secs: u64 },
    #[error("Backup {backup} is not committed: chunk {hash} it relies on was removed by a garbage collection that ran meanwhile")]
    ChunkCollected { backup: String, hash: Box<ChunkHash> },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a read of a whole object found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The object was read whole into the buffer.
    Found,
    /// There is no object of that key.
    Missing,
    /// The object is longer than the limit given (this many bytes); the buffer holds none or
    /// part of it.
    TooLong(u64),
}

/// A held lock of a store, released when dropped.
pub struct StoreLock(#[allow(dead_code)] Box<dyn fmt::Debug + Send + Sync>);

impl StoreLock {
    pub fn new(held: Box<dyn fmt::Debug + Send + Sync>) -> StoreLock {
        StoreLock(held)
    }
}

impl fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreLock").field(&self.0).finish()
    }
}

/// The objects of one repository (see the module's documentation for what an implementation
/// must give). Names of VMs, backups and disks are valid names ([`crate::validate_name`])
/// when they reach a store; listings return only valid names, sorted.
pub trait Store: Send + Sync + fmt::Debug {
    /// Where the repository is, for messages: a path (later a URL).
    fn location(&self) -> String;

    /// Reads the repository's config into `out`, if it is at most `max_len` bytes.
    fn get_config(&self, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched>;
    /// Writes the config, durably: the last step of creating a repository.
    fn put_config(&self, data: &[u8]) -> Result<()>;

    /// Whether chunk `hash` is stored.
    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool>;
    /// Stores chunk `hash` unless one of that name is stored; true when it wrote.
    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool>;
    /// Reads chunk `hash` into `out`, if it is at most `max_len` bytes.
    fn get_chunk(&self, hash: &ChunkHash, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched>;
    /// Makes the puts and removals of these chunks durable: called before any manifest that
    /// names them is staged, and by garbage collection after its removals.
    fn flush_chunks(&self, hashes: &[ChunkHash]) -> Result<()>;
    /// Every stored chunk, with the bytes it takes.
    fn list_chunks(&self) -> Result<Vec<(ChunkHash, u64)>>;
    /// Removes a chunk (garbage collection, under [`Store::lock_exclusive`]).
    fn remove_chunk(&self, hash: &ChunkHash) -> Result<()>;

    /// The VMs that have backups (or had: a VM may be listed with none).
    fn list_vms(&self) -> Result<Vec<String>>;
    /// The committed backups of `vm`.
    fn list_backups(&self, vm: &str) -> Result<Vec<String>>;
    /// The disks of committed backup `vm`/`id`; `None` when there is no such backup.
    fn list_manifests(&self, vm: &str, id: &str) -> Result<Option<Vec<String>>>;
    /// Reads the manifest of `disk` in `vm`/`id` into `out`, if it is at most `max_len` bytes.
    fn get_manifest(&self, vm: &str, id: &str, disk: &str, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched>;
    /// Reads the first `len` bytes of a manifest (all of it when shorter) into `out`; returns
    /// the manifest's whole length, `None` when there is no such manifest.
    fn get_manifest_prefix(&self, vm: &str, id: &str, disk: &str, len: u64, out: &mut Vec<u8>) -> Result<Option<u64>>;
    /// Begins staging backup `vm`/`id`; fails with [`Error::BackupExists`] when it exists.
    fn begin_backup(&self, vm: &str, id: &str) -> Result<Box<dyn PendingBackup>>;
    /// Removes committed backup `vm`/`id` at once (its manifests; chunks stay until garbage
    /// collection); false when there is no such backup.
    fn remove_backup(&self, vm: &str, id: &str) -> Result<bool>;

    /// Taken by a backup writer from its beginning until its commit or end.
    fn lock_shared(&self) -> Result<StoreLock>;
    /// Taken by garbage collection.
    fn lock_exclusive(&self) -> Result<StoreLock>;
    /// Removes what interrupted writes and removals left behind; returns how many. Called
    /// during a collection ([`Store::begin_gc`]).
    fn remove_leftovers(&self) -> Result<u64>;

    /// Begins a garbage collection. By default: [`Store::lock_exclusive`] is held until it is
    /// dropped and every chunk is a candidate.
    fn begin_gc(&self) -> Result<Box<dyn GcRun + '_>> {
        let lock = self.lock_exclusive()?;
        Ok(Box::new(LockedGc { store: self, _lock: lock }))
    }
}

/// One garbage collection (see [`Store::begin_gc`]), in this order: [`GcRun::candidates`],
/// [`GcRun::protected_manifests`], then the committed backups are read and marked, then
/// unmarked candidates are removed while [`GcRun::may_remove`]; dropped when done.
pub trait GcRun: fmt::Debug {
    /// The chunks that may be removed if no manifest names them, with their bytes.
    fn candidates(&mut self) -> Result<Vec<(ChunkHash, u64)>>;
    /// Manifests that are not committed but whose chunks must be kept (a writer may rely on
    /// them).
    fn protected_manifests(&mut self) -> Result<Vec<Protected>>;
    /// Whether removals may go on (a store that bounds a collection's time says no after it).
    fn may_remove(&self) -> bool;
}

/// An uncommitted manifest a collection must honour, as stored (checked by the caller).
#[derive(Debug)]
pub struct Protected {
    pub vm: String,
    pub id: String,
    pub disk: String,
    pub bytes: Vec<u8>,
}

/// The collection of a store that locks: [`Store::lock_exclusive`] held, every chunk a
/// candidate.
struct LockedGc<'s, S: ?Sized> {
    store: &'s S,
    _lock: StoreLock,
}

impl<S: ?Sized> fmt::Debug for LockedGc<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedGc").field("lock", &self._lock).finish_non_exhaustive()
    }
}

impl<S: Store + ?Sized> GcRun for LockedGc<'_, S> {
    fn candidates(&mut self) -> Result<Vec<(ChunkHash, u64)>> {
        self.store.list_chunks()
    }

    fn protected_manifests(&mut self) -> Result<Vec<Protected>> {
        Ok(Vec::new())
    }

    fn may_remove(&self) -> bool {
        true
    }
}

/// A backup being staged (see [`Store::begin_backup`]).
pub trait PendingBackup: Send + fmt::Debug {
    /// Stages the manifest of `disk`, durably.
    fn put_manifest(&mut self, disk: &str, data: &[u8]) -> Result<()>;
    /// Publishes every staged manifest at once; fails with [`Error::BackupExists`] when a
    /// backup of that id appeared meanwhile (then nothing is published).
    fn commit(self: Box<Self>) -> Result<()>;
}
