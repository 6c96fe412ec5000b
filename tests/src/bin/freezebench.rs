//! freezebench: how long livesnapd keeps a guest frozen, and where that time goes.
//!
//! Boots one QEMU guest (TCG) whose small ext4 disk is served by livesnap-blk (with its snapshot
//! engine), with the guest agent inside and NO hooks (an empty hooks directory), reached over
//! hybrid vsock (`vhost-user-vsock-pci` backed by vhost-device-vsock). A light workload writes
//! in the guest: a line appended and fsync'd every 100 ms, and 256 KiB rewritten without fsync
//! every second, so that each freeze has dirty pages to flush. Then, each phase N times with a
//! pause between iterations (the workload dirties the page cache again meanwhile):
//!
//! 0. **guest**: before the host starts, the guest's job itself runs busybox `fsfreeze --freeze`
//!    and `--unfreeze` (and `busybox true`, the cost of starting a process), marked in the
//!    kernel log: what FIFREEZE and FITHAW cost in the emulated kernel, without the agent;
//! 1. **agent**: one connection to the agent, N × Ping (the bare round trip through vsock and the
//!    guest), then N × (Freeze, Thaw) with no snapshot, each RPC timed from the host: what the
//!    guest (under emulation) costs; livesnap-blk's counters around each freeze show what it
//!    flushed to the disk;
//! 2. **cut**: N × (Begin, Merge) on livesnap-blk's control socket, as `livesnap-blk ctl` does:
//!    the Begin's round trip from the host and the backend's own pause (`pause_us`);
//! 3. **livesnapd**: N × `CreateSnapshot` (quiesce required, backup auto: full, then incremental)
//!    through livesnapd's gRPC API: the freeze window it records (`Thawed.freeze_window_us`,
//!    from the freeze request to the thaw's reply) and the cut's pause (`Cut.pause_us`), plus
//!    the Begin round trip inside the job when livesnapd's log shows it (`cut_rtt_us`).
//!
//! The table breaks the window down: freeze window = agent freeze + cut + agent thaw + overhead.
//! `--guest-kernel-args rcupdate.rcu_expedited=1` shows how much of FIFREEZE is RCU grace
//! periods (freeze_super's percpu rwsems), which TCG stretches.
//!
//! ```sh
//! cargo build --release -p livesnap-blk -p livesnap-control -p livesnap-tests \
//!     --bin livesnap-blk --bin livesnapd --bin freezebench && target/release/freezebench
//! ```
//!
//! Needs the guest image (`ci/build-guest.sh`), the static agent (`ci/package-agent.sh` or
//! `ci/demo.sh` builds it), and vhost-device-vsock (on `PATH` or in `~/.cargo/bin`); found as
//! [`livesnap_tests::programs`] says, or through `LIVESNAP_BLK`, `LIVESNAPD`,
//! `LIVESNAP_AGENT_STATIC` and `VHOST_DEVICE_VSOCK`. Files go to `target/freezebench/`.
//!
//! The agent is reached through a small in-process relay (a unix socket that does the hybrid
//! vsock handshake and copies bytes): `livesnap_control::agent::AgentClient` is only a
//! dev-dependency of livesnap-tests, which a binary cannot use. The relay adds one host-local
//! unix socket hop each way to the bare agent timings, and nothing to livesnapd's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use livesnap_proto::agent::agent_client::AgentClient;
use livesnap_proto::agent::{FreezeRequest, FsOutcome, PingRequest, ThawRequest};
use livesnap_proto::daemon::livesnapd_client::LivesnapdClient;
use livesnap_proto::daemon::{snapshot_event::Event, BackupKind, BackupMode, CreateSnapshotRequest, QuiesceMode};
use livesnap_proto::error::chain;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_proto::snapshot::{BeginRequest, MergeRequest, StatsRequest};
use livesnap_proto::unix_channel;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{vsock_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

const VM: &str = "bench";
const AGENT_PORT: u32 = 7735;
/// For hangs only: TCG is slow and the machine may be busy.
const WAIT: Duration = Duration::from_secs(300);
/// Each RPC of the bench, at most.
const CALL: Duration = Duration::from_secs(60);
/// The agent's lease for a bare freeze.
const FREEZE_DEADLINE_MS: u64 = 10_000;

/// The guest's job: the agent (no hooks: an empty hooks directory), restarted if it dies, and a
/// light writer.
const JOB: &str = r#"set -e
mkdir -p /mnt/data /run /etc/livesnap/hooks.d
mount -t ext4 /dev/vda /mnt/data
( while true; do
    LIVESNAP_LOG=@AGENT_LOG@ /usr/sbin/livesnap-agent --vsock-port 7735 --hooks-dir /etc/livesnap/hooks.d
    echo "AGENT-EXITED=$?"
    sleep 1
  done ) </dev/null &
mkdir -p /mnt/data/files
( i=0
  while true; do
    i=$((i + 1))
    echo "line $i" >>/mnt/data/log.txt
    sync /mnt/data/log.txt
    if [ $((i % 10)) -eq 0 ]; then
      dd if=/dev/urandom of=/mnt/data/files/f-$((i / 10 % 8)).bin bs=64k count=4 2>/dev/null
    fi
    usleep 100000
  done ) &
# The reference: the same freeze by busybox fsfreeze, marked in the kernel log (µs timestamps on
# the console), and the cost of starting a busybox applet, to subtract.
j=0
while [ "$j" -lt @N@ ]; do
  j=$((j + 1))
  usleep @GAP_US@
  echo "FB-EXEC0 $j" >/dev/kmsg; /bin/busybox true; echo "FB-EXEC1 $j" >/dev/kmsg
  echo "FB-FREEZE0 $j" >/dev/kmsg; fsfreeze --freeze /mnt/data; echo "FB-FREEZE1 $j" >/dev/kmsg
  fsfreeze --unfreeze /mnt/data; echo "FB-THAW1 $j" >/dev/kmsg
done
echo BENCH-READY
wait
"#;

/// The kernel's timestamps (µs) of the console's `[  12.345678] FB-<what> <j>` lines: (what, j) → t.
fn kmsg_marks(console: &str) -> std::collections::HashMap<(String, usize), u64> {
    let mut m = std::collections::HashMap::new();
    for line in console.lines() {
        let Some(at) = line.find("] FB-") else { continue };
        let Some(open) = line[..at].rfind('[') else { continue };
        let Ok(t) = line[open + 1..at].trim().parse::<f64>() else { continue };
        let mut words = line[at + 5..].split_whitespace();
        let (Some(what), Some(Ok(j))) = (words.next(), words.next().map(str::parse::<usize>)) else { continue };
        m.insert((what.to_string(), j), (t * 1e6) as u64);
    }
    m
}

/// Freeze window of livesnapd and where it goes, in a QEMU TCG guest with the agent and no hooks.
#[derive(Parser, Debug)]
#[command(name = "freezebench")]
struct Args {
    /// Iterations of each phase.
    #[arg(short = 'n', long, default_value_t = 30)]
    iterations: usize,
    /// Size of the guest's disk (the backup reads it all the first time).
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Pause between iterations, in ms (the workload dirties pages meanwhile).
    #[arg(long, default_value_t = 500)]
    gap_ms: u64,
    /// Virtual CPUs of the guest.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// The agent's log level (its log goes to the guest's console, target/freezebench/console.log).
    #[arg(long, default_value = "warn")]
    agent_log: String,
    /// Appended to the guest's kernel command line (e.g. `rcupdate.rcu_expedited=1`: FIFREEZE's
    /// RCU grace periods are most of a freeze under TCG).
    #[arg(long, default_value = "")]
    guest_kernel_args: String,
    /// Also print the samples and the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

fn say(msg: &str) {
    eprintln!("freezebench: {msg}");
}

struct Tools {
    blk: PathBuf,
    livesnapd: PathBuf,
    agent: PathBuf,
    vsock: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        let guest = livesnap_tests::guest::guest_dir();
        ensure!(
            guest.join("vmlinuz").is_file() && guest.join("initramfs.img").is_file(),
            "the guest image is not in {}: run ci/build-guest.sh (or set LIVESNAP_GUEST_DIR)",
            guest.display()
        );
        Ok(Tools {
            blk: programs::livesnap_blk()?,
            livesnapd: programs::livesnapd()?,
            agent: programs::agent_static()?,
            vsock: programs::vhost_device_vsock()?,
        })
    }
}

/// A unix socket at `at` whose every connection is relayed to guest port `port` behind the
/// hybrid vsock socket `uds` (`CONNECT <port>\n` → `OK <n>\n`, then the stream).
async fn agent_relay(at: &Path, uds: PathBuf, port: u32) -> Result<()> {
    let _ = std::fs::remove_file(at);
    let l = UnixListener::bind(at).with_context(|| format!("cannot listen on {}", at.display()))?;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let uds = uds.clone();
            tokio::spawn(async move {
                if let Ok(mut guest) = hybrid_connect(&uds, port).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
                }
            });
        }
    });
    Ok(())
}

async fn hybrid_connect(uds: &Path, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        ensure!(line.len() <= 32, "hybrid vsock: reply too long");
    }
    ensure!(line.starts_with(b"OK "), "hybrid vsock refused: {:?}", String::from_utf8_lossy(&line));
    Ok(s)
}

async fn channel(path: &Path) -> Result<Channel> {
    let ep = Endpoint::from_static("http://unix.invalid");
    tokio::time::timeout(Duration::from_secs(10), unix_channel(ep, path.to_path_buf()))
        .await
        .with_context(|| format!("connecting to {} timed out", path.display()))?
        .with_context(|| format!("cannot connect to {}", path.display()))
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<(T, Duration)> {
    let t = Instant::now();
    let r = tokio::time::timeout(CALL, f).await.with_context(|| format!("{what} timed out"))?;
    let r = r.with_context(|| format!("{what} failed"))?;
    Ok((r.into_inner(), t.elapsed()))
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Samples in µs.
#[derive(Default)]
struct Series {
    name: &'static str,
    v: Vec<u64>,
}

struct Stats {
    p50: u64,
    p90: u64,
    p99: u64,
    max: u64,
    mean: u64,
}

impl Series {
    fn new(name: &'static str) -> Series {
        Series { name, v: Vec::new() }
    }

    /// Nearest-rank percentiles (with 30 samples p99 is the maximum).
    fn stats(&self) -> Option<Stats> {
        if self.v.is_empty() {
            return None;
        }
        let mut s = self.v.clone();
        s.sort_unstable();
        let n = s.len();
        let at = |p: f64| s[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Stats {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: s[n - 1],
            mean: s.iter().sum::<u64>() / n as u64,
        })
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn row(out: &mut String, label: &str, s: Option<Stats>) {
    match s {
        Some(s) => {
            let _ = writeln!(
                out,
                "  {label:<44} {:>9} {:>9} {:>9} {:>9} {:>9}",
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.max),
                ms(s.mean)
            );
        }
        None => {
            let _ = writeln!(out, "  {label:<44} {:>9}", "n/a");
        }
    }
}

fn json_array(s: &Series) -> String {
    let v: Vec<String> = s.v.iter().map(u64::to_string).collect();
    format!("\"{}\":[{}]", s.name, v.join(","))
}

/// The `cut_rtt_us=N` values of livesnapd's log, in order.
fn cut_rtts(log: &str) -> Vec<u64> {
    livesnap_tests::guest::reports(log, "cut_rtt_us=").map(|(_, v)| v).collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("freezebench FAILED: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nfreezebench FAILED: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    ensure!(args.iterations > 0, "--iterations must be at least 1");
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    let tools = Tools::find()?;
    let dir = root.join("target/freezebench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blk-state"))?;
    let image = dir.join("vda.raw");
    let disk_sock = dir.join("vda.sock");
    let control = dir.join("control.sock");
    let vhost_vsock = dir.join("vsock-vhost.sock");
    let uds = dir.join("guest.vsock");
    let relay = dir.join("agent-relay.sock");
    let socket = dir.join("livesnapd.sock");
    let config = dir.join("livesnapd.toml");
    let daemon_log = dir.join("livesnapd.log");
    let console_log = dir.join("console.log");
    let gap = Duration::from_millis(args.gap_ms);
    let n = args.iterations;

    say(&format!("files in {}", dir.display()));
    std::fs::File::create(&image)?.set_len(args.disk_mib << 20)?;
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).output().context("cannot run mkfs.ext4")?;
    ensure!(mkfs.status.success(), "mkfs.ext4 failed: {}", String::from_utf8_lossy(&mkfs.stderr));

    let mut blk_cmd = Command::new(&tools.blk);
    blk_cmd
        .args(["--vm", VM, "--disk"])
        .arg(format!("id=vda,image={},socket={}", image.display(), disk_sock.display()))
        .arg("--state-dir")
        .arg(dir.join("blk-state"))
        .arg("--control")
        .arg(&control)
        .stderr(std::fs::File::create(dir.join("livesnap-blk.log"))?);
    let _blk = Daemon::spawn("livesnap-blk", blk_cmd, &[disk_sock.as_path(), control.as_path()])?;

    let mut vsock_cmd = Command::new(&tools.vsock);
    vsock_cmd
        .arg("--vm")
        .arg(format!("guest-cid=3,socket={},uds-path={}", vhost_vsock.display(), uds.display()))
        .stderr(Stdio::null());
    let _vsock = Daemon::spawn("vhost-device-vsock", vsock_cmd, &[vhost_vsock.as_path()])?;

    say(&format!(
        "booting the guest (QEMU TCG, {} vCPUs, {} MiB ext4 disk on livesnap-blk, agent, no hooks)",
        args.cpus, args.disk_mib
    ));
    let agent_bin = std::fs::read(&tools.agent).with_context(|| format!("cannot read {}", tools.agent.display()))?;
    let mut guest = Guest::start(GuestConfig {
        disks: vec![disk_sock.clone()],
        job_script: JOB
            .replace("@AGENT_LOG@", &args.agent_log)
            .replace("@N@", &n.to_string())
            .replace("@GAP_US@", &(args.gap_ms * 1000).to_string()),
        files: vec![GuestFile { path: "/usr/sbin/livesnap-agent".into(), contents: agent_bin, mode: 0o755 }],
        extra_args: vsock_args(&vhost_vsock),
        console_log: Some(console_log.clone()),
        cpus: args.cpus,
        kernel_args: args.guest_kernel_args.clone(),
        timeout: Duration::from_secs(3600),
        ..GuestConfig::default()
    })?;
    guest.wait_for_console("BENCH-READY", WAIT)?;
    say(&format!(
        "guest up and its {n} reference freezes (busybox fsfreeze) done after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let marks = kmsg_marks(&guest.console());
    let mut g_exec = Series::new("guest_exec_us");
    let mut g_freeze = Series::new("guest_fsfreeze_f_us");
    let mut g_thaw = Series::new("guest_fsfreeze_u_us");
    let span = |a: &str, b: &str, j: usize| -> Option<u64> {
        let (a, b) = (marks.get(&(a.to_string(), j))?, marks.get(&(b.to_string(), j))?);
        b.checked_sub(*a)
    };
    for j in 1..=n {
        if let (Some(e), Some(f), Some(t)) =
            (span("EXEC0", "EXEC1", j), span("FREEZE0", "FREEZE1", j), span("FREEZE1", "THAW1", j))
        {
            g_exec.v.push(e);
            g_freeze.v.push(f);
            g_thaw.v.push(t);
        }
    }

    // Phase 1: the agent alone.
    agent_relay(&relay, uds.clone(), AGENT_PORT).await?;
    let t = Instant::now();
    let mut agent = loop {
        let r: Result<AgentClient<Channel>> = async {
            let mut a = AgentClient::new(channel(&relay).await?);
            timed("Ping", a.ping(PingRequest {})).await?;
            Ok(a)
        }
        .await;
        match r {
            Ok(a) => break a,
            Err(e) if t.elapsed() > Duration::from_secs(120) => {
                return Err(e.context(format!("the guest agent never answered; console in {}", console_log.display())))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    say(&format!("agent answers; phase 1: {n} x Ping, then {n} x (Freeze, Thaw) on one connection"));
    let mut a_ping = Series::new("agent_ping_us");
    for _ in 0..n {
        let (_, d) = timed("Ping", agent.ping(PingRequest {})).await?;
        a_ping.v.push(us(d));
    }
    // What each freeze wrote to the disk: the backend's counters around it.
    let mut ctl = SnapshotControlClient::new(channel(&control).await?);
    let mut f_written = Series::new("freeze_written_bytes");
    let mut f_flushes = Series::new("freeze_flushes");
    let mut a_freeze = Series::new("agent_freeze_us");
    let mut a_thaw = Series::new("agent_thaw_us");
    let mut a_pair = Series::new("agent_freeze_thaw_us");
    let mut filesystems = String::new();
    for i in 0..n {
        tokio::time::sleep(gap).await;
        let (before, _) = timed("Stats", ctl.stats(StatsRequest {})).await?;
        let req = FreezeRequest { deadline_ms: FREEZE_DEADLINE_MS, snapshot_id: format!("freezebench-{i}") };
        let (f, df) = timed("Freeze", agent.freeze(req)).await?;
        let (after, _) = timed("Stats", ctl.stats(StatsRequest {})).await?;
        let (th, dt) = timed("Thaw", agent.thaw(ThawRequest {})).await?;
        let sum = |r: &livesnap_proto::snapshot::StatsReply| {
            r.disks.iter().fold((0, 0), |(w, f), d| (w + d.written_bytes, f + d.flushes))
        };
        let ((w0, fl0), (w1, fl1)) = (sum(&before), sum(&after));
        f_written.v.push(w1.saturating_sub(w0));
        f_flushes.v.push(fl1.saturating_sub(fl0));
        ensure!(f.frozen, "the agent did not freeze: {}", f.error);
        ensure!(f.hooks.is_empty(), "the agent ran hooks ({}); the bench wants none", f.hooks.len());
        ensure!(th.was_frozen && th.error.is_empty(), "the thaw did not thaw: {}", th.error);
        if i == 0 {
            let names: Vec<String> = f
                .filesystems
                .iter()
                .map(|fs| {
                    let how = if fs.outcome == FsOutcome::FsFrozen as i32 { "frozen" } else { "not frozen" };
                    format!("{} ({}, {how})", fs.mount_point, fs.fs_type)
                })
                .collect();
            filesystems = names.join(", ");
        }
        a_freeze.v.push(us(df));
        a_thaw.v.push(us(dt));
        a_pair.v.push(us(df + dt));
    }
    drop(agent);

    // Phase 2: the backend's cut alone.
    say(&format!("phase 2: {n} x (Begin, Merge) on livesnap-blk's control socket"));
    let mut b_rtt = Series::new("begin_rtt_us");
    let mut b_pause = Series::new("begin_pause_us");
    for _ in 0..n {
        tokio::time::sleep(gap).await;
        let (b, d) = timed("Begin", ctl.begin(BeginRequest::default())).await?;
        let snap = b.snapshot.context("Begin's reply carries no snapshot")?;
        b_rtt.v.push(us(d));
        b_pause.v.push(snap.pause_us);
        let (mut merge, _) = timed("Merge", ctl.merge(MergeRequest { snapshot_id: snap.id })).await?;
        let mut done = false;
        while let Some(p) =
            tokio::time::timeout(CALL, merge.message()).await.context("Merge timed out")?.context("Merge failed")?
        {
            done |= p.done;
        }
        ensure!(done, "the merge of snapshot {} ended before done", snap.id);
    }
    drop(ctl);

    // Phase 3: livesnapd's whole job.
    let toml = livesnap_tests::daemon::livesnapd_config(&dir, &socket, VM, &control, &uds, AGENT_PORT);
    std::fs::write(&config, &toml)?;
    let mut daemon_cmd = Command::new(&tools.livesnapd);
    daemon_cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    let log = std::fs::File::create(&daemon_log)?;
    daemon_cmd.stdout(log.try_clone()?).stderr(log);
    let daemon = Daemon::spawn("livesnapd", daemon_cmd, &[socket.as_path()])?;
    say(&format!(
        "phase 3: {n} x livesnapd CreateSnapshot (quiesce required, backup auto); its log in {}",
        daemon_log.display()
    ));
    let mut api = LivesnapdClient::new(channel(&socket).await?);
    let mut window = Series::new("freeze_window_us");
    let mut cut_pause = Series::new("cut_pause_us");
    let mut job = Series::new("job_us");
    let mut kinds = (0, 0);
    for i in 0..n {
        tokio::time::sleep(gap).await;
        let req = CreateSnapshotRequest {
            vm: VM.into(),
            backup: BackupMode::Auto as i32,
            quiesce: QuiesceMode::Required as i32,
            freeze_timeout_ms: 0,
        };
        let t = Instant::now();
        let (mut events, _) = timed("CreateSnapshot", api.create_snapshot(req)).await?;
        let (mut w, mut p, mut kind) = (None, None, None);
        while let Some(ev) = tokio::time::timeout(WAIT, events.message())
            .await
            .context("the snapshot job stalled")?
            .context("the snapshot stream failed")?
        {
            match ev.event {
                Some(Event::Cut(c)) => {
                    ensure!(
                        c.crash_consistent_reason.is_empty(),
                        "snapshot {i} is crash-consistent: {}",
                        c.crash_consistent_reason
                    );
                    p = Some(c.pause_us);
                }
                Some(Event::Thawed(th)) => w = Some(th.freeze_window_us),
                Some(Event::Done(b)) => kind = Some(b.kind),
                Some(Event::Failed(f)) => bail!("snapshot {i} failed at {}: {} (code {})", f.stage, f.reason, f.code),
                _ => {}
            }
        }
        let (Some(w), Some(p), Some(kind)) = (w, p, kind) else {
            bail!("snapshot {i}: the stream ended without cut, thawed and done events");
        };
        ensure!(w > 0, "snapshot {i}: livesnapd recorded no freeze window");
        job.v.push(us(t.elapsed()));
        window.v.push(w);
        cut_pause.v.push(p);
        if kind == BackupKind::Incremental as i32 {
            kinds.1 += 1;
        } else {
            kinds.0 += 1;
        }
    }
    drop(api);
    let status = daemon.stop(libc::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "livesnapd exited with {status}; its log is {}", daemon_log.display());
    let mut job_rtt = Series::new("job_cut_rtt_us");
    job_rtt.v = cut_rtts(&std::fs::read_to_string(&daemon_log).unwrap_or_default());
    if job_rtt.v.len() != n {
        job_rtt.v.clear();
    }
    drop(guest);

    // The table.
    let (f50, t50, b50, w50) = (
        a_freeze.stats().map_or(0, |s| s.p50),
        a_thaw.stats().map_or(0, |s| s.p50),
        b_rtt.stats().map_or(0, |s| s.p50),
        window.stats().map_or(0, |s| s.p50),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nfreezebench: {n} iterations per phase, {gap:?} apart; QEMU TCG guest, {} vCPUs, {} MiB ext4 disk on \
         livesnap-blk, a light writer, the agent with no hooks; its plan: {filesystems}{}",
        args.cpus,
        args.disk_mib,
        if args.guest_kernel_args.is_empty() {
            String::new()
        } else {
            format!("; guest kernel args: {}", args.guest_kernel_args)
        }
    );
    let _ = writeln!(out, "  {:<44} {:>9} {:>9} {:>9} {:>9} {:>9}", "(ms)", "p50", "p90", "p99", "max", "mean");
    let _ = writeln!(out, "  in the guest (kernel log timestamps), busybox, a process started each time:");
    row(&mut out, "  start of a busybox applet (busybox true)", g_exec.stats());
    row(&mut out, "  fsfreeze --freeze (FIFREEZE + process start)", g_freeze.stats());
    row(&mut out, "  fsfreeze --unfreeze (FITHAW + process start)", g_thaw.stats());
    let _ = writeln!(out, "  bare, from the host:");
    row(&mut out, "  agent Ping RPC (vsock + guest round trip)", a_ping.stats());
    row(&mut out, "  agent Freeze RPC", a_freeze.stats());
    row(&mut out, "  agent Thaw RPC", a_thaw.stats());
    row(&mut out, "  agent Freeze + Thaw", a_pair.stats());
    if let (Some(w), Some(f)) = (f_written.stats(), f_flushes.stats()) {
        let _ = writeln!(
            out,
            "    (each freeze wrote p50 {} KiB, max {} KiB, with p50 {} flushes, max {}, to the disk)",
            w.p50 / 1024,
            w.max / 1024,
            f.p50,
            f.max
        );
    }
    row(&mut out, "  backend Begin RPC (round trip)", b_rtt.stats());
    row(&mut out, "  backend Begin pause_us (disk paused)", b_pause.stats());
    let _ = writeln!(out, "  livesnapd CreateSnapshot (quiesce required; {} full, {} incremental):", kinds.0, kinds.1);
    row(&mut out, "  Cut.pause_us", cut_pause.stats());
    row(&mut out, "  Begin round trip in the job (cut_rtt_us)", job_rtt.stats());
    row(&mut out, "  Thawed.freeze_window_us", window.stats());
    row(&mut out, "  whole job (snapshot, backup, merge)", job.stats());
    let _ = writeln!(
        out,
        "  p50 breakdown: window {} = agent freeze {} + cut {} + agent thaw {} + overhead {} ms",
        ms(w50),
        ms(f50),
        ms(b50),
        ms(t50),
        format_args!("{:.3}", (w50 as f64 - (f50 + b50 + t50) as f64) / 1000.0)
    );
    let p99 = window.stats().map_or(0, |s| s.p99);
    let _ = writeln!(
        out,
        "  goal freeze window p99 < 100 ms: {} (p99 {} ms, nearest rank of {n})",
        if p99 < 100_000 { "met" } else { "NOT met" },
        ms(p99)
    );
    print!("{out}");
    if args.json {
        let all = [
            &g_exec, &g_freeze, &g_thaw, &a_ping, &f_written, &f_flushes, &a_freeze, &a_thaw, &a_pair, &b_rtt,
            &b_pause, &cut_pause, &job_rtt, &window, &job,
        ];
        let arrays: Vec<String> = all.iter().map(|s| json_array(s)).collect();
        println!("{{\"iterations\":{n},\"cpus\":{},\"disk_mib\":{},{}}}", args.cpus, args.disk_mib, arrays.join(","));
    }
    say(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}
