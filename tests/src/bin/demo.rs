//! The demo behind the README's first command: a VM whose disks are served by livesnap-blk
//! writes a file, reboots on the same backend process and reads it back; then the host reads it
//! from the image with its own tools.
//!
//! Needs the guest image (`ci/build-guest.sh`) and QEMU (`ci/install-deps.sh`); `ci/demo.sh`
//! does all of it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{Guest, GuestConfig, GuestRun};

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sbin(name: &str) -> Command {
    let p = Path::new("/usr/sbin").join(name);
    Command::new(if p.is_file() { p.into_os_string() } else { name.into() })
}

fn boot(socket: &Path, job: &str, log: &Path) -> Result<GuestRun> {
    let run = Guest::boot(GuestConfig {
        disks: vec![socket.to_owned()],
        job_script: job.to_string(),
        console_log: Some(log.to_owned()),
        ..GuestConfig::default()
    })?;
    if run.exit_code != 0 {
        bail!("the guest's job failed (exit {}); console in {}", run.exit_code, log.display());
    }
    Ok(run)
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("web01-vda.raw");
    let socket = dir.join("web01-vda.sock");

    step("Creating a 256 MiB ext4 disk image");
    std::fs::File::create(&image)?.set_len(256 << 20)?;
    sh(sbin("mkfs.ext4").args(["-q", "-F", "-L", "demo"]).arg(&image))?;

    step("Starting livesnap-blk for VM web01");
    let args = ["--vm".to_string(), "web01".into(), "--disk".into(),
        format!("id=vda,image={},socket={}", image.display(), socket.display())];
    let backend = Daemon::livesnap_blk(&args, &[&socket])?;
    println!("    serving {} on {}", image.display(), socket.display());

    step("Boot 1: the guest writes /hello.txt on /dev/vda and powers off (QEMU, TCG)");
    let run = boot(&socket, r#"set -e
mount /dev/vda /mnt
echo "hello from web01, written by the guest at boot $(cat /proc/sys/kernel/random/boot_id)" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/blob.bin bs=1M count=8 2>/dev/null
echo "GUEST-SHA=$(sha256sum /mnt/blob.bin | cut -d' ' -f1)"
sync
umount /mnt
"#, &dir.join("boot1.log"))?;
    let sha = run.value("GUEST-SHA").context("the guest printed no checksum")?.to_string();
    println!("    guest wrote /hello.txt and an 8 MiB blob.bin (sha256 {sha})");

    step("Boot 2: a new VM connects to the same backend and reads the file back");
    let run = boot(&socket, r#"set -e
mount -o ro /dev/vda /mnt
echo "GUEST-READ=$(cat /mnt/hello.txt)"
echo "GUEST-SHA=$(sha256sum /mnt/blob.bin | cut -d' ' -f1)"
umount /mnt
"#, &dir.join("boot2.log"))?;
    let read = run.value("GUEST-READ").context("the guest printed nothing")?.to_string();
    println!("    guest read: {read}");
    ensure!(run.value("GUEST-SHA") == Some(sha.as_str()), "blob.bin changed between boots");
    println!("    blob.bin checksum matches");

    step("Stopping livesnap-blk (SIGTERM: finish in-flight requests, flush, exit 0)");
    let status = backend.stop(libc::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "livesnap-blk exited with {status}");

    step("The host checks the image with its own tools");
    sh(sbin("e2fsck").args(["-fn"]).arg(&image))?;
    println!("    e2fsck -fn: clean");
    let host_read = sh(sbin("debugfs").args(["-R", "cat /hello.txt"]).arg(&image))?;
    println!("    debugfs cat /hello.txt: {}", host_read.trim());
    ensure!(host_read.trim() == read, "host and guest disagree on /hello.txt");
    let blob = dir.join("blob.bin");
    sh(sbin("debugfs").args(["-R", &format!("dump /blob.bin {}", blob.display())]).arg(&image))?;
    let host_sha = sh(Command::new("sha256sum").arg(&blob))?;
    let host_sha = host_sha.split_whitespace().next().unwrap_or_default();
    println!("    sha256 of blob.bin read by the host: {host_sha}");
    ensure!(host_sha == sha, "host and guest disagree on blob.bin");
    println!("\nDemo done: the disk served by livesnap-blk kept what the guest wrote. Logs in {}", dir.display());
    Ok(())
}
