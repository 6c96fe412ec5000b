//! A real QEMU guest (TCG) booted on disks served by a backend under test.
//!
//! The guest is Debian's cloud kernel with a busybox initramfs built by `ci/build-guest.sh`
//! (found in `$LIVESNAP_GUEST_DIR`, else `<workspace>/target/guest`). Its `/init`
//! (`ci/guest/init`) loads the virtio modules, waits for the disks, runs `/job.sh`, prints
//! `LIVESNAP-JOB-EXIT=<code>` and powers off.
//!
//! The job is given per boot without rebuilding the image: [`Guest::start`] writes the base
//! image followed by a second newc cpio archive holding `/job.sh` (and any
//! [`GuestConfig::files`]) into a temporary initrd. Linux unpacks concatenated archives in order,
//! later files over earlier ones. The archive is written by [`newc_archive`], not by `cpio`, so
//! tests need no tool for it.
//!
//! ```no_run
//! # use livesnap_tests::guest::{Guest, GuestConfig};
//! let run = Guest::boot(GuestConfig {
//!     disks: vec!["/tmp/vda.sock".into()],
//!     job_script: "mount /dev/vda /mnt && ls /mnt".into(),
//!     ..GuestConfig::default()
//! })?;
//! assert_eq!(run.exit_code, 0, "{}", run.console);
//! # Ok::<(), livesnap_tests::guest::Error>(())
//! ```

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The line `/init` prints after the job, followed by the job's exit code.
pub const EXIT_MARKER: &str = "LIVESNAP-JOB-EXIT=";

/// Lines of console shown in errors.
const TAIL_LINES: usize = 60;

/// How often the waits look at QEMU and the console.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Guest image not found in {}: run ci/build-guest.sh (or set LIVESNAP_GUEST_DIR)", dir.display())]
    ImageMissing { dir: PathBuf },
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Guest file {path} is too large for a newc archive ({len} bytes; at most 4 GiB - 1)")]
    FileTooLarge { path: String, len: usize },
    #[error("Cannot create the console log {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write the initrd of the guest")]
    WriteInitrd(#[source] io::Error),
    #[error("Cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot wait for QEMU")]
    Wait(#[source] io::Error),
    #[error("Guest did not finish within {timeout:?}; QEMU killed.\nQEMU stderr:\n{stderr}\nConsole tail:\n{tail}")]
    Timeout { timeout: Duration, stderr: String, tail: String },
    #[error("QEMU exited ({status}) without printing {EXIT_MARKER}.\nQEMU stderr:\n{stderr}\nConsole tail:\n{tail}")]
    NoExitMarker { status: ExitStatus, stderr: String, tail: String },
    #[error("Console did not show {needle:?} within {timeout:?} (QEMU exited: {exited}).\nConsole tail:\n{tail}")]
    ConsoleWait { needle: String, timeout: Duration, exited: bool, tail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A file put into the guest's root file system next to `/job.sh`.
#[derive(Clone, Debug)]
pub struct GuestFile {
    /// Absolute path in the guest; missing parent directories are created.
    pub path: String,
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// vhost-user-blk sockets, in order: the first is `/dev/vda`, the second `/dev/vdb`, ...
    pub disks: Vec<PathBuf>,
    /// Queues QEMU asks of each disk.
    pub num_queues: u16,
    /// `/job.sh`, run by busybox `sh` from `/` with `PATH` set to busybox's applets. Its exit
    /// code is [`GuestRun::exit_code`]; it does not need to power off.
    pub job_script: String,
    /// More files for the guest (a guest agent, test data).
    pub files: Vec<GuestFile>,
    /// Virtual CPUs. The guest's virtio-blk driver uses at most one queue per CPU, so this
    /// also bounds the queues in use.
    pub cpus: u32,
    /// Guest RAM in MiB (shared memfd, as vhost-user needs).
    pub memory_mib: u32,
    /// From start to QEMU's exit; QEMU is killed after it.
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// Appended to QEMU's command line.
    pub extra_args: Vec<String>,
    /// Also write the console to this file as it comes (useful when a test hangs).
    pub console_log: Option<PathBuf>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            disks: Vec::new(),
            num_queues: 2,
            job_script: String::new(),
            files: Vec::new(),
            cpus: 2,
            memory_mib: 512,
            timeout: Duration::from_secs(180),
            kernel_args: String::new(),
            extra_args: Vec::new(),
            console_log: None,
        }
    }
}

/// How a guest ended.
#[derive(Debug)]
pub struct GuestRun {
    /// The exit code of `/job.sh`, from the console's exit marker.
    pub exit_code: i32,
    /// All the serial console: kernel messages, the job's output, the marker.
    pub console: String,
    /// QEMU's stderr.
    pub stderr: String,
    /// From start to QEMU's exit (for reports; never assert on it).
    pub elapsed: Duration,
}

impl GuestRun {
    /// The value of the last console line of the form `KEY=value` (e.g. a checksum the job
    /// printed), trimmed. Kernel messages interleaved with the job's output can break a line, so
    /// a job should print what the test parses on lines of their own.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.console.lines().rev().find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix)).map(str::trim)
    }
}

/// What a VMM boots for `config`: the kernel, an initrd holding the job and the files, and the
/// kernel command line. QEMU gets them as arguments; a libvirt domain names them in `<os>`.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl BootFiles {
    /// Writes `config`'s initrd into `dir` (which must outlive the VM).
    pub fn write(config: &GuestConfig, dir: &Path) -> Result<BootFiles> {
        let guest = guest_dir();
        let kernel = guest.join("vmlinuz");
        let base = guest.join("initramfs.img");
        if !kernel.is_file() || !base.is_file() {
            return Err(Error::ImageMissing { dir: guest });
        }
        let initrd = dir.join("initrd.img");
        write_initrd(&base, &initrd, config)?;
        let cmdline = format!("console=ttyS0 panic=-1 livesnap.disks={} {}", config.disks.len(), config.kernel_args);
        Ok(BootFiles { kernel, initrd, cmdline })
    }
}

/// The directory holding `vmlinuz` and `initramfs.img`.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("LIVESNAP_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("guest"),
    }
}

/// A running QEMU guest, killed when dropped.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    console: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    timeout: Duration,
    // Holds the initrd until QEMU is gone.
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots the guest and waits for it to power off: [`Guest::start`] then [`Guest::wait`].
    pub fn boot(config: GuestConfig) -> Result<GuestRun> {
        Guest::start(config)?.wait()
    }

    /// Starts QEMU on the guest image with `config`'s job; returns once QEMU runs.
    pub fn start(config: GuestConfig) -> Result<Guest> {
        let tmp = tempfile::Builder::new().prefix("livesnap-guest").tempdir().map_err(Error::WriteInitrd)?;
        let boot = BootFiles::write(&config, tmp.path())?;

        let mem = config.memory_mib;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-M", "q35", "-nographic", "-no-reboot", "-nodefaults"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .args(["-smp", &config.cpus.to_string(), "-m", &format!("{mem}M")])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&boot.kernel)
            .arg("-initrd")
            .arg(&boot.initrd)
            .arg("-append")
            .arg(&boot.cmdline);
        for (i, sock) in config.disks.iter().enumerate() {
            cmd.arg("-chardev")
                .arg(format!("socket,id=c{i},path={},reconnect=1", sock.display()))
                .arg("-device")
                .arg(format!("vhost-user-blk-pci,chardev=c{i},num-queues={}", config.num_queues));
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());

        let log = match &config.console_log {
            Some(p) => Some(File::create(p).map_err(|source| Error::ConsoleLog { path: p.clone(), source })?),
            None => None,
        };
        let mut child = cmd.spawn().map_err(|source| Error::Spawn { program: "qemu-system-x86_64".into(), source })?;
        let started = Instant::now();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, Arc::clone(&console), log));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(err, Arc::clone(&stderr), None));
        }
        Ok(Guest { child: Some(child), console, stderr, readers, started, timeout: config.timeout, _dir: tmp })
    }

    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&lock(&self.console)).into_owned()
    }

    /// Waits until the console shows `needle` (e.g. a line the job prints when it is ready for
    /// the host's next step), at most `timeout`.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait().map_err(Error::Wait)?.is_some(),
                None => true,
            };
            if exited || start.elapsed() > timeout {
                // A last look: the readers may have been behind the exit.
                if exited {
                    self.join_readers();
                    if self.console().contains(needle) {
                        return Ok(());
                    }
                }
                return Err(Error::ConsoleWait {
                    needle: needle.to_string(),
                    timeout,
                    exited,
                    tail: tail(&self.console(), TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for QEMU to exit (the job done and the guest powered off), at most what remains
    /// of the config's timeout; kills QEMU when it runs out.
    pub fn wait(mut self) -> Result<GuestRun> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Wait(io::Error::other("QEMU was already reaped")));
        };
        let status = loop {
            if let Some(status) = child.try_wait().map_err(Error::Wait)? {
                break status;
            }
            if self.started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                self.join_readers();
                return Err(Error::Timeout {
                    timeout: self.timeout,
                    stderr: self.stderr_text(),
                    tail: tail(&self.console(), TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        };
        let elapsed = self.started.elapsed();
        self.join_readers();
        let console = self.console();
        let stderr = self.stderr_text();
        match parse_exit_code(&console) {
            Some(exit_code) => Ok(GuestRun { exit_code, console, stderr, elapsed }),
            None => Err(Error::NoExitMarker { status, stderr, tail: tail(&console, TAIL_LINES) }),
        }
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lock(m: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    // A reader thread cannot panic while holding the lock; take the data even if one did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn spawn_reader(
    mut from: impl Read + Send + 'static,
    to: Arc<Mutex<Vec<u8>>>,
    mut log: Option<File>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    lock(&to).extend_from_slice(&buf[..n]);
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                }
            }
        }
    })
}

/// QEMU arguments that give the guest a `vhost-user-vsock-pci` device backed by the vhost-user
/// vsock backend (vhost-device-vsock) listening on `vhost_socket`.
pub fn vsock_args(vhost_socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=vsock0,path={}", vhost_socket.display()),
        "-device".into(),
        "vhost-user-vsock-pci,chardev=vsock0".into(),
    ]
}

/// QEMU arguments that give the guest a second serial port (its `/dev/ttyS1`) on a unix socket
/// QEMU listens on at `socket`, for the host to talk to the guest's job.
pub fn serial_args(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=host0,path={},server=on,wait=off", socket.display()),
        "-device".into(),
        "isa-serial,chardev=host0".into(),
    ]
}

/// The values of the `KEY=N` reports in `text` (a guest's console, a log), with where each
/// stands, in order; `key` includes the `=`.
pub fn reports<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = (usize, u64)> + 'a {
    text.match_indices(key).filter_map(move |(at, _)| {
        let digits: String = text[at + key.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().map(|v| (at, v))
    })
}

/// The largest `KEY=N` report in `text`, 0 without one.
pub fn last_report(text: &str, key: &str) -> u64 {
    reports(text, key).map(|(_, v)| v).max().unwrap_or(0)
}

/// The job's exit code from the last marker line of `console`.
pub fn parse_exit_code(console: &str) -> Option<i32> {
    let at = console.rfind(EXIT_MARKER)? + EXIT_MARKER.len();
    let digits: String = console[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(out, "{}", l.trim_end_matches('\r'));
    }
    out
}

/// Writes `base` followed by an archive of the job and the config's files to `to`.
fn write_initrd(base: &Path, to: &Path, config: &GuestConfig) -> Result<()> {
    let mut image = std::fs::read(base).map_err(|source| Error::Read { path: base.to_path_buf(), source })?;
    // Linux looks for the next archive at a 4-byte boundary and skips zeros before it.
    image.resize(image.len().next_multiple_of(4), 0);
    let mut files =
        vec![GuestFile { path: "/job.sh".into(), contents: config.job_script.clone().into_bytes(), mode: 0o755 }];
    files.extend(config.files.iter().cloned());
    image.extend_from_slice(&newc_archive(&files)?);
    std::fs::write(to, image).map_err(Error::WriteInitrd)
}

/// A cpio archive in the "new ASCII" (newc) format the kernel unpacks as an initramfs, holding
/// `files` and a directory entry for each of their parent directories.
///
/// Each entry: the magic `070701`, thirteen 8-digit hex fields (ino, mode, uid, gid, nlink,
/// mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize with its NUL, check),
/// the name and a NUL padded to 4 bytes, then the data padded to 4 bytes. The archive ends with
/// an entry named `TRAILER!!!`.
pub fn newc_archive(files: &[GuestFile]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut ino = 0x4c53_0000u32; // Any number; the kernel only uses it to find hard links.
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let path = f.path.trim_start_matches('/');
        let mut parent = String::new();
        for part in path.split('/').rev().skip(1).collect::<Vec<_>>().into_iter().rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
                ino += 1;
                newc_entry(&mut out, ino, &parent, 0o040_000 | 0o755, 2, &[], 0);
            }
        }
        ino += 1;
        let len = u32::try_from(f.contents.len())
            .map_err(|_| Error::FileTooLarge { path: f.path.clone(), len: f.contents.len() })?;
        newc_entry(&mut out, ino, path, 0o100_000 | (f.mode & 0o7777), 1, &f.contents, len);
    }
    newc_entry(&mut out, 0, "TRAILER!!!", 0, 1, &[], 0);
    Ok(out)
}

/// One entry; `data_len` is `data.len()`, checked to fit by the caller.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8], data_len: u32) {
    // Names are paths of a few dozen bytes; a longer one than 4 GiB cannot be built.
    let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    let fields = [ino, mode, 0, 0, nlink, 0, data_len, 0, 0, 0, 0, name_size, 0];
    let start = out.len();
    out.extend_from_slice(b"070701");
    for v in fields {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(start + (out.len() - start).next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_each_key_with_digits_and_the_last_is_the_largest() {
        let text = "vda-P=3\r\nvdb-P=9 vda-P= vda-P=12x vda-P=4";
        assert_eq!(reports(text, "vda-P=").map(|(_, v)| v).collect::<Vec<_>>(), [3, 12, 4]);
        assert_eq!(reports(text, "vda-P=").next(), Some((0, 3)));
        assert_eq!(last_report(text, "vda-P="), 12);
        assert_eq!(last_report(text, "vdc-P="), 0);
    }

    #[test]
    fn exit_code_is_read_from_the_last_marker() {
        let console = "LIVESNAP-JOB-EXIT=1 echoed by the job\r\n[ 1.0] noise\r\nLIVESNAP-JOB-EXIT=42\r\n[ 2.0] reboot";
        assert_eq!(parse_exit_code(console), Some(42));
        assert_eq!(parse_exit_code("no marker"), None);
    }

    #[test]
    fn value_is_read_from_a_line_of_its_own() {
        let run = GuestRun {
            exit_code: 0,
            console: "SUM=1\r\nxx SUM=2\r\nSUM= abc \r\n".into(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        };
        assert_eq!(run.value("SUM"), Some("abc"));
        assert_eq!(run.value("OTHER"), None);
    }

    /// `cpio -i` is an independent reader of the format: it must list and extract what we wrote.
    #[test]
    fn newc_archive_is_read_back_by_cpio() {
        let files = [
            GuestFile { path: "/job.sh".into(), contents: b"echo hi\n".to_vec(), mode: 0o755 },
            GuestFile { path: "/opt/a/b.bin".into(), contents: (0..=255u8).cycle().take(1001).collect(), mode: 0o644 },
        ];
        let archive = newc_archive(&files).expect("small files fit");
        assert_eq!(archive.len() % 4, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cpio = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio is installed (ci/install-deps.sh)");
        cpio.stdin.take().expect("stdin").write_all(&archive).expect("write to cpio");
        assert!(cpio.wait().expect("wait for cpio").success());
        for f in &files {
            let p = dir.path().join(f.path.trim_start_matches('/'));
            assert_eq!(std::fs::read(&p).expect("extracted file"), f.contents, "{}", f.path);
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).expect("stat").permissions());
            assert_eq!(mode & 0o777, f.mode);
        }
        assert!(dir.path().join("opt/a").is_dir());
    }
}
