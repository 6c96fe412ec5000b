//! Entry points of the fuzz targets (`fuzz/` at the repository root) into parsers that are
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

use livesnap_proto::agent as pb;
use tokio::io::AsyncRead;

use crate::agent::{self, Limits, Validator};
use crate::vsock;

/// The checks [`agent::AgentClient::ping`] makes of a decoded reply.
pub fn check_ping(limits: &Limits, r: pb::PingReply) -> agent::Result<agent::PingReply> {
    Validator(limits).ping(r)
}

/// The checks [`agent::AgentClient::freeze`] makes of a decoded reply.
pub fn check_freeze(limits: &Limits, r: pb::FreezeReply) -> agent::Result<agent::FreezeReply> {
    Validator(limits).freeze(r)
}

/// The checks [`agent::AgentClient::thaw`] makes of a decoded reply.
pub fn check_thaw(limits: &Limits, r: pb::ThawReply) -> agent::Result<agent::ThawReply> {
    Validator(limits).thaw(r)
}

/// The checks [`agent::AgentClient::status`] makes of a decoded reply.
pub fn check_status(limits: &Limits, r: pb::StatusReply) -> agent::Result<agent::StatusReply> {
    Validator(limits).status(r)
}

/// Reads a hybrid vsock handshake reply as [`vsock::connect`] does; returns the host port.
pub async fn hybrid_reply(s: &mut (impl AsyncRead + Unpin)) -> Result<u32, vsock::Error> {
    vsock::read_reply(s).await
}
