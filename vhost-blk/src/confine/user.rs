//! `--user`: a user and group, by name or number, looked up before anything is confined.

use std::ffi::{CStr, CString};
use std::io;

use crate::args::UserSpec;

/// Who livesnap-blk runs as once confined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("There is no user {0}")]
    UnknownUser(String),
    #[error("There is no group {0}")]
    UnknownGroup(String),
    #[error("User {0} has no entry in the user database; give its group too, as {0}:GROUP")]
    NoPrimaryGroup(String),
    #[error("Cannot look up {0} in the user database")]
    Lookup(String, #[source] io::Error),
}

/// Resolves `spec`: a user's group defaults to its primary group.
pub fn resolve(spec: &UserSpec) -> Result<Credentials, Error> {
    let (uid, primary) = match spec.user.parse::<libc::uid_t>() {
        Ok(uid) => (uid, passwd_by_uid(uid, &spec.user)?.map(|(_, gid)| gid)),
        Err(_) => {
            let (uid, gid) = passwd_by_name(&spec.user)?.ok_or_else(|| Error::UnknownUser(spec.user.clone()))?;
            (uid, Some(gid))
        }
    };
    let gid = match &spec.group {
        Some(g) => match g.parse::<libc::gid_t>() {
            Ok(gid) => gid,
            Err(_) => group_by_name(g)?.ok_or_else(|| Error::UnknownGroup(g.clone()))?,
        },
        None => primary.ok_or_else(|| Error::NoPrimaryGroup(spec.user.clone()))?,
    };
    Ok(Credentials { uid, gid })
}

/// Calls a reentrant lookup with a growing buffer. Its result pointer is null when there is no
/// such entry.
fn lookup(what: &str, mut call: impl FnMut(&mut [u8]) -> libc::c_int) -> Result<(), Error> {
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Not found is 0 with a null result, but some NSS modules report ENOENT and the like.
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(()),
            e => return Err(Error::Lookup(what.to_owned(), io::Error::from_raw_os_error(e))),
        }
    }
}

fn c_name(name: &str) -> Result<CString, Error> {
    CString::new(name).map_err(|_| Error::UnknownUser(name.to_owned()))
}

fn passwd_by_name(name: &str) -> Result<Option<(libc::uid_t, libc::gid_t)>, Error> {
    let c = c_name(name)?;
    // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut call = |buf: &mut [u8]| {
        // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `buf` is
        // writable for its length, `pw` and `result` are ours.
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut result) }
    };
    lookup(name, &mut call)?;
    Ok((!result.is_null()).then_some((pw.pw_uid, pw.pw_gid)))
}

fn passwd_by_uid(uid: libc::uid_t, shown: &str) -> Result<Option<(libc::uid_t, libc::gid_t)>, Error> {
    // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut call = |buf: &mut [u8]| {
        // SAFETY: `buf` is writable for its length, `pw` and `result` are ours.
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut result) }
    };
    lookup(shown, &mut call)?;
    Ok((!result.is_null()).then_some((pw.pw_uid, pw.pw_gid)))
}

fn group_by_name(name: &str) -> Result<Option<libc::gid_t>, Error> {
    let c = CString::new(name).map_err(|_| Error::UnknownGroup(name.to_owned()))?;
    // SAFETY: group is plain data; all-zero is a valid value to be overwritten.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut call = |buf: &mut [u8]| {
        // SAFETY: as in `passwd_by_name`.
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr().cast(), buf.len(), &mut result) }
    };
    lookup(name, &mut call)?;
    Ok((!result.is_null()).then_some(gr.gr_gid))
}

/// The name of the running user, for logs (`None` if it has no entry).
pub fn name_of(uid: libc::uid_t) -> Option<String> {
    // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `passwd_by_uid`.
    let ret = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if ret != 0 || result.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`, alive here.
    Some(unsafe { CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> UserSpec {
        s.parse().unwrap()
    }

    #[test]
    fn root_resolves_by_name_and_number() {
        assert_eq!(resolve(&spec("root")).unwrap(), Credentials { uid: 0, gid: 0 });
        assert_eq!(resolve(&spec("0")).unwrap(), Credentials { uid: 0, gid: 0 });
        assert_eq!(resolve(&spec("root:12")).unwrap(), Credentials { uid: 0, gid: 12 });
        assert_eq!(name_of(0).as_deref(), Some("root"));
    }

    #[test]
    fn unknown_users_and_groups_are_named() {
        let e = resolve(&spec("no-such-user-here")).unwrap_err();
        assert_eq!(e.to_string(), "There is no user no-such-user-here");
        let e = resolve(&spec("root:no-such-group-here")).unwrap_err();
        assert_eq!(e.to_string(), "There is no group no-such-group-here");
        // A number with no entry needs its group spelt out.
        let e = resolve(&spec("3999999")).unwrap_err();
        assert!(matches!(e, Error::NoPrimaryGroup(_)), "{e}");
        assert_eq!(resolve(&spec("3999999:3999999")).unwrap(), Credentials { uid: 3_999_999, gid: 3_999_999 });
    }
}
