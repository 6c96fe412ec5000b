//! File-level restore in livesnapd: `ListFiles`, `ReadFile`, `GetFiles` over one disk of one
//! backup, through the repository's [`DiskReader`](livesnap_repo::DiskReader) and
//! [`crate::files::Volume`] (userspace ext4; nothing is mounted).
//!
//! The filesystem reader is not `Send` (ext4-view), so each call runs whole on one blocking
//! thread: it opens the reader and the volume, answers whether that worked (so that a disk
//! that cannot be read is the call's error, not a stream's), then streams what it reads
//! through a small channel. The client going away stops it at its next message. `get` sends
//! the tree to the client, which writes it where the operator is
//! ([`crate::files::extract`]): a tenant's files are meant for the operator, and livesnapd
//! never writes a tenant's names on its own host.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Daemon, Error, Result};
use crate::files::{self, FileInfo, Item, Volume};
use livesnap_repo::ReaderStats;

/// The reader's chunk cache: metadata blocks read again and again (inode tables, directories)
/// stay, file data passes through.
const CACHE_BYTES: u64 = 64 << 20;
/// Entries per `ListFiles` message.
const LIST_BATCH: usize = 512;

/// Which disk of which backup, which partition, which path.
#[derive(Clone, Debug)]
pub struct FilesRequest {
    pub vm: String,
    pub id: String,
    pub disk: String,
    /// 1-based; `None`: chosen as [`Volume::open`] does.
    pub partition: Option<u32>,
    pub path: String,
}

/// What a files call read, at its end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilesDone {
    pub stats: ReaderStats,
    pub disk_size: u64,
    pub partition: Option<u32>,
    pub entries: u64,
    pub data_bytes: u64,
}

/// One message of a files call's stream.
#[derive(Debug)]
pub enum FilesMsg {
    List(Vec<FileInfo>),
    Data { offset: u64, data: Vec<u8> },
    Item(Item),
    Done(FilesDone),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    List,
    Read,
    Get,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::List => "ls",
            Op::Read => "cat",
            Op::Get => "get",
        }
    }
}

/// Why a files call stopped that is not the image's fault: the reader panicked.
#[derive(Debug, thiserror::Error)]
#[error("The filesystem reader failed on this image: {0}")]
pub struct ReaderPanic(pub String);

impl Daemon {
    /// The entries at `r.path`, in batches.
    pub async fn list_files(&self, r: FilesRequest) -> Result<mpsc::Receiver<Result<FilesMsg>>> {
        self.files(r, Op::List).await
    }

    /// The bytes of the file at `r.path`.
    pub async fn read_file(&self, r: FilesRequest) -> Result<mpsc::Receiver<Result<FilesMsg>>> {
        self.files(r, Op::Read).await
    }

    /// The tree at `r.path`: entries and data.
    pub async fn get_files(&self, r: FilesRequest) -> Result<mpsc::Receiver<Result<FilesMsg>>> {
        self.files(r, Op::Get).await
    }

    async fn files(&self, r: FilesRequest, op: Op) -> Result<mpsc::Receiver<Result<FilesMsg>>> {
        let repo = self.repo.clone();
        let (opened_tx, opened_rx) = oneshot::channel::<Result<()>>();
        let (tx, rx) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            let mut opened = Some(opened_tx);
            let res = std::panic::catch_unwind(AssertUnwindSafe(|| run(&repo, &r, op, &mut opened, &tx)));
            let res = match res {
                Ok(res) => res,
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    tracing::error!(vm = %r.vm, backup = %r.id, disk = %r.disk, panic = %what, "the filesystem reader panicked");
                    Err(Error::FilesPanic(ReaderPanic(what)))
                }
            };
            match (opened.take(), res) {
                (Some(o), res) => {
                    let _ = o.send(res);
                }
                (None, Err(Error::Files(files::Error::Gone))) => {}
                (None, Err(e)) => {
                    let _ = tx.blocking_send(Err(e));
                }
                (None, Ok(())) => {}
            }
        });
        match opened_rx.await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e),
            // The task ended without a word: it panicked past catch_unwind (abort) or was
            // cancelled with the runtime.
            Err(_) => Err(Error::FilesPanic(ReaderPanic("the reading task ended".into()))),
        }
    }
}

fn send(tx: &mpsc::Sender<Result<FilesMsg>>, m: FilesMsg) -> std::result::Result<(), files::Error> {
    tx.blocking_send(Ok(m)).map_err(|_| files::Error::Gone)
}

/// The whole call on this thread: open, say so through `opened`, stream, end with `Done`.
fn run(
    repo: &livesnap_repo::Repository,
    r: &FilesRequest,
    op: Op,
    opened: &mut Option<oneshot::Sender<Result<()>>>,
    tx: &mpsc::Sender<Result<FilesMsg>>,
) -> Result<()> {
    let reader = Arc::new(repo.open_disk(&r.vm, &r.id, &r.disk, CACHE_BYTES)?);
    let vol = Volume::open(reader.clone(), r.partition)?;
    // What must exist for the call to start: the path (ls, get), a regular file (cat).
    let first = match op {
        Op::List => Some(vol.list(&r.path)?),
        Op::Get => {
            vol.stat(&r.path)?;
            None
        }
        Op::Read => {
            vol.check_file(&r.path)?;
            None
        }
    };
    if let Some(o) = opened.take() {
        let _ = o.send(Ok(()));
    }
    let mut done = FilesDone { disk_size: reader.size(), partition: vol.region.number, ..FilesDone::default() };
    match op {
        Op::List => {
            for batch in first.unwrap_or_default().chunks(LIST_BATCH) {
                done.entries += batch.len() as u64;
                send(tx, FilesMsg::List(batch.to_vec()))?;
            }
        }
        Op::Read => {
            vol.read(&r.path, |offset, data| {
                done.data_bytes += data.len() as u64;
                send(tx, FilesMsg::Data { offset, data: data.to_vec() })
            })?;
        }
        Op::Get => {
            vol.walk(&r.path, |item| {
                match &item {
                    Item::Entry { .. } => done.entries += 1,
                    Item::Data { data, .. } => done.data_bytes += data.len() as u64,
                }
                send(tx, FilesMsg::Item(item))
            })?;
        }
    }
    done.stats = reader.stats();
    tracing::info!(
        vm = %r.vm, backup = %r.id, disk = %r.disk, partition = ?vol.region.number, op = op.as_str(), path = %r.path,
        entries = done.entries, data_bytes = done.data_bytes, chunks_fetched = done.stats.chunks_fetched,
        bytes_fetched = done.stats.bytes_fetched, disk_size = done.disk_size, "files read from a backup"
    );
    send(tx, FilesMsg::Done(done))?;
    Ok(())
}
