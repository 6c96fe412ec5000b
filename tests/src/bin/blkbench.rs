//! blkbench: the same block workloads against qemu-storage-daemon, livesnap-blk and the limit
//! (pread/pwrite from the benchmark itself), on the same preallocated raw file, page-cached
//! (`--cache writeback`, the default) or not (`--cache none`: both backends and the limit use
//! `O_DIRECT`; qemu-storage-daemon with `cache.direct=on,aio=io_uring`, livesnap-blk with
//! `cache=none`). (livesnap-blk's snapshots are measured by `snapbench`.)
//!
//! ```text
//! cargo run --release -p livesnap-tests --bin blkbench -- [--size 1G] [--seconds 3] [--cache writeback|none] [--limit-threads N] [--only qsd|livesnap|limit] [--dir DIR] [--json]
//! ```
//!
//! Workloads, each over 2 queues driven by one thread per queue:
//! - 4 KiB random read / write, 16 requests in flight per queue (queue depth 32 in all), offsets
//!   uniformly random over the whole file;
//! - 1 MiB sequential read, 4 in flight per queue, and 1 MiB sequential write, 8 in flight per
//!   queue, each queue sweeping its half of the file.
//!
//! The backends are reached through the test VMM ([`livesnap_tests::frontend`]) and loaded by
//! [`livesnap_tests::load`]; write payloads are placed in guest memory once, before the cell, as
//! a guest's data already sits in its memory: the driver copies nothing per request, for either
//! backend. The limit does synchronous `pread`/`pwrite` on the file from the benchmark itself,
//! one request at a time per thread. Page-cached 4 KiB requests and 1 MiB reads: one thread per
//! queue with the queue's offsets (a synchronous syscall on a page-cached file has nothing to
//! overlap with). 1 MiB writes, and every workload with `--cache none`: as many threads as the
//! backends have requests in flight (queue depth × queues), each one sweeping its own part of
//! the queue's share or drawing its own random offsets, so that the limit runs at the same
//! concurrency.
//!
//! Both backends are started and connected at once, on the same file. For each workload the
//! targets take turns, `--rounds` times, so that load from elsewhere on the machine hits all of
//! them alike; the median of the rounds is printed. Each cell runs a warm-up (a third of
//! `--seconds`, at most 1 s) and then `--seconds` measured; the file is synced after every write
//! cell so that dirty pages do not carry over. Numbers are printed, never judged.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use livesnap_proto::error::chain;
use livesnap_tests::bench::{self, parse_size, PageCache, QUEUES};
use livesnap_tests::blk::{BlkQueue, Request, SECTOR_SIZE};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::Frontend;
use livesnap_tests::load::{self, Gate, Source};

/// Benchmark of vhost-user-blk backends against the page-cache limit.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the test file (suffixes K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Measured seconds per cell.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds: every cell is measured this many times, the targets taking turns within each
    /// round so that a burst of load elsewhere hits all of them alike; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// How the file's page cache is filled before the cells: `large` leaves the large folios
    /// that writing it sequentially creates; `small` drops them and reads every 4 KiB block
    /// back in random order, as a guest's random reads would, leaving 4 KiB folios.
    #[arg(long, value_enum, default_value_t = PageCache::Large)]
    page_cache: PageCache,
    /// Host cache of the file: `writeback` (the page cache), or `none` (`O_DIRECT` for both
    /// backends and the limit; the page cache is dropped before each cell).
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    cache: CacheMode,
    /// Threads of the limit per queue, for every workload (default: see above).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    limit_threads: Option<u32>,
    /// Run only this target.
    #[arg(long)]
    only: Option<Target>,
    /// Directory for the test file and sockets (default: a new tempdir under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Qsd,
    Livesnap,
    Limit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CacheMode {
    Writeback,
    None,
}

const TARGETS: [Target; 3] = [Target::Qsd, Target::Livesnap, Target::Limit];

/// One I/O pattern.
#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    block: u32,
    random: bool,
    write: bool,
    /// Requests in flight per queue.
    depth: usize,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "4k-randread", block: 4096, random: true, write: false, depth: 16 },
    Workload { name: "4k-randwrite", block: 4096, random: true, write: true, depth: 16 },
    Workload { name: "1m-seqread", block: 1 << 20, random: false, write: false, depth: 4 },
    Workload { name: "1m-seqwrite", block: 1 << 20, random: false, write: true, depth: 8 },
];

impl Workload {
    /// Results are IOPS for small blocks, MiB/s for large ones.
    fn unit(&self) -> &'static str {
        if self.block < 1 << 20 {
            "IOPS"
        } else {
            "MiB/s"
        }
    }

    fn value(&self, ops_per_sec: f64) -> f64 {
        if self.block < 1 << 20 {
            ops_per_sec
        } else {
            ops_per_sec * f64::from(self.block) / f64::from(1u32 << 20)
        }
    }

    /// The requests of worker `worker`: random blocks over the whole file (the same sequence
    /// for every target), or a sweep of its share of the file, over and over.
    fn source(&self, worker: usize, size: u64) -> Source {
        if self.random {
            return Box::new(load::random(worker as u64 + 1, size, self.block, if self.write { 256 } else { 0 }));
        }
        let share = size / QUEUES as u64 / u64::from(self.block) * u64::from(self.block);
        let start = worker as u64 * share;
        Box::new(load::sweep(start..start + share, self.block, self.write).cycle())
    }

    /// Threads of the limit per queue: see the module's documentation.
    fn limit_threads(&self, cache: CacheMode) -> usize {
        if cache == CacheMode::None || (self.write && self.block >= 1 << 20) {
            self.depth
        } else {
            1
        }
    }

    /// The limit's requests: thread `k` of `n` of queue `worker`'s share, or its own random
    /// stream (as [`Workload::source`] with one thread per queue).
    fn limit_source(&self, worker: usize, k: usize, n: usize, size: u64) -> Source {
        if n == 1 {
            return self.source(worker, size);
        }
        if self.random {
            let seed = 1000 * (worker as u64 + 1) + k as u64;
            return Box::new(load::random(seed, size, self.block, if self.write { 256 } else { 0 }));
        }
        let block = u64::from(self.block);
        let share = size / QUEUES as u64 / block * block;
        let part = share / n as u64 / block * block;
        let start = worker as u64 * share + k as u64 * part;
        Box::new(load::sweep(start..start + part, self.block, self.write).cycle())
    }

    /// Warm-up (a third of `run`, at most 1 s), then `run` counted; returns operations per second.
    fn steer(run: Duration) -> impl FnOnce(&Gate) -> Result<f64> {
        move |gate| Ok(gate.measure((run / 3).min(Duration::from_secs(1)), run).as_secs_f64())
    }
}

/// One synchronous pread/pwrite at a time until the gate stops it; returns the counted ones.
fn pio_worker(file: &File, w: &Workload, source: &mut Source, gate: &Gate) -> Result<u64> {
    // Aligned for O_DIRECT: a page-aligned slice of a larger vector.
    let mut backing = vec![0x5a; w.block as usize + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + w.block as usize];
    let mut ops = 0;
    while !gate.stopped() {
        let Some(req) = source.next() else { break };
        let (off, res) = match req {
            Request::Read { sector, len } => {
                (sector * SECTOR_SIZE, file.read_exact_at(&mut buf[..len as usize], sector * SECTOR_SIZE))
            }
            Request::WriteInPlace { sector, len } => {
                (sector * SECTOR_SIZE, file.write_all_at(&buf[..len as usize], sector * SECTOR_SIZE))
            }
            other => return Err(anyhow!("{} requests are not a workload of the limit", other.name())),
        };
        res.with_context(|| format!("{} at {off}", w.name))?;
        ops += u64::from(gate.counting());
    }
    Ok(ops)
}

/// Results of one target, in `WORKLOADS` order.
type Column = Vec<Option<f64>>;

/// A target, set up once and kept for all its cells.
enum Runner {
    /// A backend behind the test VMM; the daemon and frontend live as long as the queues.
    Vhost { queues: Vec<BlkQueue>, _frontend: Box<Frontend>, _daemon: Daemon },
    /// pread/pwrite on the file itself, one descriptor shared by the workers.
    Limit { file: File, cache: CacheMode, threads: Option<u32> },
}

impl Runner {
    fn new(t: Target, dir: &Path, image: &Path, size: u64, args: &Args) -> Result<Self> {
        let cache = args.cache;
        let socket = dir.join(format!("{t:?}.sock").to_lowercase());
        let direct = cache == CacheMode::None;
        let daemon = match t {
            Target::Qsd => Daemon::qemu_storage_daemon_cache(image, "raw", &socket, QUEUES as u16, direct)?,
            Target::Livesnap => {
                let args = [
                    "--vm".to_string(),
                    "bench".to_string(),
                    "--disk".to_string(),
                    // cache= only when it is not the default, so that older builds run too.
                    format!(
                        "id=vda,image={},socket={},format=raw{}",
                        image.display(),
                        socket.display(),
                        if direct { ",cache=none" } else { "" }
                    ),
                    "--queues".to_string(),
                    QUEUES.to_string(),
                ];
                Daemon::livesnap_blk(&args, &[&socket]).context("livesnap-blk did not start")?
            }
            Target::Limit => {
                let mut opts = OpenOptions::new();
                opts.read(true).write(true);
                if direct {
                    opts.custom_flags(libc::O_DIRECT);
                }
                return Ok(Runner::Limit { file: opts.open(image)?, cache, threads: args.limit_threads });
            }
        };
        let depth = WORKLOADS.iter().map(|w| w.depth).max().unwrap_or(1) as u16;
        let block = WORKLOADS.iter().map(|w| w.block).max().unwrap_or(4096);
        let (frontend, queues) = bench::connect(&socket, size, depth, block)?;
        Ok(Runner::Vhost { queues, _frontend: Box::new(frontend), _daemon: daemon })
    }

    /// Runs one cell of `w`; returns operations per second.
    fn cell(&mut self, w: &Workload, size: u64, run: Duration) -> Result<f64> {
        let sources: Vec<Source> = (0..QUEUES).map(|i| w.source(i, size)).collect();
        let (secs, ops, _) = match self {
            Runner::Vhost { queues, .. } => {
                if w.write {
                    // A guest's data is in its memory already: fill the buffers once, copy
                    // nothing per request.
                    for q in queues.iter_mut() {
                        q.fill_slots(&vec![0x5a; w.block as usize])?;
                    }
                }
                load::on_queues(queues, w.depth, sources, None, false, Workload::steer(run))?
            }
            Runner::Limit { file, cache, threads } => {
                let n = threads.map_or_else(|| w.limit_threads(*cache), |t| t as usize);
                drop(sources);
                let mut work: Vec<(&File, Source)> = (0..QUEUES)
                    .flat_map(|q| (0..n).map(move |k| (q, k)))
                    .map(|(q, k)| (&*file, w.limit_source(q, k, n, size)))
                    .collect();
                load::run(&mut work, false, |(f, s), gate| pio_worker(f, w, s, gate), Workload::steer(run))?
            }
        };
        Ok(ops as f64 / secs)
    }
}

/// Drops the file's pages from the page cache.
fn drop_cache(file: &File) -> Result<()> {
    // SAFETY: posix_fadvise(2) on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(rc == 0, "cannot drop the page cache: {}", std::io::Error::from_raw_os_error(rc));
    Ok(())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|&(_, b)| b > 0.0).map(|(a, b)| a / b)
}
fn print_table(cols: &[Column; 3]) {
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    println!(
        "{:<14} {:>6} {:>10} {:>13} {:>13} {:>13} {:>15}",
        "workload", "unit", "qsd", "livesnap-blk", "pread/pwrite", "livesnap/qsd", "livesnap/limit"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let [q, l, p] = [cols[0][i], cols[1][i], cols[2][i]].map(|v| v.map(|v| w.value(v)));
        println!(
            "{:<14} {:>6} {:>10} {:>13} {:>13} {:>13} {:>15}",
            w.name,
            w.unit(),
            f(q, 0),
            f(l, 0),
            f(p, 0),
            f(ratio(l, q), 2),
            f(ratio(l, p), 2)
        );
    }
}

fn print_json(args: &Args, cols: &[Column; 3]) {
    let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    let rows: Vec<String> = WORKLOADS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let [q, l, p] = [cols[0][i], cols[1][i], cols[2][i]].map(|v| v.map(|v| w.value(v)));
            format!(
                "{{\"workload\":\"{}\",\"unit\":\"{}\",\"qsd\":{},\"livesnap\":{},\"limit\":{},\"livesnap_qsd\":{},\"livesnap_limit\":{}}}",
                w.name,
                w.unit(),
                num(q),
                num(l),
                num(p),
                num(ratio(l, q)),
                num(ratio(l, p))
            )
        })
        .collect();
    println!(
        "{{\"size\":{},\"seconds\":{},\"rounds\":{},\"page_cache\":\"{:?}\",\"cache\":\"{:?}\",\"results\":[{}]}}",
        args.size,
        args.seconds,
        args.rounds,
        args.page_cache,
        args.cache,
        rows.join(",")
    );
}

fn run() -> Result<()> {
    let args = Args::parse();
    ensure!(args.size >= 4 << 20 && args.size % (2 << 20) == 0, "--size must be a multiple of 2M, at least 4M");
    ensure!(args.seconds.is_finite() && args.seconds > 0.0, "--seconds must be positive");
    let run = Duration::from_secs_f64(args.seconds);
    let (dir, _tmp) = bench::work_dir(args.dir.as_deref(), "blkbench")?;
    let image = dir.join("blkbench.raw");
    let file = bench::prepare_file(&image, args.size, args.page_cache)?;
    let direct = args.cache == CacheMode::None;
    if direct {
        drop_cache(&file)?;
    }
    let mut runners: Vec<Option<Runner>> = TARGETS
        .iter()
        .map(|&t| match args.only {
            Some(only) if only != t => None,
            _ => Runner::new(t, &dir, &image, args.size, &args)
                .map_err(|e| eprintln!("blkbench: {t:?} skipped: {}", chain(&*e)))
                .ok(),
        })
        .collect();
    let mut samples = vec![vec![Vec::new(); WORKLOADS.len()]; TARGETS.len()];
    for (i, w) in WORKLOADS.iter().enumerate() {
        for _ in 0..args.rounds {
            for (t, runner) in runners.iter_mut().enumerate() {
                let Some(r) = runner else { continue };
                match r.cell(w, args.size, run) {
                    Ok(v) => samples[t][i].push(v),
                    Err(e) => {
                        eprintln!("blkbench: {:?} dropped after {}: {}", TARGETS[t], w.name, chain(&*e));
                        *runner = None;
                    }
                }
                // Dirty pages of one target's writes must not slow the next one down.
                if w.write {
                    file.sync_data()?;
                }
                // Without the page cache, no target reads what another left in it.
                if direct {
                    drop_cache(&file)?;
                }
            }
        }
    }
    drop(runners);
    let cols: [Column; 3] = std::array::from_fn(|t| samples[t].iter().map(|v| bench::median(v.clone())).collect());
    if args.dir.is_some() {
        std::fs::remove_file(&image).with_context(|| format!("cannot remove {}", image.display()))?;
    }
    if args.json {
        print_json(&args, &cols);
    } else {
        print_table(&cols);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbench: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}
