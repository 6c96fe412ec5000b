//! The few system calls that std does not wrap: file locks, block-device ioctls, fallocate,
//! direct-I/O alignment (statx), signal masks, and the privilege calls of the confinement
//! (prctl, capabilities, ids).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes a non-blocking `flock`, exclusive or shared.
pub fn lock_file(file: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
    // SAFETY: flock(2) on a file descriptor we own; no memory is passed.
    check(unsafe { libc::flock(file.as_raw_fd(), op) })
}

/// `fallocate(2)` with `mode` on `[offset, offset + len)`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = to_off(offset, len)?;
    // SAFETY: fallocate(2) on a file descriptor we own; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) })
}

/// `BLKDISCARD` or `BLKZEROOUT` on `[offset, offset + len)` of a block device.
pub fn blk_range_ioctl(file: &File, zero: bool, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let req = if zero { BLKZEROOUT } else { BLKDISCARD };
    // SAFETY: both ioctls read a `u64[2]` range from the pointer, which points to `range`, alive
    // for the duration of the call.
    check(unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) })
}

/// Alignment that direct I/O on `file` needs: (memory, file offset and length), from
/// `statx(STATX_DIOALIGN)`; `None` where the kernel or the filesystem does not say.
pub fn dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx(2) with AT_EMPTY_PATH on a descriptor we own and an empty C string; it
    // writes only into `stx`, which lives for the call.
    check(unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) })?;
    Ok((stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align != 0 && stx.stx_dio_offset_align != 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

fn to_off(offset: u64, len: u64) -> io::Result<(libc::off_t, libc::off_t)> {
    let conv = |v: u64| libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    Ok((conv(offset)?, conv(len)?))
}

/// `preadv(2)`/`pwritev(2)` of the whole of `iovs` at `offset`, continuing after short transfers.
///
/// # Safety
/// Every iovec must describe memory valid for reads (writes, when `write` is false: the data
/// read lands there) for the whole call.
pub unsafe fn pv_all(file: &File, iovs: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
    let mut iovs = iovs;
    while !iovs.is_empty() {
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let cnt = iovs.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees the iovecs are valid; `cnt` does not exceed their number.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), cnt, off)
            } else {
                libc::preadv(file.as_raw_fd(), iovs.as_ptr(), cnt, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ended early"));
        }
        offset += n as u64;
        iovs = advance_iovecs(iovs, n as usize);
    }
    Ok(())
}

/// `preadv2(2)` with `RWF_NOWAIT`: reads what the page cache holds without blocking; fails
/// with `WouldBlock` when nothing can be read without waiting for the device.
///
/// # Safety
/// Every iovec must describe memory valid for writes for the whole call.
pub unsafe fn preadv_nowait(file: &File, iovs: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let cnt = iovs.len().min(1024) as libc::c_int;
    // SAFETY: the caller guarantees the iovecs are valid; `cnt` does not exceed their number.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), iovs.as_ptr(), cnt, off, libc::RWF_NOWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Drops the first `n` bytes of `iovs`, in place; returns what is left.
pub fn advance_iovecs(mut iovs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    while let Some(first) = iovs.first_mut() {
        if n < first.iov_len {
            // SAFETY: advancing within the same iovec's buffer by fewer than its length.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
            break;
        }
        n -= first.iov_len;
        iovs = &mut iovs[1..];
    }
    iovs
}

/// Blocks `signals` in the calling thread and in every thread it spawns afterwards.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is an initialised sigset_t; the old mask is not asked for.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals)?;
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid place for the result.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    check(unsafe { libc::sigemptyset(set.as_mut_ptr()) })?;
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    for &s in signals {
        // SAFETY: `set` is initialised; sigaddset validates the signal number.
        check(unsafe { libc::sigaddset(&mut set, s) })?;
    }
    Ok(set)
}

/// `prctl(2)` with one argument; the rest are zero.
pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the options used here take integers only, no pointers.
    let ret = unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the calling thread's effective, permitted and inheritable capability sets.
pub fn clear_capabilities() -> io::Result<()> {
    let header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset(2) reads a version-3 header and two data words from valid pointers.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's effective capability set, as a bit mask.
pub fn effective_capabilities() -> io::Result<u64> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) reads the header and writes two data words, both valid for the call.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | u64::from(data[1].effective) << 32)
}

/// Sets the supplementary groups to none, then the real, effective and saved group and user
/// ids. glibc applies each to every thread of the process.
pub fn switch_user(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: an empty list: no memory is read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// `access(2)` for the real user: whether it may write into and search the directory `path`.
pub fn can_write_dir(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    check(unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) })
}
