//! snapctl's daemon commands, run as the real binary against a fake livesnapd: a tonic server
//! in the test process, on a unix socket, that answers from a script (replies, errors, event
//! streams that end early or break the connection, values snapctl does not know). The real
//! livesnapd is tested by its own tests; these check snapctl's parsing of the command line,
//! its output (text and --json), its exit codes and its error messages.
//!
//! snapctl is found beside the test binary in target/ (`cargo build -p livesnap-control`), or
//! named by `SNAPCTL`.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livesnap_proto::daemon::livesnapd_server::{Livesnapd, LivesnapdServer};
use livesnap_proto::daemon::*;
use livesnap_tests::{pattern, programs};
use serde_json::Value;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

const MIB: u64 = 1 << 20;

/// One step of a scripted stream.
#[derive(Clone)]
enum Step {
    Event(snapshot_event::Event),
    /// An event of a kind snapctl does not know (the oneof left empty, as a newer daemon's
    /// new event decodes).
    UnknownEvent,
    Restore(RestoreProgress),
    Error(Code, &'static str),
    /// Shut the connection down under the stream.
    DropConnection,
    /// Send nothing more, keep the stream open.
    Hang,
    Pause(Duration),
}

type Reply<T> = Result<T, (Code, &'static str)>;

/// What the fake answers.
#[derive(Clone)]
struct Script {
    vms: Reply<ListVmsReply>,
    snapshot: Reply<Vec<Step>>,
    backups: Reply<ListBackupsReply>,
    backup: Reply<Backup>,
    verify: Reply<VerifyReply>,
    delete: Reply<()>,
    restore: Reply<Vec<Step>>,
    prune: Reply<PruneReply>,
    /// GetFiles' items, sent in order.
    files: Reply<Vec<FileItem>>,
}

impl Default for Script {
    fn default() -> Self {
        let unimplemented = (Code::Unimplemented, "not scripted");
        Script {
            vms: Err(unimplemented),
            snapshot: Err(unimplemented),
            backups: Err(unimplemented),
            backup: Err(unimplemented),
            verify: Err(unimplemented),
            delete: Err(unimplemented),
            restore: Err(unimplemented),
            prune: Err(unimplemented),
            files: Err(unimplemented),
        }
    }
}

/// What the fake was asked.
#[derive(Debug, Default)]
struct Seen {
    snapshots: Vec<CreateSnapshotRequest>,
    list_backups: Vec<ListBackupsRequest>,
    restores: Vec<RestoreRequest>,
    prunes: Vec<PruneRequest>,
    deletes: Vec<BackupRef>,
    authorization: Vec<String>,
}

#[derive(Clone)]
struct FakeDaemon {
    script: Arc<Script>,
    seen: Arc<Mutex<Seen>>,
    /// Duplicates of the accepted connections' sockets, to shut them down.
    conns: Arc<Mutex<Vec<StdUnixStream>>>,
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn status((code, msg): (Code, &'static str)) -> Status {
    Status::new(code, msg)
}

impl FakeDaemon {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_auth<T>(&self, req: &Request<T>) {
        if let Some(v) = req.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
            self.seen().authorization.push(v.to_owned());
        }
    }

    fn stream<T: Send + 'static>(&self, steps: Vec<Step>, map: fn(Step) -> Option<T>) -> EventStream<T> {
        let conns = self.conns.clone();
        Box::pin(async_stream(steps, conns, map))
    }
}

/// The steps as a stream: events in order, an error ends it, DropConnection shuts the socket,
/// Hang never ends.
fn async_stream<T: Send + 'static>(
    steps: Vec<Step>,
    conns: Arc<Mutex<Vec<StdUnixStream>>>,
    map: fn(Step) -> Option<T>,
) -> impl Stream<Item = Result<T, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        for s in steps {
            match s {
                Step::Error(code, msg) => {
                    let _ = tx.send(Err(Status::new(code, msg))).await;
                    return;
                }
                Step::DropConnection => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    for c in conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                    std::future::pending::<()>().await;
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Hang => {
                    let _keep = tx;
                    std::future::pending::<()>().await;
                    return;
                }
                other => {
                    if let Some(item) = map(other) {
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn snapshot_event(s: Step) -> Option<SnapshotEvent> {
    match s {
        Step::Event(e) => Some(SnapshotEvent { job_id: "j1".into(), event: Some(e) }),
        Step::UnknownEvent => Some(SnapshotEvent { job_id: "j1".into(), event: None }),
        _ => None,
    }
}

fn restore_progress(s: Step) -> Option<RestoreProgress> {
    match s {
        Step::Restore(p) => Some(p),
        _ => None,
    }
}

#[tonic::async_trait]
impl Livesnapd for FakeDaemon {
    async fn list_vms(&self, req: Request<ListVmsRequest>) -> Result<Response<ListVmsReply>, Status> {
        self.note_auth(&req);
        self.script.vms.clone().map(Response::new).map_err(status)
    }

    type CreateSnapshotStream = EventStream<SnapshotEvent>;

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<Self::CreateSnapshotStream>, Status> {
        self.seen().snapshots.push(req.into_inner());
        let steps = self.script.snapshot.clone().map_err(status)?;
        Ok(Response::new(self.stream(steps, snapshot_event)))
    }

    async fn list_backups(&self, req: Request<ListBackupsRequest>) -> Result<Response<ListBackupsReply>, Status> {
        self.seen().list_backups.push(req.into_inner());
        self.script.backups.clone().map(Response::new).map_err(status)
    }

    async fn get_backup(&self, _: Request<BackupRef>) -> Result<Response<Backup>, Status> {
        self.script.backup.clone().map(Response::new).map_err(status)
    }

    async fn verify_backup(&self, _: Request<BackupRef>) -> Result<Response<VerifyReply>, Status> {
        self.script.verify.clone().map(Response::new).map_err(status)
    }

    async fn delete_backup(&self, req: Request<BackupRef>) -> Result<Response<DeleteBackupReply>, Status> {
        self.seen().deletes.push(req.into_inner());
        self.script.delete.map(|()| Response::new(DeleteBackupReply {})).map_err(status)
    }

    type RestoreBackupStream = EventStream<RestoreProgress>;

    async fn restore_backup(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        self.seen().restores.push(req.into_inner());
        let steps = self.script.restore.clone().map_err(status)?;
        Ok(Response::new(self.stream(steps, restore_progress)))
    }

    async fn prune(&self, req: Request<PruneRequest>) -> Result<Response<PruneReply>, Status> {
        self.seen().prunes.push(req.into_inner());
        self.script.prune.clone().map(Response::new).map_err(status)
    }

    // `backup files ls` and `cat` run against the real daemon (files.rs); GetFiles is scripted
    // here to play a daemon (or an image) sending what the extractor must refuse.
    type ListFilesStream = EventStream<FileList>;

    async fn list_files(&self, _: Request<FilesRequest>) -> Result<Response<Self::ListFilesStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type ReadFileStream = EventStream<FileData>;

    async fn read_file(&self, _: Request<FilesRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type GetFilesStream = EventStream<FileItem>;

    async fn get_files(&self, _: Request<FilesRequest>) -> Result<Response<Self::GetFilesStream>, Status> {
        let items = self.script.files.clone().map_err(status)?;
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    // The job commands run against the real daemon (livesnapd.rs).
    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn get_job(&self, _: Request<JobRef>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn cancel_job(&self, _: Request<JobRef>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// The fake livesnapd, serving on `socket` until dropped.
struct Fake {
    _rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    socket: PathBuf,
    daemon: FakeDaemon,
}

impl Fake {
    fn start(script: Script) -> Result<Fake> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("livesnapd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let daemon = FakeDaemon { script: Arc::new(script), seen: Arc::default(), conns: Arc::default() };
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&socket)?
        };
        let conns = daemon.conns.clone();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).map(move |s| {
            let s = s?;
            let dup = s.as_fd().try_clone_to_owned()?;
            conns.lock().unwrap_or_else(|e| e.into_inner()).push(StdUnixStream::from(dup));
            Ok::<_, std::io::Error>(s)
        });
        let svc = LivesnapdServer::new(daemon.clone());
        rt.spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        Ok(Fake { _rt: rt, dir, socket, daemon })
    }

    fn cmd(&self, args: &[&str]) -> Result<Command> {
        let mut c = Command::new(programs::snapctl()?);
        c.args(args).env("LIVESNAP_SOCKET", &self.socket).env_remove("LIVESNAP_LOG").stdin(Stdio::null());
        Ok(c)
    }

    /// Runs snapctl with `args` against this daemon, at most 30 s.
    fn run(&self, args: &[&str]) -> Result<Run> {
        run(self.cmd(args)?)
    }
}

/// A finished snapctl.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(mut cmd: Command) -> Result<Run> {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("cannot run snapctl")?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r?,
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            bail!("snapctl {cmd:?} did not finish within 30 s");
        }
    };
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "snapctl {:?}: exit {}\n--- stdout\n{}--- stderr\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        r.code,
        r.stdout,
        r.stderr
    );
    Ok(r)
}

fn vm(name: &str, agent: i32) -> Vm {
    Vm {
        name: name.into(),
        control_socket: format!("/run/livesnap/{name}/control.sock"),
        disks: vec!["vda".into(), "vdb".into()],
        backend_reachable: true,
        agent,
        active_snapshot: 0,
        last_backup: "b1".into(),
        running_job: String::new(),
    }
}

fn backup(id: &str, kind: BackupKind, consistency: Consistency, note: &str) -> Backup {
    Backup {
        vm: "web01".into(),
        id: id.into(),
        created_unix: 1_796_000_000,
        kind: kind.into(),
        consistency: consistency.into(),
        note: note.into(),
        freeze_window_us: 23_400,
        snapshot_id: 7,
        key_id: String::new(),
        disks: vec![
            DiskBackup {
                disk: "vda".into(),
                size: 100 * MIB,
                bytes_read: 8 * MIB,
                bytes_changed: 6 * MIB,
                bytes_stored: 2 * MIB,
            },
            DiskBackup {
                disk: "vdb".into(),
                size: 50 * MIB,
                bytes_read: 4 * MIB,
                bytes_changed: 3 * MIB,
                bytes_stored: MIB,
            },
        ],
    }
}

fn progress(disk: &str, read: u64, total: u64) -> Step {
    Step::Event(snapshot_event::Event::BackingUp(DiskProgress {
        disk: disk.into(),
        bytes_read: read,
        bytes_total: total,
    }))
}

/// A whole snapshot: quiesce, freeze, cut, thaw, two disks read in many small steps, merge,
/// done.
fn good_snapshot() -> Vec<Step> {
    use snapshot_event::Event;
    let mut steps = vec![
        Step::Event(Event::Quiescing(Quiescing {})),
        Step::Event(Event::Frozen(Frozen { filesystems: 2 })),
        Step::Event(Event::Cut(Cut { snapshot_id: 7, crash_consistent_reason: String::new(), pause_us: 850 })),
        Step::Event(Event::Thawed(Thawed { freeze_window_us: 23_400 })),
    ];
    for i in 0..=200 {
        steps.push(progress("vda", i * MIB / 2, 100 * MIB));
    }
    for i in 0..=50 {
        steps.push(progress("vdb", i * MIB, 50 * MIB));
    }
    for i in 0..=10 {
        steps.push(Step::Event(Event::Merging(Merging { merged_bytes: i * MIB, remaining_bytes: (10 - i) * MIB })));
    }
    steps.push(Step::Event(Event::Done(backup("b2", BackupKind::Incremental, Consistency::Application, ""))));
    steps
}

fn json_lines(s: &str) -> Result<Vec<Value>> {
    s.lines().map(|l| serde_json::from_str(l).with_context(|| format!("not one JSON object: {l:?}"))).collect()
}

#[test]
fn vm_list_prints_each_vm_and_json_names_unknown_agent_states() -> Result<()> {
    let mut down = vm("db01", 9);
    down.backend_reachable = false;
    down.disks.clear();
    down.running_job = "j4".into();
    let fake = Fake::start(Script {
        vms: Ok(ListVmsReply { vms: vec![vm("web01", AgentState::Reachable.into()), down] }),
        ..Script::default()
    })?;

    let r = fake.run(&["vm", "list"])?;
    assert_eq!(r.code, 0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line per VM");
    assert!(lines[0].starts_with("NAME"));
    assert!(lines[1].starts_with("web01") && lines[1].contains("reachable") && lines[1].contains("vda,vdb"));
    assert!(lines[2].starts_with("db01") && lines[2].contains("unreachable") && lines[2].contains("unknown(9)"));
    assert!(lines[2].contains("j4"));

    let r = fake.run(&["vm", "list", "--json"])?;
    assert_eq!(r.code, 0);
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["vms"][0]["name"], "web01");
    assert_eq!(v["vms"][0]["agent"], "reachable");
    assert_eq!(v["vms"][1]["agent"], "unknown(9)");
    assert_eq!(v["vms"][1]["backend_reachable"], false);
    Ok(())
}

#[test]
fn snapshot_without_a_terminal_prints_stage_lines_throttled_progress_and_the_summary() -> Result<()> {
    let fake = Fake::start(Script { snapshot: Ok(good_snapshot()), ..Script::default() })?;
    let r = fake.run(&["vm", "snapshot", "web01", "--incremental", "--require-quiesce", "--freeze-timeout", "2.5s"])?;
    assert_eq!(r.code, 0);

    let req = &fake.daemon.seen().snapshots[0];
    assert_eq!(req.vm, "web01");
    assert_eq!(req.backup(), BackupMode::Incremental);
    assert_eq!(req.quiesce(), QuiesceMode::Required);
    assert_eq!(req.freeze_timeout_ms, 2500);

    let out = &r.stdout;
    assert!(!out.contains('\x1b'), "no terminal escapes when stdout is a pipe");
    for want in [
        "job j1: snapshot of web01",
        "quiescing the guest",
        "frozen: 2 filesystems",
        "cut: snapshot 7 (disks paused 850 µs)",
        "thawed: freeze window 23.4 ms",
        "backing up vda: 50.00 MiB of 100.00 MiB (50%)",
        "backing up vdb: 50.00 MiB of 50.00 MiB (100%)",
        "merging: 0 B merged, 10.00 MiB remaining",
        "merging: 10.00 MiB merged, 0 B remaining",
        "backup b2 of web01: incremental, application-consistent",
        "freeze window  23.4 ms",
        "total          read 12.00 MiB, changed 9.00 MiB, stored 3.00 MiB",
    ] {
        assert!(out.contains(want), "stdout lacks {want:?}");
    }
    // 201 progress events of vda: one line per tenth, not one per event.
    let vda = out.lines().filter(|l| l.starts_with("backing up vda")).count();
    assert_eq!(vda, 11);
    assert_eq!(out.lines().filter(|l| l.starts_with("merging")).count(), 2);
    Ok(())
}

#[test]
fn snapshot_flags_map_to_the_request_and_conflicting_flags_are_usage_errors() -> Result<()> {
    let fake = Fake::start(Script { snapshot: Ok(good_snapshot()), ..Script::default() })?;
    assert_eq!(fake.run(&["vm", "snapshot", "web01", "--full", "--no-quiesce"])?.code, 0);
    assert_eq!(fake.run(&["vm", "snapshot", "web01"])?.code, 0);
    {
        let seen = fake.daemon.seen();
        assert_eq!((seen.snapshots[0].backup(), seen.snapshots[0].quiesce()), (BackupMode::Full, QuiesceMode::Off));
        assert_eq!(seen.snapshots[0].freeze_timeout_ms, 0, "0: the daemon's default");
        assert_eq!(
            (seen.snapshots[1].backup(), seen.snapshots[1].quiesce()),
            (BackupMode::Auto, QuiesceMode::Preferred)
        );
    }
    for bad in [
        &["vm", "snapshot", "web01", "--full", "--incremental"][..],
        &["vm", "snapshot", "web01", "--no-quiesce", "--require-quiesce"],
        &["vm", "snapshot", "web01", "--freeze-timeout", "0s"],
        &["vm", "snapshot", "web01", "--freeze-timeout", "ten"],
        &["vm", "snapshot"],
    ] {
        let r = fake.run(bad)?;
        assert_eq!(r.code, 2, "{bad:?}");
    }
    assert_eq!(fake.daemon.seen().snapshots.len(), 2, "a usage error never reaches the daemon");
    Ok(())
}

#[test]
fn snapshot_json_prints_one_object_per_event_and_ends_with_done() -> Result<()> {
    let fake = Fake::start(Script { snapshot: Ok(good_snapshot()), ..Script::default() })?;
    let r = fake.run(&["--json", "vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 0);
    let lines = json_lines(&r.stdout)?;
    assert_eq!(lines.len(), good_snapshot().len(), "one line per event, progress included");
    assert!(lines.iter().all(|l| l["job_id"] == "j1"));
    assert_eq!(lines[0]["event"], "quiescing");
    assert_eq!(lines[2]["event"], "cut");
    assert_eq!(lines[2]["snapshot_id"], 7);
    assert_eq!(lines[3]["freeze_window_us"], 23_400);
    assert_eq!(lines[4]["event"], "backing_up");
    assert_eq!(lines[4]["disk"], "vda");
    let last = &lines[lines.len() - 1];
    assert_eq!(last["event"], "done");
    assert_eq!(last["backup"]["id"], "b2");
    assert_eq!(last["backup"]["kind"], "incremental");
    assert_eq!(last["backup"]["consistency"], "application");
    assert_eq!(last["backup"]["disks"][1]["bytes_stored"], MIB);
    Ok(())
}

fn failing(code: Code, reason: &str, stage: &str) -> Vec<Step> {
    use snapshot_event::Event;
    vec![
        Step::Event(Event::Quiescing(Quiescing {})),
        Step::Event(Event::Failed(Failed { code: code as i32, reason: reason.into(), stage: stage.into() })),
    ]
}

#[test]
fn snapshot_failed_event_exits_1_with_the_stage_and_reason() -> Result<()> {
    let fake = Fake::start(Script {
        snapshot: Ok(failing(Code::Internal, "cannot write chunk 12: No space left on device", "backup")),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr.trim(),
        "snapctl: Snapshot of web01 failed in backup: cannot write chunk 12: No space left on device [internal]"
    );
    assert!(r.stdout.contains("failed in backup"));
    assert!(!r.stdout.contains("backup "), "no summary after a failure");

    let r = fake.run(&["vm", "snapshot", "web01", "--json"])?;
    assert_eq!(r.code, 1);
    let lines = json_lines(&r.stdout)?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["event"], "failed");
    assert_eq!(lines[1]["code"], "internal");
    assert_eq!(lines[1]["stage"], "backup");
    Ok(())
}

#[test]
fn snapshot_failed_event_with_a_refusal_code_exits_5_like_the_refusal_before_the_stream() -> Result<()> {
    let fake = Fake::start(Script {
        snapshot: Ok(failing(Code::FailedPrecondition, "the agent is unreachable and quiesce is required", "quiesce")),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01", "--require-quiesce"])?;
    assert_eq!(r.code, 5);
    assert!(r.stderr.contains(
        "Snapshot of web01 failed in quiesce: the agent is unreachable and quiesce is required [failed_precondition]"
    ));
    Ok(())
}

#[test]
fn snapshot_refused_while_a_job_runs_exits_5() -> Result<()> {
    let fake = Fake::start(Script {
        snapshot: Err((Code::FailedPrecondition, "web01 already has a job running (j9)")),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 5);
    assert_eq!(r.stderr.trim(), "snapctl: Cannot snapshot web01: web01 already has a job running (j9)");
    assert!(r.stdout.is_empty());
    Ok(())
}

#[test]
fn snapshot_of_an_unknown_vm_exits_4_and_an_invalid_argument_exits_2() -> Result<()> {
    let fake = Fake::start(Script { snapshot: Err((Code::NotFound, "no VM named web09")), ..Script::default() })?;
    let r = fake.run(&["vm", "snapshot", "web09"])?;
    assert_eq!(r.code, 4);
    assert!(r.stderr.contains("Cannot snapshot web09: no VM named web09"));

    let fake = Fake::start(Script { snapshot: Err((Code::InvalidArgument, "")), ..Script::default() })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("Cannot snapshot web01: invalid argument"), "an empty message says what the code means");
    Ok(())
}

#[test]
fn snapshot_stream_ending_without_done_exits_1_and_points_at_the_job() -> Result<()> {
    use snapshot_event::Event;
    let fake = Fake::start(Script {
        snapshot: Ok(vec![
            Step::Event(Event::Quiescing(Quiescing {})),
            Step::Event(Event::Cut(Cut { snapshot_id: 3, crash_consistent_reason: "no agent".into(), pause_us: 900 })),
            progress("vda", MIB, 10 * MIB),
        ]),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("cut: snapshot 3 (disks paused 900 µs), crash-consistent: no agent"));
    assert!(r.stderr.contains("livesnapd's event stream ended before the snapshot was done or failed (job j1)"));
    assert!(r.stderr.contains("snapctl backup list web01"));

    let r = fake.run(&["vm", "snapshot", "web01", "--json"])?;
    assert_eq!(r.code, 1);
    assert_eq!(json_lines(&r.stdout)?.len(), 3, "the events that came, nothing invented");
    Ok(())
}

#[test]
fn snapshot_with_unknown_events_and_enum_values_still_finishes() -> Result<()> {
    use snapshot_event::Event;
    let mut b = backup("b3", BackupKind::Full, Consistency::Crash, "");
    b.kind = 7;
    b.consistency = 9;
    b.freeze_window_us = 0;
    let fake = Fake::start(Script {
        snapshot: Ok(vec![
            Step::UnknownEvent,
            // Progress past its total, a total of zero.
            progress("vda", 20 * MIB, 10 * MIB),
            progress("vdb", 0, 0),
            Step::Event(Event::Failed(Failed { code: 99, reason: String::new(), stage: String::new() })),
        ]),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Snapshot of web01 failed: no reason given [unknown(99)]"));

    let fake = Fake::start(Script {
        snapshot: Ok(vec![Step::UnknownEvent, progress("vda", 20 * MIB, 10 * MIB), Step::Event(Event::Done(b))]),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("backup b3 of web01: unknown(7), consistency unknown(9)"));
    assert!(r.stdout.contains("freeze window  none (not frozen)"));
    assert!(r.stdout.contains("encryption     none (not encrypted)"));
    let r = fake.run(&["vm", "snapshot", "web01", "--json"])?;
    assert_eq!(r.code, 0);
    let lines = json_lines(&r.stdout)?;
    assert_eq!(lines[0]["event"], "unknown");
    assert_eq!(lines[2]["backup"]["kind"], "unknown(7)");
    Ok(())
}

#[test]
fn snapshot_connection_lost_mid_stream_exits_3_without_repeating_the_cause() -> Result<()> {
    use snapshot_event::Event;
    let fake = Fake::start(Script {
        snapshot: Ok(vec![Step::Event(Event::Quiescing(Quiescing {})), Step::DropConnection]),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "snapshot", "web01"])?;
    assert_eq!(r.code, 3);
    let want = format!("snapctl: Snapshot of web01: lost the connection to livesnapd at {}: ", fake.socket.display());
    assert!(r.stderr.starts_with(&want), "{:?}", r.stderr);
    // The cause once: tonic's transport error and its sources say the same thing.
    let cause = r.stderr.trim().strip_prefix(&want).unwrap_or_default().to_owned();
    assert!(!cause.is_empty());
    assert_eq!(r.stderr.matches(cause.as_str()).count(), 1);
    assert!(!r.stderr.contains("transport error"));
    assert_eq!(r.stderr.lines().count(), 1);
    Ok(())
}

#[test]
fn snapshot_interrupted_detaches_and_says_the_job_goes_on() -> Result<()> {
    use snapshot_event::Event;
    let fake = Fake::start(Script {
        snapshot: Ok(vec![Step::Event(Event::Quiescing(Quiescing {})), Step::Hang]),
        ..Script::default()
    })?;
    let mut child = fake.cmd(&["vm", "snapshot", "web01"])?.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    while !line.contains("quiescing") {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            bail!("snapctl ended before quiescing");
        }
    }
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status()?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130));
    assert!(stderr.contains("Stopped following the snapshot of web01; livesnapd goes on with job j1"), "{stderr}");
    Ok(())
}

#[test]
fn backup_list_and_show_print_each_backup_and_json() -> Result<()> {
    let fake = Fake::start(Script {
        backups: Ok(ListBackupsReply {
            backups: vec![
                backup("b1", BackupKind::Full, Consistency::Crash, "no agent configured"),
                backup("b2", BackupKind::Incremental, Consistency::Application, ""),
            ],
        }),
        backup: Ok(Backup {
            key_id: "0f413ce63228a2df".into(),
            ..backup("b1", BackupKind::Full, Consistency::Crash, "Crash-consistent: no agent configured")
        }),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "list", "web01"])?;
    assert_eq!(r.code, 0);
    assert_eq!(fake.daemon.seen().list_backups[0].vm, "web01");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[1].contains("b1") && lines[1].contains("full") && lines[1].contains("crash"));
    assert!(lines[1].contains("2026-11-30T") && lines[1].contains("150.00 MiB") && lines[1].contains("3.00 MiB"));
    assert!(lines[2].contains("incremental") && lines[2].contains("application") && lines[2].contains("23.4 ms"));

    let r = fake.run(&["backup", "list", "--json"])?;
    assert_eq!(r.code, 0);
    assert_eq!(fake.daemon.seen().list_backups[1].vm, "", "no VM: every VM's");
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["backups"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["backups"][0]["note"], "no agent configured");

    let r = fake.run(&["backup", "show", "web01", "b1"])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("backup b1 of web01: full, crash-consistent (no agent configured)"));
    assert!(r.stdout.contains("disk vda"));
    assert!(r.stdout.contains("read 8.00 MiB, changed 6.00 MiB, stored 2.00 MiB"));
    assert!(r.stdout.contains("encryption     AES-256-GCM, key 0f413ce63228a2df"), "{}", r.stdout);
    let r = fake.run(&["backup", "show", "web01", "b1", "--json"])?;
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!((v["id"].as_str(), v["snapshot_id"].as_u64()), (Some("b1"), Some(7)));
    assert_eq!((v["encrypted"].as_bool(), v["key_id"].as_str()), (Some(true), Some("0f413ce63228a2df")));
    Ok(())
}

#[test]
fn backup_show_of_a_missing_backup_exits_4() -> Result<()> {
    let fake = Fake::start(Script { backup: Err((Code::NotFound, "no backup b9 of web01")), ..Script::default() })?;
    let r = fake.run(&["backup", "show", "web01", "b9"])?;
    assert_eq!(r.code, 4);
    assert_eq!(r.stderr.trim(), "snapctl: Cannot show backup b9 of web01: no backup b9 of web01");
    Ok(())
}

#[test]
fn backup_verify_exits_0_when_clean_and_1_on_damage_or_data_loss() -> Result<()> {
    let fake = Fake::start(Script {
        verify: Ok(VerifyReply { ok: true, chunks_checked: 42, problems: vec![] }),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "verify", "web01", "b1"])?;
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout.trim(), "backup b1 of web01: ok, 42 chunks checked");

    let problem = ChunkProblem {
        disk: "vda".into(),
        chunk_index: 3,
        offset: 12 * MIB,
        hash: "ab12".into(),
        fault: "corrupt: hash mismatch".into(),
    };
    let fake = Fake::start(Script {
        verify: Ok(VerifyReply { ok: false, chunks_checked: 42, problems: vec![problem.clone()] }),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "verify", "web01", "b1"])?;
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("DAMAGED, 1 problem(s) in 42 chunks checked"));
    assert!(r.stdout.contains("disk vda chunk 3 at offset 12582912 (ab12): corrupt: hash mismatch"));
    assert!(r.stderr.contains("Backup b1 of web01 is damaged"));
    let r = fake.run(&["backup", "verify", "web01", "b1", "--json"])?;
    assert_eq!(r.code, 1);
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["fault"], "corrupt: hash mismatch");

    // "ok" with problems listed is not believed.
    let fake = Fake::start(Script {
        verify: Ok(VerifyReply { ok: true, chunks_checked: 1, problems: vec![problem] }),
        ..Script::default()
    })?;
    assert_eq!(fake.run(&["backup", "verify", "web01", "b1"])?.code, 1);

    let fake =
        Fake::start(Script { verify: Err((Code::DataLoss, "the manifest of vda is damaged")), ..Script::default() })?;
    let r = fake.run(&["backup", "verify", "web01", "b1"])?;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Cannot verify backup b1 of web01: the manifest of vda is damaged"));
    Ok(())
}

#[test]
fn backup_restore_sends_the_path_as_typed_and_infers_qcow2() -> Result<()> {
    let fake = Fake::start(Script {
        restore: Ok(vec![
            Step::Restore(RestoreProgress {
                bytes_written: 0,
                bytes_total: 100 * MIB,
                done: false,
                ..Default::default()
            }),
            Step::Restore(RestoreProgress {
                bytes_written: 100 * MIB,
                bytes_total: 100 * MIB,
                done: true,
                ..Default::default()
            }),
        ]),
        ..Script::default()
    })?;
    let mut cmd = fake.cmd(&["backup", "restore", "web01", "b1", "--disk", "vda", "--to", "out/vda.qcow2"])?;
    cmd.current_dir(fake.dir.path());
    let r = run(cmd)?;
    assert_eq!(r.code, 0);
    let want = Path::new("out/vda.qcow2");
    {
        let req = &fake.daemon.seen().restores[0];
        assert_eq!((req.vm.as_str(), req.id.as_str(), req.disk.as_str()), ("web01", "b1", "vda"));
        assert_eq!(Path::new(&req.target_path), want);
        assert_eq!(req.format(), ImageFormat::Qcow2);
    }
    assert!(r.stdout.contains(&format!(
        "restored disk vda of backup b1 of web01 to {} in livesnapd's restore directory (qcow2, 100.00 MiB written)",
        want.display()
    )));

    let r = fake.run(&[
        "backup",
        "restore",
        "web01",
        "b1",
        "--disk",
        "vda",
        "--to",
        "/tmp/x.qcow2",
        "--format",
        "raw",
        "--json",
    ])?;
    assert_eq!(r.code, 0);
    assert_eq!(fake.daemon.seen().restores[1].format(), ImageFormat::Raw, "--format wins over the name");
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!((v["format"].as_str(), v["bytes_written"].as_u64()), (Some("raw"), Some(100 * MIB)));

    assert_eq!(fake.run(&["backup", "restore", "web01", "b1", "--to", "/tmp/x"])?.code, 2, "--disk is required");
    assert_eq!(
        fake.run(&["backup", "restore", "web01", "b1", "--disk", "vda", "--to", "/tmp/x", "--format", "vmdk"])?.code,
        2
    );
    Ok(())
}

#[test]
fn backup_restore_stream_without_done_exits_1_and_an_existing_target_exits_5() -> Result<()> {
    let fake = Fake::start(Script {
        restore: Ok(vec![Step::Restore(RestoreProgress {
            bytes_written: MIB,
            bytes_total: 100 * MIB,
            done: false,
            ..Default::default()
        })]),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "restore", "web01", "b1", "--disk", "vda", "--to", "/tmp/vda.raw"])?;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("progress stream ended before the restore was done; /tmp/vda.raw may be incomplete"));

    let fake = Fake::start(Script { restore: Err((Code::AlreadyExists, "/tmp/vda.raw exists")), ..Script::default() })?;
    let r = fake.run(&["backup", "restore", "web01", "b1", "--disk", "vda", "--to", "/tmp/vda.raw"])?;
    assert_eq!(r.code, 5);
    assert!(r.stderr.contains("Cannot restore disk vda of backup b1 of web01: /tmp/vda.raw exists"));

    let fake = Fake::start(Script {
        restore: Ok(vec![Step::Error(Code::NotFound, "backup b1 of web01 has no disk vdz")]),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "restore", "web01", "b1", "--disk", "vdz", "--to", "/tmp/vdz.raw"])?;
    assert_eq!(r.code, 4, "an error status inside the stream maps like one before it");
    Ok(())
}

#[test]
fn backup_delete_and_prune_report_what_went() -> Result<()> {
    let fake = Fake::start(Script {
        delete: Ok(()),
        prune: Ok(PruneReply {
            deleted: vec!["b1".into(), "b2".into()],
            chunks_removed: 17,
            bytes_freed: 68 * MIB,
            backups: vec![
                PruneDecision { id: "b1".into(), created_unix: 1_780_000_000, keep: false, rule: String::new() },
                PruneDecision { id: "b2".into(), created_unix: 1_780_086_400, keep: false, rule: String::new() },
                PruneDecision {
                    id: "b3".into(),
                    created_unix: 1_780_172_800,
                    keep: true,
                    rule: "keep-last 1/3".into(),
                },
            ],
            keep: "keep-last 3".into(),
            ..PruneReply::default()
        }),
        ..Script::default()
    })?;
    let r = fake.run(&["backup", "delete", "web01", "b3"])?;
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout.trim(), "deleted backup b3 of web01");
    assert_eq!(fake.daemon.seen().deletes[0].id, "b3");

    // --keep is --keep-last.
    let r = fake.run(&["backup", "prune", "web01", "--keep", "3"])?;
    assert_eq!(r.code, 0);
    assert_eq!(fake.daemon.seen().prunes[0].keep_last, 3);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("DECISION") && lines[0].contains("KEPT BY"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("b1") && lines[1].contains("remove"), "{}", lines[1]);
    assert!(
        lines[3].starts_with("b3") && lines[3].contains("keep") && lines[3].ends_with("keep-last 1/3"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[4], "pruned (keep-last 3): kept 1, deleted 2; removed 17 chunks, freed 68.00 MiB");
    let r = fake.run(&["backup", "prune", "web01", "--keep", "3", "--json"])?;
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!((v["chunks_removed"].as_u64(), v["deleted"][1].as_str()), (Some(17), Some("b2")));
    assert_eq!(
        (v["backups"][2]["keep"].as_bool(), v["backups"][2]["rule"].as_str()),
        (Some(true), Some("keep-last 1/3"))
    );
    assert_eq!(v["backups"][0]["rule"], Value::Null);

    // Every rule and the dry run reach the daemon; no rule asks for the VM's configured one.
    let r = fake.run(&[
        "backup",
        "prune",
        "web01",
        "--keep-last",
        "2",
        "--keep-hourly",
        "3",
        "--keep-daily",
        "7",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "6",
        "--keep-yearly",
        "1",
        "--dry-run",
    ])?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p = fake.daemon.seen().prunes[2].clone();
    assert_eq!(
        (p.keep_last, p.keep_hourly, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly, p.dry_run),
        (2, 3, 7, 4, 6, 1, true)
    );
    assert_eq!(fake.run(&["backup", "prune", "web01"])?.code, 0);
    let p = fake.daemon.seen().prunes[3].clone();
    assert_eq!((p.keep_last, p.keep_daily, p.dry_run), (0, 0, false));

    assert_eq!(fake.run(&["backup", "prune", "web01", "--keep", "0"])?.code, 2);
    assert_eq!(fake.run(&["backup", "prune", "web01", "--keep-daily", "0"])?.code, 2);
    assert_eq!(fake.daemon.seen().prunes.len(), 4);

    let fake = Fake::start(Script {
        delete: Err((Code::FailedPrecondition, "backup b3 is being restored")),
        ..Script::default()
    })?;
    assert_eq!(fake.run(&["backup", "delete", "web01", "b3"])?.code, 5);
    Ok(())
}

#[test]
fn control_characters_from_the_daemon_do_not_reach_the_terminal() -> Result<()> {
    let mut evil = vm("web\x1b]0;owned\x07\x1b[2J01", AgentState::None.into());
    evil.running_job = "j\r\n1".into();
    let fake = Fake::start(Script {
        vms: Ok(ListVmsReply { vms: vec![evil] }),
        backup: Err((Code::NotFound, "no backup \x1b[31mb9\x1b[0m")),
        ..Script::default()
    })?;
    let r = fake.run(&["vm", "list"])?;
    assert_eq!(r.code, 0);
    assert!(!r.stdout.contains('\x1b') && !r.stdout.contains('\x07') && !r.stdout.contains('\r'));
    assert_eq!(r.stdout.lines().count(), 2);
    assert!(r.stdout.contains("web?]0;owned??[2J01"));
    let r = fake.run(&["backup", "show", "web01", "b9"])?;
    assert_eq!(r.code, 4);
    assert!(!r.stderr.contains('\x1b'));
    // JSON carries the strings as they are, escaped.
    let r = fake.run(&["vm", "list", "--json"])?;
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["vms"][0]["running_job"], "j\r\n1");
    Ok(())
}

#[test]
fn no_daemon_exits_3_and_says_how_to_start_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("livesnapd.sock");
    let mut cmd = Command::new(programs::snapctl()?);
    cmd.args(["vm", "list"]).env("LIVESNAP_SOCKET", &missing);
    let r = run(cmd)?;
    assert_eq!(r.code, 3);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "snapctl: livesnapd is not running at {} (no socket there); start it with `livesnapd --config \
             /etc/livesnap/livesnapd.toml`, or name its socket with --socket or LIVESNAP_SOCKET",
            missing.display()
        )
    );

    // A socket left behind by a daemon that is gone; --socket wins over the environment.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale)?);
    let mut cmd = Command::new(programs::snapctl()?);
    cmd.args(["--socket"]).arg(&stale).args(["backup", "list"]).env("LIVESNAP_SOCKET", &missing);
    let r = run(cmd)?;
    assert_eq!(r.code, 3);
    assert!(r
        .stderr
        .contains(&format!("livesnapd is not running at {} (nothing listens on the socket)", stale.display())));
    Ok(())
}

#[test]
fn tcp_endpoint_needs_https_and_readable_files() -> Result<()> {
    let bin = programs::snapctl()?;
    let r = run({
        let mut c = Command::new(&bin);
        c.args(["--addr", "http://127.0.0.1:7736", "vm", "list"]);
        c
    })?;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("speaks TLS only"));

    let r = run({
        let mut c = Command::new(&bin);
        c.args(["--addr", "https://127.0.0.1:7736", "--token-file", "/nonexistent/token", "vm", "list"]);
        c
    })?;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("Cannot read the token file /nonexistent/token"));

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let r = run({
        let mut c = Command::new(&bin);
        c.args(["--addr", &format!("https://127.0.0.1:{port}"), "vm", "list"]);
        c
    })?;
    assert_eq!(r.code, 3);
    assert_eq!(
        r.stderr.trim(),
        format!("snapctl: Cannot reach livesnapd at https://127.0.0.1:{port}: Connection refused (os error 111)")
    );

    let r = run({
        let mut c = Command::new(&bin);
        c.args(["--token-file", "/tmp/t", "vm", "list"]);
        c
    })?;
    assert_eq!(r.code, 2, "--token-file without --addr");
    Ok(())
}

#[test]
fn agent_commands_still_work_and_say_their_error_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(programs::snapctl()?);
    cmd.args(["agent", "status", "--unix"]).arg(dir.path().join("agent.sock")).arg("--json");
    let r = run(cmd)?;
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("snapctl: Cannot connect to the agent"));
    assert_eq!(r.stderr.matches("No such file or directory").count(), 1);
    Ok(())
}

#[test]
fn snapshot_on_a_terminal_draws_bars_then_the_summary() -> Result<()> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no script(1) to give snapctl a terminal");
        return Ok(());
    }
    let mut steps = good_snapshot();
    // Slow enough in the middle of vda that the bar is drawn while it moves.
    steps.insert(100, Step::Pause(Duration::from_millis(300)));
    let fake = Fake::start(Script { snapshot: Ok(steps), ..Script::default() })?;
    let line = format!("stty cols 120 rows 40; {} vm snapshot web01", programs::snapctl()?.display());
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &line, "/dev/null"]).env("LIVESNAP_SOCKET", &fake.socket).env("COLUMNS", "120");
    let r = run(cmd)?;
    assert_eq!(r.code, 0);
    let out = &r.stdout;
    assert!(out.contains('\x1b'), "a terminal gets a live view");
    assert!(out.contains("quiescing the guest") && out.contains("thawed: freeze window 23.4 ms"));
    assert!(!out.contains("backing up vda:"), "bars, not progress lines");
    let bar = out.lines().find(|l| l.contains("vda [") && l.contains("/100.00 MiB")).context("no bar for vda")?;
    assert!(bar.contains("=="), "{bar:?}");
    assert!(out.contains("merging ["));
    let summary = out.find("backup b2 of web01: incremental, application-consistent").context("no summary")?;
    assert!(out[summary..].contains("total          read 12.00 MiB"));
    Ok(())
}

/// The whole path once, against the real daemon: livesnap-blk serving a raw disk to the test
/// VMM, livesnapd with a config naming it (no agent), snapctl for every step. Needs
/// `cargo build -p livesnap-blk -p livesnap-control`.
#[test]
fn against_the_real_livesnapd_a_crash_consistent_backup_lists_verifies_restores_and_deletes() -> Result<()> {
    use livesnap_tests::daemon::Daemon;
    use livesnap_tests::frontend::{Frontend, Options};

    let dir = tempfile::Builder::new().prefix("snapctl-real").tempdir()?;
    let d = dir.path();
    let image = d.join("vda.raw");
    let content = pattern::disk(0, (16 * MIB) as usize);
    std::fs::write(&image, &content)?;
    let (vhost, control, socket) = (d.join("vda.sock"), d.join("control.sock"), d.join("livesnapd.sock"));
    let mut blk = Command::new(programs::livesnap_blk()?);
    blk.args(["--vm", "vm1", "--queues", "1", "--disk"])
        .arg(format!("id=vda,image={},socket={},format=raw", image.display(), vhost.display()))
        .arg("--state-dir")
        .arg(d.join("blk-state"))
        .arg("--control")
        .arg(&control)
        .stdout(std::fs::File::create(d.join("livesnap-blk.log"))?)
        .stderr(std::fs::File::create(d.join("livesnap-blk.err"))?);
    let _blk = Daemon::spawn("livesnap-blk", blk, &[&vhost, &control])?;
    let _vmm = Frontend::connect(&vhost, &Options { timeout: Duration::from_secs(30), ..Options::default() })?;
    let config = d.join("livesnapd.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"{dd}/repo\"\nsocket = \"{}\"\nstate = \"{dd}/livesnapd.redb\"\nrestore_dir = \"{dd}/restore\"\n\n[[vm]]\nname = \"vm1\"\ncontrol = \"{}\"\n",
            socket.display(),
            control.display(),
            dd = d.display()
        ),
    )?;
    let mut daemon = Command::new(programs::livesnapd()?);
    daemon.arg("--config").arg(&config).stdout(Stdio::null()).stderr(std::fs::File::create(d.join("livesnapd.log"))?);
    let _daemon = Daemon::spawn("livesnapd", daemon, &[&socket])?;
    let snapctl = |args: &[&str]| -> Result<Run> {
        let mut c = Command::new(programs::snapctl()?);
        c.arg("--socket").arg(&socket).args(args).current_dir(d).stdin(Stdio::null());
        run(c)
    };

    let r = snapctl(&["vm", "list", "--json"])?;
    assert_eq!(r.code, 0);
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!((v["vms"][0]["name"].as_str(), v["vms"][0]["agent"].as_str()), (Some("vm1"), Some("none")));
    assert_eq!(v["vms"][0]["backend_reachable"], true);

    assert_eq!(snapctl(&["vm", "snapshot", "vm9"])?.code, 4, "an unknown VM");

    let r = snapctl(&["vm", "snapshot", "vm1", "--full", "--json"])?;
    assert_eq!(r.code, 0, "{}", std::fs::read_to_string(d.join("livesnapd.log")).unwrap_or_default());
    let lines = json_lines(&r.stdout)?;
    let done = lines.last().context("no events")?;
    assert_eq!(done["event"], "done");
    assert!(lines.iter().any(|l| l["event"] == "cut"));
    let b = &done["backup"];
    assert_eq!((b["kind"].as_str(), b["consistency"].as_str()), (Some("full"), Some("crash")));
    let id = b["id"].as_str().context("no backup id")?.to_owned();

    let r = snapctl(&["backup", "list", "vm1"])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains("full") && l.contains("crash")));
    let r = snapctl(&["backup", "show", "vm1", &id])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains(&format!("backup {id} of vm1: full, crash-consistent")));
    assert!(!r.stdout.contains("crash-consistent (crash-consistent"), "the daemon's note does not repeat it");
    assert_eq!(snapctl(&["backup", "show", "vm1", "no-such-backup"])?.code, 4);

    let r = snapctl(&["backup", "verify", "vm1", &id])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains(": ok, "));

    let r = snapctl(&["backup", "restore", "vm1", &id, "--disk", "vda", "--to", "restored.raw"])?;
    assert_eq!(r.code, 0);
    assert!(
        std::fs::read(d.join("restore/restored.raw"))? == content,
        "the restore is the disk at the cut, in restore_dir"
    );
    let r = snapctl(&["backup", "restore", "vm1", &id, "--disk", "vda", "--to", "restored.raw"])?;
    assert_eq!(r.code, 5, "an existing target is refused");
    let outside = d.join("outside.raw");
    for (to, code, what) in [
        ("../outside.raw", 2, "`..` is refused"),
        (outside.to_str().context("path")?, 2, "an absolute path must start with it"),
        ("no-such-dir/x.raw", 4, "does not exist"),
    ] {
        let r = snapctl(&["backup", "restore", "vm1", &id, "--disk", "vda", "--to", to])?;
        assert_eq!(r.code, code, "{to}: {}", r.stderr);
        assert!(r.stderr.contains(what), "{to}: {}", r.stderr);
    }
    assert!(!outside.exists(), "nothing written outside restore_dir");

    let r = snapctl(&["backup", "delete", "vm1", &id])?;
    assert_eq!(r.code, 0);
    assert_eq!(snapctl(&["backup", "list", "vm1"])?.stdout.trim(), "no backups of vm1");
    Ok(())
}

/// The fake daemon over TCP with TLS (cert.pem, key.pem in `dir`); its port.
fn start_tls(script: Script, dir: &Path) -> Result<(tokio::runtime::Runtime, FakeDaemon, u16)> {
    livesnap_control::install_tls_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let daemon = FakeDaemon { script: Arc::new(script), seen: Arc::default(), conns: Arc::default() };
    let identity =
        tonic::transport::Identity::from_pem(std::fs::read(dir.join("cert.pem"))?, std::fs::read(dir.join("key.pem"))?);
    let listener = {
        let _g = rt.enter();
        let std = std::net::TcpListener::bind("127.0.0.1:0")?;
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)?
    };
    let port = listener.local_addr()?.port();
    let server = tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
        .add_service(LivesnapdServer::new(daemon.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    rt.spawn(server);
    Ok((rt, daemon, port))
}

#[test]
fn tcp_with_tls_sends_the_token_and_a_refused_token_or_a_strange_certificate_exits_3() -> Result<()> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: no openssl to make certificates");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    livesnap_tests::tls::certificates(d)?;
    std::fs::write(d.join("token"), "secret-token-0123456789\nsecond line ignored\n")?;
    let (_rt, daemon, port) = start_tls(
        Script { vms: Ok(ListVmsReply { vms: vec![vm("web01", AgentState::Reachable.into())] }), ..Script::default() },
        d,
    )?;
    let addr = format!("https://127.0.0.1:{port}");
    let snapctl = |ca: &str, args: &[&str]| -> Result<Run> {
        let mut c = Command::new(programs::snapctl()?);
        c.args(["--addr", &addr, "--token-file"]).arg(d.join("token")).arg("--ca-cert").arg(d.join(ca)).args(args);
        run(c)
    };
    let r = snapctl("ca.pem", &["vm", "list"])?;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("web01"));
    assert_eq!(daemon.seen().authorization, ["Bearer secret-token-0123456789"]);

    let r = snapctl("other-ca.pem", &["vm", "list"])?;
    assert_eq!(r.code, 3);
    assert!(r.stderr.starts_with(&format!("snapctl: Cannot reach livesnapd at {addr}: ")), "{}", r.stderr);
    assert!(r.stderr.to_lowercase().contains("certificate"), "says what is wrong: {}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1);
    assert_eq!(daemon.seen().authorization.len(), 1, "no request over a connection snapctl does not trust");

    let (_rt2, _daemon2, port2) =
        start_tls(Script { vms: Err((Code::Unauthenticated, "a bearer token is required")), ..Script::default() }, d)?;
    let mut c = Command::new(programs::snapctl()?);
    c.args(["--addr", &format!("https://127.0.0.1:{port2}"), "--ca-cert"]).arg(d.join("ca.pem")).args(["vm", "list"]);
    let r = run(c)?;
    assert_eq!(r.code, 3);
    assert_eq!(
        r.stderr.trim(),
        "snapctl: Cannot list VMs: a bearer token is required (livesnapd wants its token: --token-file FILE)"
    );
    Ok(())
}

fn file_entry(path: &[&str], kind: FileKind, size: u64, target: &str) -> FileItem {
    let info = FileInfo {
        name: path.last().map(|n| n.as_bytes().to_vec()).unwrap_or_default(),
        kind: kind as i32,
        mode: 0o644,
        size,
        mtime_sec: 1_000_000_000,
        target: target.as_bytes().to_vec(),
        ..FileInfo::default()
    };
    let path = path.iter().map(|c| c.as_bytes().to_vec()).collect();
    FileItem { item: Some(file_item::Item::Entry(FileEntry { path, info: Some(info) })) }
}

fn file_data(offset: u64, data: &[u8]) -> FileItem {
    FileItem { item: Some(file_item::Item::Data(FileData { offset, data: data.to_vec(), done: None })) }
}

fn files_done() -> FileItem {
    FileItem { item: Some(file_item::Item::Done(FilesDone { disk_size: 1 << 30, ..FilesDone::default() })) }
}

/// `backup files ... get` against a daemon that sends what a hostile image holds: the
/// extractor writes the good tree, and never anything outside the target.
#[test]
fn files_get_writes_the_tree_and_never_outside_the_target() {
    let outside = tempfile::tempdir().unwrap();
    let out_s = outside.path().to_str().unwrap().to_owned();
    let cases: Vec<(&str, Vec<FileItem>, i32, &str)> = vec![
        (
            "a good tree",
            vec![
                file_entry(&["d"], FileKind::Directory, 0, ""),
                file_entry(&["d", "f"], FileKind::File, 5, ""),
                file_data(0, b"hello"),
                file_entry(&["d", "l"], FileKind::Symlink, 0, "/etc/passwd"),
                file_entry(&["d", "p"], FileKind::Fifo, 0, ""),
                files_done(),
            ],
            0,
            "a fifo, skipped",
        ),
        (
            "a file through a symlink to a directory outside",
            vec![
                file_entry(&["evil"], FileKind::Symlink, 0, &out_s),
                file_entry(&["evil", "passwd"], FileKind::File, 3, ""),
                file_data(0, b"pwn"),
                files_done(),
            ],
            1,
            "Cannot open the directory",
        ),
        (
            "`..` in a path",
            vec![file_entry(&["..", "x"], FileKind::File, 0, ""), files_done()],
            1,
            "`.` and `..` are not names",
        ),
        ("`/` in a name", vec![file_entry(&["a/b"], FileKind::File, 0, ""), files_done()], 1, "a name holding `/`"),
        (
            "data past the file's size",
            vec![file_entry(&["f"], FileKind::File, 2, ""), file_data(0, b"abc"), files_done()],
            1,
            "is past its size 2",
        ),
        (
            "a stream that ends before done",
            vec![file_entry(&["f"], FileKind::File, 0, "")],
            1,
            "ended before it was done",
        ),
    ];
    for (what, items, code, says) in cases {
        let fake = Fake::start(Script { files: Ok(items), ..Script::default() }).unwrap();
        let to = fake.dir.path().join("to");
        std::fs::create_dir(&to).unwrap();
        let r = fake
            .run(&["backup", "files", "vm1", "b1", "--disk", "vda", "get", "/", "--to", to.to_str().unwrap()])
            .unwrap();
        assert_eq!(r.code, code, "{what}: {r:?}");
        assert!(r.stderr.contains(says), "{what}: {r:?}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "{what}: written outside");
        if code == 0 {
            assert_eq!(std::fs::read(to.join("d/f")).unwrap(), b"hello");
            assert_eq!(std::fs::read_link(to.join("d/l")).unwrap(), Path::new("/etc/passwd"));
        }
    }
}
