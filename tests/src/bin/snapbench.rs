//! snapbench: livesnap-blk's snapshot engine measured against itself without a snapshot and
//! against a plain copy, on one backend instance and one file, over the control socket.
//!
//! ```text
//! cargo run --release -p livesnap-tests --bin snapbench -- [--size 1G] [--rounds 3] [--page-cache small] [--cuts 60] [--merge-size 512M] [--part cut,write,merge] [--dir DIR]
//! ```
//!
//! The device has 2 queues, loaded by [`livesnap_tests::load`] through the test VMM
//! ([`livesnap_tests::frontend`]); write payloads sit in guest memory once, as a guest's data
//! does.
//!
//! Three tables, each of interleaved rounds:
//! 1. the cut under load: 4 KiB random I/O (half reads, half writes) on both queues at QD 32
//!    while `--cuts` snapshots are cut, each merged back (its small delta) before the next.
//!    For each cut: the pause the backend reports (`BeginReply.snapshot.pause_us`) and, seen by
//!    the VMM, the longest request latency and the longest gap between completions on a queue,
//!    over completions from the `Begin` call to its reply; the same over a window of the same
//!    length with no control call (taken between cuts), and over the whole `Merge` call;
//! 2. 4 KiB random writes at QD 32: a pass over every block of the disk once (a random
//!    permutation, split between the queues) with no snapshot, then with a snapshot just cut
//!    (every write lands in a fresh region of the delta), then the same pass again (every write
//!    overwrites the delta);
//! 3. the merge of `--merge-size` bytes written into the delta (4 KiB at random blocks, or 1 MiB
//!    sequential), timed from the `Merge` call until `Status` (polled every millisecond) shows no
//!    snapshot, against `pread`/`pwrite` of the same extents, in the same pieces (at most the
//!    merger's 1 MiB), between two files of this filesystem in the same page-cache state, with
//!    an `fdatasync` every 64 MiB and at the end as the merger does; and the guest's 4 KiB random
//!    write IOPS during a merge against the same load for as long with no snapshot.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use livesnap_proto::error::chain;
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::bench::{self, parse_size, PageCache, QUEUES};
use livesnap_tests::blk::{BlkQueue, Request, SECTOR_SIZE};
use livesnap_tests::load::{self, Gate, Source, Trace, STALL, TIMEOUT};
use tonic::transport::{Channel, Endpoint};

/// Benchmark of livesnap-blk's snapshots: the cut under load, writes with a snapshot active,
/// and the merge.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the test file (suffixes K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Rounds of the write and merge tables; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// How the file's page cache is filled before the measurements: `large` leaves the large
    /// folios that writing it sequentially creates; `small` drops them and reads every 4 KiB
    /// block back in random order, as a guest's random reads would, leaving 4 KiB folios.
    #[arg(long, value_enum, default_value_t = PageCache::Large)]
    page_cache: PageCache,
    /// Directory for the test files, the sockets and the state (default: a new tempdir under
    /// /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Snapshots cut (each merged before the next) under load.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=10000))]
    cuts: u32,
    /// Bytes written into the delta before each merge that is timed.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    merge_size: u64,
    /// The tables to measure (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    part: Vec<Part>,
}

/// A table of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Cut,
    Write,
    Merge,
}

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
            let st = self.rt.block_on(self.client.status(pb::StatusRequest {})).context("status failed")?.into_inner();
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

/// 4 KiB requests of worker `worker` at uniformly random blocks, forever; `writes` of every
/// 256 are writes.
fn random(worker: usize, size: u64, writes: u32) -> Source {
    Box::new(load::random(worker as u64 + 1, size, BLOCK as u32, writes))
}

/// 4 KiB writes to blocks `perm[range]`, each once.
fn pass(perm: Arc<Perm>, range: std::ops::Range<u64>) -> Source {
    Box::new(range.map(move |i| Request::WriteInPlace { sector: perm.get(i) * BLOCK / SECTOR_SIZE, len: BLOCK as u32 }))
}

/// `block`-byte writes sweeping `range` (bytes) once.
fn sweep(range: std::ops::Range<u64>, block: u64) -> Source {
    Box::new(load::sweep(range, block as u32, true))
}

/// `sources[i]` for worker i of `n`: a pass over its share of `perm[0..count]`.
fn pass_sources(perm: &Arc<Perm>, count: u64) -> Vec<Source> {
    (0..QUEUES as u64).map(|i| pass(perm.clone(), i * count / QUEUES as u64..(i + 1) * count / QUEUES as u64)).collect()
}

/// Runs a worker per queue on `sources`, `depth` requests in flight each, while `steer` runs
/// here (see [`load::on_queues`]).
fn with_load<T>(
    queues: &mut [BlkQueue],
    depth: usize,
    sources: Vec<Source>,
    traces: Option<&mut [Trace]>,
    counting: bool,
    steer: impl FnOnce(&Gate) -> Result<T>,
) -> Result<(T, u64, Duration)> {
    load::on_queues(queues, depth, sources, traces, counting, steer)
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
            g.count(true);
            let t0 = g.at();
            ctl.merge(id)?;
            let t1 = g.at();
            g.count(false);
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
            g.count(true);
            let t0 = g.at();
            std::thread::sleep(secs);
            let t1 = g.at();
            g.count(false);
            Ok((t0, t1))
        })?;
        sync()?;
        m.iops_idle.push(ops as f64 / (t1 - t0).as_secs_f64());
        m.idle_secs.push((t1 - t0).as_secs_f64());
        m.idle_stalled.push(stalled(&traces, t0, t1));
    }
    Ok(m)
}

fn med(v: &[f64]) -> f64 {
    bench::median(v.to_vec()).unwrap_or(f64::NAN)
}

fn print_cuts(c: &Cuts) {
    let us = |v: f64| format!("{:.0}", v);
    let row = |name: &str, v: &[f64]| {
        println!(
            "{:<52} {:>9} {:>9} {:>9}",
            name,
            us(bench::percentile(v, 50.0)),
            us(bench::percentile(v, 99.0)),
            us(bench::percentile(v, 100.0))
        );
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

/// Removes what `measure` created in a directory given with `--dir`.
fn remove_files(dir: &Path, image: &Path) {
    let _ = std::fs::remove_file(image);
    for f in ["copy-src.raw", "copy-dst.raw"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("state"));
}

/// Measures the tables `args` asks for, on the image `file` at `image` in `dir`.
fn measure(args: &Args, dir: &Path, image: &Path, file: &File) -> Result<()> {
    ensure!(
        args.merge_size >= BLOCK && args.merge_size % (2 * COPY_PIECE) == 0 && args.merge_size <= args.size,
        "--merge-size must be a multiple of 2M, at most --size"
    );
    let socket = dir.join("livesnap.sock");
    let control = dir.join("control.sock");
    let extra = [
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
        "--control".to_string(),
        control.display().to_string(),
    ];
    let _daemon = bench::livesnap_blk(image, &socket, &extra, &[&control])?;
    let (_frontend, mut queues) = bench::connect(&socket, args.size, DEPTH as u16, COPY_PIECE as u32)?;
    // A guest's data is in its memory already: fill the buffers once, copy nothing per request.
    for q in &mut queues {
        q.fill_slots(&vec![0x5a; COPY_PIECE as usize])?;
    }
    let mut ctl = Ctl::connect(&control)?;

    let dst = bench::prepare_file(&dir.join("copy-dst.raw"), args.size, args.page_cache)?;
    let src_path = dir.join("copy-src.raw");
    let src = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&src_path)?;
    let copy = Copy { src, dst, size: args.size };
    let fd = file.as_raw_fd();
    let sync = move || -> Result<()> {
        // SAFETY: syncfs(2) on a descriptor we own: the image, the state directory's deltas
        // and the copy's files share the filesystem.
        match unsafe { libc::syncfs(fd) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()).context("syncfs failed"),
        }
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

fn run() -> Result<()> {
    let args = Args::parse();
    ensure!(args.size >= 4 << 20 && args.size % (2 << 20) == 0, "--size must be a multiple of 2M, at least 4M");
    let (dir, _tmp) = bench::work_dir(args.dir.as_deref(), "snapbench")?;
    let image = dir.join("snapbench.raw");
    let file = bench::prepare_file(&image, args.size, args.page_cache)?;
    let res = measure(&args, &dir, &image, &file);
    if args.dir.is_some() {
        remove_files(&dir, &image);
    }
    res
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapbench: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}
