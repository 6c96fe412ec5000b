//! The command line of livesnap-blk.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

use crate::disk::Format;

/// vhost-user block backend of livesnap: serves the disks of one VM, one socket per disk.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Name of the VM whose disks this process serves (for logs).
    #[arg(long)]
    pub vm: String,

    /// A disk: id=ID,image=PATH,socket=PATH[,format=raw|qcow2][,readonly=on|off].
    /// The format is detected from the image when not given. Repeat for each disk.
    #[arg(long = "disk", required = true)]
    pub disks: Vec<DiskSpec>,

    /// Most queues a frontend may use per disk, each served by its own thread
    /// (default: the number of host CPUs).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: Option<u16>,

    /// Directory for snapshot state: the snapshot record, deltas and change maps. Without it,
    /// disks are served without snapshots or change tracking.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Unix socket of the snapshot control service (gRPC); needs --state-dir.
    #[arg(long, value_name = "PATH", requires = "state_dir")]
    pub control: Option<PathBuf>,

    /// Most bytes a snapshot's delta may hold per disk before the snapshot is abandoned
    /// (default: no limit but the filesystem's free space).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub delta_limit: Option<u64>,

    /// Once the images, the state directory and the sockets are open, run as this user: a name
    /// or a number, and a group after a colon (default: the user's own group). The state
    /// directory must be writable by that user.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<UserSpec>,

    /// Confinement once started (no new privileges, no capabilities, Landlock, a seccomp
    /// allow-list). `off` is for debugging only: it leaves a guest that takes over the process
    /// free to reach the host.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub sandbox: bool,
}

/// The `--user` argument: a user and an optional group, each a name or a number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub user: String,
    pub group: Option<String>,
}

impl FromStr for UserSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let valid = |v: &str| !v.is_empty() && !v.contains(['\0', ':']);
        if !valid(user) || group.is_some_and(|g| !valid(g)) {
            return Err(format!("expected USER or USER:GROUP, got {s:?}"));
        }
        Ok(UserSpec { user: user.to_owned(), group: group.map(str::to_owned) })
    }
}

/// One `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub format: Option<Format>,
    pub readonly: bool,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut id, mut image, mut socket, mut format, mut readonly) = (None, None, None, None, None);
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("expected key=value, got {part:?}"))?;
            let dup = match key {
                "id" => id.replace(value.to_string()).is_some(),
                "image" => image.replace(PathBuf::from(value)).is_some(),
                "socket" => socket.replace(PathBuf::from(value)).is_some(),
                "format" => format.replace(value.parse::<Format>()?).is_some(),
                "readonly" => readonly.replace(parse_bool(value)?).is_some(),
                _ => return Err(format!("unknown disk option {key:?}")),
            };
            if dup {
                return Err(format!("disk option {key:?} given twice"));
            }
        }
        let id = id.ok_or("disk needs id=")?;
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("disk id {id:?} must be 1 to 20 of [A-Za-z0-9_-] (it is the guest's serial)"));
        }
        Ok(DiskSpec {
            id,
            image: image.ok_or("disk needs image=")?,
            socket: socket.ok_or("disk needs socket=")?,
            format,
            readonly: readonly.unwrap_or(false),
        })
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {v:?}")),
    }
}

impl Args {
    /// Checks what clap cannot: disks must not share an id, an image or a socket.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        for d in &self.disks {
            for (what, key) in [
                ("id", d.id.clone()),
                ("image", d.image.display().to_string()),
                ("socket", d.socket.display().to_string()),
            ] {
                if !seen.insert((what, key.clone())) {
                    return Err(format!("two disks share the {what} {key}"));
                }
            }
        }
        Ok(())
    }

    pub fn num_queues(&self) -> usize {
        match self.queues {
            Some(q) => usize::from(q),
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_parses_all_options() {
        let d: DiskSpec = "id=vdb,image=/dev/vg0/data,socket=/run/s.sock,format=raw,readonly=on".parse().unwrap();
        assert_eq!(d.id, "vdb");
        assert_eq!(d.image, PathBuf::from("/dev/vg0/data"));
        assert_eq!(d.format, Some(Format::Raw));
        assert!(d.readonly);
        let d: DiskSpec = "id=vda,image=a.qcow2,socket=s".parse().unwrap();
        assert_eq!((d.format, d.readonly), (None, false));
    }

    #[test]
    fn bad_disk_specs_say_what_is_wrong() {
        for (spec, what) in [
            ("image=a,socket=s", "needs id"),
            ("id=a,socket=s", "needs image"),
            ("id=a,image=a", "needs socket"),
            ("id=a,image=a,socket=s,colour=red", "unknown disk option"),
            ("id=a,id=b,image=a,socket=s", "given twice"),
            ("id=a,image=a,socket=s,format=vmdk", "unknown image format"),
            ("id=a,image=a,socket=s,readonly=maybe", "expected on or off"),
            ("id=this-id-is-longer-than-twenty,image=a,socket=s", "1 to 20"),
            ("id=a,image", "key=value"),
        ] {
            let err = spec.parse::<DiskSpec>().unwrap_err();
            assert!(err.contains(what), "{spec}: {err}");
        }
    }

    #[test]
    fn user_spec_parses_user_and_group() {
        let u: UserSpec = "nobody".parse().unwrap();
        assert_eq!(u, UserSpec { user: "nobody".into(), group: None });
        let u: UserSpec = "65534:65534".parse().unwrap();
        assert_eq!(u, UserSpec { user: "65534".into(), group: Some("65534".into()) });
        for bad in ["", ":", "a:", ":b", "a:b:c"] {
            assert!(bad.parse::<UserSpec>().unwrap_err().contains("USER:GROUP"), "{bad:?}");
        }
    }

    #[test]
    fn sandbox_is_on_unless_turned_off() {
        let base = ["livesnap-blk", "--vm", "v", "--disk", "id=a,image=x,socket=s"];
        assert!(Args::try_parse_from(base).unwrap().sandbox);
        let off = Args::try_parse_from(base.iter().copied().chain(["--sandbox", "off"])).unwrap();
        assert!(!off.sandbox);
    }

    #[test]
    fn disks_sharing_a_socket_are_refused() {
        let args = Args::try_parse_from([
            "livesnap-blk",
            "--vm",
            "v",
            "--disk",
            "id=a,image=x,socket=s",
            "--disk",
            "id=b,image=y,socket=s",
        ])
        .unwrap();
        assert!(args.validate().unwrap_err().contains("socket"));
    }
}
