//! livesnap-blk: the vhost-user block backend of livesnap.
//!
//! - [`disk`]: disk images (raw, qcow2) behind one trait; knows nothing of virtio.
//! - [`virtio`]: virtio-blk requests: parsing a descriptor chain, executing it on a disk.
//! - [`backend`]: the device's virtio side: features, config space, the queue loop.
//! - [`handler`]: the vhost-user protocol of a connection: memory, queues, their worker threads.
//! - [`inflight`]: inflight I/O tracking, so that a backend restart loses and repeats nothing.
//! - [`server`]: one listener per disk, a new device per frontend connection, clean shutdown.
//! - [`snap`]: the snapshot engine: redirect-on-write deltas, the merge, change tracking.
//! - [`restore`]: live restore: a disk served while its image is filled from a backup.
//! - [`control`]: the snapshot control service (gRPC on a unix socket); [`ctl`]: its CLI client.
//! - [`recover`]: `livesnap-blk recover`, folding a delta into its base offline.
//! - [`confine`]: the confinement once started: no privileges, Landlock, the seccomp allow-list.
//! - [`args`]: the command line.
//! - `fuzzing`: entry points of the fuzz targets (`fuzz/`) into private parsers; not an API.

pub mod args;
pub mod backend;
pub mod confine;
pub mod control;
pub mod ctl;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod inflight;
pub mod recover;
pub mod restore;
pub mod server;
pub mod snap;
pub mod sys;
pub mod virtio;
