//! The seccomp-bpf allow-list of a running livesnap-blk, and the SIGSYS handler that names a
//! blocked system call before the process dies.
//!
//! The list is what the process was seen to call once confined (`strace -f` over the whole test
//! suite: QEMU guests, snapshots, merges, change maps, control calls, reconnects, qcow2,
//! io_uring, SIGTERM), and nothing else: no exec, no fork, no new sockets, no mounts, no
//! ptrace, no privilege calls, no executable memory. A call outside it raises SIGSYS
//! (`SECCOMP_RET_TRAP`); the handler writes `livesnap-blk: blocked syscall NAME (NR)` to stderr
//! and the process dies of SIGSYS.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::syscall_names::NAMES;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filters are not supported on {0}")]
    Arch(&'static str),
    #[error("Cannot build the seccomp filter")]
    Build(#[source] BackendError),
    #[error("Cannot install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
}

/// Called from the SIGSYS handler to die when the first blocked call could not kill: never on
/// the allow-list (a unit test checks).
const SENTINEL: libc::c_long = libc::SYS_getppid;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: Op, value: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Qword, op, value)
}

fn one(conds: Vec<Cond>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conds)
}

/// ioctls a confined livesnap-blk makes: discarding and zeroing ranges of a block-device
/// image.
const IOCTLS: [u64; 2] = [0x1277 /* BLKDISCARD */, 0x127f /* BLKZEROOUT */];

/// `fcntl` commands: reading descriptor flags, duplicating with close-on-exec, and sealing the
/// memfd of vhost-user's in-flight region (`INFLIGHT_SHMFD`).
const FCNTLS: [libc::c_int; 4] = [libc::F_GETFD, libc::F_DUPFD_CLOEXEC, libc::F_ADD_SEALS, libc::F_GET_SEALS];

/// The allow-list: every syscall with the conditions under which it may run (none: always).
pub fn allow_list(pid: libc::pid_t) -> Result<Rules, BackendError> {
    let mut rules: Rules = BTreeMap::new();
    let mut allow = |nrs: &[libc::c_long]| {
        for &nr in nrs {
            rules.insert(nr, Vec::new());
        }
    };
    // Memory, threads, time, signals of its own.
    allow(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        // glibc installs its thread signal handlers at the first pthread_create.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_sigaltstack,
        // abort(3) (a double panic, a failed assertion in qcow2-rs) signals itself with
        // tgkill(getpid(), ...): it must die of SIGABRT, not of a blocked getpid.
        libc::SYS_getpid,
        // A panic's backtrace (RUST_BACKTRACE) prints paths relative to the working directory
        // and looks for the executable (Landlock refuses to open it: the frames stay
        // unnamed); qcow2-rs panics are caught and the process goes on, so printing one must
        // not kill it.
        libc::SYS_getcwd,
        libc::SYS_readlinkat,
        // glibc tries clone3 first; the second filter makes it fail with ENOSYS, and glibc
        // then uses clone, whose flags this one checks.
        libc::SYS_clone3,
    ]);
    // Files it holds open and the state directory (Landlock says which files).
    allow(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_writev,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_getdents64,
    ]);
    // Sockets it already listens on, eventfds, epoll, io_uring.
    allow(&[
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_getpeername,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        // The in-flight region of vhost-user's INFLIGHT_SHMFD is a memfd made per frontend.
        libc::SYS_memfd_create,
    ]);
    // The same calls under their older names where the architecture has them.
    #[cfg(target_arch = "x86_64")]
    allow(&[libc::SYS_epoll_wait, libc::SYS_unlink, libc::SYS_readlink]);
    #[cfg(not(target_arch = "x86_64"))]
    allow(&[libc::SYS_epoll_pwait, libc::SYS_unlinkat]);

    // New threads only: a clone without CLONE_THREAD would be a fork.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![one(vec![cond(0, Op::MaskedEq(thread), thread)?])?]);
    // Memory, never executable: no new code can be mapped in.
    let exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(nr, vec![one(vec![cond(2, Op::MaskedEq(exec), 0)?])?]);
    }
    // Signals to its own threads only (panics abort through tgkill).
    rules.insert(libc::SYS_tgkill, vec![one(vec![cond(0, Op::Eq, pid as u64)?])?]);
    // Thread names.
    rules.insert(libc::SYS_prctl, vec![one(vec![cond(0, Op::Eq, libc::PR_SET_NAME as u64)?])?]);
    rules
        .insert(libc::SYS_ioctl, IOCTLS.iter().map(|&req| one(vec![cond(1, Op::Eq, req)?])).collect::<Result<_, _>>()?);
    rules.insert(
        libc::SYS_fcntl,
        FCNTLS.iter().map(|&cmd| one(vec![cond(1, Op::Eq, cmd as u64)?])).collect::<Result<_, _>>()?,
    );
    Ok(rules)
}

fn target_arch() -> Result<TargetArch, Error> {
    std::env::consts::ARCH.try_into().map_err(|_| Error::Arch(std::env::consts::ARCH))
}

/// Installs the allow-list on every thread of the process: first the filter that turns clone3
/// into ENOSYS (its arguments sit behind a pointer, out of seccomp's sight), then the list.
pub fn apply(pid: libc::pid_t) -> Result<(), Error> {
    let arch = target_arch()?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(Error::Build)?;
    let list = allow_list(pid)
        .and_then(|rules| SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch))
        .and_then(BpfProgram::try_from)
        .map_err(Error::Build)?;
    install_sigsys_handler()?;
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(Error::Apply)?;
    seccompiler::apply_filter_all_threads(&list).map_err(Error::Apply)
}

/// `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: sigaction is plain data; all-zero is a valid value (an empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the handler is async-signal-safe (see `on_sigsys`); `action` is valid for the call.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes the line naming the blocked call, then dies of SIGSYS. Async-signal-safe: no
/// allocation, no lock, only write(2) of a stack buffer and raw system calls.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; SigsysInfo is the
    // layout of its SIGSYS variant, and only read when seccomp raised it.
    let nr = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code == SYS_SECCOMP).then_some(info.syscall)
    };
    let mut buf = [0u8; 96];
    let len = format_line(&mut buf, nr);
    // SAFETY: writes `len` initialised bytes of `buf` to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    // SIGSYS is blocked inside its own handler; a second blocked call makes the kernel reset
    // it to its default action and deliver it: the process dies of SIGSYS.
    // SAFETY: getppid takes no arguments.
    unsafe { libc::syscall(SENTINEL) };
    // SAFETY: _exit is async-signal-safe; reached only if the sentinel was not blocked.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// The name of syscall `nr` on this architecture.
pub fn name_of(nr: i32) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// `livesnap-blk: blocked syscall NAME (NR)\n` into `buf`; returns its length.
fn format_line(buf: &mut [u8], nr: Option<i32>) -> usize {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&bytes[..n]);
        at += n;
    };
    match nr {
        Some(nr) => {
            put(b"livesnap-blk: blocked syscall ");
            put(name_of(nr).unwrap_or("unknown").as_bytes());
            put(b" (");
            let mut digits = [0u8; 12];
            let mut i = digits.len();
            let negative = nr < 0;
            let mut v = nr.unsigned_abs();
            loop {
                i -= 1;
                digits[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            if negative {
                i -= 1;
                digits[i] = b'-';
            }
            put(&digits[i..]);
            put(b")\n");
        }
        None => put(b"livesnap-blk: SIGSYS received\n"),
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(nr: Option<i32>) -> String {
        let mut buf = [0u8; 96];
        let n = format_line(&mut buf, nr);
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn the_line_names_the_call_and_its_number() {
        let execve = i32::try_from(libc::SYS_execve).unwrap();
        assert_eq!(line(Some(execve)), format!("livesnap-blk: blocked syscall execve ({execve})\n"));
        assert_eq!(line(Some(99_999)), "livesnap-blk: blocked syscall unknown (99999)\n");
        assert_eq!(line(Some(-1)), "livesnap-blk: blocked syscall unknown (-1)\n");
        assert_eq!(line(None), "livesnap-blk: SIGSYS received\n");
        assert_eq!(name_of(i32::try_from(libc::SYS_io_uring_enter).unwrap()), Some("io_uring_enter"));
    }

    #[test]
    fn nothing_that_escapes_is_allowed() {
        let rules = allow_list(1).unwrap();
        for (nr, what) in [
            (SENTINEL, "the sentinel"),
            (libc::SYS_execve, "execve"),
            (libc::SYS_execveat, "execveat"),
            (libc::SYS_ptrace, "ptrace"),
            (libc::SYS_socket, "socket"),
            (libc::SYS_connect, "connect"),
            (libc::SYS_bind, "bind"),
            (libc::SYS_mount, "mount"),
            (libc::SYS_setuid, "setuid"),
            (libc::SYS_capset, "capset"),
            (libc::SYS_seccomp, "seccomp"),
            (libc::SYS_process_vm_writev, "process_vm_writev"),
            (libc::SYS_kill, "kill"),
        ] {
            assert!(!rules.contains_key(&nr), "{what} is allowed");
        }
        #[cfg(target_arch = "x86_64")]
        for nr in [libc::SYS_fork, libc::SYS_vfork] {
            assert!(!rules.contains_key(&nr));
        }
        // clone only with CLONE_THREAD, mmap never executable.
        assert_eq!(rules[&libc::SYS_clone].len(), 1);
        assert_eq!(rules[&libc::SYS_mmap].len(), 1);
    }

    #[test]
    fn the_filter_compiles_for_this_architecture() {
        let rules = allow_list(1).unwrap();
        let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, target_arch().unwrap());
        assert!(!BpfProgram::try_from(filter.unwrap()).unwrap().is_empty());
    }
}
