//! [`Error`], what the repository's operations fail with, and [`Corruption`], what is wrong
//! with a chunk or manifest that did not read back.

use std::io;
use std::path::PathBuf;

use crate::crypto::KeyId;
use crate::hash::ChunkHash;
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (its error names the object and the cause).
    #[error(transparent)]
    Store(store::Error),
    #[error("Cannot read disk {disk} of the source at offset {offset}")]
    SourceRead {
        disk: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("`{location}` is not a backup repository: it has no config")]
    NotARepository { location: String },
    #[error("`{}` is not empty: a repository is created in a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("The config of the repository `{location}` is not valid JSON")]
    ConfigParse {
        location: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("The config of the repository `{location}` is invalid: {reason}")]
    ConfigInvalid { location: String, reason: String },
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
    /// A chunk of the disk was built but not handed to the store (its storing threads
    /// stopped); never returned in place of the store's own error.
    #[error("The chunks of disk {disk} were not all stored")]
    ChunksNotStored { disk: String },
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
    #[error("The manifest of disk {disk} in backup {vm}/{id} is damaged")]
    Manifest {
        vm: String,
        id: String,
        disk: String,
        #[source]
        source: Box<Corruption>,
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
    #[error("Cannot read chunk {hash}")]
    ChunkRead {
        hash: ChunkHash,
        #[source]
        source: Box<store::Error>,
    },
    #[error("Cannot set the size of the restore of disk {disk} to {size} bytes")]
    TargetResize {
        disk: String,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write the restore of disk {disk} at offset {offset}")]
    TargetWrite {
        disk: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot sync the restore of disk {disk}")]
    TargetSync {
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error("A read of {len} bytes at offset {offset} ends beyond the {size} bytes of disk {disk}")]
    OutOfRange { disk: String, offset: u64, len: u64, size: u64 },
    #[error("Cannot set up zstd")]
    Codec(#[source] io::Error),
    #[error("Cannot compress a chunk")]
    Compress(#[source] io::Error),
    #[error("Cannot start the repository's worker threads")]
    Threads(#[source] rayon::ThreadPoolBuildError),
    #[error("Cannot encode a manifest or the config")]
    Serialize(#[source] serde_json::Error),
    #[error("The system's random number generator failed")]
    Random(#[source] getrandom::Error),
    #[error("Backup {vm}/{id} is encrypted under key {key}, and no key is configured for VM {vm}")]
    KeyMissing { vm: String, id: String, key: KeyId },
    #[error("Backup {vm}/{id} is encrypted under key {want}, but the key of VM {vm} (`{origin}`) is key {have}")]
    WrongKey { vm: String, id: String, want: KeyId, have: KeyId, origin: String },
    #[error("Backup {vm}/{id} is not encrypted, but VM {vm} has key {key} (`{origin}`): refused, since whoever can write to the store could have made it")]
    NotEncrypted { vm: String, id: String, key: KeyId, origin: String },
}

/// The store's conditions that callers match on become the repository's own variants.
impl From<store::Error> for Error {
    fn from(e: store::Error) -> Error {
        match e {
            store::Error::Busy => Error::Busy,
            store::Error::BackupExists { vm, id } => Error::BackupExists { vm, id },
            store::Error::NotEmpty(path) => Error::NotEmpty(path),
            e => Error::Store(e),
        }
    }
}

/// What is wrong with a manifest or chunk.
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
    #[error("Its {what} name {name:?} is not a valid name")]
    BadName { what: &'static str, name: String },
    #[error("It is invalid: {0}")]
    Invalid(String),
    #[error("It does not authenticate under key {key}: it was altered, or it is not the chunk or manifest its name and place say")]
    Unauthentic { key: KeyId },
    #[error("It is encrypted under key {found}, not under key {expected}")]
    OtherKey { found: KeyId, expected: KeyId },
    #[error("It is not encrypted, but its backup is (key {key})")]
    NotSealed { key: KeyId },
    #[error("It is encrypted (key {key}), but its backup is not")]
    Sealed { key: KeyId },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `e` and its causes, `: `-separated: the text of a report's fault.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
