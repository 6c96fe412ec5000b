//! The demo behind the README's first command: backups of a running VM through livesnapd.
//!
//! A QEMU guest (TCG) whose ext4 disk is served by livesnap-blk (with its snapshot engine:
//! `--state-dir`, `--control`) runs a workload that never stops writing: numbered lines appended
//! to `/log.txt`, each fsync'd, and a rotating set of 32 files of 1 MiB rewritten as it goes. The
//! guest agent runs inside and is reached over hybrid vsock (`vhost-user-vsock-pci` backed by
//! `vhost-device-vsock`); its freeze/thaw hook also prints, on the console, how many lines the
//! log held when the guest froze and thawed. The host runs livesnapd with a configuration the
//! demo writes (the VM `demo`: its livesnap-blk control socket, its agent, a repository under
//! `target/demo/`), and through snapctl, while the guest writes:
//! 1. `snapctl vm snapshot demo`: livesnapd freezes the guest, cuts, thaws, streams the frozen
//!    base into the repository and merges (a full backup, the first);
//! 2. more writes, then `snapctl vm snapshot demo` again: an incremental backup, reading only
//!    what changed;
//! 3. `snapctl backup list`, `snapctl backup verify` of both, `snapctl backup restore` of both;
//!    each restored image must be `e2fsck -fn` clean and its log (read with `debugfs`) must hold
//!    every line the guest reported fsync'd before that snapshot's freeze, and none it wrote after
//!    the thaw;
//! 4. stops the guest cleanly, takes a last snapshot of the idle disk (`--no-quiesce`), restores
//!    it and `qemu-img compare`s the restore with the disk image itself: identical; the final
//!    image is clean and holds every line the guest fsync'd.
//!
//! `--crash-consistent` snapshots with `--no-quiesce` throughout: no agent freeze, the backups are
//! crash-consistent (labelled so), and each restore is repaired (`e2fsck -fy`, a journal replay)
//! before it is checked.
//!
//! Needs what `ci/demo.sh` installs and builds; the tools are found through `LIVESNAP_BLK`,
//! `LIVESNAPD`, `SNAPCTL`, `LIVESNAP_AGENT_STATIC` and `VHOST_DEVICE_VSOCK`, else in `target/`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use livesnap_proto::error::chain;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{serial_args, vsock_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;

const VM: &str = "demo";
const DISK_MIB: u64 = 256;
const AGENT_PORT: u32 = 7735;
/// For hangs only: TCG is slow and the machine may be busy.
const WAIT: Duration = Duration::from_secs(300);
const PROGRESS: &str = "DEMO-FSYNCED=";
const HOOK_FREEZE: &str = "DEMO-HOOK-FREEZE=";
const HOOK_THAW: &str = "DEMO-HOOK-THAW=";

/// The guest's job. Every line of the log is fsync'd before the next one is written; every 10th
/// is reported on the console once its fsync returned. A line on the second serial port stops
/// the workload: it prints the last line it wrote (fsync'd too) and unmounts the disk.
const JOB: &str = r#"set -e
mkdir -p /mnt/data /run
mount -t ext4 /dev/vda /mnt/data
# The guest agent, restarted if it dies (as its systemd unit does).
( while true; do
    LIVESNAP_LOG=warn /usr/sbin/livesnap-agent --vsock-port 7735 --hook-timeout 20s
    echo "AGENT-EXITED=$?"
    sleep 1
  done ) </dev/null &
exec 3</dev/ttyS1
( read -r line <&3; touch /tmp/stop ) &
mkdir -p /mnt/data/files
echo DEMO-READY
i=0
while [ ! -e /tmp/stop ]; do
  i=$((i + 1))
  printf 'demo log line %06d\n' "$i" >>/mnt/data/log.txt
  sync /mnt/data/log.txt
  if [ $((i % 10)) -eq 0 ]; then echo "DEMO-FSYNCED=$i"; fi
  if [ $((i % 20)) -eq 0 ]; then
    dd if=/dev/urandom of=/mnt/data/files/file-$((i / 20 % 32)).bin bs=64k count=16 conv=fsync 2>/dev/null
  fi
done
echo "DEMO-LAST=$i"
umount /mnt/data
echo DEMO-UNMOUNTED
"#;

/// A freeze/thaw hook, as a tenant would install one for a database. This one also prints on
/// the console (the same one the workload reports on) how many lines the log holds: before the
/// filesystems freeze, and after they thaw.
const HOOK: &str = r#"#!/bin/sh
n=$(( $(wc -l </mnt/data/log.txt 2>/dev/null || echo 0) ))
case "$1" in
  freeze) echo "DEMO-HOOK-FREEZE=$n" >/dev/console ;;
  thaw) echo "DEMO-HOOK-THAW=$n" >/dev/console ;;
esac
echo "demo hook, $1 of snapshot $LIVESNAP_SNAPSHOT_ID: the log writer fsyncs every line, nothing to flush"
"#;

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn fact(msg: &str) {
    println!("    {msg}");
}

struct Tools {
    blk: PathBuf,
    livesnapd: PathBuf,
    snapctl: PathBuf,
    agent: PathBuf,
    vsock: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        Ok(Tools {
            blk: programs::livesnap_blk()?,
            livesnapd: programs::livesnapd()?,
            snapctl: programs::snapctl()?,
            agent: programs::agent_static()?,
            vsock: programs::vhost_device_vsock()?,
        })
    }
}

/// Runs a program of the demo's, showing the command (paths relative to the demo directory)
/// and its output; fails with both on a non-zero exit.
struct Shell {
    dir: PathBuf,
}

impl Shell {
    fn shown(&self, cmd: &Command) -> String {
        let prefix = format!("{}/", self.dir.display());
        let prog = Path::new(cmd.get_program()).file_name().unwrap_or_default().to_string_lossy().into_owned();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().replace(&prefix, "")).collect();
        let args: Vec<String> = args.into_iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect();
        format!("{prog} {}", args.join(" "))
    }

    /// Runs `cmd` quietly; its stdout.
    fn run(&self, cmd: &mut Command) -> Result<String> {
        let out = cmd.output().with_context(|| format!("cannot run {}", self.shown(cmd)))?;
        ensure!(
            out.status.success(),
            "`{}` failed ({}):\n{}{}",
            self.shown(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `cmd`, printing it and its output as it comes; its stdout.
    fn show(&self, cmd: &mut Command) -> Result<String> {
        println!("    $ {}", self.shown(cmd));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot run {}", self.shown(cmd)))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let mut out = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read the output")?;
            println!("      {line}");
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait()?;
        let err = err_reader.join().unwrap_or_default();
        for l in err.lines() {
            println!("      {l}");
        }
        ensure!(status.success(), "`{}` failed ({status}): {}", self.shown(cmd), err.trim());
        Ok(out)
    }
}

fn sbin(name: &str) -> Command {
    let p = Path::new("/usr/sbin").join(name);
    Command::new(if p.is_file() { p.into_os_string() } else { name.into() })
}

/// Lines the guest has reported fsync'd in `console`.
fn reported(console: &str) -> u64 {
    livesnap_tests::guest::last_report(console, PROGRESS)
}

/// Lines the guest has reported fsync'd so far.
fn progress(guest: &Guest) -> u64 {
    reported(&guest.console())
}

/// The first `key=N` report at or after byte `from` of the console: where, and N.
fn first_report(console: &str, from: usize, key: &str) -> Option<(usize, u64)> {
    livesnap_tests::guest::reports(console, key).find(|&(at, _)| at >= from)
}

/// The last 30 lines of the console, for errors.
fn console_tail(guest: &Guest) -> String {
    let console = guest.console();
    let tail: Vec<&str> = console.lines().rev().take(30).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Waits until the guest has reported at least `lines` fsync'd; what it reported.
fn wait_progress(guest: &Guest, lines: u64, log: &Path) -> Result<u64> {
    let start = Instant::now();
    loop {
        let p = progress(guest);
        if p >= lines {
            return Ok(p);
        }
        if guest.console().contains("LIVESNAP-JOB-EXIT=") || start.elapsed() > WAIT {
            bail!(
                "the guest did not reach {lines} lines (at {p}); console in {}, its tail:\n{}",
                log.display(),
                console_tail(guest)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The log as the workload writes it: lines `1..=n`, in order, each whole. Its line count.
fn check_log(text: &str, what: &str) -> Result<u64> {
    let mut n = 0u64;
    for (i, line) in text.lines().enumerate() {
        let want = format!("demo log line {:06}", i + 1);
        ensure!(line == want, "{what}: line {} is {line:?}, not {want:?}", i + 1);
        n += 1;
    }
    ensure!(text.is_empty() || text.ends_with('\n'), "{what}: the last line is cut short");
    Ok(n)
}

/// `debugfs -R 'cat /log.txt' IMAGE`.
fn read_log(sh: &Shell, image: &Path) -> Result<String> {
    sh.run(sbin("debugfs").args(["-R", "cat /log.txt"]).arg(image))
}

/// `e2fsck` with `flag`; Ok(exit code) when it is in `ok`.
fn e2fsck(sh: &Shell, flag: &str, image: &Path, ok: &[i32]) -> Result<i32> {
    let mut cmd = sbin("e2fsck");
    cmd.arg(flag).arg(image);
    println!("    $ {}", sh.shown(&cmd));
    let out = cmd.output().context("cannot run e2fsck")?;
    let code = out.status.code().unwrap_or(-1);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    for l in text.lines() {
        println!("      {l}");
    }
    if text.contains("in the future") {
        println!("    (the guest's clock runs a little ahead of the host's: e2fsck only remarks on it)");
    }
    ensure!(ok.contains(&code), "e2fsck {flag} {} exited with {code}: the filesystem is damaged", image.display());
    Ok(code)
}

/// A size as snapctl prints it (`256.00 MiB`, `0 B`), in bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let mut words = s.split_whitespace();
    let n: f64 = words.next()?.parse().ok()?;
    let unit = match words.next()? {
        "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((n * unit as f64) as u64)
}

/// What the summary snapctl prints after a snapshot says.
struct Summary {
    id: String,
    kind: String,
    consistency: String,
    /// Disk vda: size, bytes read, changed.
    size: u64,
    read: u64,
    changed: u64,
}

/// Reads snapctl's summary: `backup ID of demo: KIND, CONSISTENCY` and `  disk vda  SIZE: read R,
/// changed C, stored S`.
fn summary(out: &str) -> Result<Summary> {
    let head = format!(" of {VM}: ");
    let line = out
        .lines()
        .find(|l| l.starts_with("backup ") && l.contains(&head))
        .with_context(|| format!("no summary in snapctl's output:\n{out}"))?;
    let (id, rest) = line["backup ".len()..].split_once(&head).context("summary")?;
    let (kind, consistency) = rest.split_once(", ").unwrap_or((rest, ""));
    let disk = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("disk vda "))
        .with_context(|| format!("no disk vda in snapctl's summary:\n{out}"))?;
    let (size, counts) = disk["disk vda ".len()..].split_once(": ").context("disk line")?;
    let count = |what: &str| -> Result<u64> {
        counts
            .split(", ")
            .find_map(|c| c.strip_prefix(what))
            .and_then(parse_bytes)
            .with_context(|| format!("no {what:?} in {disk:?}"))
    };
    Ok(Summary {
        id: id.to_owned(),
        kind: kind.to_owned(),
        consistency: consistency.to_owned(),
        size: parse_bytes(size.trim()).with_context(|| format!("no size in {disk:?}"))?,
        read: count("read ")?,
        changed: count("changed ")?,
    })
}

fn ctl(tools: &Tools, control: &Path) -> Command {
    let mut c = Command::new(&tools.blk);
    c.arg("ctl").arg("--control").arg(control);
    c
}

fn agent(tools: &Tools, uds: &Path) -> Command {
    let mut c = Command::new(&tools.snapctl);
    c.arg("agent").arg("--vsock").arg(format!("{}:{AGENT_PORT}", uds.display()));
    c
}

/// A `snapctl vm snapshot demo` and what the guest did around it.
struct Taken {
    summary: Summary,
    /// Lines the guest had reported fsync'd before the freeze: on the console before the freeze
    /// hook's report (quiesced), before snapctl was started (crash-consistent).
    before: u64,
    /// The lines of the log when the freeze hook ran (before the filesystems froze) and when the
    /// thaw hook ran (after they thawed); quiesced snapshots only.
    hooks: Option<(u64, u64)>,
    /// Lines reported fsync'd when snapctl returned.
    after: u64,
}

struct Demo<'a> {
    root: &'a Path,
    sh: &'a Shell,
    tools: &'a Tools,
    socket: PathBuf,
    daemon_log: PathBuf,
}

impl Demo<'_> {
    /// snapctl, from the workspace root (relative paths are the README's), reaching livesnapd
    /// through `LIVESNAP_SOCKET`.
    fn snapctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.tools.snapctl);
        c.current_dir(self.root).env("LIVESNAP_SOCKET", &self.socket).args(args);
        c
    }

    fn show(&self, args: &[&str]) -> Result<String> {
        self.sh
            .show(&mut self.snapctl(args))
            .with_context(|| format!("livesnapd's log is {}", self.daemon_log.display()))
    }

    /// `snapctl vm snapshot demo EXTRA`, while the guest writes (or with the guest gone).
    fn snapshot(&self, guest: Option<&Guest>, extra: &[&str]) -> Result<Taken> {
        let from = guest.map_or(0, |g| g.console().len());
        let before = guest.map_or(0, progress);
        let mut args = vec!["vm", "snapshot", VM];
        args.extend_from_slice(extra);
        let out = self.show(&args)?;
        let after = guest.map_or(0, progress);
        let summary = summary(&out)?;
        let Some(guest) = guest.filter(|_| !extra.contains(&"--no-quiesce")) else {
            ensure!(
                summary.consistency.starts_with("crash-consistent"),
                "a snapshot with --no-quiesce is labelled {:?}, not crash-consistent",
                summary.consistency
            );
            return Ok(Taken { summary, before, hooks: None, after });
        };
        ensure!(
            summary.consistency.starts_with("application-consistent"),
            "the snapshot was not quiesced ({}): livesnapd did not freeze the guest through its agent; \
             livesnapd's log is {}",
            summary.consistency,
            self.daemon_log.display()
        );
        // The hooks printed before snapctl returned; the demo's copy of the console follows a
        // moment later.
        let start = Instant::now();
        loop {
            let console = guest.console();
            if let (Some((at, frozen)), Some((_, thawed))) =
                (first_report(&console, from, HOOK_FREEZE), first_report(&console, from, HOOK_THAW))
            {
                let before = reported(&console[..at]);
                return Ok(Taken { summary, before, hooks: Some((frozen, thawed)), after });
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the guest's freeze and thaw hooks did not report on the console; its tail:\n{}",
                console_tail(guest)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Checks a restored image against what the guest did around its snapshot: clean (after a
/// journal replay when crash-consistent), and its log holds lines 1..N with N at least what the
/// guest had reported fsync'd before the freeze (and, quiesced, between the hooks' counts).
fn check_restored(sh: &Shell, image: &Path, t: &Taken, crash: bool) -> Result<u64> {
    let name = image.file_name().unwrap_or_default().to_string_lossy().into_owned();
    if crash {
        fact("crash-consistent: the journal is replayed first, as a mount after a power loss would");
        if e2fsck(sh, "-fy", image, &[0, 1])? == 1 {
            fact("(ext4 updates the superblock's free block and inode counts lazily: e2fsck fixing them after a crash is routine)");
        }
    }
    e2fsck(sh, "-fn", image, &[0])?;
    fact(&format!("e2fsck -fn: {name} is clean"));
    let log = read_log(sh, image)?;
    let n = check_log(&log, &format!("{name}'s /log.txt"))?;
    fact(&format!(
        "$ debugfs -R 'cat /log.txt' {name}: {n} lines, 1..{n} in order and whole (last: {:?})",
        log.lines().last().unwrap_or("")
    ));
    ensure!(n >= t.before, "{name} lacks lines the guest had reported fsync'd before the freeze ({n} < {})", t.before);
    match t.hooks {
        Some((frozen, thawed)) => {
            fact(&format!(
                "the guest had reported lines 1..{} fsync'd before the freeze; the log held {frozen} lines when the \
                 freeze hook ran, {thawed} when the thaw hook ran: {} <= {frozen} <= {n} <= {thawed}",
                t.before, t.before
            ));
            ensure!(n >= frozen, "{name} lacks lines written before the freeze ({n} < {frozen})");
            ensure!(n <= thawed, "{name} holds lines written after the thaw ({n} > {thawed})");
        }
        None => fact(&format!(
            "the guest had reported lines 1..{} fsync'd before snapctl started, 1..{} when it returned",
            t.before, t.after
        )),
    }
    Ok(n)
}

fn main() -> ExitCode {
    let crash_consistent = std::env::args().skip(1).any(|a| a == "--crash-consistent");
    match run(crash_consistent) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo FAILED: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(crash: bool) -> Result<()> {
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    let tools = Tools::find()?;
    let rel = Path::new("target/demo");
    let dir = root.join(rel);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sh = Shell { dir: dir.clone() };
    let image = dir.join("demo-vda.raw");
    let state = dir.join("blk-state");
    std::fs::create_dir(&state)?;
    let disk_sock = dir.join("demo-vda.sock");
    let control = dir.join("control.sock");
    let vhost_vsock = dir.join("vsock-vhost.sock");
    let uds = dir.join("demo.vsock");
    let serial = dir.join("serial1.sock");
    let console_log = dir.join("console.log");
    let socket = dir.join("livesnapd.sock");
    let config = dir.join("livesnapd.toml");
    let daemon_log = dir.join("livesnapd.log");
    println!("livesnap demo: backups of a running VM through livesnapd and snapctl (files in {})", dir.display());

    step(&format!("Creating a {DISK_MIB} MiB ext4 disk image for VM {VM}"));
    std::fs::File::create(&image)?.set_len(DISK_MIB << 20)?;
    sh.run(sbin("mkfs.ext4").args(["-q", "-F", "-L", VM]).arg(&image))?;
    fact(&image.display().to_string());

    step(&format!("Starting livesnap-blk for {VM} with its snapshot engine"));
    let mut blk_cmd = Command::new(&tools.blk);
    blk_cmd
        .args(["--vm", VM, "--disk"])
        .arg(format!("id=vda,image={},socket={}", image.display(), disk_sock.display()))
        .arg("--state-dir")
        .arg(&state)
        .arg("--control")
        .arg(&control);
    let blk_log = dir.join("livesnap-blk.log");
    blk_cmd.stderr(std::fs::File::create(&blk_log)?);
    println!("    $ {}", sh.shown(&blk_cmd));
    let blk = Daemon::spawn("livesnap-blk", blk_cmd, &[disk_sock.as_path(), control.as_path()])?;
    fact(&format!("serving vda on {}; its log in {}", disk_sock.display(), blk_log.display()));

    step("Starting vhost-device-vsock: the VM's vsock device, a unix socket on the host");
    let mut vsock_cmd = Command::new(&tools.vsock);
    vsock_cmd.arg("--vm").arg(format!("guest-cid=3,socket={},uds-path={}", vhost_vsock.display(), uds.display()));
    vsock_cmd.stderr(Stdio::null());
    println!("    $ {}", sh.shown(&vsock_cmd));
    let vsock = Daemon::spawn("vhost-device-vsock", vsock_cmd, &[vhost_vsock.as_path()])?;

    step(&format!("Booting {VM} (QEMU, TCG): the guest agent, and a workload appending fsync'd lines to /log.txt"));
    let agent_bin = std::fs::read(&tools.agent).with_context(|| format!("cannot read {}", tools.agent.display()))?;
    let mut guest = Guest::start(GuestConfig {
        disks: vec![disk_sock.clone()],
        job_script: JOB.into(),
        files: vec![
            GuestFile { path: "/usr/sbin/livesnap-agent".into(), contents: agent_bin, mode: 0o755 },
            GuestFile {
                path: "/etc/livesnap/hooks.d/10-demo-app".into(),
                contents: HOOK.as_bytes().to_vec(),
                mode: 0o755,
            },
        ],
        extra_args: [vsock_args(&vhost_vsock), serial_args(&serial)].concat(),
        console_log: Some(console_log.clone()),
        timeout: Duration::from_secs(1800),
        ..GuestConfig::default()
    })?;
    fact(&format!("console in {}", console_log.display()));
    guest.wait_for_console("DEMO-READY", WAIT)?;
    fact(&format!("guest up after {:.1} s, writing", started.elapsed().as_secs_f64()));
    // The agent is up once it answers a ping.
    let ping_start = Instant::now();
    let ping = loop {
        match sh.run(agent(&tools, &uds).args(["ping", "--timeout", "5s"])) {
            Ok(out) => break out,
            Err(e) if ping_start.elapsed() > Duration::from_secs(120) => {
                return Err(e.context("the guest agent never answered over vsock"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    fact(&format!("guest agent answers over vsock: {}", ping.trim()));

    step("Starting livesnapd: the VM, its livesnap-blk control socket, its agent over hybrid vsock, a repository");
    let toml = livesnap_tests::daemon::livesnapd_config(&dir, &socket, VM, &control, &uds, AGENT_PORT);
    std::fs::write(&config, &toml)?;
    fact(&format!("{}:", config.display()));
    for l in toml.lines() {
        if l.is_empty() {
            println!();
        } else {
            fact(&format!("  {l}"));
        }
    }
    sh.run(Command::new(&tools.livesnapd).arg("--config").arg(&config).arg("check-config"))?;
    let mut daemon_cmd = Command::new(&tools.livesnapd);
    daemon_cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    println!("    $ {}", sh.shown(&daemon_cmd));
    let log = std::fs::File::create(&daemon_log)?;
    daemon_cmd.stdout(log.try_clone()?).stderr(log);
    let daemon = Daemon::spawn("livesnapd", daemon_cmd, &[socket.as_path()])?;
    fact(&format!("listening on {}; its log in {}", socket.display(), daemon_log.display()));
    let demo = Demo { root, sh: &sh, tools: &tools, socket: socket.clone(), daemon_log: daemon_log.clone() };
    fact(&format!("snapctl finds it through LIVESNAP_SOCKET={}", rel.join("livesnapd.sock").display()));
    let vms = demo.show(&["vm", "list"])?;
    ensure!(vms.contains(VM), "snapctl vm list does not list {VM}");

    let quiesce: &[&str] = if crash { &["--no-quiesce"] } else { &[] };
    let consistency = if crash { "crash-consistent" } else { "quiesced by the guest agent" };
    let p = wait_progress(&guest, 100, &console_log)?;
    step(&format!("The first backup, while the guest writes (it has fsync'd {p} lines so far): {consistency}"));
    let first = demo.snapshot(Some(&guest), quiesce)?;
    fact(&format!(
        "backup {}: {}, {}; the guest went from line {} to {} while snapctl ran",
        first.summary.id, first.summary.kind, first.summary.consistency, first.before, first.after
    ));
    let st = demo.sh.show(ctl(&tools, &control).arg("status"))?;
    ensure!(st.contains("no snapshot") && st.contains("direct"), "the disk is not back to direct after the snapshot");
    fact("livesnapd merged the snapshot back before snapctl returned: the disk is direct again");

    let more = wait_progress(&guest, first.after + 200, &console_log)?;
    step(&format!("More writes (the guest is at line {more}), then the second backup: incremental"));
    let second = demo.snapshot(Some(&guest), quiesce)?;
    let s2 = &second.summary;
    ensure!(s2.kind == "incremental", "the second backup is {}, not incremental", s2.kind);
    ensure!(
        s2.read * 2 < s2.size,
        "the incremental backup read {} bytes of a {} bytes disk: not only what changed",
        s2.read,
        s2.size
    );
    fact(&format!(
        "backup {}: incremental, read {:.1} MiB of the {} MiB disk ({:.1} MiB changed since backup {}); the guest went \
         from line {} to {} meanwhile",
        s2.id,
        s2.read as f64 / (1u64 << 20) as f64,
        s2.size >> 20,
        s2.changed as f64 / (1u64 << 20) as f64,
        first.summary.id,
        second.before,
        second.after
    ));

    step("The backups in the repository, each verified (every chunk re-hashed)");
    let list = demo.show(&["backup", "list", VM])?;
    for t in [&first, &second] {
        ensure!(list.contains(&t.summary.id), "snapctl backup list does not list backup {}", t.summary.id);
    }
    for t in [&first, &second] {
        let out = demo.show(&["backup", "verify", VM, &t.summary.id])?;
        ensure!(out.contains(": ok"), "backup {} does not verify: {out}", t.summary.id);
    }

    let mut restored = Vec::new();
    for (t, name) in [(&first, "restored.raw"), (&second, "restored-2.raw")] {
        step(&format!("Restoring backup {} ({}) and checking it", t.summary.id, t.summary.kind));
        demo.show(&["backup", "restore", VM, &t.summary.id, "--disk", "vda", "--to", name])?;
        restored.push(check_restored(&sh, &dir.join(name), t, crash)?);
    }

    step("Stopping the guest cleanly (a line on its second serial port)");
    UnixStream::connect(&serial)
        .and_then(|mut s| s.write_all(b"stop\n"))
        .with_context(|| format!("cannot write to the guest's serial port {}", serial.display()))?;
    let ended = guest.wait()?;
    ensure!(
        ended.exit_code == 0 && ended.console.contains("DEMO-UNMOUNTED"),
        "the guest's job failed (exit {}); console in {}",
        ended.exit_code,
        console_log.display()
    );
    let last: u64 =
        ended.value("DEMO-LAST").and_then(|v| v.parse().ok()).context("the guest did not print its last line")?;
    fact(&format!("the guest wrote and fsync'd {last} lines, unmounted its disk and powered off"));
    let status = vsock.stop(libc::SIGTERM, Duration::from_secs(30))?;
    fact(&format!("vhost-device-vsock stopped ({status})"));

    step("A last backup of the idle disk, to compare its restore with the disk image itself");
    let idle = demo.snapshot(None, &["--no-quiesce"])?;
    demo.show(&["backup", "restore", VM, &idle.summary.id, "--disk", "vda", "--to", "restored-idle.raw"])?;
    let status = daemon.stop(libc::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "livesnapd exited with {status}; its log is {}", daemon_log.display());
    fact(&format!("livesnapd stopped ({status})"));
    let status = blk.stop(libc::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "livesnap-blk exited with {status}");
    fact("livesnap-blk stopped (SIGTERM: in-flight requests finished, disks flushed, exit 0)");
    let cmp = sh.show(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(dir.join("restored-idle.raw"))
            .arg(&image),
    )?;
    ensure!(cmp.contains("identical"), "qemu-img compare: the restore differs from the disk at the cut");
    fact(&format!("backup {} ({}) restores the disk byte for byte", idle.summary.id, idle.summary.kind));

    step("Checking the final image");
    e2fsck(&sh, "-fn", &image, &[0])?;
    fact("e2fsck -fn: clean");
    let log = read_log(&sh, &image)?;
    let in_image = check_log(&log, "the final /log.txt")?;
    fact(&format!("/log.txt holds lines 1..{in_image}, in order and whole; the guest fsync'd 1..{last}"));
    ensure!(in_image == last, "the final image holds {in_image} lines, the guest fsync'd {last}");

    println!(
        "\nDemo done in {:.0} s: {VM} was backed up twice while it wrote ({consistency}; backup {} full, lines 1..{}; \
         backup {} incremental, lines 1..{}), both verified and restored clean; the restore of the idle disk is \
         identical to it, and the disk kept all {last} lines.",
        started.elapsed().as_secs_f64(),
        first.summary.id,
        restored[0],
        second.summary.id,
        restored[1]
    );
    Ok(())
}
