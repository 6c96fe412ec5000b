//! snapctl's pieces.
//!
//! - [`args`]: the command line (clap).
//! - [`connect`]: reaching livesnapd, on its unix socket or over TCP with TLS and a token.
//! - [`error`]: what can go wrong, each with its exit code; gRPC codes mapped to them.
//! - [`render`]: livesnapd's replies as text for a person and as JSON for a script; every
//!   string and enum from the daemon is treated as odd input (control characters, unknown
//!   values).
//! - [`snapshot`]: `vm snapshot`: the event stream as a live progress bar, plain lines or JSON
//!   lines.
//! - [`commands`]: `vm list` and the `backup` commands.
//! - [`files`]: `backup files ... ls | cat | get`: a backup's files through livesnapd, `get`
//!   written here by the confined extractor.
//! - [`jobs`]: the `job` commands: list, show, cancel.
//! - [`agent`]: `agent ...`, a guest agent talked to directly.

pub mod agent;
pub mod args;
pub mod commands;
pub mod connect;
pub mod error;
pub mod files;
pub mod jobs;
pub mod render;
pub mod snapshot;
