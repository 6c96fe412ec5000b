//! livesnapd's configuration: a TOML file, checked whole before the daemon starts.
//!
//! ```toml
//! repository = "/var/lib/livesnap/repo"     # created (empty directory) if missing; or
//! # repository = "s3://BUCKET/PREFIX"       # an S3-compatible object store, with [s3] below
//! socket = "/run/livesnap/livesnapd.sock"   # local clients (snapctl), mode 0600, no token
//! state = "/var/lib/livesnap/livesnapd.redb"
//! # restore_dir = "/var/lib/livesnap/restore" # restores write only beneath it (created, 0700)
//! # kek = "/etc/livesnap/kek"              # wraps the VMs' keys (`livesnapd key create-kek`)
//!
//! [tcp]                                     # optional: orchestrators, TLS and a bearer token
//! listen = "0.0.0.0:7736"
//! cert = "/etc/livesnap/tls/cert.pem"
//! key = "/etc/livesnap/tls/key.pem"
//! token_file = "/etc/livesnap/token"
//!
//! # [metrics]                               # optional: Prometheus' GET /metrics over HTTP
//! # listen = "127.0.0.1:9187"
//! # repository_count_secs = 3600            # how often the repository's size is counted
//!
//! # [s3]                                    # only with an s3:// repository
//! # endpoint = "https://s3.example.net"     # or http://127.0.0.1:3900
//! # region = "garage"
//! # credentials = "/etc/livesnap/s3.credentials"  # mode 0600: access_key_id = "…",
//! #                                               # secret_access_key = "…"
//! # grace_secs = 86400                      # gc keeps unreferenced chunks this long; a backup
//! #                                         # must commit within half of it (same on every host)
//! # request_timeout_ms = 60000              # one request
//! # retries = 4                             # per request, with backoff, within retry_timeout_ms
//! # retry_timeout_ms = 30000
//!
//! [defaults]
//! freeze_timeout_ms = 10000                 # the agent's lease when a request gives none
//! # read_bytes_per_sec = 0                  # bound on reading frozen bases (0: none)
//! # restore_bytes_per_sec = 0               # bound on a live restore's background copy (0: none;
//! #                                         # chunks a guest request waits for are never held)
//!
//! [[vm]]
//! name = "web01"
//! control = "/run/livesnap/web01/control.sock"
//! agent = { vsock = "/run/livesnap/web01/vsock.sock:7735" }   # or { cid = 3, port = 7735 }
//! # key = "/etc/livesnap/keys/web01.key"  # encrypt its backups (`livesnapd key create`)
//! ```
//!
//! Key files are read when the daemon opens (and by `livesnapd check-config`), not here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::vsock::HybridAddr;
use livesnap_repo::validate_name;
use livesnap_repo::S3Url;

/// Where restores go when the config names no `restore_dir`.
pub const DEFAULT_RESTORE_DIR: &str = "/var/lib/livesnap/restore";
/// The agent port the guest agent listens on by default.
pub const DEFAULT_AGENT_PORT: u32 = 7735;
const MAX_FREEZE_TIMEOUT_MS: u64 = 10 * 60 * 1000;

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
    Invalid { path: PathBuf, reason: String },
    #[error("The config file `{}` is invalid", path.display())]
    VmName {
        path: PathBuf,
        #[source]
        source: livesnap_repo::Error,
    },
    #[error("Cannot read the token file `{}`", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The token in `{}` is shorter than 16 characters", path.display())]
    ShortToken { path: PathBuf },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    repository: String,
    socket: PathBuf,
    state: PathBuf,
    /// Where qcow2 bases were once unpacked for reading; they are read in place now. Still
    /// accepted, so that an older config loads; ignored.
    #[allow(dead_code)]
    scratch: Option<PathBuf>,
    s3: Option<S3File>,
    restore_dir: Option<PathBuf>,
    kek: Option<PathBuf>,
    tcp: Option<TcpFile>,
    metrics: Option<MetricsFile>,
    #[serde(default)]
    defaults: DefaultsFile,
    #[serde(default)]
    vm: Vec<VmFile>,
    scheduler: Option<super::schedule::SchedulerFile>,
    #[serde(default)]
    schedule: Vec<super::schedule::ScheduleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3File {
    endpoint: String,
    region: String,
    credentials: PathBuf,
    grace_secs: Option<u64>,
    request_timeout_ms: Option<u64>,
    retries: Option<u32>,
    retry_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpFile {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    token_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: String,
    repository_count_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsFile {
    freeze_timeout_ms: Option<u64>,
    read_bytes_per_sec: Option<u64>,
    restore_bytes_per_sec: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    name: String,
    control: PathBuf,
    agent: Option<AgentFile>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    vsock: Option<String>,
    cid: Option<u32>,
    port: Option<u32>,
    unix: Option<PathBuf>,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub repository: RepositoryConfig,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// Restores write only beneath it: a client names a path inside it.
    pub restore_dir: PathBuf,
    /// The key-encryption key that wraps the VMs' keys.
    pub kek: Option<PathBuf>,
    pub tcp: Option<Tcp>,
    /// The Prometheus endpoint; `None`: off.
    pub metrics: Option<Metrics>,
    pub freeze_timeout: Duration,
    /// Bound on the rate frozen bases are read at; `None`: as fast as the repository takes.
    pub read_bytes_per_sec: Option<u64>,
    /// Bound on the rate a live restore's background copy reads chunks at; `None`: none.
    /// Chunks a guest request waits for are never held back.
    pub restore_bytes_per_sec: Option<u64>,
    pub vms: Vec<VmConfig>,
    /// Scheduled jobs that run at once, at most ([`super::schedule`]).
    pub max_jobs: usize,
    /// Schedules and retention, per group of VMs.
    pub schedules: Vec<super::schedule::Schedule>,
}

/// Where the backup repository is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepositoryConfig {
    /// A local directory.
    Dir(PathBuf),
    /// A prefix of a bucket in an S3-compatible object store.
    S3(S3Config),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub url: S3Url,
    pub endpoint: String,
    pub region: String,
    /// The credentials file (read when the daemon opens the repository).
    pub credentials: PathBuf,
    pub grace: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub retry_timeout: Duration,
}

impl std::fmt::Display for RepositoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepositoryConfig::Dir(p) => write!(f, "{}", p.display()),
            RepositoryConfig::S3(s) => write!(f, "{} at {}", s.url, s.endpoint),
        }
    }
}

/// Default grace period of an object store's garbage collection: a day.
pub const DEFAULT_GRACE_SECS: u64 = 24 * 3600;
const MAX_GRACE_SECS: u64 = 30 * 24 * 3600;

#[derive(Clone, Debug)]
pub struct Tcp {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub token_file: PathBuf,
}

/// Default interval between two counts of the repository's size (a walk of the chunk
/// directories, or a LIST of the bucket's chunks).
pub const DEFAULT_REPOSITORY_COUNT_SECS: u64 = 3600;
const REPOSITORY_COUNT_SECS: std::ops::RangeInclusive<u64> = 60..=7 * 24 * 3600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// Where `GET /metrics` is served (plain HTTP: bind it to an address only the scraper reaches).
    pub listen: SocketAddr,
    /// How often the repository's size is counted; between two counts, each backup adds what it
    /// stored.
    pub repository_count: Duration,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    /// The control socket of the VM's livesnap-blk.
    pub control: PathBuf,
    pub agent: Option<AgentEndpoint>,
    /// The key file its backups are encrypted with (wrapped by the config's `kek`); `None`:
    /// not encrypted.
    pub key: Option<PathBuf>,
}

/// Where a VM's agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A guest port behind a hybrid vsock unix socket (Cloud Hypervisor, Firecracker,
    /// vhost-device-vsock).
    Hybrid(HybridAddr),
    /// A guest's CID and port over AF_VSOCK.
    Vsock { cid: u32, port: u32 },
    /// A plain unix socket (an agent run with `--unix`; tests).
    Unix(PathBuf),
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::Hybrid(a) => write!(f, "hybrid vsock {}:{}", a.path.display(), a.port),
            AgentEndpoint::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            AgentEndpoint::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
        Config::parse(path, &text)
    }

    /// Parses and checks `text`; `path` names the file in errors and anchors nothing (every
    /// path in the file must be absolute).
    pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
        let f: File =
            toml::from_str(text).map_err(|source| Error::Parse { path: path.to_owned(), source: Box::new(source) })?;
        let invalid = |reason: String| Error::Invalid { path: path.to_owned(), reason };
        let absolute = |what: &str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(invalid(format!("{what} `{}` must be an absolute path", p.display())))
            }
        };
        let repository = if f.repository.starts_with("s3://") {
            let url = S3Url::parse(&f.repository).map_err(|e| invalid(format!("repository: {e}")))?;
            let s3 = f.s3.ok_or_else(|| invalid("an s3:// repository needs an [s3] table".into()))?;
            let endpoint_ok = ["http://", "https://"].iter().any(|p| {
                s3.endpoint.strip_prefix(p).is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace))
            });
            if !endpoint_ok {
                return Err(invalid(format!("s3.endpoint {:?} is not an http:// or https:// URL", s3.endpoint)));
            }
            if s3.region.is_empty() || !s3.region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(invalid(format!("s3.region {:?} is not a region name", s3.region)));
            }
            absolute("s3.credentials", &s3.credentials)?;
            let grace = s3.grace_secs.unwrap_or(DEFAULT_GRACE_SECS);
            let min = livesnap_repo::store::s3::MIN_GRACE.as_secs();
            if !(min..=MAX_GRACE_SECS).contains(&grace) {
                return Err(invalid(format!("s3.grace_secs {grace} is not from {min} to {MAX_GRACE_SECS}")));
            }
            let ms = |what: &str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
                v @ 1..=3_600_000 => Ok(Duration::from_millis(v)),
                v => Err(invalid(format!("s3.{what} {v} is not from 1 to 3600000"))),
            };
            let retries = s3.retries.unwrap_or(4);
            if retries > 20 {
                return Err(invalid(format!("s3.retries {retries} is more than 20")));
            }
            RepositoryConfig::S3(S3Config {
                url,
                endpoint: s3.endpoint,
                region: s3.region,
                credentials: s3.credentials,
                grace: Duration::from_secs(grace),
                request_timeout: ms("request_timeout_ms", s3.request_timeout_ms, 60_000)?,
                retries,
                retry_timeout: ms("retry_timeout_ms", s3.retry_timeout_ms, 30_000)?,
            })
        } else {
            if f.s3.is_some() {
                return Err(invalid("[s3] goes with an s3:// repository".into()));
            }
            let p = PathBuf::from(&f.repository);
            absolute("repository", &p)?;
            RepositoryConfig::Dir(p)
        };
        absolute("socket", &f.socket)?;
        absolute("state", &f.state)?;
        let restore_dir = f.restore_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_RESTORE_DIR));
        absolute("restore_dir", &restore_dir)?;
        if let Some(k) = &f.kek {
            absolute("kek", k)?;
        }
        let tcp = match f.tcp {
            None => None,
            Some(t) => {
                let listen = t.listen.parse().map_err(|_| {
                    invalid(format!("tcp.listen {:?} is not an address and port such as 0.0.0.0:7736", t.listen))
                })?;
                absolute("tcp.cert", &t.cert)?;
                absolute("tcp.key", &t.key)?;
                absolute("tcp.token_file", &t.token_file)?;
                Some(Tcp { listen, cert: t.cert, key: t.key, token_file: t.token_file })
            }
        };
        let metrics = match f.metrics {
            None => None,
            Some(m) => {
                let listen = m.listen.parse().map_err(|_| {
                    invalid(format!("metrics.listen {:?} is not an address and port such as 127.0.0.1:9187", m.listen))
                })?;
                let secs = m.repository_count_secs.unwrap_or(DEFAULT_REPOSITORY_COUNT_SECS);
                if !REPOSITORY_COUNT_SECS.contains(&secs) {
                    return Err(invalid(format!(
                        "metrics.repository_count_secs {secs} is not from {} to {}",
                        REPOSITORY_COUNT_SECS.start(),
                        REPOSITORY_COUNT_SECS.end()
                    )));
                }
                Some(Metrics { listen, repository_count: Duration::from_secs(secs) })
            }
        };
        let freeze_ms = f.defaults.freeze_timeout_ms.unwrap_or(10_000);
        if freeze_ms == 0 || freeze_ms > MAX_FREEZE_TIMEOUT_MS {
            return Err(invalid(format!(
                "defaults.freeze_timeout_ms {freeze_ms} is not from 1 to {MAX_FREEZE_TIMEOUT_MS}"
            )));
        }
        let mut names = HashSet::new();
        // Two VMs on one backend would checkpoint each other's change maps.
        let mut controls: HashMap<PathBuf, String> = HashMap::new();
        let mut vms = Vec::with_capacity(f.vm.len());
        for v in f.vm {
            validate_name("VM", &v.name).map_err(|source| Error::VmName { path: path.to_owned(), source })?;
            if !names.insert(v.name.clone()) {
                return Err(invalid(format!("VM {} is configured twice", v.name)));
            }
            absolute(&format!("vm {}: control", v.name), &v.control)?;
            if let Some(other) = controls.insert(v.control.clone(), v.name.clone()) {
                return Err(invalid(format!(
                    "VMs {other} and {} name the same backend control socket `{}`",
                    v.name,
                    v.control.display()
                )));
            }
            let agent = match v.agent {
                None => None,
                Some(a) => Some(agent_endpoint(&v.name, a).map_err(invalid)?),
            };
            if let Some(k) = &v.key {
                absolute(&format!("vm {}: key", v.name), k)?;
                if f.kek.is_none() {
                    return Err(invalid(format!(
                        "vm {}: a key file is wrapped by a key-encryption key: name it with kek = \"PATH\"",
                        v.name
                    )));
                }
            }
            vms.push(VmConfig { name: v.name, control: v.control, agent, key: v.key });
        }
        let (max_jobs, schedules) = super::schedule::check(f.scheduler, f.schedule, &vms).map_err(invalid)?;
        Ok(Config {
            repository,
            socket: f.socket,
            state: f.state,
            restore_dir,
            kek: f.kek,
            tcp,
            metrics,
            freeze_timeout: Duration::from_millis(freeze_ms),
            read_bytes_per_sec: f.defaults.read_bytes_per_sec.filter(|&r| r > 0),
            restore_bytes_per_sec: f.defaults.restore_bytes_per_sec.filter(|&r| r > 0),
            vms,
            max_jobs,
            schedules,
        })
    }

    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The schedule `vm` is in, if any (one at most).
    pub fn schedule_of(&self, vm: &str) -> Option<&super::schedule::Schedule> {
        self.schedules.iter().find(|s| s.vms.iter().any(|v| v == vm))
    }
}

fn agent_endpoint(vm: &str, a: AgentFile) -> Result<AgentEndpoint, String> {
    match (a.vsock, a.cid, a.unix) {
        (Some(s), None, None) => {
            if a.port.is_some() {
                return Err(format!(
                    "vm {vm}: agent.port goes with agent.cid; with vsock the port follows the path (PATH:PORT)"
                ));
            }
            let addr: HybridAddr = s.parse().map_err(|e| format!("vm {vm}: agent.vsock {e}"))?;
            if !addr.path.is_absolute() {
                return Err(format!("vm {vm}: agent.vsock `{}` must be an absolute path", addr.path.display()));
            }
            Ok(AgentEndpoint::Hybrid(addr))
        }
        (None, Some(cid), None) => {
            // 0, 1 and 2 are the hypervisor, the local and the host's CIDs, never a guest's.
            if cid < 3 || cid == u32::MAX {
                return Err(format!("vm {vm}: agent.cid {cid} is not a guest CID (3 to 4294967294)"));
            }
            Ok(AgentEndpoint::Vsock { cid, port: a.port.unwrap_or(DEFAULT_AGENT_PORT) })
        }
        (None, None, Some(p)) => {
            if a.port.is_some() {
                return Err(format!("vm {vm}: agent.port goes with agent.cid"));
            }
            if !p.is_absolute() {
                return Err(format!("vm {vm}: agent.unix `{}` must be an absolute path", p.display()));
            }
            Ok(AgentEndpoint::Unix(p))
        }
        (None, None, None) => {
            Err(format!("vm {vm}: agent needs one of vsock = \"PATH:PORT\", cid = N or unix = \"PATH\""))
        }
        _ => Err(format!("vm {vm}: agent takes only one of vsock, cid and unix")),
    }
}

/// Reads the bearer token: the file's first line, without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Token { path: path.to_owned(), source })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.len() < 16 {
        return Err(Error::ShortToken { path: path.to_owned() });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(Path::new("/etc/livesnap/livesnapd.toml"), text)
    }

    const BASE: &str = "repository = \"/r\"\nsocket = \"/s.sock\"\nstate = \"/var/lib/l/state.redb\"\n";

    #[test]
    fn a_full_config_parses_with_every_agent_kind() {
        let c = parse(
            &format!(
                "{BASE}[tcp]\nlisten = \"127.0.0.1:7736\"\ncert = \"/c\"\nkey = \"/k\"\ntoken_file = \"/t\"\n\
             [defaults]\nfreeze_timeout_ms = 5000\n\
             [[vm]]\nname = \"a\"\ncontrol = \"/a.sock\"\nagent = {{ vsock = \"/v.sock:7735\" }}\n\
             [[vm]]\nname = \"b\"\ncontrol = \"/b.sock\"\nagent = {{ cid = 5 }}\n\
             [[vm]]\nname = \"c\"\ncontrol = \"/c.sock\"\nkey = \"/k/c.key\"\n\
             "
            )
            .replacen("state", "kek = \"/etc/livesnap/kek\"\nstate", 1),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.freeze_timeout, Duration::from_secs(5));
        assert_eq!(c.restore_dir, PathBuf::from(DEFAULT_RESTORE_DIR));
        assert_eq!(c.vms.len(), 3);
        assert_eq!(c.vms[0].agent, Some(AgentEndpoint::Hybrid(HybridAddr { path: "/v.sock".into(), port: 7735 })));
        assert_eq!(c.vms[1].agent, Some(AgentEndpoint::Vsock { cid: 5, port: DEFAULT_AGENT_PORT }));
        assert_eq!(c.vms[2].agent, None);
        assert_eq!((c.vms[1].key.as_deref(), c.vms[2].key.as_deref()), (None, Some(Path::new("/k/c.key"))));
        assert_eq!(c.kek.as_deref(), Some(Path::new("/etc/livesnap/kek")));
        assert!(c.tcp.is_some());
        assert_eq!(c.metrics, None, "no [metrics]: the endpoint is off");
    }

    #[test]
    fn a_metrics_table_names_the_endpoint_and_its_bounds_are_checked() {
        let c = parse(&format!("{BASE}[metrics]\nlisten = \"127.0.0.1:9187\"\n")).unwrap_or_else(|e| panic!("{e}"));
        let want = Metrics {
            listen: "127.0.0.1:9187".parse().unwrap_or_else(|e| panic!("{e}")),
            repository_count: Duration::from_secs(DEFAULT_REPOSITORY_COUNT_SECS),
        };
        assert_eq!(c.metrics, Some(want));
        let cases = [
            (format!("{BASE}[metrics]\nlisten = \"localhost\"\n"), "metrics.listen"),
            (format!("{BASE}[metrics]\nlisten = \"[::1]:1\"\nrepository_count_secs = 1\n"), "repository_count_secs 1"),
            (format!("{BASE}[metrics]\nlisten = \"[::1]:1\"\npath = \"/m\"\n"), "not valid"),
        ];
        for (text, want) in cases {
            let e = parse(&text).err().unwrap_or_else(|| panic!("accepted: {text}")).to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        let cases = [
            (
                format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\n[[vm]]\nname = \"a\"\ncontrol = \"/b\"\n"),
                "twice",
            ),
            (format!("{BASE}[[vm]]\nname = \"../x\"\ncontrol = \"/a\"\n"), "name"),
            (
                format!(
                    "{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/c.sock\"\n[[vm]]\nname = \"b\"\ncontrol = \"//c.sock\"\n"
                ),
                "VMs a and b name the same backend control socket",
            ),
            (format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"rel.sock\"\n"), "absolute"),
            (format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\nagent = {{ cid = 2 }}\n"), "guest CID"),
            (
                format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\nagent = {{ vsock = \"/v\" }}\n"),
                "<unix-socket-path>:<port>",
            ),
            (
                format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\nagent = {{ cid = 3, vsock = \"/v:1\" }}\n"),
                "only one",
            ),
            (
                format!("{BASE}[tcp]\nlisten = \"nowhere\"\ncert = \"/c\"\nkey = \"/k\"\ntoken_file = \"/t\"\n"),
                "tcp.listen",
            ),
            (format!("{BASE}[defaults]\nfreeze_timeout_ms = 0\n"), "freeze_timeout_ms"),
            (format!("{BASE}colour = 1\n"), "not valid"),
            (format!("{BASE}restore_dir = \"restore\"\n"), "restore_dir `restore` must be an absolute path"),
            (format!("{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\nkey = \"/a.key\"\n"), "kek = \"PATH\""),
            (format!("kek = \"/kek\"\n{BASE}[[vm]]\nname = \"a\"\ncontrol = \"/a\"\nkey = \"a.key\"\n"), "vm a: key"),
            (format!("kek = \"kek\"\n{BASE}"), "kek `kek` must be an absolute path"),
        ];
        for (text, want) in cases {
            let e = parse(&text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            let chain = format!("{e} {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            assert!(chain.contains(want), "{want:?} not in {chain:?}");
        }
    }

    #[test]
    fn an_s3_repository_needs_its_table_and_takes_its_defaults() {
        const S3: &str = "socket = \"/s.sock\"\nstate = \"/var/lib/l/state.redb\"\n";
        let c = parse(&format!(
            "repository = \"s3://backups/fleet/a\"\n{S3}[s3]\nendpoint = \"http://127.0.0.1:3900\"\n\
             region = \"garage\"\ncredentials = \"/etc/c\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let RepositoryConfig::S3(s) = &c.repository else { panic!("{:?}", c.repository) };
        assert_eq!((s.url.bucket.as_str(), s.url.prefix.as_str()), ("backups", "fleet/a"));
        assert_eq!(s.grace, Duration::from_secs(DEFAULT_GRACE_SECS));
        assert_eq!(c.repository.to_string(), "s3://backups/fleet/a at http://127.0.0.1:3900");
        let table = "[s3]\nendpoint = \"http://h:1\"\nregion = \"r\"\ncredentials = \"/c\"\n";
        let cases = [
            (format!("repository = \"s3://backups/x\"\n{S3}"), "needs an [s3] table"),
            (format!("repository = \"s3://B/x\"\n{S3}{table}"), "bucket"),
            (format!("repository = \"s3://bucket/../x\"\n{S3}{table}"), "prefix"),
            (format!("repository = \"/r\"\n{S3}{table}"), "goes with an s3://"),
            (format!("repository = \"s3://bucket/x\"\n{S3}{}", table.replace("http://h:1", "ftp://h")), "endpoint"),
            (format!("repository = \"s3://bucket/x\"\n{S3}{}", table.replace("\"/c\"", "\"c\"")), "absolute"),
            (format!("repository = \"s3://bucket/x\"\n{S3}{table}grace_secs = 1\n"), "grace_secs"),
            (format!("repository = \"s3://bucket/x\"\n{S3}{table}retries = 99\n"), "retries"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_token_shorter_than_16_characters_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("token");
        std::fs::write(&path, "  short  \n")?;
        assert!(matches!(read_token(&path), Err(Error::ShortToken { .. })));
        std::fs::write(&path, "  0123456789abcdef  \nsecond line\n")?;
        assert_eq!(read_token(&path)?, "0123456789abcdef");
        Ok(())
    }
}
