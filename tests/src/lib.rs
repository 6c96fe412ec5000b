//! Test harness of livesnap: everything the tests and the benchmarks need to play the parts
//! around the backend under test.
//!
//! - [`daemon`]: starts the backends under test (`livesnap-blk`, `qemu-storage-daemon`) as real
//!   processes on real unix sockets, and stops them.
//! - [`virtq`]: the driver side of a split virtqueue in shared memory.
//! - [`frontend`]: the test VMM: a vhost-user frontend that shares guest memory with a backend
//!   and sets up its queues over the real socket.
//! - [`blk`]: virtio-blk requests on top of a frontend queue.
//! - [`guest`]: a real QEMU guest (TCG) booted on disks served by a backend.
//! - [`tls`]: a CA and a certificate for 127.0.0.1, made with `openssl`.
//! - [`programs`]: where the programs the tests run are found (workspace binaries, the static
//!   guest programs, vhost-device-vsock).
//! - [`pattern`]: data to write and check again (disk patterns, seeded random bytes).
//! - [`record`]: the numbered, checksummed records the guest's `recwriter` writes.
//! - [`fsync_log`]: the guest shell workload's log of fsync'd records, and the programs that
//!   check it in an image (`debugfs`, with `run` and `sbin`).
//! - [`load`]: load on a backend: workers keeping requests in flight on the test VMM's queues
//!   while the calling thread steers and measures.
//! - [`bench`]: what `blkbench` and `snapbench` share: the test file and its page cache,
//!   livesnap-blk started and connected, statistics.

pub mod bench;
pub mod blk;
pub mod daemon;
pub mod frontend;
pub mod fsync_log;
pub mod garage;
pub mod guest;
pub mod load;
pub mod pattern;
pub mod programs;
pub mod record;
pub mod tls;
pub mod virtq;
