//! livesnapd against real processes: livesnap-blk serving a raw image (written by the test VMM
//! over its vhost-user socket), livesnapd started with a generated config, gRPC over its unix
//! socket (and TCP with TLS).
//!
//! Needs `cargo build -p livesnap-blk -p livesnap-control` first (both binaries are found
//! beside the test binary, or through `LIVESNAP_BLK` / `LIVESNAPD`); `openssl` for the TLS test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap_proto::daemon as pb;
use livesnap_proto::daemon::livesnapd_client::LivesnapdClient;
use livesnap_proto::snapshot as spb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::{pattern, programs};
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
/// The backend's change-tracking granularity.
const TRACK: u64 = 64 * 1024;
const WAIT: Duration = Duration::from_secs(60);
/// Hang guard for a whole job or a merge (not a measurement).
const JOB_WAIT: Duration = Duration::from_secs(180);
const VM: &str = "vm1";
const TOKEN: &str = "test-token-0123456789abcdef";

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One VM on livesnap-blk, the test VMM connected, and livesnapd's files.
struct Rig {
    dir: tempfile::TempDir,
    image: PathBuf,
    control: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    _blk: Daemon,
    _frontend: Frontend,
    queue: Option<BlkQueue>,
    /// What the guest reads now.
    model: Vec<u8>,
    rt: tokio::runtime::Runtime,
}

impl Rig {
    /// A raw disk; `top` goes at the top level of livesnapd's config, `defaults` in its
    /// `[defaults]`.
    fn new(top: &str, defaults: &str) -> Rig {
        Rig::with(top, defaults, "", false)
    }

    /// `vm_extra` goes in the VM's table; `qcow2`: the disk is a qcow2 image.
    fn with(top: &str, defaults: &str, vm_extra: &str, qcow2: bool) -> Rig {
        let dir = tempfile::Builder::new().prefix("livesnapd-test").tempdir().unwrap();
        let raw = dir.path().join("vda.raw");
        let model = pattern::disk(0, DISK as usize);
        std::fs::write(&raw, &model).unwrap();
        let (image, format) = if qcow2 {
            let q = dir.path().join("vda.qcow2");
            qemu_img(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), q.to_str().unwrap()]);
            std::fs::remove_file(&raw).unwrap();
            (q, "qcow2")
        } else {
            (raw, "raw")
        };
        let (vhost, control) = (dir.path().join("vda.sock"), dir.path().join("control.sock"));
        let log = std::fs::File::create(dir.path().join("livesnap-blk.log")).unwrap();
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(["--vm", VM, "--queues", "1", "--disk"])
            .arg(format!("id=vda,image={},socket={},format={format}", image.display(), vhost.display()))
            .arg("--state-dir")
            .arg(dir.path().join("blk-state"))
            .arg("--control")
            .arg(&control)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let blk = Daemon::spawn("livesnap-blk", cmd, &[&vhost, &control]).unwrap();
        let mut f = Frontend::connect(&vhost, &Options { queues: 1, timeout: WAIT, ..Options::default() }).unwrap();
        let queue = f.take_queues().into_iter().next().map(|v| BlkQueue::new(v, 8, MIB as u32).unwrap());
        let socket = dir.path().join("livesnapd.sock");
        let config = dir.path().join("livesnapd.toml");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "repository = \"{d}/repo\"\nsocket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n{top}\n\
                 [defaults]\n{defaults}\n[[vm]]\nname = \"{VM}\"\ncontrol = \"{}\"\n{vm_extra}\n",
                socket.display(),
                control.display()
            ),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        Rig { image, control, socket, config, _blk: blk, _frontend: f, queue, model, rt, dir }
    }

    fn start(&self) -> Daemon {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("livesnapd.log")).unwrap();
        let mut cmd = Command::new(programs::livesnapd().unwrap());
        cmd.arg("--config").arg(&self.config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
        Daemon::spawn("livesnapd", cmd, &[&self.socket]).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("livesnapd.log")).unwrap_or_default()
    }

    fn client(&self) -> LivesnapdClient<Channel> {
        let ch = self
            .rt
            .block_on(livesnap_proto::unix_channel(
                Endpoint::from_static("http://livesnapd.invalid"),
                self.socket.clone(),
            ))
            .unwrap();
        LivesnapdClient::new(ch)
    }

    fn backend(&self) -> SnapshotControlClient<Channel> {
        self.backend_at(&self.control)
    }

    /// The control service of a backend listening on `control`.
    fn backend_at(&self, control: &Path) -> SnapshotControlClient<Channel> {
        let ch = self
            .rt
            .block_on(livesnap_proto::unix_channel(Endpoint::from_static("http://blk.invalid"), control.to_owned()))
            .unwrap();
        SnapshotControlClient::new(ch)
    }

    fn backend_status(&self) -> spb::VmStatus {
        let mut b = self.backend();
        self.rt.block_on(b.status(spb::StatusRequest {})).unwrap().into_inner()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(async { tokio::time::timeout(JOB_WAIT, f).await }).expect("no answer in time")
    }

    /// Writes `data` at `off` through the test VMM and keeps the model.
    fn write(&mut self, off: u64, data: &[u8]) {
        self.queue.as_mut().unwrap().write(off / 512, data).unwrap();
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn restore(&self, c: &mut LivesnapdClient<Channel>, id: &str, name: &str) -> Vec<u8> {
        let target = self.dir.path().join(name);
        let req = pb::RestoreRequest {
            vm: VM.into(),
            id: id.into(),
            disk: "vda".into(),
            target_path: target.display().to_string(),
            format: 0,
            live: false,
        };
        let last = self.block_on(async {
            let mut s = c.restore_backup(req).await.unwrap().into_inner();
            let mut last = None;
            while let Some(p) = s.message().await.unwrap() {
                last = Some(p);
            }
            last
        });
        assert!(last.unwrap().done, "the restore stream ended without done");
        std::fs::read(target).unwrap()
    }
}

/// A job's outcome: its events and the backup, or the status code and reason.
struct Outcome {
    events: Vec<pb::snapshot_event::Event>,
    result: Result<pb::Backup, (tonic::Code, String, String)>,
}

/// Runs CreateSnapshot to its end; `on_event` sees each event as it comes.
fn snapshot(
    rig: &Rig,
    req: pb::CreateSnapshotRequest,
    mut on_event: impl FnMut(&pb::snapshot_event::Event),
) -> Outcome {
    let mut c = rig.client();
    rig.block_on(async {
        let mut stream = match c.create_snapshot(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                return Outcome { events: vec![], result: Err((s.code(), s.message().to_owned(), String::new())) }
            }
        };
        let mut events = Vec::new();
        while let Some(e) = stream.message().await.unwrap() {
            let e = e.event.unwrap();
            on_event(&e);
            events.push(e.clone());
            match e {
                pb::snapshot_event::Event::Done(b) => return Outcome { events, result: Ok(b) },
                pb::snapshot_event::Event::Failed(f) => {
                    return Outcome { events, result: Err((tonic::Code::from(f.code), f.reason, f.stage)) }
                }
                _ => {}
            }
        }
        panic!("the event stream ended without Done or Failed: {events:?}");
    })
}

fn req(backup: pb::BackupMode, quiesce: pb::QuiesceMode) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest { vm: VM.into(), backup: backup as i32, quiesce: quiesce as i32, freeze_timeout_ms: 0 }
}

fn stamp(len: usize, version: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ version).collect()
}

#[test]
fn crash_consistent_full_then_incremental_backup_restore_the_disk_at_each_cut() {
    // Reading at 32 MiB/s makes the backup last long enough for the writes below to overlap it.
    let mut rig = Rig::new("", "read_bytes_per_sec = 33554432");
    let _d = rig.start();
    let at_cut = rig.model.clone();

    // The VMM writes while the backup of the first snapshot runs (after the cut).
    let queue = rig.queue.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut q = queue;
            let mut done: Vec<(u64, Vec<u8>)> = Vec::new();
            started_rx.recv().unwrap();
            let mut i = 0u64;
            // Until the job is over (at least 4): 16 KiB at one of 100 places (so that the
            // changes stay a small part of the disk), over and over.
            while !stop.load(Ordering::Relaxed) || i < 4 {
                let k = i % 100;
                let off = (k * 5 % 64) * MIB + (k % 7) * 4096;
                let data = stamp(16 * 1024, (i as u8).wrapping_add(1));
                q.write(off / 512, &data).unwrap();
                done.push((off, data));
                i += 1;
            }
            (q, done)
        })
    };
    let mut started = Some(started_tx);
    let first = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Preferred), |e| {
        if matches!(e, pb::snapshot_event::Event::Cut(_)) {
            if let Some(tx) = started.take() {
                tx.send(()).unwrap();
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    let (q, writes) = writer.join().unwrap();
    rig.queue = Some(q);
    for (off, data) in &writes {
        rig.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let b1 = first.result.unwrap_or_else(|e| panic!("first backup failed: {e:?}\n{}", rig.log()));
    let cut = first
        .events
        .iter()
        .find_map(|e| if let pb::snapshot_event::Event::Cut(c) = e { Some(c.clone()) } else { None })
        .unwrap();
    assert!(cut.crash_consistent_reason.contains("no agent"), "{cut:?}");
    assert!(first.events.iter().any(|e| matches!(e, pb::snapshot_event::Event::BackingUp(_))));
    assert!(first.events.iter().any(|e| matches!(e, pb::snapshot_event::Event::Merging(_))));
    assert_eq!(b1.kind, pb::BackupKind::Full as i32);
    assert_eq!(b1.consistency, pb::Consistency::Crash as i32);
    assert_eq!(b1.freeze_window_us, 0, "nothing was frozen");
    assert_eq!(b1.snapshot_id, cut.snapshot_id);
    assert!(b1.note.contains("crash-consistent") && b1.note.contains("full"), "{}", b1.note);
    eprintln!("cut pause {} µs; {} writes during the backup", cut.pause_us, writes.len());

    let mut c = rig.client();
    assert!(rig.restore(&mut c, &b1.id, "r1.raw") == at_cut, "the first restore differs from the disk at the cut");
    assert!(rig.backend_status().snapshot.is_none(), "the snapshot was merged");
    assert_eq!(std::fs::read(&rig.image).unwrap(), rig.model, "after the merge the base holds every write");

    // More writes, then an automatic backup: incremental, reading about only what changed.
    for k in 0..6u64 {
        rig.write(k * 10 * MIB + 3 * TRACK, &stamp(TRACK as usize * 2, 100 + k as u8));
    }
    let at_cut2 = rig.model.clone();
    let second = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {});
    let b2 = second.result.unwrap_or_else(|e| panic!("second backup failed: {e:?}\n{}", rig.log()));
    assert_eq!(b2.kind, pb::BackupKind::Incremental as i32, "note: {}", b2.note);
    let d = &b2.disks[0];
    // Changed at the tracking granularity: the 6 ranges above and the writer's 16 KiB pieces.
    let max_changed = (6 * 2 + 2 * writes.len().min(100) as u64) * TRACK;
    assert!(d.bytes_changed > 0 && d.bytes_changed <= max_changed, "{d:?}, at most {max_changed}");
    assert!(d.bytes_read * 10 <= d.bytes_changed * 11, "read {} for {} changed", d.bytes_read, d.bytes_changed);
    eprintln!("incremental: {} bytes read for {} changed", d.bytes_read, d.bytes_changed);
    assert!(
        rig.restore(&mut c, &b2.id, "r2.raw") == at_cut2,
        "the incremental restore differs from the disk at its cut"
    );

    // Listing, verify, prune.
    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner().backups;
    assert_eq!(list.iter().map(|b| b.id.clone()).collect::<Vec<_>>(), vec![b1.id.clone(), b2.id.clone()]);
    let got = rig.block_on(c.get_backup(pb::BackupRef { vm: VM.into(), id: b2.id.clone() })).unwrap().into_inner();
    assert_eq!(got.snapshot_id, b2.snapshot_id);
    let vms = rig.block_on(c.list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
    assert_eq!(
        (vms[0].backend_reachable, vms[0].last_backup.as_str(), vms[0].agent),
        (true, b2.id.as_str(), pb::AgentState::None as i32)
    );
    for b in [&b1, &b2] {
        let v = rig.block_on(c.verify_backup(pb::BackupRef { vm: VM.into(), id: b.id.clone() })).unwrap().into_inner();
        assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    }
    let p = rig
        .block_on(c.prune(pb::PruneRequest { vm: VM.into(), keep_last: 1, ..Default::default() }))
        .unwrap()
        .into_inner();
    assert_eq!(p.deleted, vec![b1.id.clone()]);
    let e = rig.block_on(c.get_backup(pb::BackupRef { vm: VM.into(), id: b1.id.clone() })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let v = rig.block_on(c.verify_backup(pb::BackupRef { vm: VM.into(), id: b2.id.clone() })).unwrap().into_inner();
    assert!(v.ok, "the kept backup lost chunks to the prune: {v:?}");
    assert!(rig.restore(&mut c, &b2.id, "r3.raw") == at_cut2);
    let e = rig.block_on(c.prune(pb::PruneRequest { vm: VM.into(), keep_last: 0, ..Default::default() })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let target = rig.dir.path().join("r3.raw").display().to_string();
    let e = rig
        .block_on(c.restore_backup(pb::RestoreRequest {
            vm: VM.into(),
            id: b2.id.clone(),
            disk: "vda".into(),
            target_path: target,
            format: 0,
            live: false,
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);

    // A damaged chunk is found by verify.
    let chunk = walk(&rig.dir.path().join("repo/chunks")).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let v = rig.block_on(c.verify_backup(pb::BackupRef { vm: VM.into(), id: b2.id.clone() })).unwrap().into_inner();
    assert!(!v.ok && !v.problems.is_empty(), "{v:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn quiesce_required_without_an_agent_fails_before_any_cut() {
    // A second VM whose backend is not there.
    let rig = Rig::with("", "", "[[vm]]\nname = \"ghost\"\ncontrol = \"/nonexistent/control.sock\"", false);
    let _d = rig.start();
    let out = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Required), |_| {});
    let (code, reason, _) = out.result.err().unwrap();
    assert_eq!(code, tonic::Code::FailedPrecondition, "{reason}");
    assert!(!out.events.iter().any(|e| matches!(e, pb::snapshot_event::Event::Cut(_))));
    let st = rig.backend_status();
    assert!(st.snapshot.is_none(), "{st:?}");
    let stats = rig.block_on(rig.backend().stats(spb::StatsRequest {})).unwrap().into_inner();
    assert_eq!(stats.disks[0].cuts, 0, "the backend cut a snapshot");
    // An incremental backup with nothing to start from fails before the cut too.
    let out = snapshot(&rig, req(pb::BackupMode::Incremental, pb::QuiesceMode::Off), |_| {});
    assert_eq!(out.result.err().unwrap().0, tonic::Code::FailedPrecondition);
    let stats = rig.block_on(rig.backend().stats(spb::StatsRequest {})).unwrap().into_inner();
    assert_eq!(stats.disks[0].cuts, 0, "the backend cut a snapshot");
    // An unknown VM.
    let mut r = req(pb::BackupMode::Auto, pb::QuiesceMode::Off);
    r.vm = "nope".into();
    assert_eq!(snapshot(&rig, r, |_| {}).result.err().unwrap().0, tonic::Code::NotFound);
    // A VM whose backend does not answer.
    let mut r = req(pb::BackupMode::Auto, pb::QuiesceMode::Off);
    r.vm = "ghost".into();
    let (code, reason, stage) = snapshot(&rig, r, |_| {}).result.err().unwrap();
    assert_eq!((code, stage.as_str()), (tonic::Code::Unavailable, "cut"), "{reason}");
    let vms = rig.block_on(rig.client().list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
    assert_eq!(
        vms.iter().map(|v| (v.name.as_str(), v.backend_reachable)).collect::<Vec<_>>(),
        [(VM, true), ("ghost", false)]
    );
    assert_eq!(vms[0].disks, ["vda"]);
}

#[test]
fn a_second_snapshot_while_one_runs_is_refused() {
    let rig = Rig::new("", "read_bytes_per_sec = 16777216");
    let _d = rig.start();
    let mut c = rig.client();
    let mut c2 = rig.client();
    let (second, last) = rig.block_on(async {
        let mut stream = c.create_snapshot(req(pb::BackupMode::Full, pb::QuiesceMode::Off)).await.unwrap().into_inner();
        let mut second = None;
        let mut last = None;
        while let Some(e) = stream.message().await.unwrap() {
            let e = e.event.unwrap();
            if matches!(e, pb::snapshot_event::Event::Cut(_)) {
                second = Some(c2.create_snapshot(req(pb::BackupMode::Full, pb::QuiesceMode::Off)).await.map(|_| ()));
            }
            last = Some(e);
        }
        (second, last)
    });
    assert!(matches!(last, Some(pb::snapshot_event::Event::Done(_))), "the first job did not finish: {last:?}");
    let e = second.expect("no Cut event").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("job running"), "{e:?}");
    // Once the first is done, the VM takes a new job.
    snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {}).result.unwrap();
}

#[test]
fn livesnapd_killed_mid_backup_leaves_no_snapshot_and_the_job_failed() {
    // 4 MiB/s: the 64 MiB backup takes 16 s, so the kill lands inside it.
    let rig = Rig::new("", "read_bytes_per_sec = 4194304");
    let d = rig.start();
    let mut c = rig.client();
    let mut stream =
        rig.block_on(c.create_snapshot(req(pb::BackupMode::Auto, pb::QuiesceMode::Off))).unwrap().into_inner();
    let snap = rig.block_on(async {
        let mut snap = None;
        while let Some(e) = stream.message().await.unwrap() {
            match e.event.unwrap() {
                pb::snapshot_event::Event::Cut(c) => snap = Some(c.snapshot_id),
                pb::snapshot_event::Event::BackingUp(p) if p.bytes_read > 0 => break,
                pb::snapshot_event::Event::Done(_) | pb::snapshot_event::Event::Failed(_) => {
                    panic!("the job ended before the kill")
                }
                _ => {}
            }
        }
        snap.unwrap()
    });
    let status = d.stop(libc::SIGKILL, WAIT).unwrap();
    assert!(!status.success());
    let st = rig.backend_status();
    assert_eq!(st.snapshot.as_ref().map(|s| s.id), Some(snap), "the snapshot is active while its job is dead");

    let d = rig.start();
    // The restarted daemon abandoned the snapshot before serving; wait for its merge.
    let start = Instant::now();
    loop {
        let st = rig.backend_status();
        match &st.snapshot {
            None => break,
            Some(_) => {
                assert!(
                    !st.disks.iter().any(|d| d.phase == spb::Phase::Active as i32 && d.abandoned.is_empty()),
                    "still active: {st:?}"
                );
            }
        }
        assert!(start.elapsed() < JOB_WAIT, "the abandoned snapshot never merged: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Never checkpointed: the change map still starts before the killed job's snapshot.
    let mut b = rig.backend();
    let page = rig.block_on(async {
        b.changes(spb::ChangesRequest { disk: "vda".into() })
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap()
    });
    assert_ne!(page.since_checkpoint, Some(snap), "the killed job's snapshot was checkpointed");
    let mut c = rig.client();
    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner();
    assert!(list.backups.is_empty(), "a backup appeared from the killed job: {list:?}");
    let vms = rig.block_on(c.list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
    assert!(vms[0].running_job.is_empty(), "{vms:?}");

    // The job is recorded failed (the database is read with the daemon stopped).
    assert!(d.stop(libc::SIGTERM, WAIT).unwrap().success());
    let jobs = recorded_jobs(&rig);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["result"], "failed", "{jobs:?}");
    assert!(jobs[0]["reason"].as_str().unwrap().contains("daemon restarted"), "{jobs:?}");
    assert_eq!(jobs[0]["snapshot_id"], snap);

    // And the VM backs up again.
    let _d = rig.start();
    let b = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {}).result.unwrap();
    assert!(rig.backend_status().snapshot.is_none());
    assert_eq!(b.kind, pb::BackupKind::Full as i32);
}

#[test]
fn tcp_without_the_token_is_unauthenticated() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    livesnap_tests::tls::certificates(dir).unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = dir.display();
    let rig = Rig::new(
        &format!("[tcp]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\ntoken_file = \"{d}/token\"\n"),
        "",
    );
    let _daemon = rig.start();
    livesnap_control::install_tls_provider();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(dir.join("ca.pem")).unwrap()))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap();
    // The daemon listens once its unix socket is there, TCP a moment later at most.
    let start = Instant::now();
    let channel = loop {
        match rig.rt.block_on(endpoint.connect()) {
            Ok(c) => break c,
            Err(e) => assert!(start.elapsed() < WAIT, "cannot connect over TLS: {e:?}\n{}", rig.log()),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut c = LivesnapdClient::new(channel.clone());
    let e = rig.block_on(c.list_vms(pb::ListVmsRequest {})).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let with = |token: &'static str| {
        LivesnapdClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(r)
        })
    };
    let e = rig.block_on(with("wrong-token-0123456789").list_vms(pb::ListVmsRequest {})).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let vms = rig.block_on(with(TOKEN).list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
    assert_eq!(vms.len(), 1);
    assert!(vms[0].backend_reachable);
    // The unix socket needs no token, and is the owner's only.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&rig.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    rig.block_on(rig.client().list_vms(pb::ListVmsRequest {})).unwrap();
}

/// The real agent service with a fake freezer (no filesystem is frozen), on a unix socket.
struct FakeAgent {
    fake: livesnap_agent::fake::FakeFreezer,
    _home: livesnap_agent::fake::AgentHome,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeAgent {
    fn start(rig: &Rig, socket: &Path) -> FakeAgent {
        let home_dir = rig.dir.path().join("agent-home");
        std::fs::create_dir_all(&home_dir).unwrap();
        let home = livesnap_agent::fake::AgentHome::new(&home_dir).unwrap();
        let fake = livesnap_agent::fake::FakeFreezer::new(&["/data", "/"]);
        let agent = livesnap_agent::agent::Agent::new(fake.clone(), home.config());
        let _enter = rig.rt.enter();
        let listener = livesnap_agent::serve::bind_unix(socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rig.rt.spawn(livesnap_agent::serve::serve_unix(agent, listener, async {
            let _ = rx.await;
        }));
        FakeAgent { fake, _home: home, _stop: tx }
    }
}

/// A rig whose VM has an agent on a unix socket (in a directory of its own, returned).
fn agent_rig(defaults: &str) -> (Rig, PathBuf, tempfile::TempDir) {
    let adir = tempfile::Builder::new().prefix("livesnapd-agent").tempdir().unwrap();
    let socket = adir.path().join("agent.sock");
    let rig = Rig::with("", defaults, &format!("agent = {{ unix = \"{}\" }}", socket.display()), false);
    (rig, socket, adir)
}

fn thawed_us(o: &Outcome) -> u64 {
    o.events
        .iter()
        .find_map(|e| if let pb::snapshot_event::Event::Thawed(t) = e { Some(t.freeze_window_us) } else { None })
        .unwrap()
}

#[test]
fn an_agent_quiesces_the_guest_around_the_cut_and_a_failed_freeze_goes_on_crash_consistent() {
    let (rig, socket, _adir) = agent_rig("");
    let agent = FakeAgent::start(&rig, &socket);
    let _d = rig.start();
    let mut c = rig.client();
    let vms = rig.block_on(c.list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
    assert_eq!(vms[0].agent, pb::AgentState::Reachable as i32);

    // Application-consistent: frozen, cut, thawed, in that order; the window recorded.
    let mut windows = Vec::new();
    for i in 0..20 {
        let o = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Preferred), |_| {});
        let events: Vec<&str> = o
            .events
            .iter()
            .filter_map(|e| match e {
                pb::snapshot_event::Event::Quiescing(_) => Some("quiescing"),
                pb::snapshot_event::Event::Frozen(_) => Some("frozen"),
                pb::snapshot_event::Event::Cut(_) => Some("cut"),
                pb::snapshot_event::Event::Thawed(_) => Some("thawed"),
                _ => None,
            })
            .collect();
        assert_eq!(events, ["quiescing", "frozen", "cut", "thawed"]);
        let w = thawed_us(&o);
        let pause = o
            .events
            .iter()
            .find_map(|e| if let pb::snapshot_event::Event::Cut(c) = e { Some(c.pause_us) } else { None })
            .unwrap();
        eprintln!("snapshot {i}: freeze window {w} µs, the backend's pause {pause} µs");
        let b = o.result.unwrap_or_else(|e| panic!("backup {i} failed: {e:?}\n{}", rig.log()));
        assert_eq!(b.consistency, pb::Consistency::Application as i32, "{}", b.note);
        assert!(w > 0 && b.freeze_window_us == w, "window {w}, backup says {}", b.freeze_window_us);
        assert!(agent.fake.frozen().is_empty(), "left frozen: {:?}", agent.fake.frozen());
        windows.push(w);
    }
    let log = agent.fake.log();
    assert_eq!(log.iter().filter(|l| l.starts_with("freeze")).count(), 40, "{log:?}");
    windows.sort_unstable();
    eprintln!(
        "freeze window over {} snapshots (fake freezer, no hooks): p50 {} µs, p99 {} µs, max {} µs",
        windows.len(),
        windows[windows.len() / 2],
        windows[(windows.len() * 99).div_ceil(100) - 1],
        windows[windows.len() - 1]
    );

    // A freeze that fails: preferred goes on crash-consistent and says why; required fails
    // before the cut.
    agent.fake.fail_freeze_of("/data");
    let o = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Preferred), |_| {});
    let b = o.result.unwrap();
    assert_eq!(b.consistency, pb::Consistency::Crash as i32);
    assert!(b.note.contains("freeze failed"), "{}", b.note);
    assert!(agent.fake.frozen().is_empty(), "left frozen: {:?}", agent.fake.frozen());
    let cuts = |rig: &Rig| rig.block_on(rig.backend().stats(spb::StatsRequest {})).unwrap().into_inner().disks[0].cuts;
    let before = cuts(&rig);
    let o = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Required), |_| {});
    let (code, reason, stage) = o.result.err().unwrap();
    assert_eq!((code, stage.as_str()), (tonic::Code::FailedPrecondition, "quiesce"), "{reason}");
    assert_eq!(cuts(&rig), before, "cut although the guest could not be frozen");
    assert!(agent.fake.frozen().is_empty());
}

#[test]
fn a_restarted_livesnapd_thaws_the_guest_of_a_killed_job() {
    let (rig, socket, _adir) = agent_rig("read_bytes_per_sec = 4194304");
    let agent = FakeAgent::start(&rig, &socket);
    let d = rig.start();
    let mut c = rig.client();
    let mut stream =
        rig.block_on(c.create_snapshot(req(pb::BackupMode::Full, pb::QuiesceMode::Required))).unwrap().into_inner();
    rig.block_on(async {
        while let Some(e) = stream.message().await.unwrap() {
            if matches!(e.event.unwrap(), pb::snapshot_event::Event::BackingUp(_)) {
                break;
            }
        }
    });
    d.stop(libc::SIGKILL, WAIT).unwrap();
    // As if the daemon had died while the guest was frozen.
    let a = rig
        .block_on(livesnap_control::agent::AgentClient::connect(
            livesnap_control::agent::Target::Unix(socket.clone()),
            livesnap_control::agent::Limits::default(),
        ))
        .unwrap();
    rig.block_on(a.freeze(Duration::from_secs(600), "left-behind")).unwrap();
    assert!(!agent.fake.frozen().is_empty());
    let _d = rig.start();
    assert!(agent.fake.frozen().is_empty(), "the restarted daemon left the guest frozen: {:?}", agent.fake.frozen());
    let st = rig.backend_status();
    assert!(!st.disks.iter().any(|d| d.phase == spb::Phase::Active as i32 && d.abandoned.is_empty()), "{st:?}");
}

#[test]
fn a_qcow2_disk_backs_up_full_and_incremental_and_restores_to_raw_and_qcow2() {
    let mut rig = Rig::with("", "", "", true);
    let _d = rig.start();
    let at_cut = rig.model.clone();
    let b1 = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {}).result.unwrap();
    assert_eq!(b1.kind, pb::BackupKind::Full as i32);
    let mut c = rig.client();
    assert!(rig.restore(&mut c, &b1.id, "r1.raw") == at_cut);
    rig.write(5 * MIB, &stamp(3 * TRACK as usize, 9));
    rig.write(40 * MIB + 4096, &stamp(4096, 10));
    let b2 = snapshot(&rig, req(pb::BackupMode::Incremental, pb::QuiesceMode::Off), |_| {}).result.unwrap();
    assert_eq!(b2.kind, pb::BackupKind::Incremental as i32);
    assert!(rig.restore(&mut c, &b2.id, "r2.raw") == rig.model);
    let q = rig.dir.path().join("r2.qcow2");
    let req = pb::RestoreRequest {
        vm: VM.into(),
        id: b2.id.clone(),
        disk: "vda".into(),
        target_path: q.display().to_string(),
        format: pb::ImageFormat::Qcow2 as i32,
        live: false,
    };
    rig.block_on(async {
        let mut s = c.restore_backup(req).await.unwrap().into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    let expect = rig.dir.path().join("expect.raw");
    std::fs::write(&expect, &rig.model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", q.to_str().unwrap(), expect.to_str().unwrap()]);
}

/// Starts a rate-bounded full backup and returns its stream once the reading has begun, with
/// the job's id and snapshot.
fn start_reading(rig: &Rig, c: &mut LivesnapdClient<Channel>) -> (tonic::Streaming<pb::SnapshotEvent>, String, u64) {
    let mut stream =
        rig.block_on(c.create_snapshot(req(pb::BackupMode::Full, pb::QuiesceMode::Off))).unwrap().into_inner();
    let (id, snap) = rig.block_on(async {
        let mut snap = None;
        while let Some(e) = stream.message().await.unwrap() {
            match e.event.unwrap() {
                pb::snapshot_event::Event::Cut(c) => snap = Some(c.snapshot_id),
                pb::snapshot_event::Event::BackingUp(p) if p.bytes_read > 0 => {
                    return (e.job_id, snap.unwrap());
                }
                ev @ (pb::snapshot_event::Event::Done(_) | pb::snapshot_event::Event::Failed(_)) => {
                    panic!("the job ended before the test could stop it: {ev:?}")
                }
                _ => {}
            }
        }
        panic!("the stream ended")
    });
    (stream, id, snap)
}

/// The stream's last event, which must be Failed: (code, reason, stage).
fn failure_of(rig: &Rig, mut stream: tonic::Streaming<pb::SnapshotEvent>) -> (tonic::Code, String, String) {
    rig.block_on(async {
        while let Some(e) = stream.message().await.unwrap() {
            match e.event.unwrap() {
                pb::snapshot_event::Event::Failed(f) => return (tonic::Code::from(f.code), f.reason, f.stage),
                pb::snapshot_event::Event::Done(b) => panic!("the job succeeded: {b:?}"),
                _ => {}
            }
        }
        panic!("the stream ended without Done or Failed")
    })
}

/// Waits until the backend has no snapshot (an abandoned one merged); `snap` must never have
/// been checkpointed.
fn merged_not_checkpointed(rig: &Rig, snap: u64) {
    let start = Instant::now();
    while rig.backend_status().snapshot.is_some() {
        assert!(start.elapsed() < JOB_WAIT, "the abandoned snapshot never merged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut b = rig.backend();
    let page = rig.block_on(async {
        b.changes(spb::ChangesRequest { disk: "vda".into() }).await.unwrap().into_inner().message().await.unwrap()
    });
    assert_ne!(page.unwrap().since_checkpoint, Some(snap), "the stopped job's snapshot was checkpointed");
}

/// snapctl against the rig's livesnapd: (exit code, stdout).
fn snapctl(rig: &Rig, args: &[&str]) -> (i32, String) {
    let out = Command::new(programs::snapctl().unwrap())
        .arg("--socket")
        .arg(&rig.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("snapctl {args:?}: {:?}\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn a_running_job_is_listed_and_snapctl_cancels_it_mid_backup() {
    // 4 MiB/s: the 64 MiB backup would take 16 s; the cancel lands inside it.
    let rig = Rig::new("", "read_bytes_per_sec = 4194304");
    let _d = rig.start();
    let mut c = rig.client();
    let (stream, id, snap) = start_reading(&rig, &mut c);

    let jobs = rig.block_on(c.list_jobs(pb::ListJobsRequest { vm: VM.into(), last: 0 })).unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!((jobs[0].id.as_str(), jobs[0].status), (id.as_str(), pb::JobStatus::Running as i32));
    assert_eq!(jobs[0].stage, "backup");
    assert_eq!(jobs[0].snapshot_id, snap);
    let (code, out) = snapctl(&rig, &["job", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("running"), "{out}");

    // snapctl asks, then waits for the job to end.
    let (code, out) = snapctl(&rig, &["job", "cancel", &id]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, reason, stage) = failure_of(&rig, stream);
    assert_eq!((code, stage.as_str()), (tonic::Code::Cancelled, "backup"), "{reason}");
    assert!(reason.contains("CancelJob"), "{reason}");

    // Abandoned (its delta merged), nothing checkpointed, no backup, the job recorded.
    merged_not_checkpointed(&rig, snap);
    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner();
    assert!(list.backups.is_empty(), "a cancelled backup was committed: {list:?}");
    let j = rig.block_on(c.get_job(pb::JobRef { id: id.clone() })).unwrap().into_inner();
    assert_eq!((j.status, j.stage.as_str()), (pb::JobStatus::Cancelled as i32, "backup"), "{j:?}");
    assert_ne!(j.finished_unix_us, 0);
    let (code, out) = snapctl(&rig, &["--json", "job", "show", &id]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    // A job that has ended cannot be cancelled (5); an unknown one is not found (4).
    assert_eq!(snapctl(&rig, &["job", "cancel", &id]).0, 5);
    assert_eq!(snapctl(&rig, &["job", "cancel", "no-such-job"]).0, 4);
    let err = rig.block_on(c.get_job(pb::JobRef { id: "no-such-job".into() })).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The VM backs up again, the cancelled job's changes included.
    let b = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {}).result.unwrap();
    assert_eq!(b.kind, pb::BackupKind::Full as i32);
}

#[test]
fn sigterm_lets_the_running_job_finish_its_step_and_records_it() {
    // 16 MiB/s: the backup step takes about 4 s after the signal at most.
    let rig = Rig::new("", "read_bytes_per_sec = 16777216");
    let d = rig.start();
    let mut c = rig.client();
    let (stream, id, snap) = start_reading(&rig, &mut c);
    // SAFETY: kill(2) on the daemon's pid, which this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(d.pid().unwrap() as libc::pid_t, libc::SIGTERM) }, 0);
    let (code, reason, stage) = failure_of(&rig, stream);
    assert_eq!((code, stage.as_str()), (tonic::Code::Cancelled, "backup"), "{reason}");
    assert!(reason.contains("livesnapd is stopping"), "{reason}");
    assert!(d.stop(libc::SIGTERM, WAIT).unwrap().success(), "{}", rig.log());
    merged_not_checkpointed(&rig, snap);

    // Recorded by the daemon that stopped, not left to the next start.
    let jobs = recorded_jobs(&rig);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        (jobs[0]["id"].as_str(), jobs[0]["result"].as_str()),
        (Some(id.as_str()), Some("cancelled")),
        "{jobs:?}"
    );

    // Nothing left for the next start to clean up; the backup step finished before the job
    // stopped, so the backup is whole.
    let _d = rig.start();
    assert!(!rig.log().contains("left unfinished"), "{}", rig.log());
    let mut c = rig.client();
    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner();
    assert_eq!(list.backups.len(), 1, "{list:?}");
    let b = &list.backups[0];
    assert_eq!(rig.restore(&mut c, &b.id, "restored.raw"), rig.model, "the backup is not the disk at the cut");
}

/// The jobs the rig's livesnapd recorded (`livesnapd jobs`, with the daemon stopped).
fn recorded_jobs(rig: &Rig) -> Vec<serde_json::Value> {
    let out = livesnapd_cmd(&["--config", rig.config.to_str().unwrap(), "jobs"]).unwrap_or_else(|e| panic!("{e}"));
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Runs `livesnapd ARGS` (the key commands need no config and no daemon); its stdout, or its
/// stderr when it fails.
fn livesnapd_cmd(args: &[&str]) -> Result<String, String> {
    let out = Command::new(programs::livesnapd().unwrap()).args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The 16 hex digits after `key ` in a `livesnapd key` line.
fn key_id(line: &str) -> String {
    let at = line.find(": key ").unwrap() + 6;
    line[at..at + 16].to_owned()
}

#[test]
fn an_encrypted_vm_backs_up_and_restores_identical_and_a_wrong_or_missing_key_is_refused_naming_it() {
    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name).display().to_string();
    livesnapd_cmd(&["key", "create-kek", &k("kek")]).unwrap();
    let id = key_id(&livesnapd_cmd(&["key", "create", "--kek", &k("kek"), &k("vm1.key")]).unwrap());
    let other = key_id(&livesnapd_cmd(&["key", "create", "--kek", &k("kek"), &k("other.key")]).unwrap());
    assert_ne!(id, other);

    let mut rig = Rig::with(&format!("kek = \"{}\"", k("kek")), "", &format!("key = \"{}\"", k("vm1.key")), false);
    let d = rig.start();
    let at_cut = rig.model.clone();
    let b1 = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {})
        .result
        .unwrap_or_else(|e| panic!("{e:?}\n{}", rig.log()));
    assert_eq!(b1.key_id, id, "the backup says which key encrypts it");
    rig.write(7 * MIB, &stamp(3 * TRACK as usize, 21));
    let b2 = snapshot(&rig, req(pb::BackupMode::Incremental, pb::QuiesceMode::Off), |_| {})
        .result
        .unwrap_or_else(|e| panic!("{e:?}\n{}", rig.log()));
    assert_eq!((b2.kind, b2.key_id.as_str()), (pb::BackupKind::Incremental as i32, id.as_str()));
    let mut c = rig.client();
    assert!(rig.restore(&mut c, &b1.id, "r1.raw") == at_cut);
    // Restored to qcow2 and compared by qemu-img with the disk at the second cut.
    let q = rig.dir.path().join("r2.qcow2");
    rig.block_on(async {
        let mut s = c
            .restore_backup(pb::RestoreRequest {
                vm: VM.into(),
                id: b2.id.clone(),
                disk: "vda".into(),
                target_path: q.display().to_string(),
                format: pb::ImageFormat::Qcow2 as i32,
                live: false,
            })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    let expect = rig.dir.path().join("expect.raw");
    std::fs::write(&expect, &rig.model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", q.to_str().unwrap(), expect.to_str().unwrap()]);
    let v = rig.block_on(c.verify_backup(pb::BackupRef { vm: VM.into(), id: b2.id.clone() })).unwrap().into_inner();
    assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    // Nothing in the repository is a plain chunk.
    let chunks: Vec<PathBuf> = walk(&rig.dir.path().join("repo/chunks")).into_iter().filter(|p| p.is_file()).collect();
    assert!(!chunks.is_empty());
    for p in &chunks {
        assert_eq!(&std::fs::read(p).unwrap()[..8], b"LSNAPCHX", "{}", p.display());
    }
    assert!(!rig.log().contains(&std::fs::read_to_string(keys.path().join("kek")).unwrap().trim().to_owned()));
    d.stop(libc::SIGTERM, WAIT).unwrap();

    // The VM's key file replaced by another key: every operation refuses, naming both keys.
    let config = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(&rig.config, config.replace(&k("vm1.key"), &k("other.key"))).unwrap();
    let d = rig.start();
    let mut c = rig.client();
    let wrong = |what: &str, s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
        for needle in [id.as_str(), other.as_str(), "other.key"] {
            assert!(s.message().contains(needle), "{what}: {needle} not in {:?}", s.message());
        }
    };
    let r = pb::BackupRef { vm: VM.into(), id: b1.id.clone() };
    wrong("get", rig.block_on(c.get_backup(r.clone())).unwrap_err());
    wrong("verify", rig.block_on(c.verify_backup(r.clone())).unwrap_err());
    wrong("list", rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap_err());
    let restore = pb::RestoreRequest {
        vm: VM.into(),
        id: b1.id.clone(),
        disk: "vda".into(),
        target_path: rig.dir.path().join("never.raw").display().to_string(),
        format: 0,
        live: false,
    };
    wrong("restore", rig.block_on(c.restore_backup(restore.clone())).unwrap_err());
    assert!(!rig.dir.path().join("never.raw").exists());
    let job = snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {});
    let (code, reason, _) = job.result.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{reason}");
    assert!(reason.contains(&id) && reason.contains(&other), "{reason}");
    assert!(rig.backend_status().snapshot.is_none(), "refused before any cut");
    d.stop(libc::SIGTERM, WAIT).unwrap();

    // No key for the VM: the backups' key is named.
    let config = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(&rig.config, config.replace(&format!("key = \"{}\"", k("other.key")), "")).unwrap();
    let d = rig.start();
    let mut c = rig.client();
    let s = rig.block_on(c.get_backup(r.clone())).unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains(&id) && s.message().contains("no key"), "{}", s.message());
    d.stop(libc::SIGTERM, WAIT).unwrap();

    // A key file others can read keeps the daemon from starting, naming it.
    std::fs::write(&rig.config, config).unwrap();
    std::fs::set_permissions(k("other.key"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = livesnapd_cmd(&["--config", rig.config.to_str().unwrap(), "check-config"]).unwrap_err();
    assert!(e.contains("other.key") && e.contains("0644"), "{e}");
}

/// A port nothing listens on now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` over TCP: the status line and the body.
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: livesnapd\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {out:?}"));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// The samples of livesnapd's /metrics, `name{labels}` → value; every line must parse.
fn scrape(port: u16) -> std::collections::HashMap<String, f64> {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let mut out = std::collections::HashMap::new();
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let v: f64 = if value == "+Inf" { f64::INFINITY } else { value.parse().unwrap() };
        assert!(out.insert(key.to_owned(), v).is_none(), "sample twice: {line:?}");
    }
    out
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn metrics_are_scraped_over_tcp_after_a_backup_and_a_failed_job_and_the_last_success_survives_a_restart() {
    let port = free_port();
    let rig = Rig::with(
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
        "",
        "[[vm]]\nname = \"ghost\"\ncontrol = \"/nonexistent/control.sock\"",
        false,
    );
    let d = rig.start();
    let get = |m: &std::collections::HashMap<String, f64>, key: &str| -> f64 {
        *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:#?}"))
    };
    // The repository's first count (at start) is in before the backup, so that the backup's
    // own addition to it is what shows.
    let start = Instant::now();
    while get(&scrape(port), "livesnap_repository_counted_timestamp_seconds") == 0.0 {
        assert!(start.elapsed() < WAIT, "the repository was never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = scrape(port);
    assert_eq!(get(&before, "livesnap_repository_backups"), 0.0);
    assert_eq!(get(&before, r#"livesnap_last_success_timestamp_seconds{vm="vm1"}"#), 0.0);

    let t0 = unix_secs();
    let b = snapshot(&rig, req(pb::BackupMode::Full, pb::QuiesceMode::Off), |_| {}).result.unwrap();
    let t1 = unix_secs();
    // A job on a VM whose backend is not there fails.
    let mut r = req(pb::BackupMode::Auto, pb::QuiesceMode::Off);
    r.vm = "ghost".into();
    snapshot(&rig, r, |_| {}).result.unwrap_err();

    let m = scrape(port);
    assert_eq!(get(&m, r#"livesnap_jobs_total{vm="vm1",kind="full",result="ok"}"#), 1.0);
    assert_eq!(get(&m, r#"livesnap_jobs_total{vm="ghost",kind="auto",result="failed"}"#), 1.0);
    assert!(!m.keys().any(|k| k.starts_with("livesnap_jobs_total{vm=\"vm1\"") && !k.contains("result=\"ok\"")));
    assert_eq!(get(&m, r#"livesnap_job_duration_seconds_count{vm="vm1",result="ok"}"#), 1.0);
    let last = get(&m, r#"livesnap_last_success_timestamp_seconds{vm="vm1"}"#);
    assert!((t0..=t1).contains(&last), "{last} not within the job's run {t0}..{t1}");
    assert_eq!(get(&m, r#"livesnap_last_success_timestamp_seconds{vm="ghost"}"#), 0.0);
    let stored: u64 = b.disks.iter().map(|d| d.bytes_stored).sum();
    assert!(stored > 0);
    assert_eq!(get(&m, r#"livesnap_backup_stored_bytes_total{vm="vm1"}"#), stored as f64);
    assert_eq!(get(&m, r#"livesnap_backup_read_bytes_total{vm="vm1"}"#), DISK as f64);
    assert_eq!(get(&m, "livesnap_repository_backups"), 1.0);
    assert_eq!(get(&m, "livesnap_repository_stored_bytes"), stored as f64);
    assert!(get(&m, "livesnap_repository_dedup_ratio") > 0.0);
    assert_eq!(get(&m, "livesnap_jobs_running"), 0.0);
    // From the backends' control services now: vm1's snapshot merged, ghost's not there.
    assert_eq!(get(&m, r#"livesnap_backend_up{vm="vm1"}"#), 1.0);
    assert_eq!(get(&m, r#"livesnap_backend_up{vm="ghost"}"#), 0.0);
    assert_eq!(get(&m, r#"livesnap_snapshot_active{vm="vm1"}"#), 0.0);
    assert_eq!(get(&m, r#"livesnap_delta_bytes{vm="vm1",disk="vda"}"#), 0.0);
    assert_eq!(http_get(port, "/").0, "HTTP/1.1 404 Not Found");

    // Restarted: the counters start over, the last success is read back from the state.
    assert!(d.stop(libc::SIGTERM, WAIT).unwrap().success(), "{}", rig.log());
    let _d = rig.start();
    let m = scrape(port);
    assert_eq!(get(&m, r#"livesnap_last_success_timestamp_seconds{vm="vm1"}"#), last);
    assert!(!m.keys().any(|k| k.starts_with("livesnap_jobs_total")), "{m:?}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix time: a calendar event that elapses once.
fn instant(t: u64) -> String {
    let out = Command::new("date").args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%d %H:%M:%S"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Appends a schedule of the rig's VM to its config.
fn set_schedule(rig: &Rig, calendar: &str) {
    let text = std::fs::read_to_string(&rig.config).unwrap();
    let base = text.split("[scheduler]").next().unwrap().to_owned();
    let schedule = format!(
        "[scheduler]\nmax_jobs = 1\n[[schedule]]\nname = \"nightly\"\ncalendar = \"{calendar}\"\nvms = [\"{VM}\"]\n\
         keep = {{ last = 2 }}\n"
    );
    std::fs::write(&rig.config, base + &schedule).unwrap();
}

/// Waits until `n` jobs have ended and the VM holds none (retention runs inside the job).
fn wait_jobs_ended(rig: &Rig, c: &mut LivesnapdClient<Channel>, n: usize) -> Vec<pb::Job> {
    let deadline = Instant::now() + JOB_WAIT;
    loop {
        assert!(Instant::now() < deadline, "{n} jobs did not end: {}", rig.log());
        let jobs = rig.block_on(c.list_jobs(pb::ListJobsRequest::default())).unwrap().into_inner().jobs;
        let vms = rig.block_on(c.list_vms(pb::ListVmsRequest {})).unwrap().into_inner().vms;
        let ended = jobs.iter().filter(|j| j.status != pb::JobStatus::Running as i32).count();
        if ended >= n && vms[0].running_job.is_empty() {
            return jobs;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A schedule whose elapse passed while livesnapd was stopped fires once at its start, through
/// the real workflow, and the VM's retention (keep-last 2) then prunes the oldest of three
/// backups in the real repository; a dry run shows the rule that keeps each.
#[test]
fn a_schedule_missed_while_stopped_fires_at_start_and_retention_prunes_through_the_repository() {
    let mut rig = Rig::new("", "");
    // First run: the schedule is new (its last run is recorded as the start) and far off.
    set_schedule(&rig, "2199-01-01 00:00:00");
    let d = rig.start();
    let manual: Vec<pb::Backup> = (0..2)
        .map(|v| {
            rig.write(0, &stamp(4096, v));
            snapshot(&rig, req(pb::BackupMode::Auto, pb::QuiesceMode::Off), |_| {}).result.unwrap()
        })
        .collect();
    let after_first = unix_now();
    let mut c = rig.client();
    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner().backups;
    assert_eq!(list.len(), 2, "keep-last 2 pruned too early: {list:?}");
    assert!(d.stop(libc::SIGTERM, WAIT).unwrap().success(), "{}", rig.log());

    // While it is stopped, the schedule's one elapse passes.
    while unix_now() < after_first + 2 {
        std::thread::sleep(Duration::from_millis(200));
    }
    set_schedule(&rig, &instant(after_first + 1));
    rig.write(0, &stamp(4096, 9));
    let _d = rig.start();
    let mut c = rig.client();
    let jobs = wait_jobs_ended(&rig, &mut c, 3);
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    assert!(jobs.iter().all(|j| j.status == pb::JobStatus::Ok as i32), "{jobs:?}");
    let log = rig.log();
    assert!(log.contains("missed while livesnapd was down"), "{log}");

    let list = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner().backups;
    let ids: Vec<&str> = list.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{list:?}");
    assert_eq!(ids[0], manual[1].id, "keep-last 2 after the scheduled backup: {list:?}");
    assert_eq!(rig.restore(&mut c, ids[1], "scheduled.raw"), rig.model, "the scheduled backup is not the disk");
    let e = rig.block_on(c.get_backup(pb::BackupRef { vm: VM.into(), id: manual[0].id.clone() })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    for b in &list {
        let v = rig.block_on(c.verify_backup(pb::BackupRef { vm: VM.into(), id: b.id.clone() })).unwrap().into_inner();
        assert!(v.ok && v.chunks_checked > 0, "a kept backup lost chunks to the prune: {v:?}");
    }

    // The dry run shows the rule that keeps each, and changes nothing.
    let (code, out) = snapctl(&rig, &["backup", "prune", VM, "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("keep-last 1/2") && out.contains("keep-last 2/2"), "{out}");
    assert!(out.contains("dry run (keep-last 2): would keep 2, remove 0"), "{out}");
    let (code, out) = snapctl(&rig, &["backup", "prune", VM, "--keep-last", "1", "--dry-run", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backups"][0]["keep"], false, "{v}");
    assert_eq!(v["backups"][1]["rule"], "keep-last 1/1", "{v}");
    let again = rig.block_on(c.list_backups(pb::ListBackupsRequest { vm: VM.into() })).unwrap().into_inner().backups;
    assert_eq!(again, list, "a dry run changed the backups");
}

/// With the real clock: a schedule every two seconds fires, and its backups succeed (the
/// retention's result is checked deterministically above).
#[test]
fn a_schedule_every_two_seconds_fires_on_the_real_clock() {
    let rig = Rig::new("", "");
    set_schedule(&rig, "*:*:0/2");
    let d = rig.start();
    let mut c = rig.client();
    let jobs = wait_jobs_ended(&rig, &mut c, 3);
    assert!(jobs.iter().all(|j| j.status == pb::JobStatus::Ok as i32), "{jobs:?}");
    assert!(rig.log().contains("schedule elapsed"), "{}", rig.log());
    assert!(d.stop(libc::SIGTERM, WAIT).unwrap().success(), "{}", rig.log());
}

/// The backend's disk as the test VMM reads it, in 1 MiB requests from `from` on, wrapping.
fn read_disk(q: &mut BlkQueue, from: u64) -> Vec<u8> {
    let mut out = vec![0u8; DISK as usize];
    for i in 0..DISK / MIB {
        let off = (from + i * MIB) % DISK;
        let data = q.read(off / 512, MIB as u32).unwrap();
        out[off as usize..(off + MIB) as usize].copy_from_slice(&data);
    }
    out
}

/// A VM backed up whole (a zero chunk and some data), then livesnapd restarted to find the VM's
/// control service at a new socket, that of the backend that will serve the live target.
struct LiveRig {
    rig: Rig,
    backup: pb::Backup,
    expected: Vec<u8>,
    control2: PathBuf,
    _livesnapd: Daemon,
}

impl LiveRig {
    fn new() -> LiveRig {
        let mut rig = Rig::new("", "");
        // A whole chunk of zeros (the repository's 4 MiB chunks): answered without a read.
        for i in 0..4 {
            rig.write(8 * MIB + i * MIB, &vec![0u8; MIB as usize]);
        }
        rig.write(MIB + 4096, &stamp(8192, 3));
        let d = rig.start();
        let backup = snapshot(&rig, req(pb::BackupMode::Full, pb::QuiesceMode::Off), |_| {}).result.unwrap();
        let expected = rig.model.clone();
        d.stop(libc::SIGTERM, WAIT).unwrap();
        let control2 = rig.dir.path().join("control2.sock");
        let config = std::fs::read_to_string(&rig.config).unwrap();
        std::fs::write(
            &rig.config,
            config.replace(&rig.control.display().to_string(), &control2.display().to_string()),
        )
        .unwrap();
        let livesnapd = rig.start();
        LiveRig { rig, backup, expected, control2, _livesnapd: livesnapd }
    }

    /// A live restore into `name` as `format`, served at once by a new livesnap-blk that the
    /// test VMM reads whole (from the middle) while livesnapd feeds it: every byte must be the
    /// backup's. Returns once livesnapd says complete, with the map gone and the target
    /// `qemu-img compare`-identical to the backup; the VMM's queue stays connected.
    fn restore_live(
        &self,
        c: &mut LivesnapdClient<Channel>,
        name: &str,
        format: pb::ImageFormat,
    ) -> (Daemon, Frontend, BlkQueue) {
        let rig = &self.rig;
        let target = rig.dir.path().join(name);
        let req = pb::RestoreRequest {
            vm: VM.into(),
            id: self.backup.id.clone(),
            disk: "vda".into(),
            target_path: target.display().to_string(),
            format: format as i32,
            live: true,
        };
        let mut stream = rig.block_on(c.restore_backup(req)).unwrap().into_inner();
        let first = rig.block_on(stream.message()).unwrap().unwrap();
        assert_eq!(first.state, pb::LiveRestoreState::Waiting as i32, "{first:?}");
        assert_eq!(first.chunks_total, DISK / (4 * MIB));
        assert_eq!(PathBuf::from(&first.target_path), target);
        let map = PathBuf::from(&first.map_path);
        assert!(map.exists(), "the map is created beside the target");
        let fmt = if format == pb::ImageFormat::Qcow2 { "qcow2" } else { "raw" };
        if fmt == "raw" {
            assert_eq!(std::fs::metadata(&target).unwrap().len(), DISK);
        }
        // The new backend starts on the target; the guest reads all of it at once.
        let vhost2 = rig.dir.path().join(format!("{name}.sock"));
        let log = std::fs::File::create(rig.dir.path().join(format!("{name}.blk.log"))).unwrap();
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(["--vm", VM, "--queues", "1", "--disk"])
            .arg(format!("id=vda,image={},socket={},format={fmt}", target.display(), vhost2.display()))
            .arg("--state-dir")
            .arg(rig.dir.path().join(format!("{name}.state")))
            .arg("--control")
            .arg(&self.control2)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let blk = Daemon::spawn("livesnap-blk", cmd, &[&vhost2, &self.control2]).unwrap();
        let started = Instant::now();
        let mut f = Frontend::connect(&vhost2, &Options { queues: 1, timeout: WAIT, ..Options::default() }).unwrap();
        let mut q = f.take_queues().into_iter().next().map(|v| BlkQueue::new(v, 8, MIB as u32).unwrap()).unwrap();
        let read = read_disk(&mut q, DISK / 2);
        let read_all = started.elapsed();
        let first_bad = read.iter().zip(&self.expected).position(|(a, b)| a != b);
        assert!(first_bad.is_none(), "{fmt}: the guest read differs from the backup at byte {first_bad:?}");
        // livesnapd's progress until complete.
        let last = rig.block_on(async {
            let mut last = first;
            while let Some(p) = stream.message().await.unwrap() {
                last = p;
            }
            last
        });
        assert!(last.done, "{last:?}");
        assert_eq!(last.state, pb::LiveRestoreState::Complete as i32);
        assert_eq!(last.chunks_done, last.chunks_total);
        let job = rig.block_on(c.get_job(pb::JobRef { id: last.job_id.clone() })).unwrap().into_inner();
        assert_eq!((job.kind.as_str(), job.status), ("live-restore", pb::JobStatus::Ok as i32), "{job:?}");
        assert!(!map.exists(), "the map is removed once complete");
        let reference = rig.dir.path().join(format!("{name}.expected.raw"));
        std::fs::write(&reference, &self.expected).unwrap();
        qemu_img(&["compare", "-q", "-f", "raw", "-F", fmt, reference.to_str().unwrap(), target.to_str().unwrap()]);
        if fmt == "qcow2" {
            qemu_img(&["check", "-f", "qcow2", target.to_str().unwrap()]);
        }
        // The disk keeps working as a plain image.
        assert_eq!(read_disk(&mut q, 0), self.expected);
        eprintln!(
            "live restore ({fmt}) of {} MiB: the guest read all of it in {read_all:?} from the backend's start, complete in {:?}",
            DISK / MIB,
            started.elapsed()
        );
        let st = rig.block_on(rig.backend_at(&self.control2).status(spb::StatusRequest {})).unwrap().into_inner();
        let r = st.disks[0].restore.as_ref();
        assert!(r.is_none_or(|r| r.complete), "{r:?}");
        (blk, f, q)
    }
}

#[test]
fn a_live_restore_fed_by_livesnapd_serves_the_backup_at_once_and_ends_a_plain_identical_image() {
    let live = LiveRig::new();
    let (rig, backup, expected) = (&live.rig, &live.backup, &live.expected);
    let mut c = rig.client();
    let _served = live.restore_live(&mut c, "live.raw", pb::ImageFormat::Raw);
    // Side by side, not asserted: a plain restore of the same backup.
    let plain = Instant::now();
    assert_eq!(&rig.restore(&mut c, &backup.id, "plain.raw"), expected);
    eprintln!("a plain restore took {:?}", plain.elapsed());

    // snapctl: a second live restore, whose backend never starts. It says what to do and
    // follows; Ctrl-C leaves the job running; `job cancel` stops it, target and map left.
    let mut child = Command::new(programs::snapctl().unwrap())
        .arg("--socket")
        .arg(&rig.socket)
        .args(["backup", "restore", VM, &backup.id, "--disk", "vda", "--to", "second.raw", "--live"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    while !said.contains("waiting for") {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "snapctl said only: {said}");
        said.push_str(&line);
    }
    assert!(said.contains("as disk vda"), "{said}");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{:?}: {err}", done.status);
    assert!(err.contains("goes on"), "{err}");
    let jobs = rig.block_on(c.list_jobs(pb::ListJobsRequest { vm: VM.into(), last: 1 })).unwrap().into_inner().jobs;
    let job = &jobs[0];
    assert_eq!((job.kind.as_str(), job.status), ("live-restore", pb::JobStatus::Running as i32), "{job:?}");
    let (code, _) = snapctl(rig, &["job", "cancel", &job.id]);
    assert_eq!(code, 0);
    let job = rig.block_on(c.get_job(pb::JobRef { id: job.id.clone() })).unwrap().into_inner();
    assert_eq!(job.status, pb::JobStatus::Cancelled as i32, "{job:?}");
    let second = rig.dir.path().join("second.raw");
    assert!(second.exists() && second.with_extension("raw.restore").exists(), "target and map left in place");
}

#[test]
fn a_live_restore_into_a_qcow2_target_serves_the_backup_at_once_and_ends_a_clean_identical_image() {
    let live = LiveRig::new();
    let mut c = live.rig.client();
    let _served = live.restore_live(&mut c, "live.qcow2", pb::ImageFormat::Qcow2);
}
