//! The only code that talks to the kernel directly: `FIFREEZE`/`FITHAW`, and a signal to a
//! hook's process group.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::freeze::{self, FreezeOutcome, Freezer, FsTarget, ThawOutcome};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from `<linux/fs.h>`.
const FIFREEZE: libc::c_ulong = 0xc004_5877;
const FITHAW: libc::c_ulong = 0xc004_5878;

/// Opens a mount point for the ioctls: a directory, read-only, which writes nothing.
fn open_dir(mount_point: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOATIME)
        .open(mount_point)
        .or_else(|_| std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(mount_point))
}

/// Issues `request` (FIFREEZE or FITHAW) on the filesystem of `mount_point`.
fn fs_ioctl(mount_point: &Path, request: libc::c_ulong) -> io::Result<()> {
    let dir = open_dir(mount_point)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: `dir` is an open file descriptor we own for the duration of the call; FIFREEZE
    // and FITHAW take a pointer to an int which the kernel ignores, and `arg` lives on our stack
    // for the whole call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, &mut arg as *mut libc::c_int) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The real freezer: the plan from `/proc/self/mountinfo`, the ioctls.
#[derive(Debug, Default)]
pub struct SysFreezer;

impl Freezer for SysFreezer {
    fn plan(&self) -> Result<Vec<FsTarget>, freeze::Error> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(freeze::Error::MountTable)?;
        let mounts = freeze::parse_mountinfo(&text)?;
        Ok(freeze::plan(&mounts))
    }

    fn freeze(&self, mount_point: &Path) -> io::Result<FreezeOutcome> {
        let _fast = RcuExpedited::begin();
        match fs_ioctl(mount_point, FIFREEZE) {
            Ok(()) => Ok(FreezeOutcome::Frozen),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(FreezeOutcome::FrozenByOther),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(FreezeOutcome::Unsupported),
            Err(e) => Err(e),
        }
    }

    fn thaw(&self, mount_point: &Path) -> io::Result<ThawOutcome> {
        match fs_ioctl(mount_point, FITHAW) {
            Ok(()) => Ok(ThawOutcome::Thawed),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(ThawOutcome::NotFrozen),
            Err(e) => Err(e),
        }
    }
}

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// RCU grace periods expedited while the guard lives. FIFREEZE waits for several of them (one
/// per percpu rwsem of the superblock); at the normal pace they are most of a freeze's time
/// (measured in a TCG guest: `fsfreeze --freeze` 68–72 ms, 15 ms expedited), and the guest's
/// I/O is stopped for all of it. Best effort: without the knob, or without the right to write
/// it, a freeze goes on at the normal pace. The previous setting comes back on drop.
struct RcuExpedited {
    restore: bool,
}

impl RcuExpedited {
    fn begin() -> Self {
        let was_off = std::fs::read_to_string(RCU_EXPEDITED).is_ok_and(|v| v.trim() == "0");
        RcuExpedited { restore: was_off && std::fs::write(RCU_EXPEDITED, "1").is_ok() }
    }
}

impl Drop for RcuExpedited {
    fn drop(&mut self) {
        if self.restore {
            if let Err(e) = std::fs::write(RCU_EXPEDITED, "0") {
                tracing::warn!(error = %livesnap_proto::error::chain(&e), "cannot restore {RCU_EXPEDITED} to 0");
            }
        }
    }
}

/// Sends SIGKILL to the process group `pgid` (a hook and whatever it started).
pub fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid names
    // the process group, which we created for the hook (`process_group(0)`), never our own.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}
