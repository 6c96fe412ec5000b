//! Side-by-side measurements (ignored by default; run in release):
//! `cargo test --release -p livesnap-blk --lib restore::bench_tests -- --ignored --nocapture`
//!
//! - 4 KiB random reads over restored ranges through [`RestoreDisk`] against the same reads on
//!   the plain image (page cache hot, one thread, in-process: the core's overhead, no vhost);
//! - the background fill (answers of 4 MiB chunks, committed as the default options say: a
//!   round's 64 MiB once, at its end) against writing the same bytes to a plain image and
//!   syncing it once at the end (what a plain restore does).
//!
//! Printed ratios, never asserted: timings on a shared machine are noise for a pass/fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::disk::{Answer, FeedMsg, Options, RestoreDisk};
use super::map::{create_map, map_path, Identity, Map};
use crate::disk::{self, Buf, DiskFile, Format};

const CHUNK: u64 = 4 << 20;

fn image(dir: &std::path::Path, name: &str, size: u64) -> (PathBuf, Arc<dyn DiskFile>) {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let d = disk::open(&path, Some(Format::Raw), false).unwrap();
    (path, d)
}

fn restoring(path: &std::path::Path, img: Arc<dyn DiskFile>, size: u64) -> RestoreDisk {
    let id = Identity { vm: "bench".into(), backup_id: "b".into(), disk: "vda".into() };
    create_map(path, &id, size, CHUNK).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(map_path(path)).unwrap();
    let map = Map::open(Arc::new(f)).unwrap();
    RestoreDisk::new(img, map, map_path(path), Options::default()).unwrap()
}

/// Feeds every chunk the disk wants, but never `keep_missing`; returns the fill time.
fn fill(disk: &RestoreDisk, data: &[u8], keep_missing: Option<u64>) -> Duration {
    let (gen, mut rx) = disk.attach();
    let start = Instant::now();
    while let Ok(FeedMsg::Want { chunks, .. }) = rx.try_recv() {
        for c in chunks {
            if Some(c) != keep_missing {
                disk.answer(gen, c, Answer::Data(data.to_vec())).unwrap();
            }
        }
    }
    disk.commit().unwrap();
    start.elapsed()
}

fn random_reads(d: &dyn DiskFile, blocks: u64, n: usize, seed: u64) -> Duration {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for _ in 0..n {
        d.read_vectored_at(&[Buf::from(&mut buf[..])], rng.u64(0..blocks) * 4096).unwrap();
    }
    start.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn restored_reads_and_fill_throughput_against_a_plain_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; CHUNK as usize];
    fastrand::Rng::with_seed(1).fill(&mut data);

    // Fill throughput: rounds of 64 MiB, RestoreDisk and plain writes alternating; the median of
    // the rounds' ratios (the machine is shared: single rounds are noise).
    let size = 16 * CHUNK;
    let mut ratios = Vec::new();
    let (mut fill_t, mut plain_t) = (Duration::ZERO, Duration::ZERO);
    for round in 0..9 {
        let (p, img) = image(dir.path(), &format!("r{round}.raw"), size);
        let rd = restoring(&p, img, size);
        let f = fill(&rd, &data, None);
        assert!(rd.is_complete());
        let (_, plain) = image(dir.path(), &format!("p{round}.raw"), size);
        let start = Instant::now();
        for c in 0..size / CHUNK {
            let mut d = data.clone();
            plain.write_vectored_at(&[Buf::from(&mut d[..])], c * CHUNK).unwrap();
        }
        plain.flush().unwrap();
        let pt = start.elapsed();
        ratios.push(pt.as_secs_f64() / f.as_secs_f64());
        fill_t += f;
        plain_t += pt;
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_file(map_path(&p)).unwrap();
        std::fs::remove_file(dir.path().join(format!("p{round}.raw"))).unwrap();
    }
    let mib = 9.0 * size as f64 / (1 << 20) as f64;
    println!(
        "fill: {:.0} MiB/s through RestoreDisk, {:.0} MiB/s plain writes (totals); median ratio of 9 rounds {:.2}",
        mib / fill_t.as_secs_f64(),
        mib / plain_t.as_secs_f64(),
        median(ratios)
    );

    // Random reads over restored ranges: every chunk but the last is in, so the disk is not
    // complete and every read goes through the lookups.
    let size = 64 * CHUNK;
    let (p, img) = image(dir.path(), "reads.raw", size);
    let rd = restoring(&p, img.clone(), size);
    fill(&rd, &data, Some(size / CHUNK - 1));
    assert!(!rd.is_complete());
    let blocks = (size - CHUNK) / 4096;
    let n = 20_000;
    random_reads(&*img, blocks, 10 * n, 9); // warm the page cache
    let mut ratios = Vec::new();
    for round in 0..31 {
        let plain = random_reads(&*img, blocks, n, round);
        let restore = random_reads(&rd, blocks, n, round);
        ratios.push(plain.as_secs_f64() / restore.as_secs_f64());
    }
    println!("4 KiB random reads: median ratio RestoreDisk/plain of 31 rounds of {n}: {:.3}", median(ratios));
}
