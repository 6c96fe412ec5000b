//! Command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The vsock port the agent listens on unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 7735;

/// livesnap's guest agent: runs freeze/thaw hooks and freezes the guest's filesystems for
/// consistent snapshots, on the host's request over vsock. Thaws by itself at the deadline.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// vsock port to listen on (any CID).
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT)]
    pub vsock_port: u32,
    /// Listen on this unix socket instead of vsock (tests, debugging).
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Directory of hook executables.
    #[arg(long, default_value = "/etc/livesnap/hooks.d")]
    pub hooks_dir: PathBuf,
    /// Timeout of each hook run, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub hook_timeout: Duration,
    /// Bytes of each hook's stdout and of its stderr returned to the host.
    #[arg(long, default_value_t = 4096)]
    pub hook_output_limit: usize,
    /// The longest freeze deadline accepted.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_deadline: Duration,
    /// Record of what is frozen; must be on a filesystem never frozen (a tmpfs such as /run).
    #[arg(long, default_value = "/run/livesnap-agent/state")]
    pub state_file: PathBuf,
}
