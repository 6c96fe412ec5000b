//! End to end: `livesnap-agent` (the static binary from `ci/package-agent.sh`) runs inside a
//! real QEMU guest whose ext4 disk is served by `livesnap-blk`; the host reaches it over vsock
//! (`vhost-user-vsock-pci` backed by `vhost-device-vsock`, whose unix socket speaks hybrid
//! vsock) with the client of `livesnap-control`.
//!
//! Two test hooks record their calls (in `/run/hooks.log`, on the initramfs: never frozen) and
//! print the record so far; the first one, at `freeze`, starts a writer that waits until the
//! agent is freezing, then writes a file on the frozen disk and prints `WRITE-DONE` when the
//! write returned. So the console shows when a write issued while frozen completed.
//!
//! Needs `ci/install-deps.sh`, `ci/build-guest.sh`, `ci/package-agent.sh` (its stripped static
//! binary `target/debian/livesnap-agent`, or
//! `LIVESNAP_AGENT_STATIC`), `cargo install --locked vhost-device-vsock` (or
//! `VHOST_DEVICE_VSOCK`) and a built `livesnap-blk`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_control::agent::{AgentClient, FsOutcome, HookOutcome, Limits, Target};
use livesnap_control::vsock::HybridAddr;
use livesnap_proto::error::chain;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{vsock_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;

const PORT: u32 = 7735;
const DISK_MIB: u64 = 32;

fn mkfs(image: &Path) {
    let f = std::fs::File::create(image).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    let mkfs =
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].into_iter().find(|p| Path::new(p).is_file()).unwrap_or("mkfs.ext4");
    let st = Command::new(mkfs).args(["-F", "-q"]).arg(image).status().unwrap();
    assert!(st.success());
}

/// A test hook: records `<name> <phase>` and prints the record so far; `extra` runs after.
fn hook(name: &str, extra: &str) -> GuestFile {
    let script = format!(
        "#!/bin/sh\necho \"{name} $1\" >>/run/hooks.log\necho \"record: $(tr '\\n' , </run/hooks.log)\"\n{extra}\n"
    );
    GuestFile { path: format!("/etc/livesnap/hooks.d/{name}"), contents: script.into_bytes(), mode: 0o755 }
}

/// At freeze: a writer that waits for the agent's state file (written just before FIFREEZE),
/// lets the freeze happen, then writes to the frozen disk. For the snapshot id `crash`, also
/// kills the agent (the hook's parent) once the guest is frozen.
const WRITER: &str = r#"if [ "$1" = freeze ]; then
  ( while [ ! -e /run/livesnap-agent/state ]; do sleep 0.1; done
    sleep 1
    echo WRITE-START
    echo "written while frozen" >/mnt/data/while-frozen.txt
    echo WRITE-DONE ) </dev/null >/dev/console 2>&1 &
fi
if [ "$1" = freeze ] && [ "$LIVESNAP_SNAPSHOT_ID" = crash ]; then
  agent=$PPID
  ( while [ ! -e /run/livesnap-agent/state ]; do sleep 0.1; done
    sleep 1
    echo KILLING-AGENT
    kill -9 "$agent" ) </dev/null >/dev/console 2>&1 &
fi"#;

const JOB: &str = r#"set -eux
mkdir -p /mnt/data /run
mount -t ext4 /dev/vda /mnt/data
ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ || true
# Restarted when it dies, as systemd's Restart= does.
( set +e +x
  while true; do
    LIVESNAP_LOG=info /usr/sbin/livesnap-agent --vsock-port 7735 --hook-timeout 20s
    echo "AGENT-EXITED=$?"
    sleep 1
  done ) &
echo AGENT-STARTED
set +x
while true; do sleep 1; done
"#;

struct Setup {
    dir: tempfile::TempDir,
    vsock: Option<Daemon>,
    _blk: Daemon,
    guest: Guest,
    uds: PathBuf,
}

fn boot() -> Setup {
    let dir = tempfile::Builder::new().prefix("livesnap-agent-e2e").tempdir().unwrap();
    let image = dir.path().join("vda.raw");
    mkfs(&image);
    let disk_sock = dir.path().join("vda.sock");
    let blk = Daemon::livesnap_blk(
        &[
            "--vm".into(),
            "agent-e2e".into(),
            "--disk".into(),
            format!("id=vda,image={},socket={}", image.display(), disk_sock.display()),
        ],
        &[disk_sock.as_path()],
    )
    .unwrap();
    let vhost_sock = dir.path().join("vsock-vhost.sock");
    let uds = dir.path().join("vm.vsock");
    let mut cmd = Command::new(programs::vhost_device_vsock().unwrap());
    cmd.arg("--vm").arg(format!("guest-cid=3,socket={},uds-path={}", vhost_sock.display(), uds.display()));
    let vsock = Daemon::spawn("vhost-device-vsock", cmd, &[vhost_sock.as_path()]).unwrap();
    let agent = std::fs::read(programs::agent_static().unwrap()).unwrap();
    let guest = Guest::start(GuestConfig {
        disks: vec![disk_sock],
        job_script: JOB.into(),
        files: vec![
            GuestFile { path: "/usr/sbin/livesnap-agent".into(), contents: agent, mode: 0o755 },
            hook("10-first", WRITER),
            hook("20-second", ""),
            GuestFile {
                path: "/etc/livesnap/hooks.d/30-skipped.dpkg-old".into(),
                contents: b"#!/bin/sh\nexit 1\n".to_vec(),
                mode: 0o755,
            },
        ],
        extra_args: vsock_args(&vhost_sock),
        console_log: Some(dir.path().join("console.log")),
        timeout: Duration::from_secs(300),
        ..GuestConfig::default()
    })
    .unwrap();
    eprintln!("console in {}", dir.path().join("console.log").display());
    Setup { dir, vsock: Some(vsock), _blk: blk, guest, uds }
}

impl Setup {
    /// Connects and pings until the agent answers.
    async fn client(&mut self) -> AgentClient {
        self.guest.wait_for_console("AGENT-STARTED", Duration::from_secs(120)).unwrap();
        let start = Instant::now();
        loop {
            let target = Target::HybridVsock(HybridAddr { path: self.uds.clone(), port: PORT });
            let limits = Limits {
                connect_timeout: Duration::from_secs(10),
                call_timeout: Duration::from_secs(30),
                ..Limits::default()
            };
            match AgentClient::connect(target, limits).await {
                Ok(c) => match c.ping().await {
                    Ok(p) => {
                        eprintln!("agent {} after {:?}", p.version, start.elapsed());
                        return c;
                    }
                    Err(e) => eprintln!("ping: {}", chain(&e)),
                },
                Err(e) => eprintln!("connect: {}", chain(&e)),
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "the agent never answered; console:\n{}",
                self.guest.console()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn wait(&mut self, needle: &str, timeout: Duration) {
        self.guest.wait_for_console(needle, timeout).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_guest_runs_hooks_in_order_and_holds_writes_until_thaw() {
    let mut s = boot();
    let c = s.client().await;

    let f = c.freeze(Duration::from_secs(60), "e2e-1").await.unwrap();
    let data: Vec<_> = f.filesystems.iter().filter(|f| f.mount_point == "/mnt/data").collect();
    assert_eq!(data.len(), 1, "{:?}", f.filesystems);
    assert_eq!((data[0].outcome.clone(), data[0].fs_type.as_str()), (FsOutcome::Frozen, "ext4"));
    assert!(
        f.filesystems.iter().all(|f| f.fs_type == "ext4"),
        "only the ext4 disk is freezable here: {:?}",
        f.filesystems
    );
    assert_eq!(
        f.hooks.iter().map(|h| (h.name.as_str(), h.phase.as_str(), h.outcome.clone())).collect::<Vec<_>>(),
        [("10-first", "freeze", HookOutcome::Ok), ("20-second", "freeze", HookOutcome::Ok)]
    );
    assert!(c.status().await.unwrap().frozen);

    s.wait("WRITE-START", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!s.guest.console().contains("WRITE-DONE"), "a write completed on a frozen filesystem");

    // snapctl over the same hybrid vsock socket sees the freeze.
    let out = Command::new(programs::snapctl().unwrap())
        .args(["agent", "status", "--json", "--vsock"])
        .arg(format!("{}:{PORT}", s.uds.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["frozen"].as_bool(), v["snapshot_id"].as_str()), (Some(true), Some("e2e-1")));

    let t = c.thaw().await.unwrap();
    assert!(t.was_frozen && t.error.is_empty(), "{t:?}");
    assert_eq!(
        t.filesystems.iter().map(|f| (f.mount_point.as_str(), f.outcome.clone())).collect::<Vec<_>>(),
        [("/mnt/data", FsOutcome::Thawed)]
    );
    s.wait("WRITE-DONE", Duration::from_secs(60));
    // The guest's own record, printed by the last hook to run.
    let last = t.hooks.last().unwrap();
    assert_eq!(last.name, "10-first");
    assert!(
        last.output.contains("record: 10-first freeze,20-second freeze,20-second thaw,10-first thaw,"),
        "{:?}",
        last.output
    );
    assert!(!c.status().await.unwrap().frozen);
    drop(s.dir);
}

/// The host side vanishes mid-freeze (the vsock backend killed, the client gone): the guest
/// thaws by itself at the deadline, and the write held by the freeze completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_vanishing_mid_freeze_leaves_the_lease_to_thaw_the_guest() {
    let mut s = boot();
    let c = s.client().await;
    let deadline = Duration::from_secs(5);
    let f = c.freeze(deadline, "e2e-lease").await.unwrap();
    let frozen_at = Instant::now();
    assert!(f.frozen);
    drop(c);
    if let Some(v) = s.vsock.take() {
        v.stop(libc::SIGKILL, Duration::from_secs(10)).unwrap();
    }
    s.wait("WRITE-START", Duration::from_secs(60));
    // Generous: TCG is slow and CI machines are busy; without the lease this never happens.
    s.wait("WRITE-DONE", Duration::from_secs(60));
    let thawed_after = frozen_at.elapsed();
    eprintln!("thawed by the lease {thawed_after:?} after the freeze reply (deadline {deadline:?})");
    assert!(thawed_after < deadline + Duration::from_secs(45), "the lease thawed {thawed_after:?} after the freeze");
    assert!(s.guest.console().contains("freeze lease expired"), "the agent did not log the lease thaw");
}

/// The agent is killed (SIGKILL) while the guest is frozen with a long deadline: the restarted
/// agent thaws first, long before the lease would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_frozen_thaws_first_when_restarted() {
    let mut s = boot();
    let c = s.client().await;
    let f = c.freeze(Duration::from_secs(600), "crash").await.unwrap();
    assert!(f.frozen);
    s.wait("KILLING-AGENT", Duration::from_secs(60));
    s.wait("AGENT-EXITED", Duration::from_secs(30));
    s.wait("WRITE-DONE", Duration::from_secs(60));
    let console = s.guest.console();
    assert!(console.contains("a previous agent left a freeze"), "the restarted agent did not recover");
    drop(c);
    // The restarted agent serves again and is not frozen; its thaw hooks ran.
    let c = s.client().await;
    let st = c.status().await.unwrap();
    assert!(!st.frozen);
    assert_eq!(st.last_thaw_reason, "restart");
}
