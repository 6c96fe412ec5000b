//! restorebench: live restore against a plain restore of the same backup, side by side in one
//! run (issue 12, point 4).
//!
//! ```text
//! cargo build --release -p livesnap-blk -p livesnap-control -p livesnap-tests \
//!     --bin livesnap-blk --bin livesnapd --bin snapctl --bin restorebench
//! target/release/restorebench [--disk 1G] [--data 512M] [--reads 200] [--run-secs 5] [--guest true]
//! ```
//!
//! The backup: an ext4 image of `--disk` bytes holding one file of `--data` incompressible
//! bytes, backed up into a local repository (4 MiB chunks, zstd 3); livesnapd serves it.
//! 1. **Background copy**: `snapctl backup restore` into a new file (plain), then
//!    `snapctl backup restore --live` into another with livesnap-blk serving it and no guest
//!    I/O; the time of each, from the request (plain) or the backend's start (live) to the end;
//!    the two images compared.
//! 2. **First reads**: a live restore whose background copy is slowed to 1 MiB/s; the test VMM
//!    reads 4 KiB at a random place of `--reads` chunks not yet restored, one at a time: the
//!    latency of each read that had to fetch its chunk (p50, p99, max).
//! 3. **Reads over restored ranges**: in that same restore, 128 MiB read once (restored on
//!    demand), then 4 KiB random reads over them, 2 queues × 8 in flight, for `--run-secs`; the same
//!    on livesnap-blk serving the plain image: IOPS of each.
//! 4. **Boot to workload** (`--guest`, needs `ci/build-guest.sh`): a QEMU guest (TCG) whose job
//!    mounts the disk and reads a file of it, from QEMU's start to the job's `WORKLOAD-READY`: on the
//!    plain image, then on a new live restore started at the same moment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use livesnap_repo::{BackupSpec, Consistency, CreateOptions, FileSource, Repository};
use livesnap_tests::bench::{self, parse_size, QUEUES};
use livesnap_tests::blk::{BlkQueue, Request};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::fsync_log::sbin;
use livesnap_tests::guest::{Guest, GuestConfig};
use livesnap_tests::{load, pattern, programs};

/// Live restore against a plain restore of the same backup.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the disk (suffixes K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    disk: u64,
    /// Incompressible bytes in it.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    data: u64,
    /// Reads that fetch their chunk, in part 2.
    #[arg(long, default_value_t = 200)]
    reads: usize,
    /// Seconds of each random-read measurement.
    #[arg(long, default_value_t = 5)]
    run_secs: u64,
    /// Also boot a QEMU guest from each (part 4).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    guest: bool,
    /// Directory for the images, the repository and the sockets (default: a new tempdir under
    /// /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;
const VM: &str = "bench";
const BACKUP: &str = "b1";
/// Hang guard (not a measurement).
const WAIT: Duration = Duration::from_secs(900);
/// Bytes read once, then read at random, in part 3.
const RESTORED_RANGE: u64 = 128 * MIB;

/// The guest's job in part 4: what a workload does first, its data mounted and read.
const JOB: &str = "mkdir -p /mnt/data && mount -t ext4 /dev/vda /mnt/data && \
                   head -c 16777216 /mnt/data/data >/dev/null && echo WORKLOAD-READY && umount /mnt/data";

struct Bench {
    dir: PathBuf,
    socket: PathBuf,
    snapctl: PathBuf,
}

impl Bench {
    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// livesnapd on the repository, the background copy paced at `feed_bytes_per_sec` (0: not).
    fn livesnapd(&self, feed_bytes_per_sec: u64) -> Result<Daemon> {
        let d = self.dir.display();
        let pace = if feed_bytes_per_sec > 0 {
            format!("restore_bytes_per_sec = {feed_bytes_per_sec}\n")
        } else {
            String::new()
        };
        let config = self.dir.join("livesnapd.toml");
        std::fs::write(
            &config,
            format!(
                "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n\
                 [defaults]\n{pace}[[vm]]\nname = \"{VM}\"\ncontrol = \"{}\"\n",
                self.socket.display(),
                self.control().display()
            ),
        )?;
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("livesnapd.log"))?;
        let mut cmd = Command::new(programs::livesnapd()?);
        cmd.arg("--config").arg(&config).env("RUST_LOG", "warn").stdout(log.try_clone()?).stderr(log);
        Daemon::spawn("livesnapd", cmd, &[&self.socket])
    }

    fn snapctl(&self) -> Command {
        let mut c = Command::new(&self.snapctl);
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// `snapctl backup restore ... --live` into `target`, running; returns once the map exists.
    fn start_live(&self, target: &Path) -> Result<Child> {
        let mut child = self
            .snapctl()
            .args(["backup", "restore", VM, BACKUP, "--disk", "vda", "--to"])
            .arg(target)
            .arg("--live")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("snapctl-live.err"))?)
            .spawn()?;
        let map = livesnap_blk::restore::map_path(target);
        let start = Instant::now();
        while !map.exists() {
            if let Some(st) = child.try_wait()? {
                bail!("snapctl --live exited ({st}) before creating {}", map.display());
            }
            ensure!(start.elapsed() < WAIT, "no restore map after {WAIT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    /// livesnap-blk serving `image` as the VM's disk vda on `socket`, with the control socket
    /// (and a new state directory) when `control`: a disk under live restore needs them.
    fn blk(&self, image: &Path, socket: &Path, control: bool) -> Result<Daemon> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(programs::livesnap_blk()?);
        cmd.args(["--vm", VM, "--disk"]).arg(format!("id=vda,image={},socket={}", image.display(), socket.display()));
        let ctl = self.control();
        let mut sockets = vec![socket];
        if control {
            let _ = std::fs::remove_file(&ctl);
            let state = self.dir.join("blk-state");
            let _ = std::fs::remove_dir_all(&state);
            cmd.arg("--control").arg(&ctl).arg("--state-dir").arg(state);
            sockets.push(&ctl);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("livesnap-blk.log"))?;
        cmd.stderr(log);
        Daemon::spawn("livesnap-blk", cmd, &sockets)
    }
}

fn wait_ok(child: &mut Child, what: &str) -> Result<()> {
    let st = livesnap_tests::fsync_log::wait_child(child, WAIT, what).map_err(anyhow::Error::msg)?;
    ensure!(st.success(), "{what} failed ({st})");
    Ok(())
}

fn connect(socket: &Path, queues: u16) -> Result<(Frontend, Vec<BlkQueue>)> {
    let mut f = Frontend::connect(socket, &Options { queues, timeout: WAIT, ..Options::default() })?;
    let queues =
        f.take_queues().into_iter().map(|v| BlkQueue::new(v, 16, MIB as u32)).collect::<Result<Vec<_>, _>>()?;
    Ok((f, queues))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 4 KiB random reads over the first `range` bytes, 2 queues × 8 in flight, for `run`: IOPS.
fn random_reads(queues: &mut [BlkQueue], range: u64, run: Duration) -> Result<f64> {
    let sources: Vec<load::Source> =
        (0..queues.len()).map(|i| Box::new(load::random(7 + i as u64, range, 4096, 0)) as load::Source).collect();
    let (secs, ops, _) = load::on_queues(queues, 8, sources, None, false, |gate| {
        Ok::<_, anyhow::Error>(gate.measure(Duration::from_millis(500), run).as_secs_f64())
    })?;
    Ok(ops as f64 / secs)
}

/// From QEMU's start to the job's `WORKLOAD-READY`, the guest's disk on `socket`.
fn boot(socket: &Path, console: &Path) -> Result<Duration> {
    let start = Instant::now();
    let mut g = Guest::start(GuestConfig {
        disks: vec![socket.to_owned()],
        job_script: JOB.into(),
        console_log: Some(console.to_owned()),
        timeout: WAIT,
        ..GuestConfig::default()
    })?;
    g.wait_for_console("WORKLOAD-READY", WAIT)?;
    let took = start.elapsed();
    g.wait()?;
    Ok(took)
}

fn measure(args: &Args, dir: &Path) -> Result<()> {
    ensure!(args.data + 64 * MIB <= args.disk, "--data must leave 64 MiB of the disk for the filesystem");
    // The source: ext4 with one file of incompressible data.
    let content = dir.join("content");
    std::fs::create_dir_all(&content)?;
    std::fs::write(content.join("data"), pattern::random(11, args.data as usize))?;
    let image = dir.join("source.raw");
    std::fs::File::create(&image)?.set_len(args.disk)?;
    let out = sbin("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-d"]).arg(&content).arg(&image).output()?;
    ensure!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&content)?;
    let repo = Repository::create(dir.join("repo"), CreateOptions::default())?;
    let mut w = repo.begin_backup(BackupSpec {
        vm: VM.into(),
        id: BACKUP.into(),
        consistency: Consistency::Crash,
        freeze_window: None,
        created_unix_us: None,
    })?;
    w.full("vda", &FileSource::open(&image)?)?;
    w.commit()?;
    drop(repo);
    std::fs::remove_file(&image)?;

    let b = Bench { dir: dir.to_owned(), socket: dir.join("livesnapd.sock"), snapctl: programs::snapctl()? };
    let disk_sock = dir.join("vda.sock");
    println!(
        "restorebench: a {} MiB disk holding {} MiB of data, in {}",
        args.disk / MIB,
        args.data / MIB,
        dir.display()
    );

    // 1. The background copy against a plain restore.
    let plain = dir.join("plain.raw");
    let live = dir.join("live1.raw");
    let (t_plain, t_live) = {
        let _d = b.livesnapd(0)?;
        let start = Instant::now();
        let mut c = b
            .snapctl()
            .args(["backup", "restore", VM, BACKUP, "--disk", "vda", "--to"])
            .arg(&plain)
            .stdout(Stdio::null())
            .spawn()?;
        wait_ok(&mut c, "snapctl backup restore")?;
        let t_plain = start.elapsed();
        let mut child = b.start_live(&live)?;
        let start = Instant::now();
        let _blk = b.blk(&live, &disk_sock, true)?;
        wait_ok(&mut child, "snapctl backup restore --live")?;
        (t_plain, start.elapsed())
    };
    let same = Command::new("cmp").arg("-s").arg(&plain).arg(&live).status()?.success();
    ensure!(same, "the live restore's image differs from the plain restore's");
    std::fs::remove_file(&live)?;
    let mib = args.disk as f64 / MIB as f64;
    println!("\n| restore of the {mib:.0} MiB disk | seconds | MiB/s of the disk |\n|---|---|---|");
    println!(
        "| plain (`snapctl backup restore`) | {:.2} | {:.0} |",
        t_plain.as_secs_f64(),
        mib / t_plain.as_secs_f64()
    );
    println!("| live, background copy alone | {:.2} | {:.0} |", t_live.as_secs_f64(), mib / t_live.as_secs_f64());
    println!("background copy / plain restore: {:.2}x the throughput", t_plain.as_secs_f64() / t_live.as_secs_f64());

    // 2 and 3. First reads, then reads over restored ranges, while the copy crawls.
    let live = dir.join("live2.raw");
    {
        let _d = b.livesnapd(MIB)?;
        let mut child = b.start_live(&live)?;
        let _blk = b.blk(&live, &disk_sock, true)?;
        let (_f, mut queues) = connect(&disk_sock, QUEUES as u16)?;
        let map = livesnap_blk::restore::map_path(&live);
        let chunk = livesnap_blk::restore::read_map(&map)?.chunk_size;
        let chunks = args.disk / chunk;
        let mut rng = fastrand::Rng::with_seed(5);
        let mut order: Vec<u64> = (RESTORED_RANGE / chunk..chunks).collect();
        rng.shuffle(&mut order);
        let mut lat = Vec::new();
        for c in order {
            if lat.len() == args.reads {
                break;
            }
            // The map lags the backend's memory by a sync at most: a chunk it shows restored is.
            if livesnap_blk::restore::read_map(&map)?.chunks_done >= chunks {
                bail!("the background copy finished before the reads");
            }
            let sector = (c * chunk + rng.u64(0..chunk / 4096) * 4096) / 512;
            let start = Instant::now();
            queues[0].request_ok(&Request::Read { sector, len: 4096 })?;
            lat.push(start.elapsed());
        }
        lat.sort();
        println!(
            "\nfirst reads of {} chunks not yet restored (4 KiB each, one at a time): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(*lat.last().context("no reads")?)
        );
        // Restore the first 128 MiB on demand, then read them at random.
        for s in (0..RESTORED_RANGE).step_by(MIB as usize) {
            queues[0].request_ok(&Request::Read { sector: s / 512, len: MIB as u32 })?;
        }
        let restoring = random_reads(&mut queues, RESTORED_RANGE, Duration::from_secs(args.run_secs))?;
        let info = livesnap_blk::restore::read_map(&map)?;
        ensure!(!info.complete, "the restore completed during the measurement");
        drop((_f, queues, _blk));
        let _plain_blk = b.blk(&plain, &disk_sock, false)?;
        let (_f, mut queues) = connect(&disk_sock, QUEUES as u16)?;
        let plain_iops = random_reads(&mut queues, RESTORED_RANGE, Duration::from_secs(args.run_secs))?;
        println!("\n| 4 KiB random reads over 128 MiB, 2 queues × 8 | IOPS |\n|---|---|");
        println!("| live restore in progress, ranges restored | {restoring:.0} |");
        println!("| plain image | {plain_iops:.0} |");
        println!("restored ranges / plain: {:.2}x", restoring / plain_iops);
        let _ = child.kill();
        let _ = child.wait();
    }
    std::fs::remove_file(&live)?;
    let _ = std::fs::remove_file(livesnap_blk::restore::map_path(&live));

    // 4. Boot to workload.
    if args.guest {
        let t_plain_boot = {
            let _blk = b.blk(&plain, &disk_sock, false)?;
            boot(&disk_sock, &dir.join("console-plain.log"))?
        };
        let live = dir.join("live3.raw");
        let t_live_boot = {
            let _d = b.livesnapd(0)?;
            let mut child = b.start_live(&live)?;
            let _blk = b.blk(&live, &disk_sock, true)?;
            let t = boot(&disk_sock, &dir.join("console-live.log"))?;
            wait_ok(&mut child, "snapctl backup restore --live")?;
            t
        };
        println!("\n| guest (TCG) from QEMU's start to its workload | seconds |\n|---|---|");
        println!("| fully restored local disk | {:.2} |", t_plain_boot.as_secs_f64());
        println!("| live restore, started at the same moment | {:.2} |", t_live_boot.as_secs_f64());
        println!("live / plain: {:.2}x", t_live_boot.as_secs_f64() / t_plain_boot.as_secs_f64());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let res =
        bench::work_dir(args.dir.as_deref(), "livesnap-restorebench").and_then(|(dir, _guard)| measure(&args, &dir));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restorebench: {}", livesnap_proto::error::chain(&*e));
            ExitCode::FAILURE
        }
    }
}
