//! Backends under test, run as real processes.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::programs;

/// How long a backend may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A backend process, killed when dropped unless stopped first.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    name: &'static str,
}

impl Daemon {
    /// Spawns `cmd` and waits until every path of `sockets` exists.
    pub fn spawn(name: &'static str, mut cmd: Command, sockets: &[&Path]) -> Result<Self> {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        let mut d = Daemon { child: Some(child), name };
        let start = Instant::now();
        while !sockets.iter().all(|s| s.exists()) {
            if let Some(status) = d.try_wait()? {
                bail!("{name} exited before creating its sockets: {status}");
            }
            if start.elapsed() > START_TIMEOUT {
                bail!("{name} did not create {sockets:?} within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    /// `livesnap-blk` with the given arguments; `sockets` are the disks' socket paths.
    pub fn livesnap_blk(args: &[String], sockets: &[&Path]) -> Result<Self> {
        let mut cmd = Command::new(programs::livesnap_blk()?);
        cmd.args(args);
        Self::spawn("livesnap-blk", cmd, sockets)
    }

    /// `qemu-storage-daemon` exporting `image` (format `raw` or `qcow2`) as vhost-user-blk.
    pub fn qemu_storage_daemon(image: &Path, format: &str, socket: &Path, num_queues: u16) -> Result<Self> {
        Self::qemu_storage_daemon_cache(image, format, socket, num_queues, false)
    }

    /// [`Self::qemu_storage_daemon`], with `direct`: `cache.direct=on,aio=io_uring` (QEMU's
    /// `cache=none` done asynchronously), else through the page cache with its thread pool.
    pub fn qemu_storage_daemon_cache(
        image: &Path,
        format: &str,
        socket: &Path,
        num_queues: u16,
        direct: bool,
    ) -> Result<Self> {
        let cache = if direct { "cache.direct=on,aio=io_uring" } else { "cache.direct=off,aio=threads" };
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={},{cache}", image.display()))
            .arg("--blockdev")
            .arg(format!("driver={format},node-name=disk0,file=file0"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ));
        Self::spawn("qemu-storage-daemon", cmd, &[socket])
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// Sends `signal` and waits for the exit, at most `timeout`.
    pub fn stop(mut self, signal: i32, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
        unsafe { libc::kill(pid, signal) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {timeout:?} of signal {signal}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A livesnapd config for one VM `vm`: state, repository and restores under `dir`, the local socket at
/// `socket`, the VM's livesnap-blk control socket, and its agent on guest port `agent_port`
/// behind the hybrid vsock socket `vsock`.
pub fn livesnapd_config(dir: &Path, socket: &Path, vm: &str, control: &Path, vsock: &Path, agent_port: u32) -> String {
    let d = dir.display();
    format!(
        "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n\n\
         [[vm]]\nname = \"{vm}\"\ncontrol = \"{}\"\nagent = {{ vsock = \"{}:{agent_port}\" }}\n",
        socket.display(),
        control.display(),
        vsock.display()
    )
}
