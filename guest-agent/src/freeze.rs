//! Which filesystems to freeze: `/proc/self/mountinfo` parsed into a freeze plan.
//!
//! The plan holds every freezable local filesystem once per superblock (bind mounts and a
//! filesystem mounted twice share one `major:minor`), skipping pseudo, read-only and network
//! filesystems. Filesystems are frozen in the reverse order of `mountinfo` (mounts stacked on
//! top of others first, as qemu-ga does) and thawed in the reverse order of the freeze.
//!
//! Nothing here touches a filesystem: the ioctls are in [`crate::sys`], behind [`Freezer`].

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields the plan needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the superblock.
    pub dev: (u32, u32),
    /// Where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `noatime`, ...).
    pub mount_options: String,
    pub fs_type: String,
    /// The mount source, unescaped (e.g. `/dev/vda1`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

/// A filesystem to freeze.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsTarget {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub dev: (u32, u32),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Malformed mountinfo line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
    #[error("Cannot read the mount table")]
    MountTable(#[source] std::io::Error),
}

/// Filesystems with nothing to freeze: kernel interfaces and memory filesystems.
const PSEUDO: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
    "iso9660",
    "nfsd",
    "zram",
];

/// Filesystems whose data lives elsewhere: freezing them would not quiesce anything on our
/// disks, and can hang on a dead server.
const NETWORK: &[&str] =
    &["9p", "afs", "ceph", "cifs", "glusterfs", "lustre", "ncpfs", "nfs", "nfs4", "smb3", "smbfs", "sshfs", "virtiofs"];

/// Whether a filesystem of `fs_type` may be frozen.
fn freezable_type(fs_type: &str) -> bool {
    // fuse: a userspace server, possibly on this very guest, possibly remote; freezing it can
    // deadlock on its own daemon.
    !(PSEUDO.contains(&fs_type) || NETWORK.contains(&fs_type) || fs_type == "fuse" || fs_type.starts_with("fuse."))
}

fn has_option(options: &str, name: &str) -> bool {
    options.split(',').any(|o| o == name)
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash; any `\ooo`). A backslash not followed by three octal digits stays as is.
pub fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Escapes every byte that is not printable ASCII, and backslash, as `\ooo`: the inverse of
/// [`unescape`], used for one-line records (the state file).
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &c in bytes {
        if c.is_ascii_graphic() && c != b'\\' {
            s.push(char::from(c));
        } else {
            s.push_str(&format!("\\{c:03o}"));
        }
    }
    s
}

/// Parses the text of `/proc/self/mountinfo`.
///
/// Format (proc(5)): `id parent major:minor root mount-point mount-options [optional...] -
/// fstype source super-options`; the optional fields end at a lone `-`.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, Error> {
    let mut mounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |reason| Error::Malformed { line: line_no, reason };
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 10 {
            return Err(malformed("fewer than 10 fields"));
        }
        let (major, minor) = fields[2].split_once(':').ok_or_else(|| malformed("no major:minor"))?;
        let dev =
            (major.parse().map_err(|_| malformed("bad major"))?, minor.parse().map_err(|_| malformed("bad minor"))?);
        let sep = fields[6..].iter().position(|f| *f == "-").ok_or_else(|| malformed("no separator"))? + 6;
        if fields.len() < sep + 4 {
            return Err(malformed("missing fields after the separator"));
        }
        mounts.push(MountInfo {
            dev,
            mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
            mount_options: fields[5].to_string(),
            fs_type: fields[sep + 1].to_string(),
            source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
            super_options: fields[sep + 3].to_string(),
        });
    }
    Ok(mounts)
}

/// The freeze plan of `mounts` (in mountinfo order): freezable local read-write filesystems,
/// one mount point per superblock (its first read-write mount), in freeze order.
pub fn plan(mounts: &[MountInfo]) -> Vec<FsTarget> {
    let mut seen = HashSet::new();
    let mut targets = Vec::new();
    for m in mounts {
        if !freezable_type(&m.fs_type) || has_option(&m.super_options, "ro") || has_option(&m.mount_options, "ro") {
            continue;
        }
        // A read-only bind of a read-write filesystem is skipped above; a later read-write mount
        // of the same superblock still gets it into the plan.
        if seen.insert(m.dev) {
            targets.push(FsTarget {
                mount_point: m.mount_point.clone(),
                fs_type: m.fs_type.clone(),
                source: m.source.clone(),
                dev: m.dev,
            });
        }
    }
    targets.reverse();
    targets
}

/// What a freeze of one filesystem did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// We froze it; we must thaw it.
    Frozen,
    /// It was already frozen (`EBUSY`): someone else's freeze, never thawed by us.
    FrozenByOther,
    /// The filesystem cannot be frozen (`EOPNOTSUPP`).
    Unsupported,
}

/// What a thaw of one filesystem did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThawOutcome {
    Thawed,
    /// It was not frozen (`EINVAL`): thawed by someone else, or never frozen.
    NotFrozen,
}

/// Freezes and thaws filesystems. [`crate::sys::SysFreezer`] is the real one; tests use
/// fakes.
pub trait Freezer: Send + Sync + 'static {
    /// The filesystems to freeze, in freeze order.
    fn plan(&self) -> Result<Vec<FsTarget>, Error>;
    fn freeze(&self, mount_point: &Path) -> std::io::Result<FreezeOutcome>;
    fn thaw(&self, mount_point: &Path) -> std::io::Result<ThawOutcome>;
}

/// A path as the bytes the kernel sees, for records.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian 12 VM: ext4 root, a separate /boot, /srv bind-mounted at /var/www (same
    /// superblock), /data mounted twice, an NFS share, a read-only ISO, tmpfs, a path with a
    /// space and a backslash, an ro bind of a rw filesystem, and shared-subtree optional fields.
    const SAMPLE: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 28 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
24 28 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=989224k,nr_inodes=247306,mode=755
26 28 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=201868k,mode=755
28 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
45 28 254:2 / /boot rw,relatime shared:27 - ext2 /dev/vda2 rw
46 28 254:16 / /data rw,noatime shared:28 - xfs /dev/vdb rw,attr2,inode64
47 28 254:1 /srv /var/www rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
48 28 254:16 / /mnt/data\\040copy rw,noatime shared:28 - xfs /dev/vdb rw,attr2,inode64
49 28 0:40 / /mnt/nfs rw,relatime shared:29 - nfs4 host:/export rw,vers=4.2
50 28 11:0 / /media/cdrom ro,relatime shared:30 - iso9660 /dev/sr0 ro
51 28 254:32 / /mnt/ro-bind ro,relatime shared:31 - ext4 /dev/vdc rw
52 28 254:32 / /mnt/a\\134b rw,relatime shared:31 - ext4 /dev/vdc rw
53 28 254:48 / /mnt/sealed rw,relatime shared:32 - ext4 /dev/vdd ro
54 28 0:50 / /home/u/remote rw,nosuid,nodev,relatime shared:33 - fuse.sshfs u@h:/ rw,user_id=0
55 28 0:51 / /mnt/btr rw,relatime shared:34 master:1 - btrfs /dev/vde rw,space_cache=v2
";

    #[test]
    fn mountinfo_sample_parses_with_escapes_and_optional_fields() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(m.len(), 17);
        assert_eq!(m[9].mount_point, PathBuf::from("/mnt/data copy"));
        assert_eq!(m[13].mount_point, PathBuf::from("/mnt/a\\b"));
        assert_eq!(m[16].fs_type, "btrfs");
        assert_eq!(m[16].dev, (0, 51));
        assert_eq!(m[10].source, "host:/export");
        assert_eq!(m[4].super_options, "rw,errors=remount-ro");
    }

    #[test]
    fn plan_keeps_one_rw_local_mount_per_superblock_in_reverse_order() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        let points: Vec<_> = plan(&m).into_iter().map(|t| t.mount_point).collect();
        let want: Vec<PathBuf> = ["/mnt/btr", "/mnt/a\\b", "/data", "/boot", "/"].iter().map(PathBuf::from).collect();
        assert_eq!(points, want);
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for bad in [
            "1 2 3",
            "22 28 021 / /sys rw shared:7 - sysfs sysfs rw",
            "22 28 0:x / /sys rw shared:7 - sysfs sysfs rw",
            "22 28 0:21 / /sys rw shared:7 x sysfs sysfs rw",
            "22 28 0:21 / /sys rw a b c - sysfs",
        ] {
            assert!(parse_mountinfo(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn escape_and_unescape_round_trip_any_bytes() {
        let raw: Vec<u8> = (0..=255u8).collect();
        assert_eq!(unescape(&escape(&raw)), raw);
        assert_eq!(unescape("a\\040b\\"), b"a b\\");
        assert_eq!(unescape("\\777x"), b"\\777x");
        assert_eq!(unescape("\\04"), b"\\04");
    }
}
