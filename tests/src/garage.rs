//! A real Garage object store on loopback for a test, started and stopped by `ci/garage.sh`
//! (one node with replication 1, or three with replication 3). Stopped when dropped.
//!
//! The binary is `$GARAGE`, else `garage` on `PATH`, else `~/.cargo/bin/garage`; a test that
//! needs it fails, never skips, when it is missing (`cargo install --locked --version 2.5.0
//! garage`; `ci/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livesnap_repo::{Credentials, S3Options, S3Url};

use crate::programs;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Program(#[from] programs::Error),
    #[error("Cannot run ci/garage.sh")]
    Spawn(#[source] std::io::Error),
    #[error("ci/garage.sh {args} failed: {stderr}")]
    Script { args: String, stderr: String },
    #[error("Cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Repo(#[from] livesnap_repo::store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A running store: bucket `livesnap`, a key allowed to read and write it.
#[derive(Debug)]
pub struct Garage {
    dir: PathBuf,
    garage: PathBuf,
    pub nodes: u32,
    /// `http://127.0.0.1:PORT` of node 1.
    pub endpoint: String,
    pub bucket: String,
    /// The credentials file (mode 0600).
    pub credentials: PathBuf,
}

/// Garage's region name (its `s3_region`).
pub const REGION: &str = "garage";

impl Garage {
    /// Starts `nodes` (1 or 3) nodes with their files under `dir` (a new directory).
    pub fn start(dir: &Path, nodes: u32) -> Result<Garage> {
        let garage = programs::garage()?;
        let g = Garage {
            dir: dir.to_owned(),
            garage,
            nodes,
            endpoint: String::new(),
            bucket: String::new(),
            credentials: dir.join("credentials"),
        };
        let mut g = g;
        if let Err(e) = g.script(&["start", &dir.display().to_string(), &nodes.to_string()]) {
            let _ = g.script(&["stop", &dir.display().to_string()]);
            return Err(e);
        }
        g.endpoint = g.read("endpoint")?;
        g.bucket = g.read("bucket")?;
        Ok(g)
    }

    fn read(&self, name: &str) -> Result<String> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|source| Error::Read { path, source })
    }

    fn script(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(programs::workspace_root().join("ci/garage.sh"))
            .args(args)
            .env("GARAGE", &self.garage)
            .output()
            .map_err(Error::Spawn)?;
        if !out.status.success() {
            return Err(Error::Script {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// The pid of node `n` (1-based).
    pub fn pid(&self, n: u32) -> Result<i32> {
        let s = self.read(&format!("node{n}/pid"))?;
        s.parse().map_err(|_| Error::Script { args: format!("pid of node {n}"), stderr: s })
    }

    /// SIGKILLs node `n` and waits until it is gone.
    pub fn kill(&self, n: u32) -> Result<()> {
        let pid = self.pid(n)?;
        // SAFETY: kill(2) with a pid ci/garage.sh wrote for a child it started; no memory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        for _ in 0..100 {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return Ok(());
            }
            // The script's background children are re-parented: reap none here; a zombie
            // answers signal 0 until init reaps it, which is quick.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts node `n` again (after [`Garage::kill`]) and waits until it answers.
    pub fn restart(&self, n: u32) -> Result<()> {
        self.script(&["restart", &self.dir.display().to_string(), &n.to_string()])
    }

    /// Options for a repository under `prefix` of the bucket, with grace period `grace`, few
    /// retries and short timeouts (tests of failures must not wait long).
    pub fn options(&self, prefix: &str, grace: Duration) -> Result<S3Options> {
        let url = S3Url::parse(&format!("s3://{}/{prefix}", self.bucket))?;
        let creds = Credentials::load(&self.credentials)?;
        let mut o = S3Options::new(url, self.endpoint.clone(), REGION.into(), creds);
        o.grace = grace;
        o.retries = 2;
        o.retry_timeout = Duration::from_secs(5);
        o.connect_timeout = Duration::from_secs(2);
        o.timeout = Duration::from_secs(20);
        Ok(o)
    }

    /// The `repository` line of a livesnapd config for `prefix` (a top-level key).
    pub fn repository_line(&self, prefix: &str) -> String {
        format!("repository = \"s3://{}/{prefix}\"\n", self.bucket)
    }

    /// The `[s3]` table of a livesnapd config (after every top-level key).
    pub fn s3_table(&self, grace_secs: u64) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\ncredentials = \"{}\"\ngrace_secs = {grace_secs}\n\
             retries = 2\nretry_timeout_ms = 5000\nrequest_timeout_ms = 20000\n",
            self.endpoint,
            self.credentials.display()
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.script(&["stop", &self.dir.display().to_string()]);
    }
}
