//! livesnap's gRPC definitions and their generated code.
//!
//! - [`agent`]: the guest agent's service (`agent.proto`, package `livesnap.agent.v1`), served
//!   by `livesnap-agent` inside the VM over vsock and called by the host (`livesnap-control`).
//! - [`snapshot`]: the snapshot control service of one `livesnap-blk` process
//!   (`snapshot.proto`, package `livesnap.snapshot.v1`), served on its `--control` unix socket.
//! - [`daemon`]: livesnapd's API (`livesnapd.proto`, package `livesnap.daemon.v1`), for
//!   orchestrators and snapctl.
//! - [`unix_channel`]: a channel to a gRPC server on a unix socket.
//! - [`error`]: the error-chain printer every binary uses, and a `tonic::Status` that carries
//!   the whole chain.
//!
//! The code is generated at build time by `build.rs` (protox + tonic-prost-build); no system
//! `protoc` is needed.

pub mod error;

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The guest agent's service, `livesnap.agent.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod agent {
    tonic::include_proto!("livesnap.agent.v1");
}

/// The backend's snapshot control service, `livesnap.snapshot.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod snapshot {
    tonic::include_proto!("livesnap.snapshot.v1");
}

/// livesnapd's API, `livesnap.daemon.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod daemon {
    tonic::include_proto!("livesnap.daemon.v1");
}

/// Connects `endpoint` to a gRPC server on the unix socket at `path` (the endpoint's URI is
/// never dialled; `Endpoint::from_static("http://unix.invalid")` will do). The caller bounds the
/// time.
pub async fn unix_channel(endpoint: Endpoint, path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}
