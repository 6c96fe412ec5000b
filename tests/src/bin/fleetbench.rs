//! fleetbench: one host, many VMs: the memory of idle livesnap-blk backends (against
//! qemu-storage-daemon serving the same disks, in the same run), and the time livesnapd takes
//! to back up all of them with a bound on the jobs at a time.
//!
//! ```text
//! cargo run --release -p livesnap-tests --bin fleetbench -- [--vms 100] [--jobs 4] [--disk 256M] [--data 16M] [--dir DIR]
//! ```
//!
//! Each VM: a sparse raw disk of `--disk` bytes holding `--data` bytes, half of them the same in
//! every VM (as an operating system's files are) and half its own; one livesnap-blk (its
//! default: 2 queues, confined) with its state directory and control socket, the test VMM
//! connected with both queues set up, idle. Then:
//! 1. the backends' memory, from `/proc/PID/status` (`VmRSS`) and `/proc/PID/smaps_rollup`
//!    (`Pss`: shared pages divided among their users, so that the sum is what they cost
//!    together);
//! 2. livesnapd with every VM in its config backs up all of them, `--jobs` at a time, through
//!    its gRPC socket (crash-consistent: no agents), a full backup each; then, after the VMM
//!    wrote 1 MiB into each disk, an incremental each; the wall time of each round, each job's
//!    time (median and slowest), what the repository stores and livesnapd's memory after;
//! 3. qemu-storage-daemon (`--peer`, the default) exporting each disk's image copy the same
//!    way, the VMM connected, idle: the same memory figures.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use livesnap_proto::daemon as pb;
use livesnap_proto::daemon::livesnapd_client::LivesnapdClient;
use livesnap_proto::error::chain;
use livesnap_tests::bench::{self, parse_size, QUEUES};
use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::Frontend;
use livesnap_tests::{pattern, programs};
use tonic::transport::Endpoint;

/// Benchmark of one host serving many VMs: idle backends' memory and backing all of them up.
#[derive(Debug, Parser)]
struct Args {
    /// VMs, one disk each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    vms: u32,
    /// Backup jobs at a time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    jobs: u32,
    /// Size of each disk (sparse; suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    disk: u64,
    /// Bytes of data in each disk, half shared by all VMs.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    data: u64,
    /// Also measure qemu-storage-daemon serving the same disks.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    peer: bool,
    /// Directory for the images, sockets, state and repository (default: a new tempdir under
    /// /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;
/// Hang guard for one backup job (not a measurement).
const JOB_WAIT: Duration = Duration::from_secs(600);
/// How long the backends sit idle before their memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// One VM's files.
struct Vm {
    name: String,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
}

/// A process's memory, in bytes.
#[derive(Clone, Copy, Default)]
struct Mem {
    rss: u64,
    pss: u64,
}

/// The value in kB of `key` in a `/proc` file of `key: N kB` lines, in bytes.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|k| k << 10)
}

fn mem(pid: u32) -> Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(Mem { rss: proc_kb(&status, "VmRSS:").context("no VmRSS")?, pss: proc_kb(&rollup, "Pss:").context("no Pss")? })
}

/// One line of the memory table: total, mean and largest of `mems`.
fn mem_line(what: &str, mems: &[Mem]) {
    let n = mems.len().max(1) as f64;
    let m = |v: u64| v as f64 / MIB as f64;
    let rss: u64 = mems.iter().map(|x| x.rss).sum();
    let pss: u64 = mems.iter().map(|x| x.pss).sum();
    let max = mems.iter().map(|x| x.rss).max().unwrap_or(0);
    println!("| {what} | {} | {:.1} | {:.2} | {:.2} | {:.1} |", mems.len(), m(rss), m(rss) / n, m(max), m(pss) / n);
}

/// Writes VM `i`'s data: the first half of `data` the same in every VM, the second its own.
fn fill_image(path: &Path, i: u32, disk: u64, data: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(disk)?;
    let half = data / 2;
    let shared = pattern::random(1, half as usize);
    f.write_all_at(&shared, 0)?;
    let own = pattern::random(1000 + u64::from(i), (data - half) as usize);
    // Its own data in the middle of the disk, so that the disk has holes around it.
    f.write_all_at(&own, disk / 2)?;
    Ok(())
}

/// Backs up every VM, `jobs` at a time: the wall time, each job's time and the bytes stored.
fn backup_round(socket: &Path, vms: &[Vm], jobs: u32) -> Result<(Duration, Vec<f64>, u64)> {
    let next = AtomicUsize::new(0);
    let times = Mutex::new(Vec::new());
    let stored = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    let ch = rt.block_on(livesnap_proto::unix_channel(
                        Endpoint::from_static("http://livesnapd.invalid"),
                        socket.to_path_buf(),
                    ))?;
                    let mut client = LivesnapdClient::new(ch);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(vm) = vms.get(i) else { return Ok(()) };
                        let t = Instant::now();
                        let req = pb::CreateSnapshotRequest {
                            vm: vm.name.clone(),
                            backup: pb::BackupMode::Auto as i32,
                            quiesce: pb::QuiesceMode::Off as i32,
                            freeze_timeout_ms: 0,
                        };
                        let backup = rt.block_on(async {
                            tokio::time::timeout(JOB_WAIT, async {
                                let mut stream = client.create_snapshot(req).await?.into_inner();
                                while let Some(e) = stream.message().await? {
                                    match e.event {
                                        Some(pb::snapshot_event::Event::Done(b)) => return Ok(b),
                                        Some(pb::snapshot_event::Event::Failed(f)) => {
                                            bail!("the backup of {} failed at {}: {}", vm.name, f.stage, f.reason)
                                        }
                                        _ => {}
                                    }
                                }
                                bail!("the event stream of {} ended without an outcome", vm.name)
                            })
                            .await
                            .with_context(|| format!("the backup of {} did not end in time", vm.name))?
                        })?;
                        times.lock().unwrap_or_else(|e| e.into_inner()).push(t.elapsed().as_secs_f64());
                        let bytes: u64 = backup.disks.iter().map(|d| d.bytes_stored).sum();
                        stored.fetch_add(bytes as usize, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a backup worker panicked"))??;
        }
        Ok(())
    })?;
    let times = times.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok((start.elapsed(), times, stored.load(Ordering::Relaxed) as u64))
}

fn round_line(what: &str, (wall, times, stored): &(Duration, Vec<f64>, u64), vms: usize) {
    println!(
        "| {what} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} |",
        wall.as_secs_f64(),
        wall.as_secs_f64() / vms as f64,
        bench::median(times.clone()).unwrap_or(f64::NAN),
        times.iter().copied().fold(0.0, f64::max),
        *stored as f64 / MIB as f64
    );
}

/// Bytes the files under `dir` occupy on disk.
fn du(dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(["-s", "-B1"]).arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|v| v.parse().ok()).context("du printed no size")
}

fn measure(args: &Args, dir: &Path) -> Result<()> {
    let n = args.vms as usize;
    println!(
        "fleetbench: {n} VMs, disks {} MiB with {} MiB of data (half shared), {} queues each, {} jobs at a time",
        args.disk / MIB,
        args.data / MIB,
        QUEUES,
        args.jobs
    );
    let vms: Vec<Vm> = (0..args.vms)
        .map(|i| {
            let name = format!("vm{i:03}");
            Vm {
                image: dir.join(format!("{name}.raw")),
                socket: dir.join(format!("{name}.sock")),
                control: dir.join(format!("{name}.control")),
                name,
            }
        })
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        fill_image(&vm.image, i as u32, args.disk, args.data)
            .with_context(|| format!("cannot write {}", vm.image.display()))?;
    }

    // The backends, each connected to the test VMM and idle.
    let mut backends = Vec::with_capacity(n);
    let mut frontends: Vec<(Frontend, Vec<BlkQueue>)> = Vec::with_capacity(n);
    for vm in &vms {
        let blk_args = [
            "--vm".to_string(),
            vm.name.clone(),
            "--disk".to_string(),
            format!("id=vda,image={},socket={},format=raw", vm.image.display(), vm.socket.display()),
            "--queues".to_string(),
            QUEUES.to_string(),
            "--state-dir".to_string(),
            dir.join(format!("{}-state", vm.name)).display().to_string(),
            "--control".to_string(),
            vm.control.display().to_string(),
        ];
        backends
            .push(Daemon::livesnap_blk(&blk_args, &[&vm.socket, &vm.control]).context("livesnap-blk did not start")?);
        frontends.push(bench::connect(&vm.socket, args.disk, 8, MIB as u32)?);
    }
    std::thread::sleep(SETTLE);
    let idle: Vec<Mem> = backends.iter().map(|b| mem(b.pid().context("no pid")?)).collect::<Result<_>>()?;

    // livesnapd with every VM.
    let socket = dir.join("livesnapd.sock");
    let config = dir.join("livesnapd.toml");
    let d = dir.display();
    let mut text = format!(
        "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n",
        socket.display()
    );
    for vm in &vms {
        text.push_str(&format!("[[vm]]\nname = \"{}\"\ncontrol = \"{}\"\n", vm.name, vm.control.display()));
    }
    std::fs::write(&config, text)?;
    let log = std::fs::File::create(dir.join("livesnapd.log"))?;
    let mut cmd = Command::new(programs::livesnapd()?);
    cmd.arg("--config").arg(&config).env("RUST_LOG", "warn").stdout(log.try_clone()?).stderr(log);
    let livesnapd = Daemon::spawn("livesnapd", cmd, &[&socket]).context("livesnapd did not start")?;

    let full = backup_round(&socket, &vms, args.jobs)?;
    let repo_after_full = du(&dir.join("repo"))?;
    // 1 MiB of new data in each disk, then the incrementals.
    for (i, (_, queues)) in frontends.iter_mut().enumerate() {
        let data = pattern::random(5000 + i as u64, MIB as usize);
        queues[0].write(args.disk / 4 / 512, &data)?;
        queues[0].flush()?;
    }
    let incr = backup_round(&socket, &vms, args.jobs)?;
    let repo = du(&dir.join("repo"))?;
    let daemon_mem = mem(livesnapd.pid().context("no pid")?)?;
    let after: Vec<Mem> = backends.iter().map(|b| mem(b.pid().context("no pid")?)).collect::<Result<_>>()?;
    drop(livesnapd);
    drop(frontends);
    drop(backends);

    let peer = if args.peer {
        let mut peers = Vec::with_capacity(n);
        let mut fes = Vec::with_capacity(n);
        for vm in &vms {
            let sock = dir.join(format!("{}-qsd.sock", vm.name));
            peers.push(Daemon::qemu_storage_daemon(&vm.image, "raw", &sock, QUEUES as u16)?);
            fes.push(bench::connect(&sock, args.disk, 8, MIB as u32)?);
        }
        std::thread::sleep(SETTLE);
        let m: Vec<Mem> = peers.iter().map(|b| mem(b.pid().context("no pid")?)).collect::<Result<_>>()?;
        Some(m)
    } else {
        None
    };

    println!();
    println!("| memory | processes | total RSS MiB | RSS per process MiB | largest RSS MiB | PSS per process MiB |");
    println!("|---|---|---|---|---|---|");
    mem_line("livesnap-blk, idle, connected", &idle);
    mem_line("livesnap-blk, after the two backups", &after);
    if let Some(p) = &peer {
        mem_line("qemu-storage-daemon, idle, connected", p);
    }
    mem_line("livesnapd, after the two backups", &[daemon_mem]);
    println!();
    println!(
        "| backups of all {n} VMs, {} at a time | wall s | s per VM | job median s | slowest job s | stored MiB |",
        args.jobs
    );
    println!("|---|---|---|---|---|---|");
    round_line("full", &full, n);
    round_line("incremental (1 MiB changed per VM)", &incr, n);
    let logical = args.data * n as u64;
    println!();
    println!(
        "repository on disk: {:.1} MiB after the full round, {:.1} MiB after both ({:.1} MiB of data in the disks: {:.2}× less)",
        repo_after_full as f64 / MIB as f64,
        repo as f64 / MIB as f64,
        logical as f64 / MIB as f64,
        logical as f64 / repo_after_full.max(1) as f64
    );
    Ok(())
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.data > args.disk / 2 {
        bail!("--data must be at most half of --disk");
    }
    let (dir, _tmp) = bench::work_dir(args.dir.as_deref(), "fleetbench")?;
    measure(&args, &dir)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetbench: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}
