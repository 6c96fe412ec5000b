//! blkbench: the same block workloads against qemu-storage-daemon, livesnap-blk and the limit
//! (pread/pwrite from the benchmark itself), on the same preallocated, page-cached raw file.
//!
//! ```text
//! cargo run --release -p livesnap-tests --bin blkbench -- [--size 1G] [--seconds 3] [--only qsd|livesnap|limit] [--dir DIR] [--json]
//! cargo run --release -p livesnap-tests --bin blkbench -- --snapshot [--cuts 60] [--merge-size 512M] [--part cut,write,merge]
//! ```
//!
//! With `--snapshot`, livesnap-blk alone is measured, with its snapshot engine on (see [`snap`]):
//! the cut's pause under load, random writes with a snapshot active, and the merge.
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
    /// Measure livesnap-blk's snapshots instead of comparing backends: the cut's pause under
    /// load, 4 KiB random writes with a snapshot active, and the merge (see `snapshot_bench`).
    #[arg(long)]
    snapshot: bool,
    /// With --snapshot: snapshots cut (each merged before the next) under load.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=10000))]
    cuts: u32,
    /// With --snapshot: bytes written into the delta before each merge that is timed.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    merge_size: u64,
    /// With --snapshot: the tables to measure (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    part: Vec<Part>,
}

/// A table of `--snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Cut,
    Write,
    Merge,
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
        let queues =
            fe.take_queues().into_iter().map(|v| BlkQueue::new(v, depth, block)).collect::<Result<Vec<_>, _>>()?;
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
    if args.snapshot {
        ensure!(!args.json && args.only.is_none(), "--snapshot takes neither --json nor --only");
        let res = snap::bench(&args, &dir, &image, &file);
        if args.dir.is_some() {
            snap::remove_files(&dir, &image);
        }
        return res;
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

/// `--snapshot`: livesnap-blk's snapshot engine measured against itself without a snapshot and
/// against a plain copy, on one backend instance and one file, over the control socket.
///
/// Three tables, each of interleaved rounds:
/// 1. the cut under load: 4 KiB random I/O (half reads, half writes) on both queues at QD 32
///    while `--cuts` snapshots are cut, each merged back (its small delta) before the next.
///    For each cut: the pause the backend reports (`BeginReply.snapshot.pause_us`) and, seen by
///    the VMM, the longest request latency and the longest gap between completions on a queue,
///    over completions from the `Begin` call to its reply; the same over a window of the same
///    length with no control call (taken between cuts), and over the whole `Merge` call;
/// 2. 4 KiB random writes at QD 32: a pass over every block of the disk once (a random
///    permutation, split between the queues) with no snapshot, then with a snapshot just cut
///    (every write lands in a fresh region of the delta), then the same pass again (every write
///    overwrites the delta);
/// 3. the merge of `--merge-size` bytes written into the delta (4 KiB at random blocks, or 1 MiB
///    sequential), timed from the `Merge` call until `Status` (polled every millisecond) shows no
///    snapshot, against `pread`/`pwrite` of the same extents, in the same pieces (at most the
///    merger's 1 MiB), between two files of this filesystem in the same page-cache state, with
///    an `fdatasync` every 64 MiB and at the end as the merger does; and the guest's 4 KiB random
///    write IOPS during a merge against the same load for as long with no snapshot.
mod snap {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use livesnap_proto::snapshot as pb;
    use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
    use tonic::transport::{Channel, Endpoint};

    use super::*;

    const BLOCK: u64 = 4096;
    /// Requests in flight per queue for 4 KiB requests (QD 32 over both queues), and for 1 MiB.
    const DEPTH: usize = 16;
    const DEPTH_LARGE: usize = 4;
    /// The merger's largest piece (`vhost-blk/src/snap/delta.rs` MERGE_CHUNK) and its commit
    /// interval (`snap/mod.rs` MERGE_COMMIT_BYTES), which the plain copy imitates.
    const COPY_PIECE: u64 = 1 << 20;
    const COPY_SYNC_EVERY: u64 = 64 << 20;
    /// How often the end of a merge is polled.
    const POLL: Duration = Duration::from_millis(1);

    /// Blocking client of the snapshot control service.
    struct Ctl {
        rt: tokio::runtime::Runtime,
        client: SnapshotControlClient<Channel>,
    }

    impl Ctl {
        fn connect(path: &Path) -> Result<Self> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let endpoint = Endpoint::from_static("http://x.invalid").timeout(TIMEOUT);
            let channel = rt
                .block_on(livesnap_proto::unix_channel(endpoint, path.to_path_buf()))
                .with_context(|| format!("cannot connect to {}", path.display()))?;
            Ok(Ctl { rt, client: SnapshotControlClient::new(channel) })
        }

        /// Cuts a snapshot of every disk; returns its id and the pause the backend measured (µs).
        fn begin(&mut self) -> Result<(u64, u64)> {
            let reply = self.rt.block_on(self.client.begin(pb::BeginRequest::default())).context("begin failed")?;
            let s = reply.into_inner().snapshot.context("begin replied without a snapshot")?;
            Ok((s.id, s.pause_us))
        }

        /// Merges snapshot `id` and returns once `Status` shows no snapshot any more.
        fn merge(&mut self, id: u64) -> Result<()> {
            let mut stream = self
                .rt
                .block_on(self.client.merge(pb::MergeRequest { snapshot_id: id }))
                .context("merge failed")?
                .into_inner();
            // The first report comes once every disk is merging; the stream then reports only
            // every 200 ms, too coarse to time a merge, so the end is polled instead.
            let first = self.rt.block_on(stream.message()).context("merge failed")?;
            drop(stream);
            if first.is_some_and(|m| m.done) {
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs(900);
            loop {
                let st =
                    self.rt.block_on(self.client.status(pb::StatusRequest {})).context("status failed")?.into_inner();
                if st.snapshot.is_none() {
                    return Ok(());
                }
                ensure!(Instant::now() < deadline, "snapshot {id} still merging after 900 s");
                std::thread::sleep(POLL);
            }
        }
    }

    /// A pseudo-random permutation of `0..n`: every block once, with no locality.
    struct Perm {
        n: u64,
        bits: u32,
    }

    impl Perm {
        fn new(n: u64) -> Self {
            Perm { n, bits: 64 - n.max(2).saturating_sub(1).leading_zeros() }
        }

        fn get(&self, i: u64) -> u64 {
            let mask = u64::MAX >> (64 - self.bits);
            let shift = self.bits / 2 + 1;
            let mut x = i;
            // Odd multipliers and right xorshifts are bijections on `bits`-bit integers; walking
            // the cycle until the value is below `n` keeps it a permutation of `0..n`.
            loop {
                x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & mask;
                x ^= x >> shift;
                x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) & mask;
                x ^= x >> shift;
                if x < self.n {
                    return x;
                }
            }
        }
    }

    /// The requests of one worker.
    type Source = Box<dyn FnMut() -> Option<Request<'static>> + Send>;

    /// 4 KiB requests at uniformly random blocks, forever; `writes` of every 256 are writes.
    fn random(worker: usize, size: u64, writes: u32) -> Source {
        let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1);
        let blocks = size / BLOCK;
        Box::new(move || {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let r = rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let sector = r % blocks * BLOCK / SECTOR_SIZE;
            Some(match ((r >> 56) as u32) < writes {
                true => Request::WriteInPlace { sector, len: BLOCK as u32 },
                false => Request::Read { sector, len: BLOCK as u32 },
            })
        })
    }

    /// 4 KiB writes to blocks `perm[range]`, each once.
    fn pass(perm: Arc<Perm>, range: std::ops::Range<u64>) -> Source {
        let mut it = range;
        Box::new(move || {
            it.next().map(|i| Request::WriteInPlace { sector: perm.get(i) * BLOCK / SECTOR_SIZE, len: BLOCK as u32 })
        })
    }

    /// `block`-byte writes sweeping `range` (bytes) once.
    fn sweep(range: std::ops::Range<u64>, block: u64) -> Source {
        let mut it = range.step_by(block as usize);
        Box::new(move || it.next().map(|off| Request::WriteInPlace { sector: off / SECTOR_SIZE, len: block as u32 }))
    }

    /// `sources[i]` for worker i of `n`: a pass over its share of `perm[0..count]`.
    fn pass_sources(perm: &Arc<Perm>, count: u64) -> Vec<Source> {
        (0..QUEUES as u64)
            .map(|i| pass(perm.clone(), i * count / QUEUES as u64..(i + 1) * count / QUEUES as u64))
            .collect()
    }

    /// What the workers of one load share with the thread steering it.
    struct Gate {
        start: Instant,
        stop: AtomicBool,
        /// Completions are counted while set.
        counting: AtomicBool,
        finished: AtomicUsize,
    }

    impl Gate {
        fn at(&self) -> Duration {
            self.start.elapsed()
        }

        /// Waits until every worker ran out of requests.
        fn wait_workers(&self) {
            while self.finished.load(Ordering::SeqCst) < QUEUES {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Per worker and per millisecond of completion time: the longest latency of a request
    /// completed then and the longest wait for a completion ending then, in µs.
    #[derive(Clone, Debug, Default)]
    struct Trace {
        max_lat: Vec<u32>,
        max_gap: Vec<u32>,
        /// Waits for a completion of at least [`STALL`]: (when it ended, how long).
        stalls: Vec<(Duration, Duration)>,
    }

    /// A wait for a completion this long counts as a stall of the queue.
    const STALL: Duration = Duration::from_millis(5);

    impl Trace {
        fn record(&mut self, at: Duration, lat: Duration, gap: Duration) {
            let ms = at.as_millis() as usize;
            if ms >= self.max_lat.len() {
                self.max_lat.resize(ms + 1024, 0);
                self.max_gap.resize(ms + 1024, 0);
            }
            let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
            self.max_lat[ms] = self.max_lat[ms].max(us(lat));
            self.max_gap[ms] = self.max_gap[ms].max(us(gap));
            if gap >= STALL {
                self.stalls.push((at, gap));
            }
        }

        /// Time stalled in waits that ended from `from` to `to`.
        fn stalled(&self, from: Duration, to: Duration) -> Duration {
            self.stalls.iter().filter(|(at, _)| *at >= from && *at <= to).map(|(_, gap)| *gap).sum()
        }

        /// Longest latency and gap of completions from `from` to `to` (whole milliseconds).
        fn window(&self, from: Duration, to: Duration) -> (u32, u32) {
            let (a, b) = (from.as_millis() as usize, (to.as_millis() as usize + 1).min(self.max_lat.len()));
            let max = |v: &[u32]| v.get(a..b).and_then(|s| s.iter().max().copied()).unwrap_or(0);
            (max(&self.max_lat), max(&self.max_gap))
        }
    }

    /// Keeps `depth` requests of `next` in flight on `q` until `gate` stops it or `next` runs
    /// out; returns the completions counted.
    fn worker(
        q: &mut BlkQueue,
        depth: usize,
        next: &mut Source,
        gate: &Gate,
        mut trace: Option<&mut Trace>,
    ) -> Result<u64> {
        let mut submitted = vec![gate.start; q.free_slots() + q.in_flight()];
        let mut done = Vec::with_capacity(depth);
        let (mut ops, mut last, mut more) = (0, Instant::now(), true);
        loop {
            more &= !gate.stop.load(Ordering::Relaxed);
            while more && q.in_flight() < depth {
                match next() {
                    Some(req) => submitted[usize::from(q.submit(&req)?)] = Instant::now(),
                    None => more = false,
                }
            }
            if q.in_flight() == 0 {
                return Ok(ops);
            }
            q.kick()?;
            done.clear();
            q.reap(Some(TIMEOUT), &mut done)?;
            let now = Instant::now();
            if let Some(c) = done.iter().find(|c| c.status != 0) {
                bail!("request failed with status {}", c.status);
            }
            if let Some(t) = trace.as_deref_mut() {
                let lat = done.iter().map(|c| now - submitted[usize::from(c.tag)]).max().unwrap_or_default();
                t.record(now - gate.start, lat, now - last);
            }
            last = now;
            if gate.counting.load(Ordering::Relaxed) {
                ops += done.len() as u64;
            }
        }
    }

    /// Runs a worker per queue on `sources` while `steer` runs here; stops them when it returns.
    /// With `traces`, worker i records into `traces[i]`. Returns what `steer` returned, the
    /// completions counted and how long the workers ran.
    fn with_load<T>(
        queues: &mut [BlkQueue],
        depth: usize,
        mut sources: Vec<Source>,
        traces: Option<&mut [Trace]>,
        counting: bool,
        steer: impl FnOnce(&Gate) -> Result<T>,
    ) -> Result<(T, u64, Duration)> {
        let gate = Gate {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            counting: AtomicBool::new(counting),
            finished: AtomicUsize::new(0),
        };
        let mut traces: Vec<Option<&mut Trace>> = match traces {
            Some(t) => t.iter_mut().map(Some).collect(),
            None => Vec::new(),
        };
        traces.resize_with(queues.len(), || None);
        std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter_mut()
                .zip(sources.iter_mut())
                .zip(traces)
                .map(|((q, src), trace)| {
                    let gate = &gate;
                    s.spawn(move || {
                        let r = worker(q, depth, src, gate, trace);
                        gate.finished.fetch_add(1, Ordering::SeqCst);
                        r
                    })
                })
                .collect();
            let steered = steer(&gate);
            gate.stop.store(true, Ordering::SeqCst);
            let ops = handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
                .sum::<Result<u64>>();
            let ran = gate.at();
            Ok((steered?, ops?, ran))
        })
    }

    /// Table 1, per cut: the backend's pause (µs), and the VMM's (longest latency, longest
    /// gap) in µs over the `Begin` call, a window as long with no call, and the `Merge` call;
    /// then the lengths of the `Begin` and `Merge` calls (µs).
    #[derive(Debug, Default)]
    struct Cuts {
        pause: Vec<f64>,
        begin: Vec<(f64, f64)>,
        idle: Vec<(f64, f64)>,
        merge: Vec<(f64, f64)>,
        begin_call: Vec<f64>,
        merge_call: Vec<f64>,
    }

    fn cuts(queues: &mut [BlkQueue], ctl: &mut Ctl, size: u64, n: u32) -> Result<Cuts> {
        let mut traces = vec![Trace::default(); QUEUES];
        let sources = (0..QUEUES).map(|i| random(i, size, 128)).collect();
        type Span = (Duration, Duration);
        let (windows, _, _) = with_load(queues, DEPTH, sources, Some(&mut traces), false, |gate| {
            std::thread::sleep(Duration::from_millis(500));
            let mut w: Vec<(u64, Span, Span, Span)> = Vec::new();
            for _ in 0..n {
                let b0 = gate.at();
                let (id, pause) = ctl.begin()?;
                let b1 = gate.at();
                // Writes fill the delta a little, as they would during a backup.
                std::thread::sleep(Duration::from_millis(100));
                let m0 = gate.at();
                ctl.merge(id)?;
                let m1 = gate.at();
                std::thread::sleep(Duration::from_millis(100));
                let i0 = gate.at();
                std::thread::sleep(b1 - b0);
                let i1 = gate.at();
                std::thread::sleep(Duration::from_millis(20));
                w.push((pause, (b0, b1), (m0, m1), (i0, i1)));
            }
            Ok(w)
        })?;
        let window = |(a, b): Span| {
            let (lat, gap) = traces.iter().map(|t| t.window(a, b)).fold((0, 0), |x, y| (x.0.max(y.0), x.1.max(y.1)));
            (f64::from(lat), f64::from(gap))
        };
        let mut c = Cuts::default();
        for (pause, begin, merge, idle) in windows {
            c.pause.push(pause as f64);
            c.begin.push(window(begin));
            c.idle.push(window(idle));
            c.merge.push(window(merge));
            c.begin_call.push((begin.1 - begin.0).as_micros() as f64);
            c.merge_call.push((merge.1 - merge.0).as_micros() as f64);
        }
        Ok(c)
    }

    /// IOPS of one pass of 4 KiB writes over `perm[0..count]`.
    fn pass_iops(queues: &mut [BlkQueue], perm: &Arc<Perm>, count: u64) -> Result<f64> {
        let ((), ops, ran) = with_load(queues, DEPTH, pass_sources(perm, count), None, true, |g| {
            g.wait_workers();
            Ok(())
        })?;
        ensure!(ops == count, "pass completed {ops} of {count} writes");
        Ok(ops as f64 / ran.as_secs_f64())
    }

    /// Table 2, per round: IOPS with no snapshot, into a fresh delta, over the delta.
    fn writes(
        queues: &mut [BlkQueue],
        ctl: &mut Ctl,
        size: u64,
        rounds: u32,
        sync: &dyn Fn() -> Result<()>,
    ) -> Result<Vec<[f64; 3]>> {
        let perm = Arc::new(Perm::new(size / BLOCK));
        let mut out = Vec::new();
        for _ in 0..rounds {
            let direct = pass_iops(queues, &perm, size / BLOCK)?;
            sync()?;
            let (id, _) = ctl.begin()?;
            let fresh = pass_iops(queues, &perm, size / BLOCK)?;
            sync()?;
            let over = pass_iops(queues, &perm, size / BLOCK)?;
            sync()?;
            ctl.merge(id)?;
            sync()?;
            out.push([direct, fresh, over]);
        }
        Ok(out)
    }

    /// Table 3, per round, in MiB/s then IOPS: merge and copy of a random delta, of a
    /// sequential one; guest writes during a merge and idle; and the loaded merge's length (s).
    #[derive(Debug, Default)]
    struct Merges {
        merge_random: Vec<f64>,
        copy_random: Vec<f64>,
        merge_seq: Vec<f64>,
        copy_seq: Vec<f64>,
        iops_merging: Vec<f64>,
        iops_idle: Vec<f64>,
        loaded_secs: Vec<f64>,
        idle_secs: Vec<f64>,
        /// During the loaded merge: the most time a queue spent in stalls, and the longest one.
        loaded_stalled: Vec<f64>,
        loaded_longest: Vec<f64>,
        idle_stalled: Vec<f64>,
    }

    /// The files of the plain copy.
    struct Copy {
        src: File,
        dst: File,
        size: u64,
    }

    impl Copy {
        /// Makes `src` a sparse file holding `blocks` (4 KiB each, written in that order), synced.
        fn fill(&self, blocks: impl Iterator<Item = (u64, u64)>) -> Result<()> {
            self.src.set_len(0)?;
            self.src.set_len(self.size)?;
            let buf = vec![0x5a; COPY_PIECE as usize];
            for (off, len) in blocks {
                self.src.write_all_at(&buf[..len as usize], off)?;
            }
            self.src.sync_all()?;
            Ok(())
        }

        /// Copies `extents` from `src` to `dst` as the merger does; returns the time taken.
        fn copy(&self, extents: &[(u64, u64)]) -> Result<Duration> {
            let mut buf = vec![0u8; COPY_PIECE as usize];
            let t = Instant::now();
            let mut since_sync = 0;
            for &(start, end) in extents {
                let mut off = start;
                while off < end {
                    let len = (end - off).min(COPY_PIECE);
                    self.src.read_exact_at(&mut buf[..len as usize], off)?;
                    self.dst.write_all_at(&buf[..len as usize], off)?;
                    off += len;
                    since_sync += len;
                    if since_sync >= COPY_SYNC_EVERY {
                        self.dst.sync_data()?;
                        since_sync = 0;
                    }
                }
            }
            self.dst.sync_data()?;
            Ok(t.elapsed())
        }
    }

    /// Sorted, coalesced byte ranges of 4 KiB blocks.
    fn extents_of(mut blocks: Vec<u64>) -> Vec<(u64, u64)> {
        blocks.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            let (s, e) = (b * BLOCK, (b + 1) * BLOCK);
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    fn merges(
        queues: &mut [BlkQueue],
        ctl: &mut Ctl,
        args: &Args,
        copy: &Copy,
        sync: &dyn Fn() -> Result<()>,
    ) -> Result<Merges> {
        let (size, bytes) = (args.size, args.merge_size);
        let count = bytes / BLOCK;
        let perm = Arc::new(Perm::new(size / BLOCK));
        let random_blocks: Vec<u64> = (0..count).map(|i| perm.get(i)).collect();
        let random_extents = extents_of(random_blocks.clone());
        let seq_extents = [(0, bytes)];
        let mib = bytes as f64 / f64::from(1u32 << 20);
        let seq_sources = || -> Vec<Source> {
            let share = bytes / QUEUES as u64;
            (0..QUEUES as u64).map(|i| sweep(i * share..(i + 1) * share, COPY_PIECE)).collect()
        };
        // A delta of `count` random blocks, synced.
        let random_delta = |queues: &mut [BlkQueue], ctl: &mut Ctl| -> Result<u64> {
            let (id, _) = ctl.begin()?;
            with_load(queues, DEPTH, pass_sources(&perm, count), None, true, |g| {
                g.wait_workers();
                Ok(())
            })?;
            sync()?;
            Ok(id)
        };
        let timed_merge = |ctl: &mut Ctl, id: u64| -> Result<f64> {
            let t = Instant::now();
            ctl.merge(id)?;
            let secs = t.elapsed().as_secs_f64();
            sync()?;
            Ok(secs)
        };
        let mut m = Merges::default();
        for _ in 0..args.rounds {
            let id = random_delta(queues, ctl)?;
            m.merge_random.push(mib / timed_merge(ctl, id)?);
            copy.fill(random_blocks.iter().map(|&b| (b * BLOCK, BLOCK)))?;
            m.copy_random.push(mib / copy.copy(&random_extents)?.as_secs_f64());
            sync()?;

            let (id, _) = ctl.begin()?;
            with_load(queues, DEPTH_LARGE, seq_sources(), None, true, |g| {
                g.wait_workers();
                Ok(())
            })?;
            sync()?;
            m.merge_seq.push(mib / timed_merge(ctl, id)?);
            copy.fill((0..bytes).step_by(COPY_PIECE as usize).map(|o| (o, COPY_PIECE.min(bytes - o))))?;
            m.copy_seq.push(mib / copy.copy(&seq_extents)?.as_secs_f64());
            sync()?;

            // The guest writes while the merge runs, then as long again with no snapshot.
            let id = random_delta(queues, ctl)?;
            let sources = (0..QUEUES).map(|i| random(i, size, 256)).collect();
            let mut traces = vec![Trace::default(); QUEUES];
            let ((t0, t1), ops, _) = with_load(queues, DEPTH, sources, Some(&mut traces), false, |g| {
                std::thread::sleep(Duration::from_millis(300));
                g.counting.store(true, Ordering::SeqCst);
                let t0 = g.at();
                ctl.merge(id)?;
                let t1 = g.at();
                g.counting.store(false, Ordering::SeqCst);
                Ok((t0, t1))
            })?;
            sync()?;
            let secs = t1 - t0;
            let stalled = |t: &[Trace], a, b| t.iter().map(|t| t.stalled(a, b)).max().unwrap_or_default().as_secs_f64();
            m.iops_merging.push(ops as f64 / secs.as_secs_f64());
            m.loaded_secs.push(secs.as_secs_f64());
            m.loaded_stalled.push(stalled(&traces, t0, t1));
            m.loaded_longest.push(traces.iter().map(|t| f64::from(t.window(t0, t1).1)).fold(0.0, f64::max) / 1e6);
            let sources = (0..QUEUES).map(|i| random(i, size, 256)).collect();
            let mut traces = vec![Trace::default(); QUEUES];
            let ((t0, t1), ops, _) = with_load(queues, DEPTH, sources, Some(&mut traces), false, |g| {
                std::thread::sleep(Duration::from_millis(300));
                g.counting.store(true, Ordering::SeqCst);
                let t0 = g.at();
                std::thread::sleep(secs);
                let t1 = g.at();
                g.counting.store(false, Ordering::SeqCst);
                Ok((t0, t1))
            })?;
            sync()?;
            m.iops_idle.push(ops as f64 / (t1 - t0).as_secs_f64());
            m.idle_secs.push((t1 - t0).as_secs_f64());
            m.idle_stalled.push(stalled(&traces, t0, t1));
        }
        Ok(m)
    }

    /// The value at percentile `p` (nearest rank).
    fn pct(v: &[f64], p: f64) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v.get(i.clamp(1, v.len().max(1)) - 1).copied().unwrap_or(f64::NAN)
    }

    fn med(v: &[f64]) -> f64 {
        median(v.to_vec()).unwrap_or(f64::NAN)
    }

    fn print_cuts(c: &Cuts) {
        let us = |v: f64| format!("{:.0}", v);
        let row = |name: &str, v: &[f64]| {
            println!("{:<52} {:>9} {:>9} {:>9}", name, us(pct(v, 50.0)), us(pct(v, 99.0)), us(pct(v, 100.0)));
        };
        let first = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        let second = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
        println!(
            "cut under 4k random read+write, QD32 on {QUEUES} queues: {} cuts, each merged before the next",
            c.pause.len()
        );
        println!("{:<52} {:>9} {:>9} {:>9}", "µs", "p50", "p99", "max");
        row("backend pause (BeginReply pause_us)", &c.pause);
        row("VMM longest request latency, during Begin", &first(&c.begin));
        row("VMM longest request latency, as long without a call", &first(&c.idle));
        let extra: Vec<f64> = c.begin.iter().zip(&c.idle).map(|(b, i)| b.0 - i.0).collect();
        row("VMM extra latency (during Begin - without)", &extra);
        row("VMM longest completion gap, during Begin", &second(&c.begin));
        row("VMM longest completion gap, as long without a call", &second(&c.idle));
        row("VMM longest request latency, during Merge", &first(&c.merge));
        row("VMM longest completion gap, during Merge", &second(&c.merge));
        row("Begin call", &c.begin_call);
        row("Merge call (small delta)", &c.merge_call);
        println!();
    }

    fn print_writes(w: &[[f64; 3]]) {
        let col = |i: usize| w.iter().map(|r| r[i]).collect::<Vec<_>>();
        let (direct, fresh, over) = (med(&col(0)), med(&col(1)), med(&col(2)));
        println!("4k random write, QD32, one pass over every block, {} rounds (medians)", w.len());
        println!("{:<40} {:>10} {:>8}", "", "IOPS", "ratio");
        println!("{:<40} {:>10.0} {:>8}", "no snapshot", direct, "");
        println!("{:<40} {:>10.0} {:>8.2}", "snapshot active, first writes (fresh)", fresh, fresh / direct);
        println!("{:<40} {:>10.0} {:>8.2}", "snapshot active, overwrites of the delta", over, over / direct);
        println!();
    }

    fn print_merges(args: &Args, m: &Merges) {
        let mib = args.merge_size as f64 / f64::from(1u32 << 20);
        println!("merge of a {mib:.0} MiB delta, {} rounds (medians)", m.merge_random.len());
        println!("{:<48} {:>10} {:>10} {:>8}", "", "merge", "plain copy", "ratio");
        let pair = |name: &str, a: &[f64], b: &[f64], unit: &str| {
            println!("{:<48} {:>10.0} {:>10.0} {:>8.2}", format!("{name}, {unit}"), med(a), med(b), med(a) / med(b));
        };
        pair("delta of random 4k blocks", &m.merge_random, &m.copy_random, "MiB/s");
        pair("delta written sequentially (1M)", &m.merge_seq, &m.copy_seq, "MiB/s");
        println!("{:<48} {:>10} {:>10} {:>8}", "", "merging", "idle", "ratio");
        pair("guest 4k random write QD32", &m.iops_merging, &m.iops_idle, "IOPS");
        println!(
            "  merge under that load took {:.2} s (alone: {:.2} s); a queue stalled (waits >= {STALL:?}) {:.3} s of it, longest {:.3} s; idle: {:.3} s stalled (medians)",
            med(&m.loaded_secs),
            mib / med(&m.merge_random),
            med(&m.loaded_stalled),
            med(&m.loaded_longest),
            med(&m.idle_stalled)
        );
    }

    /// Removes what `bench` created in a directory given with `--dir`.
    pub fn remove_files(dir: &Path, image: &Path) {
        let _ = std::fs::remove_file(image);
        for f in ["copy-src.raw", "copy-dst.raw"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_dir_all(dir.join("state"));
    }

    pub fn bench(args: &Args, dir: &Path, image: &Path, file: &File) -> Result<()> {
        ensure!(
            args.merge_size >= BLOCK && args.merge_size % (2 * COPY_PIECE) == 0 && args.merge_size <= args.size,
            "--merge-size must be a multiple of 2M, at most --size"
        );
        let socket = dir.join("livesnap.sock");
        let control = dir.join("control.sock");
        let state = dir.join("state");
        let daemon_args = [
            "--vm".to_string(),
            "bench".to_string(),
            "--disk".to_string(),
            format!("id=vda,image={},socket={},format=raw", image.display(), socket.display()),
            "--queues".to_string(),
            QUEUES.to_string(),
            "--state-dir".to_string(),
            state.display().to_string(),
            "--control".to_string(),
            control.display().to_string(),
        ];
        let _daemon = Daemon::livesnap_blk(&daemon_args, &[&socket, &control]).context("livesnap-blk did not start")?;
        let opts = Options { queues: QUEUES as u16, mem_size: 48 << 20, timeout: TIMEOUT, ..Options::default() };
        let mut fe = Frontend::connect(&socket, &opts).context("cannot set up the device")?;
        let mut queues = fe
            .take_queues()
            .into_iter()
            .map(|v| BlkQueue::new(v, DEPTH as u16, COPY_PIECE as u32))
            .collect::<Result<Vec<_>, _>>()?;
        // A guest's data is in its memory already: fill the buffers once, copy nothing per request.
        for q in &mut queues {
            q.fill_slots(&vec![0x5a; COPY_PIECE as usize])?;
        }
        let mut ctl = Ctl::connect(&control)?;

        let dst_path = dir.join("copy-dst.raw");
        let dst =
            prepare_file(&dst_path, args.size).with_context(|| format!("cannot prepare {}", dst_path.display()))?;
        if args.page_cache == PageCache::Small {
            refill_cache_small(&dst, args.size).context("cannot refill the page cache")?;
        }
        let src_path = dir.join("copy-src.raw");
        let src = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&src_path)?;
        let copy = Copy { src, dst, size: args.size };
        let fd = file.as_raw_fd();
        let sync = move || -> Result<()> {
            // SAFETY: syncfs(2) on a descriptor we own: the image, the state directory's deltas
            // and the copy's files share the filesystem.
            ensure!(unsafe { libc::syncfs(fd) } == 0, "syncfs: {}", std::io::Error::last_os_error());
            Ok(())
        };

        let want = |p| args.part.is_empty() || args.part.contains(&p);
        if want(Part::Cut) {
            let c = cuts(&mut queues, &mut ctl, args.size, args.cuts).context("cut under load")?;
            print_cuts(&c);
            sync()?;
        }
        if want(Part::Write) {
            let w = writes(&mut queues, &mut ctl, args.size, args.rounds, &sync).context("writes with a snapshot")?;
            print_writes(&w);
        }
        if want(Part::Merge) {
            let m = merges(&mut queues, &mut ctl, args, &copy, &sync).context("merge")?;
            print_merges(args, &m);
        }
        Ok(())
    }
}
