//! livesnap's host side. For now: the client of the guest agent.
//!
//! - [`vsock`]: the hybrid vsock connector (a unix socket exposed by the VMM or
//!   vhost-device-vsock: `CONNECT <port>\n`, `OK <n>\n`, then the stream).
//! - [`agent`]: the agent client. The guest belongs to a tenant: every reply is hostile input —
//!   sizes bounded, a timeout on every call, replies validated, garbage answered with an error.
//!
//! `snapctl` (src/main.rs) is the operators' CLI on top.

pub mod agent;
pub mod repo;
pub mod vsock;
