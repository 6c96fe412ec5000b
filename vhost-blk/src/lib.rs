//! livesnap-blk: the vhost-user block backend of livesnap.
//!
//! - [`disk`]: disk images (raw, qcow2) behind one trait; knows nothing of virtio.
//! - [`virtio`]: virtio-blk requests: parsing a descriptor chain, executing it on a disk.
//! - [`backend`]: the vhost-user glue: features, config space, one worker thread per queue.
//! - [`server`]: one listener per disk, a new device per frontend connection, clean shutdown.
//! - [`args`]: the command line.

pub mod args;
pub mod backend;
pub mod disk;
pub mod server;
pub mod snap;
pub mod sys;
pub mod virtio;
