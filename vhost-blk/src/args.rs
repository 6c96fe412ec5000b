//! The command line of livesnap-blk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{CommandFactory, Parser};
use serde::Deserialize;

use crate::disk::{Cache, Format};

/// vhost-user block backend of livesnap: serves the disks of one VM, one socket per disk.
///
/// Every option may also come from a TOML file (`--config`); an option given on the command line
/// wins over the file's.
#[derive(Debug, Parser)]
#[command(name = "livesnap-blk", version, about)]
struct Cli {
    /// Read the options from this TOML file (`vm`, `queues`, `state_dir`, `control`,
    /// `delta_limit`, `user`, `sandbox` and one `[[disk]]` table per disk with `id`, `image`,
    /// `socket`, `format`, `readonly`, `cache`); the command line's options win over the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Name of the VM whose disks this process serves (for logs).
    #[arg(long)]
    vm: Option<String>,

    /// A disk: id=ID,image=PATH,socket=PATH[,format=raw|qcow2][,readonly=on|off]
    /// [,cache=writeback|none]. The format is detected from the image when not given;
    /// cache=none (raw images only) bypasses the host's page cache (O_DIRECT), writeback is the
    /// default. Repeat for each disk.
    #[arg(long = "disk")]
    disks: Vec<DiskSpec>,

    /// Most queues a frontend may use per disk, each served by its own thread
    /// (default: the number of host CPUs).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES))]
    queues: Option<u16>,

    /// Directory for snapshot state: the snapshot record, deltas and change maps. Without it,
    /// disks are served without snapshots or change tracking.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Unix socket of the snapshot control service (gRPC); needs --state-dir.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Most bytes a snapshot's delta may hold per disk before the snapshot is abandoned
    /// (default: no limit but the filesystem's free space).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    delta_limit: Option<u64>,

    /// Once the images, the state directory and the sockets are open, run as this user: a name
    /// or a number, and a group after a colon (default: the user's own group). The state
    /// directory must be writable by that user.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<UserSpec>,

    /// Confinement once started (no new privileges, no capabilities, Landlock, a seccomp
    /// allow-list; default: on). `off` is for debugging only: it leaves a guest that takes over
    /// the process free to reach the host.
    #[arg(long, value_name = "on|off", value_parser = parse_bool, action = clap::ArgAction::Set)]
    sandbox: Option<bool>,
}

const MAX_QUEUES: i64 = 64;

/// What livesnap-blk was told to do: the command line over the `--config` file.
#[derive(Debug)]
pub struct Args {
    /// Name of the VM whose disks this process serves (for logs).
    pub vm: String,
    pub disks: Vec<DiskSpec>,
    pub queues: Option<u16>,
    pub state_dir: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub delta_limit: Option<u64>,
    pub user: Option<UserSpec>,
    pub sandbox: bool,
    /// The `--config` file's options that the command line replaced with another value (for
    /// the log: a unit's options win over what an operator wrote in the file).
    pub overridden: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the config file `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The config file `{}` is not valid", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("The config file `{}` is invalid: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The `--config` file as written: the command line's options, under their long names with
/// `_` for `-`, and one `[[disk]]` table per disk.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileArgs {
    vm: Option<String>,
    queues: Option<i64>,
    state_dir: Option<PathBuf>,
    control: Option<PathBuf>,
    delta_limit: Option<u64>,
    user: Option<String>,
    sandbox: Option<bool>,
    #[serde(default)]
    disk: Vec<FileDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    id: String,
    image: PathBuf,
    socket: PathBuf,
    format: Option<String>,
    readonly: Option<bool>,
    cache: Option<String>,
}

impl Args {
    /// Parses the process's command line and its `--config` file; prints help or the version
    /// and exits when asked, as clap does.
    pub fn load() -> Result<Args, Error> {
        Args::resolve(Cli::parse())
    }

    /// As [`Args::load`], from `args` (the first being the program's name).
    pub fn try_load_from<I, T>(args: I) -> Result<Args, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Args::resolve(Cli::try_parse_from(args).map_err(|e| Error::Invalid(e.to_string()))?)
    }

    fn resolve(cli: Cli) -> Result<Args, Error> {
        let file = match &cli.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })?;
                Some((path.clone(), parse_file(path, &text)?))
            }
            None => None,
        };
        let (path, file) = file.unwrap_or_default();
        let from_file = !path.as_os_str().is_empty();
        if !cli.disks.is_empty() && !file.disks.is_empty() {
            return Err(Error::Invalid(format!(
                "Disks are given both on the command line and in `{}`: give them in one place",
                path.display()
            )));
        }
        let vm_overridden = differs(&cli.vm, &file.vm);
        let vm = cli.vm.or(file.vm).ok_or_else(|| {
            Error::Invalid(if from_file {
                format!("No VM name: give --vm or vm = \"NAME\" in `{}`", path.display())
            } else {
                "No VM name: give --vm NAME".to_owned()
            })
        })?;
        let disks = if cli.disks.is_empty() { file.disks } else { cli.disks };
        let mut overridden = Vec::new();
        let mut note = |name: &'static str, differs: bool| {
            if differs {
                overridden.push(name);
            }
        };
        note("vm", vm_overridden);
        note("queues", differs(&cli.queues, &file.queues));
        note("state_dir", differs(&cli.state_dir, &file.state_dir));
        note("control", differs(&cli.control, &file.control));
        note("delta_limit", differs(&cli.delta_limit, &file.delta_limit));
        note("user", differs(&cli.user, &file.user));
        note("sandbox", differs(&cli.sandbox, &file.sandbox));
        if disks.is_empty() {
            return Err(Error::Invalid("No disk to serve: give --disk, or [[disk]] tables in a --config file".into()));
        }
        let args = Args {
            vm,
            disks,
            queues: cli.queues.or(file.queues),
            state_dir: cli.state_dir.or(file.state_dir),
            control: cli.control.or(file.control),
            delta_limit: cli.delta_limit.or(file.delta_limit),
            user: cli.user.or(file.user),
            sandbox: cli.sandbox.or(file.sandbox).unwrap_or(true),
            overridden,
        };
        args.validate().map_err(Error::Invalid)?;
        Ok(args)
    }
}

/// Whether the command line's `cli` replaces the file's `file` with another value.
fn differs<T: PartialEq>(cli: &Option<T>, file: &Option<T>) -> bool {
    cli.is_some() && file.is_some() && cli != file
}

/// The options a `--config` file gives, checked as the command line's are.
#[derive(Debug, Default)]
pub(crate) struct FileOptions {
    pub(crate) vm: Option<String>,
    pub(crate) queues: Option<u16>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) control: Option<PathBuf>,
    pub(crate) delta_limit: Option<u64>,
    pub(crate) user: Option<UserSpec>,
    pub(crate) sandbox: Option<bool>,
    pub(crate) disks: Vec<DiskSpec>,
}

/// Parses and checks a `--config` file's text; `path` names it in errors. Every path in it must
/// be absolute: a unit's working directory says nothing about where the file meant.
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<FileOptions, Error> {
    let f: FileArgs =
        toml::from_str(text).map_err(|source| Error::Parse { path: path.to_owned(), source: Box::new(source) })?;
    let invalid = |reason: String| Error::InvalidFile { path: path.to_owned(), reason };
    let absolute = |what: &str, p: &Path| {
        if p.is_absolute() {
            Ok(())
        } else {
            Err(invalid(format!("{what} `{}` must be an absolute path", p.display())))
        }
    };
    let queues = match f.queues {
        None => None,
        Some(q) => match u16::try_from(q) {
            Ok(q) if (1..=MAX_QUEUES).contains(&i64::from(q)) => Some(q),
            _ => return Err(invalid(format!("queues {q} is not from 1 to {MAX_QUEUES}"))),
        },
    };
    if f.delta_limit == Some(0) {
        return Err(invalid("delta_limit must be at least 1 byte".into()));
    }
    for (what, p) in [("state_dir", &f.state_dir), ("control", &f.control)] {
        if let Some(p) = p {
            absolute(what, p)?;
        }
    }
    let user = f.user.map(|u| u.parse::<UserSpec>().map_err(|e| invalid(format!("user: {e}")))).transpose()?;
    let mut disks = Vec::with_capacity(f.disk.len());
    for d in f.disk {
        absolute(&format!("disk {}: image", d.id), &d.image)?;
        absolute(&format!("disk {}: socket", d.id), &d.socket)?;
        let format =
            d.format.map(|s| s.parse::<Format>()).transpose().map_err(|e| invalid(format!("disk {}: {e}", d.id)))?;
        let cache =
            d.cache.map(|s| s.parse::<Cache>()).transpose().map_err(|e| invalid(format!("disk {}: {e}", d.id)))?;
        let spec =
            DiskSpec::new(d.id, d.image, d.socket, format, d.readonly.unwrap_or(false), cache.unwrap_or_default())
                .map_err(invalid)?;
        disks.push(spec);
    }
    Ok(FileOptions {
        vm: f.vm,
        queues,
        state_dir: f.state_dir,
        control: f.control,
        delta_limit: f.delta_limit,
        user,
        sandbox: f.sandbox,
        disks,
    })
}

/// livesnap-blk's whole command line, with `ctl` and `recover`, for the man pages and the shell
/// completions (`xtask`).
pub fn command() -> clap::Command {
    Cli::command().subcommand(crate::ctl::command().name("ctl")).subcommand(crate::recover::command().name("recover"))
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
    /// How the host caches the image.
    pub cache: Cache,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut id, mut image, mut socket, mut format, mut readonly, mut cache) = (None, None, None, None, None, None);
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("expected key=value, got {part:?}"))?;
            let dup = match key {
                "id" => id.replace(value.to_string()).is_some(),
                "image" => image.replace(PathBuf::from(value)).is_some(),
                "socket" => socket.replace(PathBuf::from(value)).is_some(),
                "format" => format.replace(value.parse::<Format>()?).is_some(),
                "readonly" => readonly.replace(parse_bool(value)?).is_some(),
                "cache" => cache.replace(value.parse::<Cache>()?).is_some(),
                _ => return Err(format!("unknown disk option {key:?}")),
            };
            if dup {
                return Err(format!("disk option {key:?} given twice"));
            }
        }
        let id = id.ok_or("disk needs id=")?;
        let image = image.ok_or("disk needs image=")?;
        let socket = socket.ok_or("disk needs socket=")?;
        DiskSpec::new(id, image, socket, format, readonly.unwrap_or(false), cache.unwrap_or_default())
    }
}

impl DiskSpec {
    /// Checks the id: it is also the guest's serial number of the disk.
    fn new(
        id: String,
        image: PathBuf,
        socket: PathBuf,
        format: Option<Format>,
        readonly: bool,
        cache: Cache,
    ) -> Result<Self, String> {
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("disk id {id:?} must be 1 to 20 of [A-Za-z0-9_-] (it is the guest's serial)"));
        }
        if cache == Cache::None && format == Some(Format::Qcow2) {
            return Err(format!("disk {id}: cache=none is for raw images; a qcow2 image needs cache=writeback"));
        }
        Ok(DiskSpec { id, image, socket, format, readonly, cache })
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
    /// Checks what clap cannot: disks must not share an id, an image or a socket; a control
    /// socket needs a state directory.
    pub fn validate(&self) -> Result<(), String> {
        if self.control.is_some() && self.state_dir.is_none() {
            return Err("A control socket (--control) needs a state directory (--state-dir)".into());
        }
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
        assert_eq!((d.format, d.readonly, d.cache), (None, false, Cache::Writeback));
        let d: DiskSpec = "id=vda,image=a,socket=s,cache=none".parse().unwrap();
        assert_eq!(d.cache, Cache::None);
        let d: DiskSpec = "id=vda,image=a,socket=s,cache=writeback".parse().unwrap();
        assert_eq!(d.cache, Cache::Writeback);
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
            ("id=a,image=a,socket=s,cache=directsync", "unknown cache mode"),
            ("id=a,image=a,socket=s,cache=none,cache=none", "given twice"),
            ("id=a,image=a,socket=s,format=qcow2,cache=none", "cache=none is for raw images"),
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
        assert!(Args::try_load_from(base).unwrap().sandbox);
        let off = Args::try_load_from(base.iter().copied().chain(["--sandbox", "off"])).unwrap();
        assert!(!off.sandbox);
    }

    #[test]
    fn disks_sharing_a_socket_are_refused() {
        let err = Args::try_load_from([
            "livesnap-blk",
            "--vm",
            "v",
            "--disk",
            "id=a,image=x,socket=s",
            "--disk",
            "id=b,image=y,socket=s",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("share the socket"), "{err}");
    }

    fn write_config(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web01.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        (dir, path)
    }

    const CONFIG: &str = "vm = \"web01\"\nqueues = 2\nstate_dir = \"/var/lib/livesnap/vms/web01\"\n\
        control = \"/run/livesnap/vms/web01/control.sock\"\ndelta_limit = 4096\nuser = \"livesnap\"\n\
        [[disk]]\nid = \"vda\"\nimage = \"/images/web01.qcow2\"\nsocket = \"/run/livesnap/vms/web01/vda.sock\"\n\
        format = \"qcow2\"\n[[disk]]\nid = \"vdb\"\nimage = \"/dev/vg0/web01-data\"\n\
        socket = \"/run/livesnap/vms/web01/vdb.sock\"\nreadonly = true\ncache = \"none\"\n";

    #[test]
    fn a_config_file_gives_every_option() {
        let (_dir, path) = write_config(CONFIG);
        let a = Args::try_load_from(["livesnap-blk", "--config", &path]).unwrap();
        assert_eq!(a.vm, "web01");
        assert_eq!(a.queues, Some(2));
        assert_eq!(a.state_dir, Some(PathBuf::from("/var/lib/livesnap/vms/web01")));
        assert_eq!(a.control, Some(PathBuf::from("/run/livesnap/vms/web01/control.sock")));
        assert_eq!(a.delta_limit, Some(4096));
        assert_eq!(a.user, Some(UserSpec { user: "livesnap".into(), group: None }));
        assert!(a.sandbox);
        assert!(a.overridden.is_empty());
        assert_eq!(a.disks.len(), 2);
        assert_eq!(
            (a.disks[0].id.as_str(), a.disks[0].format, a.disks[0].readonly, a.disks[0].cache),
            ("vda", Some(Format::Qcow2), false, Cache::Writeback)
        );
        assert_eq!(
            (a.disks[1].image.as_path(), a.disks[1].format, a.disks[1].readonly, a.disks[1].cache),
            (Path::new("/dev/vg0/web01-data"), None, true, Cache::None)
        );
    }

    #[test]
    fn the_command_line_wins_over_the_config_file() {
        let (_dir, path) = write_config(CONFIG);
        let a = Args::try_load_from([
            "livesnap-blk",
            "--config",
            &path,
            "--vm",
            "other",
            "--queues",
            "3",
            "--user",
            "nobody",
            "--sandbox",
            "off",
        ])
        .unwrap();
        assert_eq!((a.vm.as_str(), a.queues, a.sandbox), ("other", Some(3), false));
        assert_eq!(a.overridden, ["vm", "queues", "user"], "the file gives no sandbox");
        assert_eq!(a.user, Some(UserSpec { user: "nobody".into(), group: None }));
        // What the command line does not give comes from the file.
        assert_eq!(a.delta_limit, Some(4096));
        assert_eq!(a.disks.len(), 2);
        let err = Args::try_load_from(["livesnap-blk", "--config", &path, "--disk", "id=c,image=/c,socket=/c.sock"])
            .unwrap_err();
        assert!(err.to_string().contains("one place"), "{err}");
    }

    #[test]
    fn config_file_mistakes_say_what_is_wrong() {
        let disk = "[[disk]]\nid = \"a\"\nimage = \"/a\"\nsocket = \"/a.sock\"\n";
        for (text, want) in [
            (format!("vm = \"v\"\ncolour = 1\n{disk}"), "not valid"),
            (format!("vm = \"v\"\nqueues = 0\n{disk}"), "queues 0 is not from 1 to 64"),
            (format!("vm = \"v\"\nqueues = 65\n{disk}"), "queues 65"),
            (format!("vm = \"v\"\ndelta_limit = 0\n{disk}"), "delta_limit"),
            (format!("vm = \"v\"\nstate_dir = \"rel\"\n{disk}"), "state_dir `rel` must be an absolute path"),
            (format!("vm = \"v\"\ncontrol = \"/c.sock\"\n{disk}"), "needs a state directory"),
            (format!("vm = \"v\"\nuser = \"a:b:c\"\n{disk}"), "USER:GROUP"),
            (
                "vm = \"v\"\n[[disk]]\nid = \"a\"\nimage = \"a.img\"\nsocket = \"/a.sock\"\n".into(),
                "must be an absolute path",
            ),
            ("vm = \"v\"\n[[disk]]\nid = \"a/b\"\nimage = \"/a\"\nsocket = \"/a.sock\"\n".into(), "1 to 20"),
            (format!("vm = \"v\"\n{disk}format = \"vmdk\"\n"), "unknown image format"),
            (format!("vm = \"v\"\n{disk}cache = \"unsafe\"\n"), "unknown cache mode"),
            (format!("vm = \"v\"\n{disk}{disk}"), "share the id"),
            (disk.to_owned(), "No VM name"),
            ("vm = \"v\"\n".into(), "No disk"),
            ("vm = \"v\"\nqueues = \"many\"\n".into(), "not valid"),
        ] {
            let (_dir, path) = write_config(&text);
            let err = Args::try_load_from(["livesnap-blk", "--config", &path]).unwrap_err();
            let chain = format!("{err} {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
            assert!(chain.contains(want), "{want:?} not in {chain:?} for {text}");
        }
        let err = Args::try_load_from(["livesnap-blk", "--config", "/nonexistent/livesnap.toml"]).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
    }
}
