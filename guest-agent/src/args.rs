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
    /// Bytes of each hook's stdout and of its stderr returned to the host (at most 8192: the
    /// host takes 16 KiB of output per hook).
    #[arg(long, default_value_t = 4096, value_parser = output_limit)]
    pub hook_output_limit: usize,
    /// The longest freeze deadline accepted.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_deadline: Duration,
    /// Record of what is frozen; must be on a filesystem never frozen (a tmpfs such as /run).
    #[arg(long, default_value = "/run/livesnap-agent/state")]
    pub state_file: PathBuf,
}

fn output_limit(s: &str) -> Result<usize, String> {
    let max = crate::hooks::MAX_OUTPUT_LIMIT;
    match s.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("expected a number of bytes from 0 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_limit_the_host_would_refuse_is_refused() {
        let parse = |v: &str| Args::try_parse_from(["livesnap-agent", "--hook-output-limit", v]);
        assert_eq!(parse("8192").map(|a| a.hook_output_limit).ok(), Some(8192));
        assert!(parse("8193").is_err());
        assert_eq!(Args::try_parse_from(["livesnap-agent"]).map(|a| a.hook_output_limit).ok(), Some(4096));
    }
}
