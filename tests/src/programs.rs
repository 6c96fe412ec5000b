//! Where the tests, the benchmarks and the demo find the programs they run: this workspace's
//! binaries beside the running one, the static guest programs under `target/`, and the
//! vhost-device-vsock tool. Every lookup can be overridden by an environment variable.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot find {name} beside {}: build it (cargo build --workspace) or set {var}", exe.display())]
    NotBuilt { name: String, var: String, exe: PathBuf },
    #[error("Cannot find {name} (looked for {tried}): {how} (or set {var})")]
    Missing { name: &'static str, var: &'static str, how: &'static str, tried: String },
    #[error("Cannot tell where the running program is")]
    CurrentExe(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace binary `name`: `$var`, else beside the running test or bench binary in the
/// cargo target directory (`target/<profile>/` or its `deps/`).
pub fn workspace_bin(var: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(Error::CurrentExe)?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::NotBuilt { name: name.into(), var: var.into(), exe })
}

/// `livesnap-blk` (`$LIVESNAP_BLK`, else as [`workspace_bin`] finds it).
pub fn livesnap_blk() -> Result<PathBuf> {
    workspace_bin("LIVESNAP_BLK", "livesnap-blk")
}

/// `livesnapd` (`$LIVESNAPD`, else as [`workspace_bin`] finds it).
pub fn livesnapd() -> Result<PathBuf> {
    workspace_bin("LIVESNAPD", "livesnapd")
}

/// `snapctl` (`$SNAPCTL`, else as [`workspace_bin`] finds it).
pub fn snapctl() -> Result<PathBuf> {
    workspace_bin("SNAPCTL", "snapctl")
}

/// `$var` if set, else the most recently built of `candidates`; it must be a file.
fn existing(name: &'static str, var: &'static str, how: &'static str, candidates: &[PathBuf]) -> Result<PathBuf> {
    let candidates = match std::env::var_os(var) {
        Some(p) => vec![PathBuf::from(p)],
        None => candidates.to_vec(),
    };
    let modified = |p: &PathBuf| p.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    candidates.iter().filter(|p| p.is_file()).max_by_key(|p| modified(p)).cloned().ok_or_else(|| {
        let tried = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Error::Missing { name, var, how, tried }
    })
}

/// The static guest agent (`$LIVESNAP_AGENT_STATIC`, else the newer of
/// `target/debian/livesnap-agent` from `ci/package-agent.sh` and `target/guest-bin/livesnap-agent`
/// from `ci/demo.sh`, so that a stale copy never wins).
pub fn agent_static() -> Result<PathBuf> {
    let root = workspace_root();
    existing(
        "the static livesnap-agent",
        "LIVESNAP_AGENT_STATIC",
        "run ci/package-agent.sh",
        &[root.join("target/debian/livesnap-agent"), root.join("target/guest-bin/livesnap-agent")],
    )
}

/// The static guest record writer (`$LIVESNAP_RECWRITER`, else `target/guest-bin/recwriter`).
pub fn recwriter_static() -> Result<PathBuf> {
    existing(
        "the static recwriter",
        "LIVESNAP_RECWRITER",
        "run ci/build-recwriter.sh",
        &[workspace_root().join("target/guest-bin/recwriter")],
    )
}

/// vhost-device-vsock, the guest's vsock device (`$VHOST_DEVICE_VSOCK`, else on `PATH`, else
/// in `~/.cargo/bin`).
pub fn vhost_device_vsock() -> Result<PathBuf> {
    const NAME: &str = "vhost-device-vsock";
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(NAME)).find(|p| p.is_file()));
    let in_home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin").join(NAME));
    // The first on PATH wins, as a shell would choose.
    let candidates: Vec<PathBuf> = on_path.or(in_home).into_iter().collect();
    existing(
        "vhost-device-vsock on PATH",
        "VHOST_DEVICE_VSOCK",
        "cargo install --locked vhost-device-vsock",
        &candidates,
    )
}

/// Garage, the S3-compatible object store of the tests (`$GARAGE`, else on `PATH`, else in
/// `~/.cargo/bin`).
pub fn garage() -> Result<PathBuf> {
    const NAME: &str = "garage";
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(NAME)).find(|p| p.is_file()));
    let in_home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin").join(NAME));
    let candidates: Vec<PathBuf> = on_path.or(in_home).into_iter().collect();
    existing("garage", "GARAGE", "cargo install --locked --version 2.5.0 garage", &candidates)
}
