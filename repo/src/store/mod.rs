//! Where a repository keeps its objects: the [`Store`] trait, and [`LocalStore`], a directory
//! (the layout in docs/repository.md).
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
//!   [`Store::lock_shared`] all that time; collection holds [`Store::lock_exclusive`]. Both
//!   fail at once with [`Error::Busy`] rather than wait.
//!
//! How the local directory gives them: a chunk is a file written under a temporary name,
//! synced and renamed, the renames made durable by a sync of their directories
//! ([`Store::flush_chunks`]); a backup is staged in a temporary directory renamed to its id at
//! commit; the locks are an `flock` of the file `lock`, which holds between processes of one
//! host.
//!
//! How an S3-compatible object store will give them (issue 11): each chunk, manifest and the
//! config is an object; a put-if-absent is a HEAD and then a PUT (chunks are named by their
//! content, so two hosts racing write the same bytes; conditional PUTs are not relied on, as
//! Garage ignores `If-None-Match`), durable when it answers, so flushing is nothing; a
//! backup's manifests are staged under their final keys and the backup becomes visible by one
//! last object, its commit marker, which listing and reading require; and since no lock holds across hosts, [`Store::lock_shared`] and
//! [`Store::lock_exclusive`] give nothing there: its collection instead removes only chunks
//! older than a grace period longer than any backup may take (as Proxmox Backup Server does),
//! and leftovers of pending backups only once that old.

mod local;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use local::LocalStore;

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
    /// under [`Store::lock_exclusive`].
    fn remove_leftovers(&self) -> Result<u64>;
}

/// A backup being staged (see [`Store::begin_backup`]).
pub trait PendingBackup: Send + fmt::Debug {
    /// Stages the manifest of `disk`, durably.
    fn put_manifest(&mut self, disk: &str, data: &[u8]) -> Result<()>;
    /// Publishes every staged manifest at once; fails with [`Error::BackupExists`] when a
    /// backup of that id appeared meanwhile (then nothing is published).
    fn commit(self: Box<Self>) -> Result<()>;
}
