//! livesnap-blk confines itself once started: no privileges, no capabilities, a seccomp
//! allow-list on every thread, Landlock on its files, and `--user`. Checked on the real process:
//! its `/proc/PID/status`, a forbidden system call, a forbidden file, and I/O with a snapshot
//! and its merge while confined and running as another user.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::programs;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);
/// The overflow user and group of Linux, present on every Debian system as `nobody`/`nogroup`.
const NOBODY: u32 = 65534;

/// A livesnap-blk serving one raw disk with snapshots, its log in a file.
struct Rig {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    state: PathBuf,
    log: PathBuf,
    daemon: Option<Daemon>,
}

impl Rig {
    /// A fresh directory (searchable by every user, so that `--user` can reach the state
    /// directory inside it), a 16 MiB image and an empty state directory.
    fn new() -> Rig {
        let dir = tempfile::Builder::new().prefix("livesnap-confine").tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        Rig {
            image,
            socket: dir.path().join("vda.sock"),
            control: dir.path().join("ctl.sock"),
            state,
            log: dir.path().join("livesnap-blk.log"),
            dir,
            daemon: None,
        }
    }

    fn command(&self, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(["--vm", "confine-test", "--queues", "2", "--disk"])
            .arg(format!("id=vda,image={},socket={}", self.image.display(), self.socket.display()))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--control")
            .arg(&self.control)
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::from(std::fs::File::create(&self.log).unwrap()));
        cmd
    }

    /// Starts livesnap-blk and waits until it is ready (its sockets exist).
    fn start(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let cmd = self.command(extra, env);
        self.daemon = Some(Daemon::spawn("livesnap-blk", cmd, &[&self.socket, &self.control]).unwrap());
        // The sockets exist a moment before the confinement is complete: wait for "ready".
        self.wait_log("ready");
    }

    /// Starts livesnap-blk and waits for it to exit (at most [`WAIT`], then it is killed).
    fn run_to_exit(&self, extra: &[&str], env: &[(&str, &str)]) -> ExitStatus {
        let mut daemon = Daemon::spawn("livesnap-blk", self.command(extra, env), &[]).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = daemon.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < WAIT, "livesnap-blk still runs:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().pid().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn wait_log(&mut self, what: &str) {
        let start = Instant::now();
        while !self.log().contains(what) {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("livesnap-blk exited ({status}) before logging {what:?}:\n{}", self.log());
            }
            assert!(start.elapsed() < WAIT, "no {what:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `livesnap-blk ctl` on the control socket; its standard output.
    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(programs::livesnap_blk().unwrap())
            .args(["ctl", "--control"])
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}\nbackend log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn connect(&self) -> (Frontend, Vec<BlkQueue>) {
        let mut f =
            Frontend::connect(&self.socket, &Options { queues: 2, timeout: WAIT, ..Options::default() }).unwrap();
        let qs = f.take_queues().into_iter().map(|v| BlkQueue::new(v, 8, MIB as u32).unwrap()).collect();
        (f, qs)
    }

    fn stop(&mut self) {
        let status = self.daemon.take().unwrap().stop(libc::SIGTERM, WAIT).unwrap();
        assert!(status.success(), "exit status {status}:\n{}", self.log());
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// The `key:` line of `/proc/PID[/task/TID]/status`, its value trimmed.
fn status_field(status: &str, key: &str) -> String {
    let prefix = format!("{key}:");
    let line = status.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {key} in\n{status}"));
    line[prefix.len()..].trim().to_owned()
}

/// The status of every thread of `pid`.
fn thread_statuses(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        if let Ok(s) = std::fs::read_to_string(entry.unwrap().path().join("status")) {
            out.push(s);
        }
    }
    out
}

/// Whether this kernel has Landlock (`landlock_create_ruleset` with the version flag).
fn landlock_available() -> bool {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION takes no attribute: null and size 0.
    unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) > 0 }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn every_thread_runs_filtered_without_privileges_and_serves_io() {
    let mut rig = Rig::new();
    rig.start(&[], &[]);
    // Queue threads start with the frontend, long after the confinement: they must carry it too.
    let (_f, mut qs) = rig.connect();
    qs[0].write(8, &[7u8; 4096]).unwrap();
    assert_eq!(qs[1].read(8, 4096).unwrap(), vec![7u8; 4096]);
    qs[1].flush().unwrap();
    rig.ctl(&["begin"]);
    let statuses = thread_statuses(rig.pid());
    assert!(statuses.len() >= 4, "expected listener, control and two queue threads, got {}", statuses.len());
    for status in &statuses {
        let name = status_field(status, "Name");
        for (key, want) in [
            ("Seccomp", "2"),
            ("NoNewPrivs", "1"),
            ("CapEff", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapInh", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
        ] {
            assert_eq!(status_field(status, key), want, "{key} of thread {name}");
        }
    }
    rig.ctl(&["merge", "1"]);
    drop(qs);
    rig.stop();
}

#[test]
fn sandbox_off_leaves_the_process_unconfined() {
    let mut rig = Rig::new();
    rig.start(&["--sandbox", "off"], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", rig.pid())).unwrap();
    assert_eq!(status_field(&status, "Seccomp"), "0");
    assert_eq!(status_field(&status, "NoNewPrivs"), "0");
    assert!(rig.log().contains("--sandbox off"), "no warning:\n{}", rig.log());
    rig.stop();
}

#[test]
fn a_forbidden_syscall_kills_the_process_naming_it() {
    let rig = Rig::new();
    let status = rig.run_to_exit(&[], &[("LIVESNAP_BLK_TEST_FORBIDDEN_SYSCALL", "1")]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "exit status {status}:\n{}", rig.log());
    let line = format!("livesnap-blk: blocked syscall execve ({})", libc::SYS_execve);
    assert!(rig.log().contains(&line), "no {line:?} in the log:\n{}", rig.log());
}

#[test]
fn landlock_refuses_files_outside_the_state_directory_and_images() {
    let mut rig = Rig::new();
    let outside = rig.dir.path().join("outside.txt");
    std::fs::write(&outside, "not livesnap-blk's").unwrap();
    let shown = outside.display().to_string();
    rig.start(&[], &[("LIVESNAP_BLK_TEST_OPEN", &shown)]);
    if !landlock_available() {
        // Skipped cleanly: said once, and the process goes on serving.
        eprintln!("this kernel has no Landlock; checking that it is skipped cleanly");
        assert!(rig.log().contains("Landlock is not available on this kernel"), "{}", rig.log());
        rig.stop();
        return;
    }
    assert!(rig.log().contains("Landlock: file access restricted"), "{}", rig.log());
    assert!(
        rig.log()
            .lines()
            .any(|l| l.contains("test hook: cannot open") && l.contains(&shown) && l.contains("Permission denied")),
        "{shown} could be opened:\n{}",
        rig.log()
    );
    rig.stop();

    // The same file inside the state directory is the process's own.
    let inside = rig.state.join("inside.txt");
    std::fs::write(&inside, "livesnap-blk's").unwrap();
    let shown = inside.display().to_string();
    rig.start(&[], &[("LIVESNAP_BLK_TEST_OPEN", &shown)]);
    assert!(rig.log().lines().any(|l| l.contains("test hook: opened") && l.contains(&shown)), "{}", rig.log());
    rig.stop();
}

#[test]
fn as_another_user_it_serves_io_and_a_snapshot_with_its_merge() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let mut rig = Rig::new();
    // Start-up refuses a state directory the user cannot write, before serving anything.
    let status = rig.run_to_exit(&["--user", "65534:65534"], &[]);
    assert_eq!(status.code(), Some(1), "exit status {status}");
    let log = rig.log();
    assert!(log.contains("User 65534 cannot write into the state directory"), "{log}");

    chown(&rig.state, NOBODY, NOBODY);
    rig.start(&["--user", "nobody:65534"], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", rig.pid())).unwrap();
    assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Groups"), "");
    assert_eq!(status_field(&status, "Seccomp"), "2");
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");

    let (_f, mut qs) = rig.connect();
    qs[0].write(0, &[1u8; 4096]).unwrap();
    qs[0].flush().unwrap();
    rig.ctl(&["begin"]);
    // Into the delta, created at run time by the unprivileged user.
    qs[1].write(0, &[2u8; 4096]).unwrap();
    qs[1].write(64, &[3u8; 4096]).unwrap();
    qs[1].flush().unwrap();
    let delta = rig.state.join("vda.delta.1");
    assert_eq!(std::fs::metadata(&delta).unwrap().uid(), NOBODY, "the delta is not the user's");
    // The frozen base still holds the cut.
    assert_eq!(&std::fs::read(&rig.image).unwrap()[..4096], &[1u8; 4096][..]);
    rig.ctl(&["merge", "1"]);
    rig.ctl(&["checkpoint", "1"]);
    assert!(!delta.exists(), "the delta outlived its merge");
    assert_eq!(qs[0].read(0, 4096).unwrap(), vec![2u8; 4096]);
    let image = std::fs::read(&rig.image).unwrap();
    assert_eq!(&image[..4096], &[2u8; 4096][..]);
    assert_eq!(&image[64 * 512..64 * 512 + 4096], &[3u8; 4096][..]);
    drop(qs);
    rig.stop();
    assert!(!rig.log().contains("blocked syscall"), "{}", rig.log());
}

#[test]
fn a_panic_in_a_confined_thread_prints_its_backtrace_and_the_process_goes_on() {
    // qcow2-rs panics on some images; the panic is caught and the disk failed, and printing it
    // (with a backtrace when RUST_BACKTRACE asks) must not be a blocked call.
    let mut rig = Rig::new();
    rig.start(&[], &[("LIVESNAP_BLK_TEST_PANIC", "1"), ("RUST_BACKTRACE", "full")]);
    rig.wait_log("test hook: the panic was caught");
    assert!(rig.log().contains("test hook: a panic in a confined thread"), "{}", rig.log());
    assert!(rig.log().contains("stack backtrace:"), "{}", rig.log());
    let (_f, mut qs) = rig.connect();
    qs[0].write(0, &[9u8; 4096]).unwrap();
    assert_eq!(qs[1].read(0, 4096).unwrap(), vec![9u8; 4096]);
    drop(qs);
    rig.stop();
    assert!(!rig.log().contains("blocked syscall"), "{}", rig.log());
}
