//! livesnap-agent, the guest agent: quiesces the guest for a consistent snapshot.
//!
//! - [`args`]: command line.
//! - [`agent`]: the domain — freeze (hooks, then FIFREEZE of every filesystem), thaw, status,
//!   and the lease that thaws at the deadline whatever happens to the host.
//! - [`service`]: the gRPC adapter from tonic to [`agent::AgentApi`].
//! - [`freeze`]: `/proc/self/mountinfo` parsing and the freeze plan; the [`freeze::Freezer`]
//!   trait.
//! - [`hooks`]: listing and running the hooks (order, skips, timeouts, bounded output).
//! - [`lease`]: the state file under `/run` that lets a restarted agent thaw first.
//! - [`fake`]: a fake freezer for tests (no privileges, no filesystem touched).
//! - [`sys`]: the ioctls (FIFREEZE/FITHAW) and the kill of a hook's process group.
//! - [`serve`]: listeners (vsock, unix) and the whole run of the daemon.
//! - `fuzzing`: entry points of the fuzz targets (`fuzz/`) into private code; not an API.

pub mod agent;
pub mod args;
pub mod fake;
pub mod freeze;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod lease;
pub mod serve;
pub mod service;
pub mod sys;
