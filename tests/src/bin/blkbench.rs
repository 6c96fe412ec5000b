//! blkbench: the same block workloads against qemu-storage-daemon, livesnap-blk and the limit
//! (pread/pwrite from the benchmark itself), on the same preallocated, page-cached raw file.
//!
//! ```text
//! cargo run --release -p livesnap-tests --bin blkbench -- [--size 1G] [--seconds 3] [--only qsd|livesnap|limit] [--dir DIR] [--json]
//! ```
//!
//! Workloads, each over 2 queues driven by one thread per queue:
//! - 4 KiB random read / write, 16 requests in flight per queue (queue depth 32 in all), offsets
//!   uniformly random over the whole file;
//! - 1 MiB sequential read / write, 4 in flight per queue, each queue sweeping its half of the file.
//!
//! The backends are reached through the test VMM ([`livesnap_tests::frontend`]); write payloads are
//! placed in guest memory once, before the cell, as a guest's data already sits in its memory:
//! the driver copies nothing per request, for either backend. The limit uses 2 threads doing synchronous `pread`/`pwrite` on the file with the same
//! offsets, one request at a time per thread (queue depth 1 per thread: a synchronous syscall on
//! a page-cached file has nothing to overlap with).
//!
//! Both backends are started and connected at once, on the same file. For each workload the
//! targets take turns, `--rounds` times, so that load from elsewhere on the machine hits all of
//! them alike; the median of the rounds is printed. Each cell runs a warm-up (a third of
//! `--seconds`, at most 1 s) and then `--seconds` measured; the file is synced after every write
//! cell so that dirty pages do not carry over. Numbers are printed, never judged.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use livesnap_tests::blk::{BlkQueue, Request, SECTOR_SIZE};
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};

/// Queues, and threads, of every workload.
const QUEUES: usize = 2;
/// Limit of one wait for a completion; only a hung backend reaches it.
const TIMEOUT: Duration = Duration::from_secs(30);

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
enum PageCache {
    Large,
    Small,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Qsd,
    Livesnap,
    Limit,
}

const TARGETS: [Target; 3] = [Target::Qsd, Target::Livesnap, Target::Limit];

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

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
    Workload { name: "1m-seqwrite", block: 1 << 20, random: false, write: true, depth: 4 },
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
}

/// Byte offsets of one worker: random blocks over the whole file, or a sweep of its share.
struct Offsets {
    block: u64,
    random: bool,
    start: u64,
    blocks: u64,
    pos: u64,
    rng: u64,
}

impl Offsets {
    fn new(w: &Workload, worker: usize, size: u64) -> Self {
        let block = u64::from(w.block);
        let (start, blocks) = if w.random {
            (0, size / block)
        } else {
            let share = size / QUEUES as u64 / block;
            (worker as u64 * share * block, share)
        };
        Offsets { block, random: w.random, start, blocks, pos: 0, rng: 0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1) }
    }

    fn next(&mut self) -> u64 {
        let i = if self.random {
            // xorshift64*: uniform enough, and the same sequence for every target.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.blocks
        } else {
            let i = self.pos;
            self.pos = (self.pos + 1) % self.blocks;
            i
        };
        self.start + i * self.block
    }
}

/// Warm-up then measurement window shared by the workers of one cell.
struct Clock {
    start: Instant,
    warmup: Duration,
    run: Duration,
}

impl Clock {
    /// Whether completions now count, and whether the cell is over.
    fn phase(&self) -> (bool, bool) {
        let t = self.start.elapsed();
        (t >= self.warmup && t < self.warmup + self.run, t >= self.warmup + self.run)
    }
}

/// Keeps `w.depth` requests in flight on `q` until the clock ends; returns the counted ones.
fn virtio_worker(q: &mut BlkQueue, w: &Workload, mut offs: Offsets, clock: &Clock) -> Result<u64> {
    if w.write {
        // A guest's data is in its memory already: fill the buffers once, copy nothing per request.
        q.fill_slots(&vec![0x5a; w.block as usize])?;
    }
    let mut done = Vec::with_capacity(w.depth);
    let mut ops = 0;
    loop {
        let (counting, over) = clock.phase();
        if over {
            break;
        }
        while q.in_flight() < w.depth {
            let sector = offs.next() / SECTOR_SIZE;
            let req = match w.write {
                true => Request::WriteInPlace { sector, len: w.block },
                false => Request::Read { sector, len: w.block },
            };
            q.submit(&req)?;
        }
        q.kick()?;
        done.clear();
        q.reap(Some(TIMEOUT), &mut done)?;
        if let Some(c) = done.iter().find(|c| c.status != 0) {
            bail!("{} request failed with status {}", w.name, c.status);
        }
        if counting && clock.phase().0 {
            ops += done.len() as u64;
        }
    }
    while q.in_flight() > 0 {
        q.reap(Some(TIMEOUT), &mut done)?;
    }
    Ok(ops)
}

/// One synchronous pread/pwrite at a time until the clock ends; returns the counted ones.
fn pio_worker(file: &File, w: &Workload, mut offs: Offsets, clock: &Clock) -> Result<u64> {
    let mut buf = vec![0x5a; w.block as usize];
    let mut ops = 0;
    loop {
        let (counting, over) = clock.phase();
        if over {
            return Ok(ops);
        }
        let off = offs.next();
        match w.write {
            true => file.write_all_at(&buf, off),
            false => file.read_exact_at(&mut buf, off),
        }
        .with_context(|| format!("{} at {off}", w.name))?;
        ops += u64::from(counting && clock.phase().0);
    }
}

/// Runs `w` with one worker per element of `ctx` and returns operations per second.
fn cell<C: Send>(
    w: &Workload,
    size: u64,
    run: Duration,
    ctx: &mut [C],
    worker: impl Fn(&mut C, &Workload, Offsets, &Clock) -> Result<u64> + Sync,
) -> Result<f64> {
    let clock = Clock { start: Instant::now(), warmup: (run / 3).min(Duration::from_secs(1)), run };
    let ops = std::thread::scope(|s| {
        let handles: Vec<_> = ctx
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                let (clock, worker) = (&clock, &worker);
                s.spawn(move || worker(c, w, Offsets::new(w, i, size), clock))
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?).sum::<Result<u64>>()
    })?;
    Ok(ops as f64 / run.as_secs_f64())
}

/// Results of one target, in `WORKLOADS` order.
type Column = Vec<Option<f64>>;

/// A target, set up once and kept for all its cells.
enum Runner {
    /// A backend behind the test VMM; the daemon and frontend live as long as the queues.
    Vhost { queues: Vec<BlkQueue>, _frontend: Frontend, _daemon: Daemon },
    /// pread/pwrite on the file itself, one descriptor shared by the workers.
    Limit { file: File },
}

impl Runner {
    fn new(t: Target, dir: &Path, image: &Path, size: u64) -> Result<Self> {
        let socket = dir.join(format!("{t:?}.sock").to_lowercase());
        let daemon = match t {
            Target::Qsd => Daemon::qemu_storage_daemon(image, "raw", &socket, QUEUES as u16)?,
            Target::Livesnap => {
                let args = [
                    "--vm".to_string(),
                    "bench".to_string(),
                    "--disk".to_string(),
                    format!("id=vda,image={},socket={},format=raw", image.display(), socket.display()),
                    "--queues".to_string(),
                    QUEUES.to_string(),
                ];
                Daemon::livesnap_blk(&args, &[&socket]).context("livesnap-blk did not start")?
            }
            Target::Limit => return Ok(Runner::Limit { file: OpenOptions::new().read(true).write(true).open(image)? }),
        };
        let opts = Options { queues: QUEUES as u16, mem_size: 48 << 20, timeout: TIMEOUT, ..Options::default() };
        let mut fe = Frontend::connect(&socket, &opts).context("cannot set up the device")?;
        let capacity = fe.config().capacity;
        ensure!(capacity * SECTOR_SIZE == size, "device capacity {capacity} sectors, file {size} bytes");
        let depth = WORKLOADS.iter().map(|w| w.depth).max().unwrap_or(1) as u16;
        let block = WORKLOADS.iter().map(|w| w.block).max().unwrap_or(4096);
        let queues = fe.take_queues().into_iter().map(|v| BlkQueue::new(v, depth, block)).collect::<Result<Vec<_>, _>>()?;
        Ok(Runner::Vhost { queues, _frontend: fe, _daemon: daemon })
    }

    /// Runs one cell of `w`; returns operations per second.
    fn cell(&mut self, w: &Workload, size: u64, run: Duration) -> Result<f64> {
        match self {
            Runner::Vhost { queues, .. } => cell(w, size, run, queues, virtio_worker),
            Runner::Limit { file } => {
                let mut files = vec![&*file; QUEUES];
                cell(w, size, run, &mut files, |f, w, o, c| pio_worker(f, w, o, c))
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Creates `size` bytes of non-zero data, synced, so that every block is allocated and cached.
fn prepare_file(path: &Path, size: u64) -> Result<File> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    for off in (0..size).step_by(chunk.len()) {
        file.write_all_at(&chunk, off)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// Refills the page cache of `file` with 4 KiB folios: drops it, then reads every 4 KiB block
/// in a random order without readahead (which would allocate large folios again).
fn refill_cache_small(file: &File, size: u64) -> Result<()> {
    let fd = file.as_raw_fd();
    let advise = |advice| {
        // SAFETY: posix_fadvise(2) on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(fd, 0, 0, advice) };
        ensure!(rc == 0, "posix_fadvise: {}", std::io::Error::from_raw_os_error(rc));
        Ok(())
    };
    advise(libc::POSIX_FADV_DONTNEED)?;
    advise(libc::POSIX_FADV_RANDOM)?;
    let w = Workload { name: "fill", block: 4096, random: true, write: false, depth: 1 };
    let mut offs = Offsets::new(&w, 0, size);
    let mut buf = vec![0u8; 4096];
    // Random blocks with repeats; a final sweep catches the ones never drawn.
    for _ in 0..size / 4096 {
        file.read_exact_at(&mut buf, offs.next())?;
    }
    for off in (0..size).step_by(4096) {
        file.read_exact_at(&mut buf, off)?;
    }
    advise(libc::POSIX_FADV_NORMAL)
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
        "{{\"size\":{},\"seconds\":{},\"rounds\":{},\"page_cache\":\"{:?}\",\"results\":[{}]}}",
        args.size,
        args.seconds,
        args.rounds,
        args.page_cache,
        rows.join(",")
    );
}

fn run() -> Result<()> {
    let args = Args::parse();
    ensure!(args.size >= 4 << 20 && args.size % (2 << 20) == 0, "--size must be a multiple of 2M, at least 4M");
    ensure!(args.seconds.is_finite() && args.seconds > 0.0, "--seconds must be positive");
    let run = Duration::from_secs_f64(args.seconds);
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("blkbench").tempdir_in("/var/tmp")?;
            tmp.path().to_path_buf()
        }
    };
    let image = dir.join("blkbench.raw");
    let file = prepare_file(&image, args.size).with_context(|| format!("cannot prepare {}", image.display()))?;
    if args.page_cache == PageCache::Small {
        refill_cache_small(&file, args.size).context("cannot refill the page cache")?;
    }
    let mut runners: Vec<Option<Runner>> = TARGETS
        .iter()
        .map(|&t| match args.only {
            Some(only) if only != t => None,
            _ => Runner::new(t, &dir, &image, args.size).map_err(|e| eprintln!("blkbench: {t:?} skipped: {e:#}")).ok(),
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
                        eprintln!("blkbench: {:?} dropped after {}: {e:#}", TARGETS[t], w.name);
                        *runner = None;
                    }
                }
                // Dirty pages of one target's writes must not slow the next one down.
                if w.write {
                    file.sync_data()?;
                }
            }
        }
    }
    drop(runners);
    let cols: [Column; 3] = std::array::from_fn(|t| samples[t].iter().map(|v| median(v.clone())).collect());
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

fn main() {
    if let Err(e) = run() {
        eprintln!("blkbench: {e:#}");
        std::process::exit(1);
    }
}
