//! livesnapd's Prometheus metrics, and (in [`http`]) the endpoint that serves them, on the
//! address `[metrics] listen` names; off without it.
//!
//! Three sources, each as cheap as it can be:
//!
//! - **the jobs**, as they end: counters, histograms and the last success, updated by the
//!   workflow's hooks ([`Metrics::job_finished`], [`Metrics::freeze`],
//!   [`Metrics::backup_committed`]); the last success per VM is read back from the state
//!   database at start, so it survives a restart;
//! - **the backends**, at each scrape: every configured VM's control service asked for its
//!   status (its deltas and merge), all at once, each within [`PROBE`]; one scrape at a time;
//! - **the repository**: counted (a walk of the chunks, or a LIST of the bucket) at start and
//!   then every `repository_count_secs` or after a prune, never by a scrape; between two
//!   counts each backup adds what it stored.
//!
//! Names follow Prometheus' conventions: the `livesnap_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters. The list is in `control/README.md`.

mod http;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use super::config::VmConfig;
use super::model::BackupMode;
use super::ports::{Connector, Phase, Timeouts, VmStatus};
use super::state::{JobKind, JobResult, JobState};
use super::Daemon;
use livesnap_repo::{self as repo, Repository};

pub use http::{bind, serve, Error};

/// How long a scrape waits for each backend's status.
const PROBE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    vm: String,
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    vm: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    vm: String,
    disk: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A job's length: 1 s to about 9 h.
fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// A freeze window: 1 ms to about 33 s (the agent's lease is 10 s by default).
fn freeze_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn vm(name: &str) -> VmLabels {
    VmLabels { vm: name.to_owned() }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The repository's totals: counted, plus what backups added since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepoTotals {
    /// Bytes of the stored chunks (compressed, headers included).
    pub stored_bytes: u64,
    pub chunks: u64,
    /// The disks' sizes summed over every backup: what restoring them all would write.
    pub logical_bytes: u64,
    pub backups: u64,
}

/// The gauges of the repository.
#[derive(Debug, Default)]
struct RepoGauges {
    stored_bytes: Gauge,
    chunks: Gauge,
    logical_bytes: Gauge,
    backups: Gauge,
    dedup_ratio: F64Gauge,
    counted: F64Gauge,
}

/// The metric families, registered once; cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    job_duration: Histograms<ResultLabels>,
    freeze_duration: Histograms<VmLabels>,
    read_bytes: Family<VmLabels, Counter>,
    changed_bytes: Family<VmLabels, Counter>,
    stored_bytes: Family<VmLabels, Counter>,
    last_success: Family<VmLabels, F64Gauge>,
    running: Gauge,
    repo: RepoGauges,
    totals: Mutex<RepoTotals>,
    backend_up: Family<VmLabels, Gauge>,
    snapshot_active: Family<VmLabels, Gauge>,
    delta_bytes: Family<DiskLabels, Gauge>,
    delta_extents: Family<DiskLabels, Gauge>,
    merged_bytes: Family<DiskLabels, Gauge>,
    merge_remaining: Family<DiskLabels, Gauge>,
    live_restores: Family<ResultLabels, Counter>,
    restore_chunks: Family<DiskLabels, Gauge>,
    restore_remaining: Family<DiskLabels, Gauge>,
    /// One scrape at a time: each clears and refills the backends' families.
    scrape: tokio::sync::Mutex<()>,
    /// Asks for a count of the repository now (after a prune).
    count_now: Notify,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("livesnap");
        let m = Metrics {
            registry: Registry::default(),
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(job_buckets as fn() -> Histogram),
            freeze_duration: Family::new_with_constructor(freeze_buckets as fn() -> Histogram),
            read_bytes: Family::default(),
            changed_bytes: Family::default(),
            stored_bytes: Family::default(),
            last_success: Family::default(),
            running: Gauge::default(),
            repo: RepoGauges::default(),
            totals: Mutex::new(RepoTotals::default()),
            backend_up: Family::default(),
            snapshot_active: Family::default(),
            delta_bytes: Family::default(),
            delta_extents: Family::default(),
            merged_bytes: Family::default(),
            merge_remaining: Family::default(),
            live_restores: Family::default(),
            restore_chunks: Family::default(),
            restore_remaining: Family::default(),
            scrape: tokio::sync::Mutex::new(()),
            count_now: Notify::new(),
        };
        r.register(
            "jobs",
            "Snapshot jobs ended, by VM, requested kind (auto, full, incremental) and result (ok, failed, cancelled)",
            m.jobs.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Length of the snapshot jobs ended, by VM and result",
            m.job_duration.clone(),
        );
        r.register(
            "freeze_duration_seconds",
            "The guest's freeze windows: the agent's freeze request to its thaw reply",
            m.freeze_duration.clone(),
        );
        r.register("backup_read_bytes", "Bytes read from the frozen bases by committed backups", m.read_bytes.clone());
        r.register(
            "backup_changed_bytes",
            "Bytes changed since the previous backup (the disk's size for a full one), of committed backups",
            m.changed_bytes.clone(),
        );
        r.register(
            "backup_stored_bytes",
            "Bytes of new chunks committed backups wrote to the repository",
            m.stored_bytes.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "When the VM's last successful snapshot job ended (Unix time; 0: never)",
            m.last_success.clone(),
        );
        r.register("jobs_running", "Snapshot jobs running now", m.running.clone());
        r.register("repository_stored_bytes", "Bytes of the repository's chunks", m.repo.stored_bytes.clone());
        r.register("repository_chunks", "Chunks in the repository", m.repo.chunks.clone());
        r.register(
            "repository_logical_bytes",
            "The disks' sizes summed over every backup in the repository",
            m.repo.logical_bytes.clone(),
        );
        r.register("repository_backups", "Backups in the repository", m.repo.backups.clone());
        r.register(
            "repository_dedup_ratio",
            "Logical bytes over stored bytes: deduplication, skipped zeros and compression together (0: nothing stored)",
            m.repo.dedup_ratio.clone(),
        );
        r.register(
            "repository_counted_timestamp_seconds",
            "When the repository was last counted whole (Unix time; 0: not yet)",
            m.repo.counted.clone(),
        );
        r.register(
            "backend_up",
            "Whether the VM's livesnap-blk answered its status at this scrape",
            m.backend_up.clone(),
        );
        r.register(
            "snapshot_active",
            "Whether the VM's backend holds a snapshot (cut, not yet merged)",
            m.snapshot_active.clone(),
        );
        r.register(
            "delta_bytes",
            "Bytes of the disk in its snapshot's delta: written since the cut, or still to merge",
            m.delta_bytes.clone(),
        );
        r.register("delta_extents", "Extents of the disk's delta map", m.delta_extents.clone());
        r.register("merge_merged_bytes", "Bytes the disk's running merge copied into its base", m.merged_bytes.clone());
        r.register(
            "merge_remaining_bytes",
            "Bytes the disk's running merge has still to copy (0: not merging)",
            m.merge_remaining.clone(),
        );
        r.register(
            "live_restores",
            "Live restore jobs ended, by VM and result (ok, failed, cancelled)",
            m.live_restores.clone(),
        );
        r.register(
            "live_restore_chunks",
            "Chunks of the backup the disk's live restore fills, as its backend reports (no series: not restoring)",
            m.restore_chunks.clone(),
        );
        r.register(
            "live_restore_remaining_chunks",
            "Chunks the disk's live restore has still to fill",
            m.restore_remaining.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Sets the last success of each configured VM from the recorded jobs (0 for a VM that
    /// never had one); called once, at start.
    pub fn restore(&self, vms: &[VmConfig], jobs: &[JobState]) {
        for v in vms {
            let last = jobs
                .iter()
                .filter(|j| j.vm == v.name && j.kind == JobKind::Snapshot && j.result == Some(JobResult::Ok))
                .filter_map(|j| j.finished_unix_us)
                .max();
            self.last_success.get_or_create(&vm(&v.name)).set(last.map_or(0.0, |us| us as f64 / 1e6));
        }
    }

    /// A job ended, at `ended_unix_us`, after `duration`.
    pub fn job_finished(
        &self,
        vm_name: &str,
        mode: BackupMode,
        result: JobResult,
        duration: Duration,
        ended_unix_us: u64,
    ) {
        let kind = match mode {
            BackupMode::Auto => "auto",
            BackupMode::Full => "full",
            BackupMode::Incremental => "incremental",
        };
        let labels = JobLabels { vm: vm_name.to_owned(), kind: kind.into(), result: result.as_str().into() };
        self.jobs.get_or_create(&labels).inc();
        let labels = ResultLabels { vm: vm_name.to_owned(), result: result.as_str().into() };
        self.job_duration.get_or_create(&labels).observe(duration.as_secs_f64());
        if result == JobResult::Ok {
            self.last_success.get_or_create(&vm(vm_name)).set(ended_unix_us as f64 / 1e6);
        }
    }

    /// A live restore job ended.
    pub fn live_restore_finished(&self, vm_name: &str, result: JobResult) {
        let labels = ResultLabels { vm: vm_name.to_owned(), result: result.as_str().into() };
        self.live_restores.get_or_create(&labels).inc();
    }

    /// The guest was frozen for `window`.
    pub fn freeze(&self, vm_name: &str, window: Duration) {
        self.freeze_duration.get_or_create(&vm(vm_name)).observe(window.as_secs_f64());
    }

    /// A backup was committed: its bytes, and the repository's totals until the next count.
    pub fn backup_committed(&self, info: &repo::BackupInfo) {
        let l = vm(&info.vm);
        let mut t = self.lock_totals();
        for d in &info.disks {
            self.read_bytes.get_or_create(&l).inc_by(d.stats.bytes_read);
            self.changed_bytes.get_or_create(&l).inc_by(d.stats.bytes_changed);
            self.stored_bytes.get_or_create(&l).inc_by(d.stats.bytes_stored);
            t.stored_bytes = t.stored_bytes.saturating_add(d.stats.bytes_stored);
            t.chunks = t.chunks.saturating_add(d.stats.chunks_new);
            t.logical_bytes = t.logical_bytes.saturating_add(d.size);
        }
        t.backups += 1;
        self.set_repo(&t);
    }

    /// The repository as counted whole now.
    pub fn repository_counted(&self, counted: RepoTotals) {
        let mut t = self.lock_totals();
        *t = counted;
        self.set_repo(&t);
        self.repo.counted.set(unix_now());
    }

    /// Asks the counting task to count the repository now (after a prune or a delete).
    pub fn recount(&self) {
        self.count_now.notify_one();
    }

    fn lock_totals(&self) -> std::sync::MutexGuard<'_, RepoTotals> {
        self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_repo(&self, t: &RepoTotals) {
        self.repo.stored_bytes.set(gauge(t.stored_bytes));
        self.repo.chunks.set(gauge(t.chunks));
        self.repo.logical_bytes.set(gauge(t.logical_bytes));
        self.repo.backups.set(gauge(t.backups));
        let ratio = if t.stored_bytes == 0 { 0.0 } else { t.logical_bytes as f64 / t.stored_bytes as f64 };
        self.repo.dedup_ratio.set(ratio);
    }

    /// The backends' gauges from their statuses (`None`: the backend did not answer); the
    /// series of VMs and disks no longer there are dropped.
    fn set_backends(&self, statuses: &[(String, Option<VmStatus>)]) {
        for f in [
            &self.delta_bytes,
            &self.delta_extents,
            &self.merged_bytes,
            &self.merge_remaining,
            &self.restore_chunks,
            &self.restore_remaining,
        ] {
            f.clear();
        }
        self.backend_up.clear();
        self.snapshot_active.clear();
        for (name, st) in statuses {
            let l = vm(name);
            self.backend_up.get_or_create(&l).set(i64::from(st.is_some()));
            let Some(st) = st else { continue };
            self.snapshot_active.get_or_create(&l).set(i64::from(st.snapshot.is_some()));
            for d in &st.disks {
                let l = DiskLabels { vm: name.clone(), disk: d.id.clone() };
                let merging = d.phase == Phase::Merging;
                self.delta_bytes.get_or_create(&l).set(gauge(d.delta_bytes));
                self.delta_extents.get_or_create(&l).set(gauge(d.delta_extents));
                self.merged_bytes.get_or_create(&l).set(if merging { gauge(d.merged_bytes) } else { 0 });
                self.merge_remaining.get_or_create(&l).set(if merging { gauge(d.delta_bytes) } else { 0 });
                if let Some(r) = d.restore.as_ref().filter(|r| !r.complete) {
                    self.restore_chunks.get_or_create(&l).set(gauge(r.chunks_total));
                    self.restore_remaining.get_or_create(&l).set(gauge(r.chunks_total.saturating_sub(r.chunks_done)));
                }
            }
        }
    }

    /// The text exposition of every family as it is now.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Asks every configured VM's backend for its status (all at once, each within [`PROBE`]),
    /// updates the gauges that come from them and from the daemon, and encodes everything.
    pub async fn scrape(&self, daemon: &Daemon) -> String {
        let _one = self.scrape.lock().await;
        self.running.set(gauge(daemon.stops_map().len() as u64));
        let statuses = statuses(daemon.connector.clone(), &daemon.config.vms).await;
        self.set_backends(&statuses);
        self.encode()
    }
}

/// Each VM's backend status, in the configuration's order; `None` for one that did not answer
/// within [`PROBE`].
async fn statuses(connector: Arc<dyn Connector>, vms: &[VmConfig]) -> Vec<(String, Option<VmStatus>)> {
    let timeouts = Timeouts { connect: PROBE, call: PROBE };
    let mut probes = tokio::task::JoinSet::new();
    for (i, v) in vms.iter().cloned().enumerate() {
        let c = connector.clone();
        probes.spawn(async move {
            let st = async { c.backend(&v, timeouts).await?.status().await };
            // The connect and the call are each bounded; this bounds both together.
            let st = tokio::time::timeout(2 * PROBE, st).await.ok().and_then(Result::ok);
            (i, st)
        });
    }
    let mut out: Vec<(String, Option<VmStatus>)> = vms.iter().map(|v| (v.name.clone(), None)).collect();
    while let Some(r) = probes.join_next().await {
        if let Ok((i, st)) = r {
            if let Some(slot) = out.get_mut(i) {
                slot.1 = st;
            }
        }
    }
    out
}

/// Counts the repository whole: every chunk listed, every backup's manifests read. Blocks.
pub fn count(repo: &Repository) -> repo::Result<RepoTotals> {
    let chunks = repo.store().list_chunks()?;
    let backups = repo.list(None)?;
    Ok(RepoTotals {
        stored_bytes: chunks.iter().map(|(_, len)| *len).sum(),
        chunks: chunks.len() as u64,
        logical_bytes: backups.iter().flat_map(|b| b.disks.iter().map(|d| d.size)).sum(),
        backups: backups.len() as u64,
    })
}

/// Counts the repository at once, then every `interval` or when [`Metrics::recount`] asks;
/// runs until the runtime stops.
pub(crate) fn spawn_counter(daemon: Arc<Daemon>, interval: Duration) {
    tokio::spawn(async move {
        loop {
            match daemon.blocking(|repo, _| Ok(count(repo)?)).await {
                Ok(t) => daemon.metrics.repository_counted(t),
                Err(e) => tracing::warn!(error = %livesnap_proto::error::chain(&e), "cannot count the repository"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = daemon.metrics.count_now.notified() => {}
            }
        }
    });
}

#[cfg(test)]
mod tests;
