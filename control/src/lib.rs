//! livesnap's host side: the host daemon livesnapd and the client of the guest agent, on top of
//! the backup repository (the livesnap-repo crate).
//!
//! - [`vsock`]: the vsock connectors: hybrid vsock (a unix socket exposed by the VMM or
//!   vhost-device-vsock: `CONNECT <port>\n`, `OK <n>\n`, then the stream) and AF_VSOCK.
//! - [`agent`]: the agent client. The guest belongs to a tenant: every reply is hostile input —
//!   sizes bounded, a timeout on every call, replies validated, garbage answered with an error.
//! - [`files`]: file-level restore: partition tables, ext4 read in userspace (ext4-view) over
//!   the repository's disk reader, and the confined writer of a tree (`snapctl backup files`).
//! - [`restore`]: restores of a backup's disk to a new raw or qcow2 image (`qemu-img`).
//! - [`daemon`]: livesnapd, the host daemon (`proto/livesnapd.proto`; binary src/bin/livesnapd.rs).
//!
//! - `fuzzing`: entry points of the fuzz targets (`fuzz/`) into private parsers; not an API.
//!
//! - [`cli`]: `snapctl`, the operators' CLI on top (its `main` is src/main.rs).

pub mod agent;
pub mod cli;
pub mod daemon;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod restore;
pub mod vsock;

/// Makes ring, which tonic's TLS was built with, the process's rustls crypto provider. Call it
/// before any TLS: the object store's HTTP client links a second provider (aws-lc-rs), and
/// with two rustls refuses to choose (it panics at the first handshake).
pub fn install_tls_provider() {
    // Err: one is installed already (a second call), which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
