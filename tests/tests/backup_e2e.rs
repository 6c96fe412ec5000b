//! End to end, real processes throughout: the user's `snapctl vm snapshot` of a running QEMU
//! guest whose workload appends fsync'd, checksummed records, then `snapctl backup restore` and
//! checks of what the restored image holds (issue 5, point 7).
//!
//! - `livesnap-blk` (`--state-dir`, `--control`) serves a 64 MiB ext4 raw image as `/dev/vda`;
//! - `vhost-device-vsock` is the guest's vsock device; the guest agent runs inside;
//! - `livesnapd` runs with a generated config: VM `web01` (its control socket, its agent over
//!   hybrid vsock `PATH:7735`) and a repository in the test's tempdir;
//! - `snapctl --json` is what the test runs for every step.
//!
//! The guest appends record `k` (`R k w1..w8 sum`, the words random, `sum` a checksum of `k` and
//! the words) to `/records.log`, fsyncs it, then stores `k` in `/tmp/fsynced` and prints
//! `FSYNCED=k`. The lower bound of what a backup must hold comes from the guest itself, so that
//! no ordering of console output against livesnapd's events is assumed:
//! - quiesced: a freeze hook (run by the agent before FIFREEZE) prints
//!   `HOOK-FREEZE-<job>=k` from `/tmp/fsynced`: records `1..=k` had been fsync'd before the
//!   freeze, hence before the cut;
//! - crash-consistent: the highest `FSYNCED=k` on the console before snapctl is started.
//!
//! The upper bound: after the job is done the host writes `markN` to the guest's second serial
//! port; the workload prints `MARK-markN=j` before it starts record `j`, so record `j` and later
//! ones were written after the cut and cannot be in the backup.
//!
//! Needs `ci/install-deps.sh`, `ci/build-guest.sh`, the static agent (`ci/package-agent.sh` →
//! `target/debian/livesnap-agent`, or `target/guest-bin/livesnap-agent` from `ci/demo.sh`, or
//! `LIVESNAP_AGENT_STATIC`), `vhost-device-vsock` (`VHOST_DEVICE_VSOCK`) and
//! `cargo build --workspace` (livesnap-blk, livesnapd and snapctl are found beside the test
//! binary, or through `LIVESNAP_BLK`, `LIVESNAPD`, `SNAPCTL`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use livesnap_tests::daemon::Daemon;
use livesnap_tests::fsync_log::{self, sbin};
use livesnap_tests::guest::{serial_args, vsock_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;
use serde_json::Value;

const DISK_MIB: u64 = 64;
const AGENT_PORT: u32 = 7735;
const VM: &str = "web01";
/// Hang guards only: TCG is slow and CI machines are busy. Nothing is asserted on a duration.
const WAIT: Duration = Duration::from_secs(180);

/// The guest's job: the agent (restarted if it dies), a reader of the second serial port
/// (`stop`, `markN`), and the workload ([`fsync_log::APPEND`] at `@APPEND@`).
const JOB: &str = r#"set -e
mkdir -p /mnt/data /run
mount -t ext4 /dev/vda /mnt/data
( while true; do
    LIVESNAP_LOG=warn /usr/sbin/livesnap-agent --vsock-port 7735 --hook-timeout 20s
    echo "AGENT-EXITED=$?"
    sleep 1
  done ) </dev/null &
echo 0 >/tmp/fsynced
exec 3</dev/ttyS1
( while read -r cmd <&3; do
    case "$cmd" in
      stop) touch /tmp/stop ;;
      mark*) echo "$cmd" >/tmp/mark.new; mv /tmp/mark.new /tmp/mark ;;
    esac
  done ) &
set +e
LOG=/mnt/data/records.log
echo WORKLOAD-READY
i=0
while [ ! -e /tmp/stop ]; do
  if [ -e /tmp/mark ]; then
    read -r m </tmp/mark
    rm -f /tmp/mark
    echo "MARK-$m=$((i + 1))"
  fi
  i=$((i + 1))
@APPEND@done
echo "LAST=$i"
umount /mnt/data
echo WORKLOAD-UNMOUNTED
"#;

/// Run by the agent before it freezes (and after it thaws): at freeze, prints the last record
/// whose fsync had returned. `/tmp` is a tmpfs, never frozen; the workload rewrites the file
/// after each record, so an empty read is retried.
const HOOK: &str = r#"#!/bin/sh
if [ "$1" = freeze ]; then
  k=
  while [ -z "$k" ]; do read -r k </tmp/fsynced || true; done
  echo "HOOK-FREEZE-$LIVESNAP_SNAPSHOT_ID=$k" >/dev/console
fi
"#;

/// Runs `cmd` to its end (at most [`WAIT`]): exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (i32, String, String) {
    fsync_log::run(cmd, WAIT).unwrap()
}

fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    fsync_log::wait_child(child, timeout, what).unwrap()
}

/// `debugfs -R 'cat /records.log' IMAGE`, checked: its record count.
fn records_in(image: &Path, what: &str) -> u64 {
    fsync_log::records_in(image).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `e2fsck FLAG IMAGE`: its exit code, asserted to be in `ok`.
fn e2fsck(flag: &str, image: &Path, ok: &[i32], what: &str) -> i32 {
    let (code, out, err) = run(sbin("e2fsck").arg(flag).arg(image));
    assert!(ok.contains(&code), "e2fsck {flag} on {what} exited {code} (wanted one of {ok:?}):\n{out}{err}");
    code
}

/// The largest `FSYNCED=k` on the console.
fn fsynced(console: &str) -> u64 {
    livesnap_tests::guest::last_report(console, "FSYNCED=")
}

/// The number after the last `key` on the console.
fn number_after(console: &str, key: &str) -> Option<u64> {
    let at = console.rfind(key)? + key.len();
    let digits: String = console[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

struct Rig {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    snapctl: PathBuf,
    guest: Option<Guest>,
    /// The guest's second serial port, held open.
    serial: UnixStream,
    livesnapd: Option<Daemon>,
    vsock: Option<Daemon>,
    blk: Option<Daemon>,
}

/// What a `snapctl vm snapshot` printed.
struct Snapshot {
    events: Vec<Value>,
    backup: Value,
    /// The highest `FSYNCED=k` on the console when the `frozen` event was read (for the report).
    at_frozen: Option<u64>,
}

impl Rig {
    fn start() -> Rig {
        let dir = tempfile::Builder::new().prefix("livesnap-backup-e2e").tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let image = p("web01-vda.raw");
        std::fs::File::create(&image).unwrap().set_len(DISK_MIB << 20).unwrap();
        let (code, _, err) = run(sbin("mkfs.ext4").args(["-q", "-F", "-L", VM]).arg(&image));
        assert_eq!(code, 0, "mkfs.ext4: {err}");

        let (disk_sock, control) = (p("vda.sock"), p("control.sock"));
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(["--vm", VM, "--disk"])
            .arg(format!("id=vda,image={},socket={}", image.display(), disk_sock.display()))
            .arg("--state-dir")
            .arg(p("blk-state"))
            .arg("--control")
            .arg(&control)
            .stderr(std::fs::File::create(p("livesnap-blk.log")).unwrap());
        let blk = Daemon::spawn("livesnap-blk", cmd, &[&disk_sock, &control]).unwrap();

        let (vhost_vsock, uds) = (p("vsock-vhost.sock"), p("web01.vsock"));
        let mut cmd = Command::new(programs::vhost_device_vsock().unwrap());
        cmd.arg("--vm")
            .arg(format!("guest-cid=3,socket={},uds-path={}", vhost_vsock.display(), uds.display()))
            .stderr(std::fs::File::create(p("vhost-device-vsock.log")).unwrap());
        let vsock = Daemon::spawn("vhost-device-vsock", cmd, &[&vhost_vsock]).unwrap();

        let socket = p("livesnapd.sock");
        let config = p("livesnapd.toml");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n\
                 [defaults]\nfreeze_timeout_ms = 30000\n\
                 [[vm]]\nname = \"{VM}\"\ncontrol = \"{c}\"\nagent = {{ vsock = \"{}:{AGENT_PORT}\" }}\n",
                socket.display(),
                uds.display(),
                c = control.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(p("livesnapd.log")).unwrap();
        let mut cmd = Command::new(programs::livesnapd().unwrap());
        cmd.arg("--config").arg(&config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
        let livesnapd = Daemon::spawn("livesnapd", cmd, &[&socket]).unwrap();

        let serial = p("serial1.sock");
        let guest = Guest::start(GuestConfig {
            disks: vec![disk_sock],
            job_script: JOB.replace("@APPEND@", fsync_log::APPEND),
            files: vec![
                GuestFile {
                    path: "/usr/sbin/livesnap-agent".into(),
                    contents: std::fs::read(programs::agent_static().unwrap()).unwrap(),
                    mode: 0o755,
                },
                GuestFile {
                    path: "/etc/livesnap/hooks.d/10-records".into(),
                    contents: HOOK.as_bytes().to_vec(),
                    mode: 0o755,
                },
            ],
            extra_args: [vsock_args(&vhost_vsock), serial_args(&serial)].concat(),
            console_log: Some(p("console.log")),
            timeout: Duration::from_secs(600),
            ..GuestConfig::default()
        })
        .unwrap();
        eprintln!("files in {} (console.log, livesnapd.log, livesnap-blk.log)", dir.path().display());
        // QEMU creates the server socket as it starts.
        let start = Instant::now();
        let serial = loop {
            match UnixStream::connect(&serial) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(start.elapsed() < WAIT, "cannot connect to the guest's serial port: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let snapctl = programs::snapctl().unwrap();
        Rig {
            dir,
            image,
            socket,
            snapctl,
            guest: Some(guest),
            serial,
            livesnapd: Some(livesnapd),
            vsock: Some(vsock),
            blk: Some(blk),
        }
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().unwrap()
    }

    fn console(&self) -> String {
        self.guest.as_ref().map(Guest::console).unwrap_or_default()
    }

    fn snapctl(&self) -> Command {
        let mut c = Command::new(&self.snapctl);
        c.arg("--socket").arg(&self.socket).arg("--json");
        c
    }

    /// `snapctl --json ARGS`, which must succeed: its one JSON object.
    fn snapctl_json(&self, args: &[&str]) -> Value {
        let (code, out, err) = run(self.snapctl().args(args));
        assert_eq!(code, 0, "snapctl {args:?} exited {code}: {err}{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapctl {args:?}: not JSON ({e}): {out}"))
    }

    /// Waits until the guest has reported `k` records fsync'd; the highest it reported.
    fn wait_fsynced(&mut self, k: u64) -> u64 {
        let start = Instant::now();
        loop {
            let console = self.console();
            let p = fsynced(&console);
            if p >= k {
                return p;
            }
            assert!(
                start.elapsed() < WAIT && !console.contains("LIVESNAP-JOB-EXIT="),
                "the guest did not reach record {k} (at {p}); console in {}",
                self.dir.path().join("console.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `cmd` to the guest's second serial port.
    fn tell(&mut self, cmd: &str) {
        self.serial.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        self.serial.flush().unwrap();
    }

    /// Marks the current point of the workload: the first record it writes after now.
    fn mark(&mut self, name: &str) -> u64 {
        self.tell(name);
        let key = format!("MARK-{name}=");
        self.guest().wait_for_console(&key, WAIT).unwrap();
        // The rest of the line may still be on its way.
        let start = Instant::now();
        loop {
            let console = self.console();
            let at = console.rfind(&key).unwrap() + key.len();
            if console[at..].contains('\n') {
                return number_after(&console, &key).unwrap();
            }
            assert!(start.elapsed() < WAIT, "the mark line never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `snapctl --json vm snapshot VM`, following its events as they come.
    fn snapshot(&self, vm: &str) -> Snapshot {
        self.snapshot_with(vm, &[])
    }

    /// `snapctl vm snapshot VM ARGS...`.
    fn snapshot_with(&self, vm: &str, args: &[&str]) -> Snapshot {
        let mut child = self
            .snapctl()
            .args(["vm", "snapshot", vm])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let start = Instant::now();
        let mut events = Vec::new();
        let mut at_frozen = None;
        loop {
            let left = WAIT.saturating_sub(start.elapsed());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("snapctl vm snapshot {vm} did not finish within {WAIT:?}; events so far: {events:?}");
                }
            };
            let ev: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if ev["event"] == "frozen" {
                at_frozen = Some(fsynced(&self.console()));
            }
            events.push(ev);
        }
        let status = wait_child(&mut child, WAIT, "snapctl vm snapshot");
        let _ = reader.join();
        let err = err_reader.join().unwrap();
        // The stages and the summary; not every progress event.
        for e in events.iter().filter(|e| e["event"] != "backing_up" && e["event"] != "merging") {
            eprintln!("  {e}");
        }
        assert!(status.success(), "snapctl vm snapshot {vm}: {status}: {err}");
        let last = events.last().cloned().unwrap_or_default();
        assert_eq!(last["event"], "done", "the last event is not done: {events:?}");
        let backup = last["backup"].clone();
        Snapshot { events, backup, at_frozen }
    }

    /// Restores `id`'s disk vda to a new raw file, checked by `snapctl backup verify` first.
    fn verify_and_restore(&self, vm: &str, id: &str, name: &str) -> PathBuf {
        let v = self.snapctl_json(&["backup", "verify", vm, id]);
        assert_eq!(v["ok"], true, "verify of {vm} {id}: {v}");
        assert!(v["chunks_checked"].as_u64().unwrap() > 0, "verify checked nothing: {v}");
        assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
        let to = self.dir.path().join(name);
        let r = self.snapctl_json(&["backup", "restore", vm, id, "--disk", "vda", "--to", to.to_str().unwrap()]);
        assert_eq!((r["format"].as_str(), r["bytes_total"].as_u64()), (Some("raw"), Some(DISK_MIB << 20)), "{r}");
        assert_eq!(std::fs::metadata(&to).unwrap().len(), DISK_MIB << 20);
        to
    }
}

fn event<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

#[test]
fn backups_of_a_writing_guest_hold_every_record_fsynced_before_the_cut() {
    let started = Instant::now();
    let mut rig = Rig::start();
    rig.guest().wait_for_console("WORKLOAD-READY", WAIT).unwrap();
    // livesnapd sees the agent once the guest's vsock driver and the agent are up.
    let t = Instant::now();
    loop {
        let list = rig.snapctl_json(&["vm", "list"]);
        let vms = list.as_array().or_else(|| list["vms"].as_array()).cloned().unwrap_or_default();
        let web = vms.iter().find(|v| v["name"] == VM).unwrap_or_else(|| panic!("{VM} not listed: {list}"));
        if web["agent"] == "reachable" {
            assert_eq!(web["backend_reachable"].as_bool(), Some(true), "{list}");
            break;
        }
        assert!(t.elapsed() < WAIT, "livesnapd never reached the agent: {list}");
        std::thread::sleep(Duration::from_millis(500));
    }
    rig.wait_fsynced(50);

    // 1. Mid-run, quiesced through the agent: application-consistent.
    let s1 = rig.snapshot(VM);
    let b1 = &s1.backup;
    let job1 = s1.events[0]["job_id"].as_str().unwrap().to_owned();
    assert_eq!((b1["kind"].as_str(), b1["consistency"].as_str()), (Some("full"), Some("application")), "{b1}");
    let window1 = b1["freeze_window_us"].as_u64().unwrap();
    assert!(window1 > 0, "no freeze window recorded: {b1}");
    let thawed = event(&s1.events, "thawed").unwrap();
    assert_eq!(thawed["freeze_window_us"].as_u64(), Some(window1));
    let cut = event(&s1.events, "cut").unwrap();
    assert_eq!(cut["crash_consistent_reason"], "", "{cut}");
    assert!(event(&s1.events, "frozen").unwrap()["filesystems"].as_u64().unwrap() >= 1);
    let stages: Vec<&str> = s1
        .events
        .iter()
        .filter_map(|e| e["event"].as_str())
        .filter(|e| ["quiescing", "frozen", "cut", "thawed", "done"].contains(e))
        .collect();
    assert_eq!(stages, ["quiescing", "frozen", "cut", "thawed", "done"]);
    let mark1 = rig.mark("mark1");
    let key1 = format!("HOOK-FREEZE-{job1}=");
    let k1 = number_after(&rig.console(), &key1).unwrap_or_else(|| panic!("the freeze hook did not print {key1}"));
    let id1 = b1["id"].as_str().unwrap().to_owned();
    let img1 = rig.verify_and_restore(VM, &id1, "restore-1.raw");
    e2fsck("-fn", &img1, &[0], "the restored full backup");
    let n1 = records_in(&img1, "the restored full backup");
    eprintln!(
        "backup 1 {id1}: freeze window {:.1} ms; the guest had fsync'd {k1} records at the freeze hook \
         ({:?} on the console when the frozen event was read); the backup holds 1..={n1}; record {mark1} \
         was started after the job was done",
        window1 as f64 / 1e3,
        s1.at_frozen
    );
    assert!(n1 >= k1, "the backup lacks records fsync'd before the freeze: holds {n1}, {k1} were fsync'd");
    assert!(n1 < mark1, "the backup holds record {n1}, written after the job (from {mark1})");

    // 2. More writes, then an incremental backup (auto picks it).
    rig.wait_fsynced(mark1 + 30);
    let s2 = rig.snapshot(VM);
    let b2 = &s2.backup;
    let job2 = s2.events[0]["job_id"].as_str().unwrap().to_owned();
    assert_eq!((b2["kind"].as_str(), b2["consistency"].as_str()), (Some("incremental"), Some("application")), "{b2}");
    let window2 = b2["freeze_window_us"].as_u64().unwrap();
    assert!(window2 > 0, "{b2}");
    let disk2 = &b2["disks"][0];
    assert!(
        disk2["bytes_read"].as_u64().unwrap() < DISK_MIB << 20,
        "the incremental backup read the whole disk: {disk2}"
    );
    let mark2 = rig.mark("mark2");
    let key2 = format!("HOOK-FREEZE-{job2}=");
    let k2 = number_after(&rig.console(), &key2).unwrap_or_else(|| panic!("the freeze hook did not print {key2}"));
    assert!(k2 >= mark1 + 30, "the second freeze saw {k2} records fsync'd, the console had shown {}", mark1 + 30);
    let id2 = b2["id"].as_str().unwrap().to_owned();
    let img2 = rig.verify_and_restore(VM, &id2, "restore-2.raw");
    e2fsck("-fn", &img2, &[0], "the restored incremental backup");
    let n2 = records_in(&img2, "the restored incremental backup");
    eprintln!(
        "backup 2 {id2} (incremental, read {} of {} bytes): freeze window {:.1} ms; {k2} records fsync'd at \
         the freeze hook ({:?} at the frozen event); the backup holds 1..={n2}; record {mark2} started after",
        disk2["bytes_read"],
        disk2["size"],
        window2 as f64 / 1e3,
        s2.at_frozen
    );
    assert!(n2 >= k2, "the incremental backup lacks records fsync'd before the freeze: holds {n2}, {k2} were fsync'd");
    assert!(n2 < mark2, "the incremental backup holds record {n2}, written after the job (from {mark2})");

    // 3. The same VM without quiescing (a full backup): crash-consistent, labelled so. Only
    //    what was reported fsync'd before snapctl started counts. (This ran through a second
    //    VM entry on the same backend with no agent; livesnapd now refuses two entries on one
    //    control socket, as they would checkpoint each other's change maps. The workflow's unit
    //    tests cover the no-agent case.)
    rig.wait_fsynced(mark2 + 30);
    let k3 = fsynced(&rig.console());
    let s3 = rig.snapshot_with(VM, &["--full", "--no-quiesce"]);
    let b3 = &s3.backup;
    assert_eq!((b3["kind"].as_str(), b3["consistency"].as_str()), (Some("full"), Some("crash")), "{b3}");
    assert_eq!(b3["freeze_window_us"].as_u64(), Some(0), "{b3}");
    assert!(b3["note"].as_str().unwrap().contains("quiesce=off"), "the note does not say why: {b3}");
    let cut3 = event(&s3.events, "cut").unwrap();
    assert!(cut3["crash_consistent_reason"].as_str().unwrap().contains("quiesce=off"), "{cut3}");
    assert!(event(&s3.events, "quiescing").is_none() && event(&s3.events, "frozen").is_none());
    let mark3 = rig.mark("mark3");
    let id3 = b3["id"].as_str().unwrap().to_owned();
    let img3 = rig.verify_and_restore(VM, &id3, "restore-3.raw");
    // As after a power cut: the journal may need replaying (exit 1: fixed).
    let fixed = e2fsck("-fy", &img3, &[0, 1], "the restored crash-consistent backup");
    e2fsck("-fn", &img3, &[0], "the restored crash-consistent backup, repaired");
    let n3 = records_in(&img3, "the restored crash-consistent backup");
    eprintln!(
        "backup 3 {id3} (crash-consistent: {:?}): e2fsck -fy exit {fixed}; {k3} records reported fsync'd \
         before snapctl started; the backup holds 1..={n3}; record {mark3} started after",
        b3["note"].as_str().unwrap_or_default()
    );
    assert!(
        n3 >= k3,
        "the crash-consistent backup lacks records fsync'd before the cut: holds {n3}, {k3} were fsync'd"
    );
    assert!(n3 < mark3, "the crash-consistent backup holds record {n3}, written after the job (from {mark3})");

    let list = rig.snapctl_json(&["backup", "list"]);
    let mut ids: Vec<&str> = list["backups"].as_array().unwrap().iter().filter_map(|b| b["id"].as_str()).collect();
    ids.sort_unstable();
    let mut want = [id1.as_str(), id2.as_str(), id3.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "{list}");

    // The guest stops cleanly: the workload ends, unmounts, the guest powers off.
    rig.tell("stop");
    let run = rig.guest.take().unwrap().wait().unwrap();
    assert_eq!(run.exit_code, 0, "the guest's job failed; console in {}", rig.dir.path().join("console.log").display());
    assert!(run.console.contains("WORKLOAD-UNMOUNTED"));
    let last: u64 = run.value("LAST").and_then(|v| v.parse().ok()).unwrap();
    for d in [rig.livesnapd.take(), rig.vsock.take()].into_iter().flatten() {
        d.stop(libc::SIGTERM, Duration::from_secs(30)).unwrap();
    }
    let st = rig.blk.take().unwrap().stop(libc::SIGTERM, Duration::from_secs(30)).unwrap();
    assert!(st.success(), "livesnap-blk exited {st}");
    // Every snapshot was merged back: the live image holds all the guest wrote.
    e2fsck("-fn", &rig.image, &[0], "the VM's image after shutdown");
    assert_eq!(records_in(&rig.image, "the VM's image after shutdown"), last);
    eprintln!("done in {:.1} s; the guest wrote {last} records", started.elapsed().as_secs_f64());
}
