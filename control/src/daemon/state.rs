//! livesnapd's own state in an embedded database (redb: pure Rust, one file, crash-safe
//! transactions with checksummed pages; no C to build).
//!
//! | table | key | value |
//! |---|---|---|
//! | `jobs` | job id | [`JobState`] as JSON (a live restore's with its [`LiveRestoreState`]) |
//! | `backups` | `VM/ID` | [`BackupState`] as JSON |
//! | `meta` | `job_seq` | the last job number handed out |
//! | `schedules` | schedule name | [`ScheduleState`] as JSON: when it last ran |
//!
//! The repository stays the source of truth for what a backup holds: the `backups` table only
//! adds what the repository does not know (the snapshot it was cut from, its kind, the note),
//! and a backup the repository no longer has is not listed.
//!
//! The tables' layout for operators: docs/livesnapd-state.md.
//!
//! Every call is a blocking transaction (a commit syncs the file): call it from a blocking
//! thread.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BACKUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("backups");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("The state database `{}` cannot be opened", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("The state database failed")]
    Db(#[source] Box<redb::Error>),
    #[error("The record {key} of the state database is damaged")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cannot encode a record of the state database")]
    Encode(#[source] serde_json::Error),
}

impl<E: Into<redb::Error>> From<E> for Error {
    fn from(e: E) -> Self {
        Error::Db(Box::new(e.into()))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobResult {
    Ok,
    Failed,
    /// Stopped early: cancelled by a client (CancelJob), or by livesnapd stopping.
    Cancelled,
}

impl JobResult {
    pub fn as_str(self) -> &'static str {
        match self {
            JobResult::Ok => "ok",
            JobResult::Failed => "failed",
            JobResult::Cancelled => "cancelled",
        }
    }
}

/// Where a job is. Stored as its lowercase name, the strings the first records held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Recorded, nothing asked of the VM yet.
    Starting,
    /// Connecting to the agent, freezing the guest.
    Quiesce,
    /// The backend's Begin.
    Cut,
    /// Thawing the guest.
    Thaw,
    /// Reading the frozen bases into the repository.
    Backup,
    /// The delta merging into the base, then the checkpoint.
    Merge,
    /// Recording the backup's outcome.
    Record,
    /// A live restore: its target and map exist, no backend serves them yet.
    Waiting,
    /// A live restore: a backend serves the target, the chunks it asks for are fed to it.
    Feeding,
    Done,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Starting => "starting",
            Stage::Quiesce => "quiesce",
            Stage::Cut => "cut",
            Stage::Thaw => "thaw",
            Stage::Backup => "backup",
            Stage::Merge => "merge",
            Stage::Record => "record",
            Stage::Waiting => "waiting",
            Stage::Feeding => "feeding",
            Stage::Done => "done",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job does. Records written before live restore existed have no `kind`: snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// CreateSnapshot.
    #[default]
    Snapshot,
    /// RestoreBackup with `live`: feeding a backend that serves the target ([`super::live`]).
    LiveRestore,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Snapshot => "snapshot",
            JobKind::LiveRestore => "live-restore",
        }
    }

    fn is_snapshot(&self) -> bool {
        *self == JobKind::Snapshot
    }
}

/// What a live-restore job restores, and where: enough to resume it after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRestoreState {
    /// The backup (of the job's VM) and its disk.
    pub backup_id: String,
    pub disk: String,
    /// The target image as created, and its restore map (the target's path + `.restore`).
    pub target: std::path::PathBuf,
    pub map: std::path::PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks_total: u64,
}

/// One job (CreateSnapshot, or a live restore), from its start to its end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub version: u32,
    pub id: String,
    pub vm: String,
    /// The stage reached.
    pub stage: Stage,
    pub started_unix_us: u64,
    pub finished_unix_us: Option<u64>,
    /// `None` while the job runs (or when the daemon died under it).
    pub result: Option<JobResult>,
    pub reason: String,
    /// The backend's snapshot, once cut.
    pub snapshot_id: Option<u64>,
    #[serde(default, skip_serializing_if = "JobKind::is_snapshot")]
    pub kind: JobKind,
    /// A live restore's target; `None` for a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveRestoreState>,
}

impl JobState {
    pub fn new(id: String, vm: String, started_unix_us: u64) -> JobState {
        JobState {
            version: STATE_VERSION,
            id,
            vm,
            stage: Stage::Starting,
            started_unix_us,
            finished_unix_us: None,
            result: None,
            reason: String::new(),
            snapshot_id: None,
            kind: JobKind::Snapshot,
            live: None,
        }
    }
}

/// What the daemon knows of a backup beyond its manifests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupState {
    pub version: u32,
    pub vm: String,
    pub id: String,
    pub job: String,
    pub snapshot_id: u64,
    /// full or incremental (incremental when every disk was).
    pub kind: String,
    /// application or crash.
    pub consistency: String,
    pub freeze_window_us: u64,
    pub note: String,
}

impl BackupState {
    pub fn current_version() -> u32 {
        STATE_VERSION
    }
}

/// When a schedule last ran ([`super::schedule`]): its next elapse counts from there, so one
/// missed while the daemon was down runs once at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub version: u32,
    pub name: String,
    /// Seconds since the epoch (UTC) of its last run.
    pub last_run_unix: i64,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record { key: key.to_owned(), source })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::Encode)
}

impl Store {
    /// Opens (or creates) the database at `path`; one process at a time.
    pub fn open(path: &Path) -> Result<Store> {
        let db =
            Database::create(path).map_err(|e| Error::Open { path: path.to_owned(), source: Box::new(e.into()) })?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.open_table(BACKUPS)?;
        tx.open_table(META)?;
        tx.open_table(SCHEDULES)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// The next job number (persisted, so ids are never reused across restarts).
    pub fn next_job_seq(&self) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let n = {
            let mut t = tx.open_table(META)?;
            let n = t.get("job_seq")?.map_or(0, |v| v.value()) + 1;
            t.insert("job_seq", n)?;
            n
        };
        tx.commit()?;
        Ok(n)
    }

    pub fn put_job(&self, job: &JobState) -> Result<()> {
        let bytes = encode(job)?;
        let tx = self.db.begin_write()?;
        tx.open_table(JOBS)?.insert(job.id.as_str(), bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<JobState>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOBS)?;
        let v = t.get(id)?;
        v.map(|v| decode(id, v.value())).transpose()
    }

    pub fn jobs(&self) -> Result<Vec<JobState>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode::<JobState>(k.value(), v.value())?);
        }
        out.sort_by(|a, b| (a.started_unix_us, &a.id).cmp(&(b.started_unix_us, &b.id)));
        Ok(out)
    }

    pub fn put_backup(&self, b: &BackupState) -> Result<()> {
        let bytes = encode(b)?;
        let key = format!("{}/{}", b.vm, b.id);
        let tx = self.db.begin_write()?;
        tx.open_table(BACKUPS)?.insert(key.as_str(), bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn backup(&self, vm: &str, id: &str) -> Result<Option<BackupState>> {
        let key = format!("{vm}/{id}");
        let tx = self.db.begin_read()?;
        let t = tx.open_table(BACKUPS)?;
        let v = t.get(key.as_str())?;
        v.map(|v| decode(&key, v.value())).transpose()
    }

    /// When schedule `name` last ran; `None` if it never did.
    pub fn schedule_last_run(&self, name: &str) -> Result<Option<i64>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SCHEDULES)?;
        let v = t.get(name)?;
        Ok(v.map(|v| decode::<ScheduleState>(name, v.value())).transpose()?.map(|s| s.last_run_unix))
    }

    pub fn put_schedule_run(&self, name: &str, last_run_unix: i64) -> Result<()> {
        let st = ScheduleState { version: STATE_VERSION, name: name.to_owned(), last_run_unix };
        let bytes = encode(&st)?;
        let tx = self.db.begin_write()?;
        tx.open_table(SCHEDULES)?.insert(name, bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove_backups(&self, vm: &str, ids: &[String]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(BACKUPS)?;
            for id in ids {
                t.remove(format!("{vm}/{id}").as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_backups_survive_a_reopen() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path)?;
            assert_eq!(s.next_job_seq()?, 1);
            let mut j = JobState::new("j1".into(), "vm1".into(), 5);
            j.snapshot_id = Some(3);
            s.put_job(&j)?;
            let b = BackupState {
                version: 1,
                vm: "vm1".into(),
                id: "b1".into(),
                job: "j1".into(),
                snapshot_id: 3,
                kind: "full".into(),
                consistency: "crash".into(),
                freeze_window_us: 0,
                note: "no agent".into(),
            };
            s.put_backup(&b)?;
        }
        let s = Store::open(&path)?;
        assert_eq!(s.next_job_seq()?, 2, "job numbers are not reused");
        let jobs = s.jobs()?;
        assert_eq!(jobs.len(), 1);
        assert_eq!(s.job("j1")?.as_ref(), Some(&jobs[0]));
        assert_eq!(s.job("j2")?, None);
        assert_eq!(jobs[0].snapshot_id, Some(3));
        assert_eq!(jobs[0].result, None);
        assert_eq!(s.backup("vm1", "b1")?.map(|b| b.note), Some("no agent".into()));
        s.remove_backups("vm1", &["b1".into()])?;
        assert_eq!(s.backup("vm1", "b1")?, None);
        assert_eq!(s.schedule_last_run("nightly")?, None);
        s.put_schedule_run("nightly", 1_800_000_000)?;
        drop(s);
        let s = Store::open(&path)?;
        assert_eq!(s.schedule_last_run("nightly")?, Some(1_800_000_000), "a schedule's last run survives a restart");
        assert_eq!(s.schedule_last_run("other")?, None);
        Ok(())
    }

    #[test]
    fn job_records_written_with_stage_strings_read_as_stages() -> std::result::Result<(), Box<dyn std::error::Error>> {
        for (text, stage) in [
            ("starting", Stage::Starting),
            ("quiesce", Stage::Quiesce),
            ("cut", Stage::Cut),
            ("backup", Stage::Backup),
            ("merge", Stage::Merge),
            ("record", Stage::Record),
            ("done", Stage::Done),
        ] {
            let old = format!(
                r#"{{"version":1,"id":"j","vm":"v","stage":"{text}","started_unix_us":1,"finished_unix_us":null,"result":null,"reason":"","snapshot_id":null}}"#
            );
            let j: JobState = decode("j", old.as_bytes())?;
            assert_eq!(j.stage, stage);
            assert_eq!(String::from_utf8(encode(&j)?)?, old, "written back as it was");
        }
        let unknown = br#"{"version":1,"id":"j","vm":"v","stage":"teleport","started_unix_us":1,"finished_unix_us":null,"result":null,"reason":"","snapshot_id":null}"#;
        assert!(matches!(decode::<JobState>("j", unknown), Err(Error::Record { .. })));
        Ok(())
    }
}
