//! livesnap's gRPC definitions and their generated code.
//!
//! - [`agent`]: the guest agent's service (`agent.proto`, package `livesnap.agent.v1`), served
//!   by `livesnap-agent` inside the VM over vsock and called by the host (`livesnap-control`).
//!
//! The code is generated at build time by `build.rs` (protox + tonic-prost-build); no system
//! `protoc` is needed.

/// The guest agent's service, `livesnap.agent.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod agent {
    tonic::include_proto!("livesnap.agent.v1");
}
