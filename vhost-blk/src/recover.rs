//! `livesnap-blk recover`: folds one disk's delta back into its base offline, from the delta's
//! journal, when the state directory's record no longer reads back and the backend refuses to
//! start (`docs/snapshots.md`, "Recovery"). Nothing in the state directory is changed.

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};

use crate::disk::{self, Format};
use crate::snap::recover::fold;

/// Copies what a snapshot's delta holds for DISK into its image, as the merge would.
#[derive(Debug, Parser)]
#[command(name = "livesnap-blk recover")]
struct Recover {
    /// The VM's state directory (the backend's --state-dir).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// The disk's id (its `id=` in --disk).
    #[arg(long, value_name = "ID")]
    disk: String,
    /// The disk's base image (its `image=`); the backend must not be running.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// The image's format; detected when not given.
    #[arg(long)]
    format: Option<Format>,
    /// The snapshot whose delta to fold; needed only when several lie in the directory.
    #[arg(long, value_name = "N")]
    snapshot: Option<u64>,
    /// Only say what would be copied.
    #[arg(long)]
    dry_run: bool,
}

/// The command's definition, for the man pages and the shell completions.
pub fn command() -> clap::Command {
    Recover::command()
}

/// Runs `livesnap-blk recover` with `args` (the first being the command's name).
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let r = Recover::parse_from(args);
    let prefix = format!("{}.map.", r.disk);
    let mut found: Vec<u64> = std::fs::read_dir(&r.state_dir)
        .with_context(|| format!("Cannot list {}", r.state_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
        .collect();
    found.sort_unstable();
    let snapshot = match (r.snapshot, found.as_slice()) {
        (Some(n), _) => n,
        (None, [n]) => *n,
        (None, []) => bail!("No delta journal {prefix}N for disk {} in {}", r.disk, r.state_dir.display()),
        (None, many) => {
            bail!("Several snapshots have a delta for disk {}: {many:?}; choose one with --snapshot", r.disk)
        }
    };
    let jpath = r.state_dir.join(format!("{}.map.{snapshot}", r.disk));
    let dpath = r.state_dir.join(format!("{}.delta.{snapshot}", r.disk));
    let journal = File::open(&jpath).with_context(|| format!("Cannot open {}", jpath.display()))?;
    let delta = disk::open(&dpath, Some(Format::Raw), true).with_context(|| format!("Delta {}", dpath.display()))?;
    let base = disk::open(&r.image, r.format, r.dry_run).with_context(|| format!("Image {}", r.image.display()))?;
    let done = fold(&*delta, &journal, snapshot, &*base, r.dry_run)
        .with_context(|| format!("Cannot fold {} into {}", dpath.display(), r.image.display()))?;
    let verb = if r.dry_run { "would copy" } else { "copied and flushed" };
    println!(
        "disk {}: snapshot {snapshot}: {verb} {} bytes in {} extents from {} into {}",
        r.disk,
        done.bytes,
        done.extents,
        dpath.display(),
        r.image.display()
    );
    Ok(())
}
