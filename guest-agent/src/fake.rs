//! A fake [`Freezer`] for tests: a fixed plan, a log of calls, and failures on demand. It
//! behaves like the kernel: freezing a frozen filesystem is `EBUSY` (reported as frozen by
//! someone else), thawing a thawed one `EINVAL` (not frozen).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::freeze::{FreezeOutcome, Freezer, FsTarget, ThawOutcome};

#[derive(Debug, Default)]
struct Inner {
    plan: Vec<FsTarget>,
    frozen: HashSet<PathBuf>,
    fail_freeze: HashSet<PathBuf>,
    log: Vec<String>,
}

/// Clones share one state.
#[derive(Clone, Debug, Default)]
pub struct FakeFreezer {
    inner: Arc<Mutex<Inner>>,
}

impl FakeFreezer {
    /// A freezer whose plan is `mount_points`, in that (freeze) order.
    pub fn new(mount_points: &[&str]) -> Self {
        let plan = mount_points
            .iter()
            .enumerate()
            .map(|(i, p)| FsTarget {
                mount_point: PathBuf::from(p),
                fs_type: "ext4".into(),
                source: format!("/dev/fake{i}"),
                dev: (4095, u32::try_from(i).unwrap_or(u32::MAX)),
            })
            .collect();
        FakeFreezer { inner: Arc::new(Mutex::new(Inner { plan, ..Inner::default() })) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `p` frozen by someone else.
    pub fn freeze_externally(&self, p: &str) {
        self.lock().frozen.insert(PathBuf::from(p));
    }

    /// Makes FIFREEZE of `p` fail with EIO.
    pub fn fail_freeze_of(&self, p: &str) {
        self.lock().fail_freeze.insert(PathBuf::from(p));
    }

    /// `freeze /x`, `thaw /x` in call order.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// The filesystems frozen now, sorted.
    pub fn frozen(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.lock().frozen.iter().cloned().collect();
        v.sort();
        v
    }
}

impl Freezer for FakeFreezer {
    fn plan(&self) -> Result<Vec<FsTarget>, crate::freeze::Error> {
        Ok(self.lock().plan.clone())
    }

    fn freeze(&self, p: &Path) -> io::Result<FreezeOutcome> {
        let mut i = self.lock();
        i.log.push(format!("freeze {}", p.display()));
        if i.fail_freeze.contains(p) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if !i.frozen.insert(p.to_path_buf()) {
            return Ok(FreezeOutcome::FrozenByOther);
        }
        Ok(FreezeOutcome::Frozen)
    }

    fn thaw(&self, p: &Path) -> io::Result<ThawOutcome> {
        let mut i = self.lock();
        i.log.push(format!("thaw {}", p.display()));
        Ok(if i.frozen.remove(p) { ThawOutcome::Thawed } else { ThawOutcome::NotFrozen })
    }
}

/// A scratch home for an agent under test, in a folder the caller owns: `hooks.d/`, a log of
/// the calls of recording hooks (`calls`), and the state file (`run/state`).
#[derive(Clone, Debug)]
pub struct AgentHome {
    dir: PathBuf,
}

impl AgentHome {
    /// Makes `dir/hooks.d`.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir.join("hooks.d"))?;
        Ok(AgentHome { dir: dir.to_path_buf() })
    }

    /// The agent's configuration: this home's hooks and state file, 20 s per hook, 1 KiB of
    /// output per stream, deadlines up to 10 minutes.
    pub fn config(&self) -> crate::agent::Config {
        crate::agent::Config {
            hooks: crate::hooks::Hooks {
                dir: self.dir.join("hooks.d"),
                timeout: std::time::Duration::from_secs(20),
                max_output: 1024,
            },
            max_deadline: std::time::Duration::from_secs(600),
            state_file: self.state_file(),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("run/state")
    }

    /// Installs an executable hook `name` that appends `<name> <arg>` to the call log, then
    /// runs the shell lines `extra`.
    pub fn hook(&self, name: &str, extra: &str) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.join("hooks.d").join(name);
        let calls = self.dir.join("calls");
        std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $1\" >>{}\n{extra}\n", calls.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
    }

    /// The recording hooks' calls so far, in order.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default().lines().map(String::from).collect()
    }
}
