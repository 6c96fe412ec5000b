//! Landlock: once confined, livesnap-blk opens only its own files. Best effort: a kernel
//! without Landlock (or with an older ABI) enforces what it knows, and the process goes on.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError,
    RulesetStatus, Scope, ABI,
};

/// The newest Landlock ABI tested with livesnap-blk (Linux 6.15 and later). Newer kernels
/// enforce this ABI's rights; older ones what they know of them.
const TESTED_ABI: ABI = ABI::V7;

/// The paths a confined livesnap-blk may still use.
#[derive(Clone, Debug, Default)]
pub struct Files {
    /// The state directory: its files are created, written, truncated, listed and removed at run
    /// time (deltas, journals, change maps, the record).
    pub state_dir: Option<PathBuf>,
    /// Disk images, writable or not. They are open already; the rule only lets them be
    /// opened again, never anything beside them.
    pub images: Vec<(PathBuf, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {} for a Landlock rule", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("Cannot build or enforce the Landlock ruleset")]
    Ruleset(#[from] RulesetError),
}

/// How much of the ruleset the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partially,
    /// This kernel has no Landlock (not built in, or not enabled at boot).
    Not,
}

/// Rights on the state directory: its regular files, nothing else (no subdirectories, links,
/// devices, sockets or executables).
fn state_dir_access() -> BitFlags<AccessFs> {
    AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::ReadDir
        | AccessFs::RemoveFile
        | AccessFs::MakeReg
        | AccessFs::Truncate
}

fn image_access(writable: bool) -> BitFlags<AccessFs> {
    if writable {
        AccessFs::ReadFile | AccessFs::WriteFile
    } else {
        AccessFs::ReadFile.into()
    }
}

fn rule(path: &Path, access: BitFlags<AccessFs>) -> Result<PathBeneath<PathFd>, Error> {
    let fd = PathFd::new(path).map_err(|source| Error::Path { path: path.to_owned(), source })?;
    Ok(PathBeneath::new(fd, access))
}

/// Restricts the calling thread (and the threads it starts later) to `files`: no other file
/// may be opened, created or removed, no TCP port bound or connected to (ABI 4), no abstract
/// unix socket outside reached and no signal sent outside (ABI 6).
pub fn restrict(files: &Files) -> Result<Enforced, Error> {
    let mut rules = Vec::new();
    if let Some(dir) = &files.state_dir {
        rules.push(rule(dir, state_dir_access())?);
    }
    for (image, writable) in &files.images {
        rules.push(rule(image, image_access(*writable))?);
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(TESTED_ABI))?
        .handle_access(AccessNet::from_all(TESTED_ABI))?
        .scope(Scope::from_all(TESTED_ABI))?
        .create()?
        .add_rules(rules.into_iter().map(Ok::<_, RulesetError>))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partially,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
