//! A libvirt-managed VM on a livesnap-blk disk (issue 14, point 5), with Debian's libvirt
//! (`qemu:///system`, QEMU under TCG, run as the user `libvirt-qemu` in the group `kvm`):
//!
//! - `livesnap-blk` serves a 64 MiB ext4 raw image, its socket in the group `kvm` with mode
//!   0770 as the host package's unit makes it (`Group=kvm`, `UMask=0007`);
//! - the test defines and starts a domain whose disk is `<disk type='vhostuser'>` with shared
//!   memory backing (the XML in the README), booting the test guest's kernel and initrd; its job
//!   appends fsync'd records ([`fsync_log`]) until the test says stop on its second serial port;
//! - `snapctl vm snapshot` backs it up through livesnapd while it writes (no agent: the backup
//!   is crash-consistent), `snapctl backup restore` restores it, and the restored image, after
//!   the journal replay a crash-consistent image needs, holds every record fsync'd before the
//!   snapshot was asked for.
//!
//! Needs libvirt running (`ci/libvirt.sh` installs and starts it), `ci/build-guest.sh` and
//! `cargo build --workspace`. Fails, never skips, when libvirt is not reachable.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_tests::daemon::Daemon;
use livesnap_tests::fsync_log::{self, sbin};
use livesnap_tests::guest::{last_report, BootFiles, GuestConfig};
use livesnap_tests::programs;
use serde_json::Value;

const DISK_MIB: u64 = 64;
const VM: &str = "web01";
const URI: &str = "qemu:///system";
/// Hang guard only: TCG is slow and CI machines are busy. Nothing is asserted on a duration.
const WAIT: Duration = Duration::from_secs(240);

/// The guest's job: a reader of the second serial port (`stop`) and the workload.
const JOB: &str = r#"set -e
mkdir -p /mnt/data
mount -t ext4 /dev/vda /mnt/data
( while read -r cmd; do
    [ "$cmd" = stop ] && touch /tmp/stop
  done ) </dev/ttyS1 &
set +e
LOG=/mnt/data/records.log
echo WORKLOAD-READY
i=0
while [ ! -e /tmp/stop ]; do
  i=$((i + 1))
@APPEND@done
echo "LAST=$i"
umount /mnt/data
echo WORKLOAD-UNMOUNTED
"#;

/// The domain: `@NAME@`, `@KERNEL@`, `@INITRD@`, `@CMDLINE@`, `@DISK@` (livesnap-blk's socket),
/// `@CONSOLE@` (a file), `@SERIAL1@` (a socket the test listens on).
const DOMAIN: &str = r#"<domain type='qemu'>
  <name>@NAME@</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>@KERNEL@</kernel>
    <initrd>@INITRD@</initrd>
    <cmdline>@CMDLINE@</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='1'/>
      <source type='unix' path='@DISK@'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='@CONSOLE@'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='connect' path='@SERIAL1@'/>
      <target port='1'/>
    </serial>
  </devices>
</domain>
"#;

/// `virsh -c qemu:///system ARGS`: exit code, stdout, stderr.
fn virsh(args: &[&str]) -> (i32, String, String) {
    fsync_log::run(Command::new("virsh").args(["-c", URI]).args(args), WAIT).unwrap()
}

/// A defined domain, destroyed and undefined when dropped.
struct Domain {
    name: String,
}

impl Domain {
    fn define(name: &str, xml_path: &Path) -> Domain {
        let (code, out, err) = virsh(&["define", xml_path.to_str().unwrap()]);
        assert_eq!(code, 0, "virsh define: {out}{err}");
        Domain { name: name.into() }
    }

    fn state(&self) -> String {
        let (code, out, err) = virsh(&["domstate", &self.name]);
        assert_eq!(code, 0, "virsh domstate: {err}");
        out.trim().to_owned()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// Polls the console file until `f` holds for it; panics after [`WAIT`].
fn wait_console(console: &Path, what: &str, f: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if f(&text) {
            return text;
        }
        assert!(
            start.elapsed() < WAIT && !text.contains("LIVESNAP-JOB-EXIT="),
            "the guest did not get to {what}; console in {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Accepts QEMU's connection to the guest's second serial port.
fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("QEMU did not connect to the guest's second serial port: {e}"),
        }
    }
}

/// `snapctl --socket SOCKET --json ARGS`, which must succeed: the JSON values it printed (one
/// per event, or one object).
fn snapctl(socket: &Path, args: &[&str]) -> Vec<Value> {
    let snapctl = programs::snapctl().unwrap();
    let (code, out, err) =
        fsync_log::run(Command::new(snapctl).arg("--socket").arg(socket).arg("--json").args(args), WAIT).unwrap();
    assert_eq!(code, 0, "snapctl {args:?} exited {code}: {err}{out}");
    serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("snapctl {args:?}: not JSON ({e}): {out}")))
        .collect()
}

#[test]
fn a_libvirt_domain_on_livesnap_blk_is_backed_up_while_it_writes_and_restored() {
    let (code, out, err) = virsh(&["version"]);
    assert_eq!(code, 0, "libvirt is not reachable at {URI} (ci/libvirt.sh installs and starts it): {out}{err}");

    // QEMU runs as libvirt-qemu: the directory must let it reach the kernel, the initrd and the
    // sockets.
    let dir = tempfile::Builder::new().prefix("livesnap-libvirt").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |n: &str| dir.path().join(n);
    let image = p("web01-vda.raw");
    std::fs::File::create(&image).unwrap().set_len(DISK_MIB << 20).unwrap();
    let (code, _, err) = fsync_log::run(sbin("mkfs.ext4").args(["-q", "-F", "-L", VM]).arg(&image), WAIT).unwrap();
    assert_eq!(code, 0, "mkfs.ext4: {err}");

    // As livesnap-blk@.service runs it: the group kvm and umask 0007, so the disk's socket is
    // srwxrwx--- root:kvm and QEMU (in the group kvm) can connect.
    let (disk_sock, control) = (p("vda.sock"), p("control.sock"));
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 0007; exec setpriv --regid kvm --clear-groups \"$@\"", "sh"])
        .arg(programs::livesnap_blk().unwrap())
        .args(["--vm", VM, "--queues", "1", "--disk"])
        .arg(format!("id=vda,image={},socket={}", image.display(), disk_sock.display()))
        .arg("--state-dir")
        .arg(p("blk-state"))
        .arg("--control")
        .arg(&control)
        .stderr(std::fs::File::create(p("livesnap-blk.log")).unwrap());
    let _blk = Daemon::spawn("livesnap-blk", cmd, &[&disk_sock, &control]).unwrap();
    let mode = std::fs::metadata(&disk_sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o770, "the disk's socket mode");

    let socket = p("livesnapd.sock");
    let config = p("livesnapd.toml");
    let d = dir.path().display();
    // Reading at 16 MiB/s makes the backup last long enough for the guest to write through it.
    std::fs::write(
        &config,
        format!(
            "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n\
             [defaults]\nread_bytes_per_sec = 16777216\n[[vm]]\nname = \"{VM}\"\ncontrol = \"{}\"\n",
            socket.display(),
            control.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(p("livesnapd.log")).unwrap();
    let mut cmd = Command::new(programs::livesnapd().unwrap());
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
    let _livesnapd = Daemon::spawn("livesnapd", cmd, &[&socket]).unwrap();

    let serial1 = p("serial1.sock");
    let listener = UnixListener::bind(&serial1).unwrap();
    std::fs::set_permissions(&serial1, std::fs::Permissions::from_mode(0o777)).unwrap();
    let boot = BootFiles::write(
        &GuestConfig {
            disks: vec![disk_sock.clone()],
            job_script: JOB.replace("@APPEND@", fsync_log::APPEND),
            ..GuestConfig::default()
        },
        dir.path(),
    )
    .unwrap();
    let console = p("console.log");
    let name = format!("livesnap-test-{}", std::process::id());
    let xml = DOMAIN
        .replace("@NAME@", &name)
        .replace("@KERNEL@", &boot.kernel.display().to_string())
        .replace("@INITRD@", &boot.initrd.display().to_string())
        .replace("@CMDLINE@", &boot.cmdline)
        .replace("@DISK@", &disk_sock.display().to_string())
        .replace("@CONSOLE@", &console.display().to_string())
        .replace("@SERIAL1@", &serial1.display().to_string());
    let xml_path = p("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    eprintln!("files in {} (domain.xml, console.log, livesnapd.log, livesnap-blk.log)", dir.path().display());
    let domain = Domain::define(&name, &xml_path);
    let (code, out, err) = virsh(&["start", &name]);
    assert_eq!(code, 0, "virsh start: {out}{err}");
    let mut serial = accept(&listener);
    assert_eq!(domain.state(), "running");

    // The guest writes; the backup is asked for once it has fsync'd a few records.
    let text = wait_console(&console, "record 5", |t| last_report(t, "FSYNCED=") >= 5);
    let before = last_report(&text, "FSYNCED=");
    let events = snapctl(&socket, &["vm", "snapshot", VM]);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "the last event is not done: {events:?}");
    let id = done["backup"]["id"].as_str().unwrap().to_owned();
    let after = last_report(&std::fs::read_to_string(&console).unwrap(), "FSYNCED=");
    eprintln!("records fsync'd: {before} when the snapshot was asked for, {after} when it was done");

    // The guest stops writing, unmounts and powers off; libvirt sees it shut off.
    serial.write_all(b"stop\n").unwrap();
    let text = wait_console(&console, "its unmount", |t| t.contains("WORKLOAD-UNMOUNTED"));
    let last = last_report(&text, "LAST=");
    let start = Instant::now();
    while domain.state() != "shut off" {
        assert!(start.elapsed() < WAIT, "the domain did not shut off: {}", domain.state());
        std::thread::sleep(Duration::from_millis(100));
    }
    // QEMU closed the serial port.
    let mut rest = Vec::new();
    let _ = serial.read_to_end(&mut rest);

    // The live image: clean, every record the guest wrote.
    let (code, out, err) = fsync_log::run(sbin("e2fsck").args(["-fn"]).arg(&image), WAIT).unwrap();
    assert_eq!(code, 0, "e2fsck -fn on the live image: {out}{err}");
    assert_eq!(fsync_log::records_in(&image).unwrap(), last, "the live image's records");

    // The backup: verified, restored, and after the journal replay every record fsync'd before
    // the snapshot was asked for is in it, and none the guest had not begun when it was done.
    let v = snapctl(&socket, &["backup", "verify", VM, &id]);
    assert_eq!(v.last().unwrap()["ok"], true, "verify: {v:?}");
    let restored = p("restored.raw");
    let r = snapctl(&socket, &["backup", "restore", VM, &id, "--disk", "vda", "--to", restored.to_str().unwrap()]);
    assert_eq!(r.last().unwrap()["bytes_total"].as_u64(), Some(DISK_MIB << 20), "{r:?}");
    let (code, out, err) = fsync_log::run(sbin("e2fsck").args(["-fy"]).arg(&restored), WAIT).unwrap();
    assert!(code == 0 || code == 1, "e2fsck -fy on the restored image exited {code}:\n{out}{err}");
    let n = fsync_log::records_in(&restored).unwrap();
    eprintln!("the backup holds records 1..={n}");
    assert!(n >= before, "the backup holds {n} records; {before} were fsync'd before the snapshot");
    assert!(n <= after + 1, "the backup holds {n} records; the guest had begun at most {} when it was done", after + 1);
}
