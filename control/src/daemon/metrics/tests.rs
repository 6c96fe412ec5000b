//! The metric families with fakes, the repository's count against what backups add, and the
//! endpoint over a real TCP socket.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{serve_with, Limits};
use super::*;
use crate::daemon::config::{AgentEndpoint, Config};
use crate::daemon::ports::{
    Agent, AgentError, Backend, BackendError, ChangeMap, DiskState, MergeProgress, RestoreState, Snapshot,
};

/// The samples of an exposition: `name{labels}` → value. Fails on a line that is not a
/// comment or a sample, so a malformed exposition fails the test.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let v = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")),
        };
        assert!(out.insert(key.to_owned(), v).is_none(), "sample twice: {line:?}");
    }
    out
}

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        panic!("no sample {key} in {keys:#?}")
    })
}

fn vms(names: &[&str]) -> Vec<VmConfig> {
    names
        .iter()
        .map(|n| VmConfig { name: (*n).into(), control: format!("/fake/{n}.sock").into(), agent: None, key: None })
        .collect()
}

#[test]
fn jobs_count_by_vm_kind_and_result_and_only_a_success_moves_the_last_success() {
    let m = Metrics::new();
    m.job_finished("a", BackupMode::Full, JobResult::Ok, Duration::from_secs(3), 1_700_000_000_000_000);
    m.job_finished("a", BackupMode::Auto, JobResult::Failed, Duration::from_millis(1500), 1_700_000_100_000_000);
    m.job_finished("a", BackupMode::Auto, JobResult::Cancelled, Duration::from_secs(1), 1_700_000_200_000_000);
    m.job_finished("b", BackupMode::Auto, JobResult::Failed, Duration::from_secs(1), 1_700_000_300_000_000);
    m.freeze("a", Duration::from_millis(40));
    m.live_restore_finished("a", JobResult::Ok);
    m.live_restore_finished("a", JobResult::Cancelled);
    m.live_restore_finished("a", JobResult::Ok);
    let s = parse(&m.encode());
    assert_eq!(sample(&s, r#"livesnap_live_restores_total{vm="a",result="ok"}"#), 2.0);
    assert_eq!(sample(&s, r#"livesnap_live_restores_total{vm="a",result="cancelled"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_jobs_total{vm="a",kind="full",result="ok"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_jobs_total{vm="a",kind="auto",result="failed"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_jobs_total{vm="a",kind="auto",result="cancelled"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_jobs_total{vm="b",kind="auto",result="failed"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_last_success_timestamp_seconds{vm="a"}"#), 1_700_000_000.0);
    assert!(!s.keys().any(|k| k.contains("last_success") && k.contains(r#"vm="b""#)), "b never succeeded");
    assert_eq!(sample(&s, r#"livesnap_job_duration_seconds_count{vm="a",result="ok"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_job_duration_seconds_sum{vm="a",result="ok"}"#), 3.0);
    assert_eq!(sample(&s, r#"livesnap_job_duration_seconds_bucket{vm="a",result="failed",le="2"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_job_duration_seconds_bucket{vm="a",result="failed",le="1"}"#), 0.0);
    assert_eq!(sample(&s, r#"livesnap_freeze_duration_seconds_count{vm="a"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_freeze_duration_seconds_bucket{vm="a",le="0.064"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_freeze_duration_seconds_bucket{vm="a",le="0.032"}"#), 0.0);
}

#[test]
fn the_last_success_is_restored_from_the_recorded_jobs_and_is_zero_for_a_vm_never_backed_up() {
    let job = |vm: &str, result, finished: Option<u64>| {
        let mut j = JobState::new(format!("{vm}-{finished:?}"), vm.into(), 1);
        j.result = result;
        j.finished_unix_us = finished;
        j
    };
    let jobs = [
        job("a", Some(JobResult::Ok), Some(5_000_000)),
        job("a", Some(JobResult::Ok), Some(9_000_000)),
        job("a", Some(JobResult::Failed), Some(12_000_000)),
        job("a", None, None),
        job("b", Some(JobResult::Cancelled), Some(7_000_000)),
        // Not configured any more: no series.
        job("gone", Some(JobResult::Ok), Some(3_000_000)),
    ];
    let m = Metrics::new();
    m.restore(&vms(&["a", "b"]), &jobs);
    let s = parse(&m.encode());
    assert_eq!(sample(&s, r#"livesnap_last_success_timestamp_seconds{vm="a"}"#), 9.0);
    assert_eq!(sample(&s, r#"livesnap_last_success_timestamp_seconds{vm="b"}"#), 0.0);
    assert!(!s.keys().any(|k| k.contains("gone")), "a VM no longer configured has a series");
}

#[test]
fn backends_set_their_gauges_and_a_vm_or_disk_gone_loses_its_series() {
    let disk = |id: &str, phase, delta_bytes, merged_bytes| DiskState {
        id: id.into(),
        phase,
        snapshot: Some(4),
        size: 1 << 30,
        base_path: "/b".into(),
        base_format: "raw".into(),
        abandoned: None,
        delta_bytes,
        delta_extents: 3,
        merged_bytes,
        restore: None,
    };
    let restoring = |done, complete| DiskState {
        restore: Some(RestoreState {
            vm: "old".into(),
            backup_id: "b1".into(),
            disk: "vda".into(),
            chunk_size: 4 << 20,
            chunks_total: 256,
            chunks_done: done,
            complete,
            map_path: "/t.restore".into(),
            fed: true,
        }),
        ..disk("vdc", Phase::Direct, 0, 0)
    };
    let merging = VmStatus {
        snapshot: Some(Snapshot { id: 4, disks: vec!["vda".into(), "vdb".into()], pause_us: 1 }),
        disks: vec![disk("vda", Phase::Merging, 1000, 24), disk("vdb", Phase::Active, 500, 0), restoring(56, false)],
    };
    let m = Metrics::new();
    m.set_backends(&[("a".into(), Some(merging)), ("b".into(), None)]);
    let s = parse(&m.encode());
    assert_eq!(sample(&s, r#"livesnap_backend_up{vm="a"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_backend_up{vm="b"}"#), 0.0);
    assert_eq!(sample(&s, r#"livesnap_snapshot_active{vm="a"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_delta_bytes{vm="a",disk="vda"}"#), 1000.0);
    assert_eq!(sample(&s, r#"livesnap_delta_extents{vm="a",disk="vdb"}"#), 3.0);
    assert_eq!(sample(&s, r#"livesnap_merge_merged_bytes{vm="a",disk="vda"}"#), 24.0);
    assert_eq!(sample(&s, r#"livesnap_merge_remaining_bytes{vm="a",disk="vda"}"#), 1000.0);
    assert_eq!(sample(&s, r#"livesnap_merge_remaining_bytes{vm="a",disk="vdb"}"#), 0.0, "vdb is not merging");
    assert_eq!(sample(&s, r#"livesnap_live_restore_chunks{vm="a",disk="vdc"}"#), 256.0);
    assert_eq!(sample(&s, r#"livesnap_live_restore_remaining_chunks{vm="a",disk="vdc"}"#), 200.0);
    assert!(!s.keys().any(|k| k.contains("live_restore") && k.contains(r#"disk="vda""#)), "vda is not restoring");

    let direct = VmStatus { snapshot: None, disks: vec![disk("vda", Phase::Direct, 0, 0), restoring(256, true)] };
    m.set_backends(&[("a".into(), Some(direct))]);
    let s = parse(&m.encode());
    assert_eq!(sample(&s, r#"livesnap_snapshot_active{vm="a"}"#), 0.0);
    assert_eq!(sample(&s, r#"livesnap_delta_bytes{vm="a",disk="vda"}"#), 0.0);
    assert!(!s.keys().any(|k| k.contains(r#"disk="vdb""#) || k.contains(r#"vm="b""#)), "{s:?}");
    assert!(!s.keys().any(|k| k.contains("live_restore_")), "a complete restore has no series: {s:?}");
}

#[test]
fn what_backups_add_to_the_repository_totals_matches_a_count_of_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::create(dir.path().join("repo"), repo::CreateOptions::default()).unwrap();
    let m = Metrics::new();
    m.repository_counted(count(&repo).unwrap());
    assert_eq!(*m.lock_totals(), RepoTotals::default());
    let chunk = repo.chunk_size() as usize;
    // Three chunks, one of zeros (not stored); each backup changes the first, so the others
    // dedup across backups. (Not two alike in one backup: the writer's threads may both store
    // such a chunk and both count it new, which the next count corrects.)
    let mut disk: Vec<u8> = (0..2 * chunk).map(|i| (i % 253) as u8).collect();
    disk.extend(std::iter::repeat_n(0, chunk));
    for (id, vm_name) in [("b1", "a"), ("b2", "a"), ("b3", "b")] {
        let spec = repo::BackupSpec {
            vm: vm_name.into(),
            id: id.into(),
            consistency: repo::Consistency::Crash,
            freeze_window: None,
            created_unix_us: None,
        };
        let mut w = repo.begin_backup(spec).unwrap();
        w.full("vda", &disk).unwrap();
        let info = w.commit().unwrap();
        m.backup_committed(&info);
        assert_eq!(*m.lock_totals(), count(&repo).unwrap(), "after {id}");
        disk[7] ^= 0xff;
    }
    let s = parse(&m.encode());
    let t = count(&repo).unwrap();
    assert_eq!((t.backups, t.logical_bytes), (3, 9 * chunk as u64));
    assert_eq!(sample(&s, "livesnap_repository_backups"), 3.0);
    assert_eq!(sample(&s, "livesnap_repository_stored_bytes"), t.stored_bytes as f64);
    let ratio = sample(&s, "livesnap_repository_dedup_ratio");
    assert!((ratio - t.logical_bytes as f64 / t.stored_bytes as f64).abs() < 1e-9, "{ratio}");
    assert!(ratio > 1.0, "{ratio}");
    assert!(sample(&s, r#"livesnap_backup_stored_bytes_total{vm="a"}"#) > 0.0);
    assert_eq!(sample(&s, r#"livesnap_backup_read_bytes_total{vm="a"}"#), 6.0 * chunk as f64);
    assert_eq!(sample(&s, r#"livesnap_backup_changed_bytes_total{vm="b"}"#), 3.0 * chunk as f64);
}

/// A connector whose backends are scripted by VM name: `up` answers, `hangs` never does, any
/// other is refused.
#[derive(Debug)]
struct Backends;

#[async_trait]
impl Connector for Backends {
    async fn backend(&self, vm: &VmConfig, _t: Timeouts) -> Result<Arc<dyn Backend>, BackendError> {
        match vm.name.as_str() {
            "up" | "hangs" => Ok(Arc::new(FakeBackend(vm.name == "hangs"))),
            _ => Err(BackendError::NoAnswer { socket: vm.control.clone(), timeout: PROBE }),
        }
    }

    async fn agent(&self, _e: &AgentEndpoint, _t: Timeouts) -> Result<Arc<dyn Agent>, AgentError> {
        unreachable!("the metrics never reach an agent")
    }
}

struct FakeBackend(bool);

#[async_trait]
impl Backend for FakeBackend {
    async fn status(&self) -> Result<VmStatus, BackendError> {
        if self.0 {
            std::future::pending::<()>().await;
        }
        Ok(VmStatus { snapshot: None, disks: vec![] })
    }
    async fn changes(&self, _disk: &str) -> Result<ChangeMap, BackendError> {
        unreachable!()
    }
    async fn begin(&self) -> Result<Snapshot, BackendError> {
        unreachable!()
    }
    async fn merge(&self, _s: u64, _p: &mut (dyn FnMut(MergeProgress) + Send)) -> Result<(), BackendError> {
        unreachable!()
    }
    async fn abandon(&self, _s: u64, _r: &str) -> Result<(), BackendError> {
        unreachable!()
    }
    async fn checkpoint(&self, _s: u64) -> Result<(), BackendError> {
        unreachable!()
    }
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_never_answers_is_down_and_does_not_hold_the_scrape() {
    // Time is paused: the hour passes at once if the probe waits for the backend.
    let got = tokio::time::timeout(
        Duration::from_secs(3600),
        statuses(Arc::new(Backends), &vms(&["up", "hangs", "refuses"])),
    )
    .await
    .expect("the scrape waited for the backend that never answers");
    let up: Vec<(&str, bool)> = got.iter().map(|(n, s)| (n.as_str(), s.is_some())).collect();
    assert_eq!(up, [("up", true), ("hangs", false), ("refuses", false)]);
}

/// A daemon on a temp dir, its VMs reached through [`Backends`].
fn daemon(dir: &Path) -> Arc<Daemon> {
    let text = format!(
        "repository = \"{0}/repo\"\nsocket = \"{0}/d.sock\"\nstate = \"{0}/state.redb\"\nrestore_dir = \"{0}/restore\"\n\
         [[vm]]\nname = \"up\"\ncontrol = \"/fake/up.sock\"\n[[vm]]\nname = \"refuses\"\ncontrol = \"/fake/r.sock\"\n",
        dir.display()
    );
    let config = Config::parse(Path::new("/test.toml"), &text).unwrap();
    Daemon::open_with(config, Arc::new(Backends)).unwrap()
}

/// Sends `request` and reads until the server closes or the answer's length is read.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

async fn endpoint(limits: Limits) -> (tempfile::TempDir, Arc<Daemon>, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_with(d.clone(), listener, limits);
    (dir, d, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_metrics_is_served_and_the_answer_parses() {
    let (_dir, d, addr) = endpoint(Limits::default()).await;
    d.metrics().job_finished("up", BackupMode::Full, JobResult::Failed, Duration::from_secs(2), 1);
    let a = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
    assert!(a.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{a}");
    let (_, body) = a.split_once("\r\n\r\n").unwrap();
    let s = parse(body);
    assert_eq!(sample(&s, r#"livesnap_jobs_total{vm="up",kind="full",result="failed"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_backend_up{vm="up"}"#), 1.0);
    assert_eq!(sample(&s, r#"livesnap_backend_up{vm="refuses"}"#), 0.0);
    assert_eq!(sample(&s, "livesnap_jobs_running"), 0.0);
    assert_eq!(sample(&s, r#"livesnap_last_success_timestamp_seconds{vm="up"}"#), 0.0);

    for (req, want) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        (b"GET /metrics/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"NONSENSE\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ] {
        let a = exchange(addr, req).await;
        assert_eq!(status_line(&a), want, "{}: {a}", String::from_utf8_lossy(req));
    }
    // A head larger than the server reads is refused, not buffered.
    // (One header: hyper refuses more than 100 headers on its own.)
    let big =
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: {}\r\n\r\n", "y".repeat(20_000));
    let a = exchange(addr, big.as_bytes()).await;
    assert_eq!(status_line(&a), "HTTP/1.1 431 Request Header Fields Too Large", "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_take_at_most_their_slots_and_are_cut_off_at_the_header_timeout() {
    // The header timeout is long, then short: no outcome depends on how fast this runs.
    let limits =
        Limits { connections: 2, header_timeout: Duration::from_secs(3600), lifetime: Duration::from_secs(3600) };
    let (_dir, _d, addr) = endpoint(limits).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metr").await.unwrap();
        silent.push(s);
    }
    // Both slots are held: a third connection is closed without an answer.
    let a = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(a, "", "a third client was served");
    drop(silent);

    // Only the header timeout can end the slow connection.
    let limits =
        Limits { header_timeout: Duration::from_millis(100), lifetime: Duration::from_secs(3600), ..Limits::default() };
    let (_dir, _d, addr) = endpoint(limits).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Meanwhile another client is served.
    let a = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK");
    // The slow one is closed (hyper may answer 408 first), however long that takes.
    let mut out = Vec::new();
    // A hang guard, far beyond the header timeout.
    let read = tokio::time::timeout(Duration::from_secs(60), slow.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the slow client was never cut off");
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
}
