//! Confinement of a running livesnap-blk: a guest that takes it over must not reach the host or
//! another VM's disks.
//!
//! Once the images, the state directory and the sockets are open, and before any other thread
//! starts (every thread started later inherits all of it), [`Plan::apply`]:
//! 1. makes the process non-dumpable (a core file would hold guest memory) and sets
//!    no-new-privileges;
//! 2. empties the capability bounding set;
//! 3. with `--user`, switches to that user and group, with no supplementary groups;
//! 4. empties every other capability set (effective, permitted, inheritable, ambient);
//! 5. restricts file access to its own files with Landlock ([`landlock`]), where the kernel
//!    has it;
//! 6. installs the seccomp allow-list ([`seccomp`]) on every thread.
//!
//! `--sandbox off` (for debugging only) skips all but `--user`.

pub mod landlock;
pub mod seccomp;
mod syscall_names;
pub mod user;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;

use tracing::{info, warn};

use self::landlock::Enforced;
pub use self::landlock::Files;
pub use self::user::Credentials;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot count the process's threads")]
    Threads(#[source] io::Error),
    #[error("Confinement must come before any other thread starts, but {0} threads are running")]
    NotAlone(usize),
    #[error("Cannot make the process non-dumpable")]
    Dumpable(#[source] io::Error),
    #[error("Cannot set no-new-privileges")]
    NoNewPrivs(#[source] io::Error),
    #[error("Cannot drop capability {cap} from the bounding set")]
    Bounding {
        cap: libc::c_ulong,
        #[source]
        source: io::Error,
    },
    #[error("Cannot switch to user {uid} and group {gid}")]
    SwitchUser {
        uid: libc::uid_t,
        gid: libc::gid_t,
        #[source]
        source: io::Error,
    },
    #[error("Cannot clear the ambient capabilities")]
    Ambient(#[source] io::Error),
    #[error("Cannot drop the capabilities")]
    Capabilities(#[source] io::Error),
    #[error("User {uid} cannot write into the state directory {}: make it owned by or writable for that user", dir.display())]
    StateDir {
        uid: libc::uid_t,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot restrict file access")]
    Landlock(#[source] landlock::Error),
    #[error("Cannot apply the system call filter")]
    Seccomp(#[source] seccomp::Error),
}

/// What to confine, and how.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Everything but the user switch; off only for debugging.
    pub sandbox: bool,
    pub user: Option<Credentials>,
    pub files: Files,
}

impl Plan {
    /// Confines the process; must run while the calling thread is the only one.
    pub fn apply(&self) -> Result<(), Error> {
        let threads = std::fs::read_dir("/proc/self/task").map_err(Error::Threads)?.count();
        if threads != 1 {
            return Err(Error::NotAlone(threads));
        }
        if self.sandbox {
            sys::prctl(libc::PR_SET_DUMPABLE, 0).map_err(Error::Dumpable)?;
            sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(Error::NoNewPrivs)?;
            drop_bounding_set()?;
        }
        if let Some(c) = &self.user {
            sys::switch_user(c.uid, c.gid).map_err(|source| Error::SwitchUser { uid: c.uid, gid: c.gid, source })?;
            if let Some(dir) = &self.files.state_dir {
                sys::can_write_dir(dir).map_err(|source| Error::StateDir { uid: c.uid, dir: dir.clone(), source })?;
            }
        }
        if !self.sandbox {
            warn!("--sandbox off: livesnap-blk runs unconfined (for debugging only)");
            return Ok(());
        }
        sys::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong).map_err(Error::Ambient)?;
        sys::clear_capabilities().map_err(Error::Capabilities)?;
        match landlock::restrict(&self.files).map_err(Error::Landlock)? {
            Enforced::Fully => info!("Landlock: file access restricted to the images and the state directory"),
            Enforced::Partially => info!("Landlock: file access restricted as far as this kernel's Landlock allows"),
            Enforced::Not => info!("Landlock is not available on this kernel: file access is not restricted by it"),
        }
        // SAFETY: getpid(2) takes no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        seccomp::apply(pid).map_err(Error::Seccomp)?;
        Ok(())
    }
}

/// Empties the bounding set, which limits what an exec could ever gain. Without CAP_SETPCAP
/// (livesnap-blk started unprivileged) it cannot be emptied and need not be: no-new-privileges
/// and the seccomp filter already rule out exec.
fn drop_bounding_set() -> Result<(), Error> {
    const CAP_SETPCAP: u32 = 8;
    let can = sys::effective_capabilities().map_err(Error::Capabilities)? & (1 << CAP_SETPCAP) != 0;
    if !can {
        info!("no CAP_SETPCAP: the capability bounding set stays as it is");
        return Ok(());
    }
    for cap in 0..64 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            Ok(_) => {}
            // Past the last capability this kernel knows.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
            Err(source) => return Err(Error::Bounding { cap, source }),
        }
    }
    Ok(())
}

/// Hooks for the confinement's own tests, read from the environment at start-up, before any
/// guest is connected: nothing a guest sends can trigger them.
#[derive(Debug, Default)]
pub struct TestHooks {
    /// `LIVESNAP_BLK_TEST_FORBIDDEN_SYSCALL=1`: a thread started after the confinement tries to
    /// exec, which the filter must block (the process dies, naming `execve`).
    forbidden_syscall: bool,
    /// `LIVESNAP_BLK_TEST_OPEN=PATH`: after the confinement, opening PATH for reading is tried
    /// and its outcome logged (Landlock must refuse a path outside the process's own files).
    open: Option<OsString>,
    /// `LIVESNAP_BLK_TEST_PANIC=1`: a thread started after the confinement panics, as qcow2-rs
    /// may under `catch_unwind`; the panic message (and, with `RUST_BACKTRACE`, the backtrace)
    /// must be printed without a blocked call, and the process must go on.
    panic: bool,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        TestHooks {
            forbidden_syscall: std::env::var_os("LIVESNAP_BLK_TEST_FORBIDDEN_SYSCALL").is_some_and(|v| v == "1"),
            open: std::env::var_os("LIVESNAP_BLK_TEST_OPEN"),
            panic: std::env::var_os("LIVESNAP_BLK_TEST_PANIC").is_some_and(|v| v == "1"),
        }
    }

    /// Runs the hooks that were asked for; call after [`Plan::apply`].
    pub fn run(&self) {
        if let Some(path) = &self.open {
            let path = PathBuf::from(path);
            match std::fs::File::open(&path) {
                Ok(_) => warn!(path = %path.display(), "test hook: opened"),
                Err(e) => warn!(path = %path.display(), error = %e, "test hook: cannot open"),
            }
        }
        if self.panic {
            let spawned = std::thread::Builder::new().name("test-hook".into()).spawn(|| {
                let joined = std::thread::Builder::new()
                    .name("test-panic".into())
                    .spawn(|| panic!("test hook: a panic in a confined thread"))
                    .map(std::thread::JoinHandle::join);
                match joined {
                    Ok(Err(_)) => warn!("test hook: the panic was caught"),
                    Ok(Ok(())) => warn!("test hook: no panic"),
                    Err(e) => warn!(error = %e, "test hook: cannot start its thread"),
                }
            });
            if let Err(e) = spawned {
                warn!(error = %e, "test hook: cannot start its thread");
            }
        }
        if self.forbidden_syscall {
            let spawned = std::thread::Builder::new().name("test-hook".into()).spawn(|| {
                warn!("test hook: calling execve");
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                // SAFETY: a NUL-terminated path and null-terminated argument and environment
                // arrays, all alive for the call.
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                warn!(error = %io::Error::last_os_error(), "test hook: execve returned");
            });
            if let Err(e) = spawned {
                warn!(error = %e, "test hook: cannot start its thread");
            }
        }
    }
}
