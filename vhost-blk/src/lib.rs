//! livesnap-blk: the vhost-user block backend of livesnap.
//!
//! - [`disk`]: disk images (raw, qcow2) behind one trait; knows nothing of virtio.
//! - [`virtio`]: virtio-blk requests: parsing a descriptor chain, executing it on a disk.
//! - [`backend`]: the vhost-user glue: features, config space, one worker thread per queue.
//! - [`server`]: one listener per disk, a new device per frontend connection, clean shutdown.
//! - [`snap`]: the snapshot engine: redirect-on-write deltas, the merge, change tracking.
//! - [`control`]: the snapshot control service (gRPC on a unix socket); [`ctl`]: its CLI client.
//! - [`recover`]: `livesnap-blk recover`, folding a delta into its base offline.
//! - [`args`]: the command line.
//! - `fuzzing`: entry points of the fuzz targets (`fuzz/`) into private parsers; not an API.

pub mod args;
pub mod backend;
pub mod control;
pub mod ctl;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod recover;
pub mod server;
pub mod snap;
pub mod sys;
pub mod virtio;
