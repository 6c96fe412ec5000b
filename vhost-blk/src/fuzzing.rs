//! Entry points of the fuzz targets (`fuzz/` at the repository root) into parsers that are
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

pub use crate::disk::qcow2::Header as Qcow2Header;

/// The largest virtual size the qcow2 header check accepts.
pub const QCOW2_MAX_VIRTUAL_SIZE: u64 = crate::disk::qcow2::MAX_VIRTUAL_SIZE;

/// What the `blk_config` target checks of an accepted `--config` file.
#[derive(Debug)]
pub struct BlkConfig {
    pub queues: Option<u16>,
    pub delta_limit: Option<u64>,
    /// Every path the file gives: state directory, control socket, each disk's image and socket.
    pub paths: Vec<std::path::PathBuf>,
    pub disk_ids: Vec<String>,
}

/// Parses and checks a livesnap-blk `--config` file's text as `--config` does.
pub fn blk_config(text: &str) -> Result<BlkConfig, crate::args::Error> {
    let f = crate::args::parse_file(std::path::Path::new("/etc/livesnap/vms/fuzz.toml"), text)?;
    let mut paths: Vec<_> = f.state_dir.into_iter().chain(f.control).collect();
    for d in &f.disks {
        paths.push(d.image.clone());
        paths.push(d.socket.clone());
    }
    Ok(BlkConfig {
        queues: f.queues,
        delta_limit: f.delta_limit,
        paths,
        disk_ids: f.disks.into_iter().map(|d| d.id).collect(),
    })
}
