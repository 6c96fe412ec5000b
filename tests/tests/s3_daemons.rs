//! Two livesnapd with separate state and configs stand for two hosts sharing one bucket of a
//! real Garage on loopback: backups of different VMs from both at once, the second host lists,
//! verifies and restores what the first took, and the object store killed mid-backup.
//!
//! Each VM is a raw image served by livesnap-blk, written by the test VMM (no guest: the cut,
//! the backup and the merge are what is tested). Needs `cargo build -p livesnap-blk -p
//! livesnap-control`, `qemu-img`, and Garage: fails, never skips, without.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livesnap_proto::daemon as pb;
use livesnap_proto::daemon::livesnapd_client::LivesnapdClient;
use livesnap_proto::snapshot as spb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::garage::Garage;
use livesnap_tests::{pattern, programs};
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const WAIT: Duration = Duration::from_secs(60);
/// Hang guard for a whole job (not a measurement).
const JOB_WAIT: Duration = Duration::from_secs(180);
const GRACE_SECS: u64 = 600;

/// One host: a VM on livesnap-blk with the test VMM connected, and livesnapd's files.
struct Host {
    dir: PathBuf,
    vm: String,
    image: PathBuf,
    control: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    _blk: Daemon,
    _frontend: Frontend,
    queue: BlkQueue,
    /// What the guest reads now.
    model: Vec<u8>,
    rt: tokio::runtime::Runtime,
}

impl Host {
    fn new(root: &Path, vm: &str, seed: u64, g: &Garage, defaults: &str) -> Host {
        let dir = root.join(vm);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("vda.raw");
        let model = pattern::disk(seed, DISK as usize);
        std::fs::write(&image, &model).unwrap();
        let (vhost, control) = (dir.join("vda.sock"), dir.join("control.sock"));
        let log = std::fs::File::create(dir.join("livesnap-blk.log")).unwrap();
        let mut cmd = Command::new(programs::livesnap_blk().unwrap());
        cmd.args(["--vm", vm, "--queues", "1", "--disk"])
            .arg(format!("id=vda,image={},socket={},format=raw", image.display(), vhost.display()))
            .arg("--state-dir")
            .arg(dir.join("blk-state"))
            .arg("--control")
            .arg(&control)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let blk = Daemon::spawn("livesnap-blk", cmd, &[&vhost, &control]).unwrap();
        let mut f = Frontend::connect(&vhost, &Options { queues: 1, timeout: WAIT, ..Options::default() }).unwrap();
        let queue = f.take_queues().into_iter().next().map(|v| BlkQueue::new(v, 8, MIB as u32).unwrap()).unwrap();
        let socket = dir.join("livesnapd.sock");
        let config = dir.join("livesnapd.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "{}socket = \"{}\"\nstate = \"{d}/livesnapd.redb\"\nrestore_dir = \"{d}\"\n\n[defaults]\n{defaults}\n\n\
                 {}\n[[vm]]\nname = \"{vm}\"\ncontrol = \"{}\"\n",
                g.repository_line("fleet"),
                socket.display(),
                g.s3_table(GRACE_SECS),
                control.display()
            ),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        Host { dir, vm: vm.into(), image, control, socket, config, _blk: blk, _frontend: f, queue, model, rt }
    }

    fn start(&self) -> Daemon {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("livesnapd.log")).unwrap();
        let mut cmd = Command::new(programs::livesnapd().unwrap());
        cmd.arg("--config").arg(&self.config).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log);
        Daemon::spawn("livesnapd", cmd, &[&self.socket]).unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("livesnapd.log")).unwrap_or_default()
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

    fn backend_status(&self) -> spb::VmStatus {
        let ch = self
            .rt
            .block_on(livesnap_proto::unix_channel(Endpoint::from_static("http://blk.invalid"), self.control.clone()))
            .unwrap();
        self.rt.block_on(SnapshotControlClient::new(ch).status(spb::StatusRequest {})).unwrap().into_inner()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(async { tokio::time::timeout(JOB_WAIT, f).await }).expect("no answer in time")
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.queue.write(off / 512, data).unwrap();
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// Runs a backup job to its end: the backup, or the failure's stage and reason.
    fn snapshot(&self, on_backing_up: impl FnOnce()) -> Result<pb::Backup, (String, String)> {
        let mut c = self.client();
        let req = pb::CreateSnapshotRequest {
            vm: self.vm.clone(),
            backup: pb::BackupMode::Auto as i32,
            quiesce: pb::QuiesceMode::Off as i32,
            freeze_timeout_ms: 0,
        };
        let mut hook = Some(on_backing_up);
        self.block_on(async {
            let mut stream =
                c.create_snapshot(req).await.map_err(|s| (String::new(), s.message().to_owned()))?.into_inner();
            while let Some(e) = stream.message().await.unwrap() {
                match e.event.unwrap() {
                    pb::snapshot_event::Event::BackingUp(_) => {
                        if let Some(h) = hook.take() {
                            h();
                        }
                    }
                    pb::snapshot_event::Event::Done(b) => return Ok(b),
                    pb::snapshot_event::Event::Failed(f) => return Err((f.stage, f.reason)),
                    _ => {}
                }
            }
            panic!("the event stream ended without Done or Failed");
        })
    }

    fn list(&self, vm: &str) -> Vec<pb::Backup> {
        let mut c = self.client();
        self.block_on(c.list_backups(pb::ListBackupsRequest { vm: vm.into() })).unwrap().into_inner().backups
    }

    /// Restores `vm`'s backup `id` (disk vda) here; the restored file.
    fn restore(&self, vm: &str, id: &str, name: &str) -> PathBuf {
        let mut c = self.client();
        let target = self.dir.join(name);
        let req = pb::RestoreRequest {
            vm: vm.into(),
            id: id.into(),
            disk: "vda".into(),
            target_path: target.display().to_string(),
            format: 0,
            live: false,
        };
        let done = self.block_on(async {
            let mut s = c.restore_backup(req).await.unwrap().into_inner();
            let mut last = None;
            while let Some(p) = s.message().await.unwrap() {
                last = Some(p);
            }
            last.is_some_and(|p| p.done)
        });
        assert!(done, "the restore stream ended without done");
        target
    }
}

fn qemu_img_compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_hosts_back_up_at_once_and_each_restores_the_others_backups() {
    let root = tempfile::Builder::new().prefix("s3-daemons").tempdir().unwrap();
    let g = Garage::start(&root.path().join("garage"), 1).unwrap();
    let mut a = Host::new(root.path(), "web1", 1, &g, "");
    let mut b = Host::new(root.path(), "web2", 2, &g, "");
    let (_da, _db) = (a.start(), b.start());

    // Both at once, then writes after the cuts that the restores must not hold.
    let at_cut_a = a.dir.join("at-cut.raw");
    let at_cut_b = b.dir.join("at-cut.raw");
    std::fs::write(&at_cut_a, &a.model).unwrap();
    std::fs::write(&at_cut_b, &b.model).unwrap();
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.snapshot(|| {}));
        let tb = s.spawn(|| b.snapshot(|| {}));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ba = ra.unwrap_or_else(|e| panic!("host a: {e:?}\n{}", a.log()));
    let bb = rb.unwrap_or_else(|e| panic!("host b: {e:?}\n{}", b.log()));
    a.write(3 * MIB, &[0xaa; 65536]);
    b.write(5 * MIB, &[0xbb; 65536]);

    // Each host sees both VMs' backups; each verifies and restores the other's.
    for h in [&a, &b] {
        assert_eq!(h.list("web1").iter().map(|x| &x.id).collect::<Vec<_>>(), vec![&ba.id]);
        assert_eq!(h.list("web2").iter().map(|x| &x.id).collect::<Vec<_>>(), vec![&bb.id]);
    }
    let mut cb = b.client();
    let v = b.block_on(cb.verify_backup(pb::BackupRef { vm: "web1".into(), id: ba.id.clone() })).unwrap().into_inner();
    assert!(v.ok && v.chunks_checked > 0, "{v:?}");
    qemu_img_compare(&b.restore("web1", &ba.id, "web1-on-b.raw"), &at_cut_a);
    qemu_img_compare(&a.restore("web2", &bb.id, "web2-on-a.raw"), &at_cut_b);

    // An incremental on host a; host b restores it as it was at its cut.
    let at_cut2 = a.dir.join("at-cut2.raw");
    std::fs::write(&at_cut2, &a.model).unwrap();
    let ba2 = a.snapshot(|| {}).unwrap_or_else(|e| panic!("{e:?}\n{}", a.log()));
    assert_eq!(ba2.kind, pb::BackupKind::Incremental as i32, "{}", ba2.note);
    qemu_img_compare(&b.restore("web1", &ba2.id, "web1-2-on-b.raw"), &at_cut2);
}

/// The object store killed while a backup reads: the job fails naming the store, the snapshot
/// is merged, nothing is listed or checkpointed; once the store is back the next backup is an
/// incremental that holds the failed one's changes too.
#[test]
fn object_store_killed_mid_backup_fails_the_job_cleanly() {
    let root = tempfile::Builder::new().prefix("s3-fault").tempdir().unwrap();
    let g = Garage::start(&root.path().join("garage"), 1).unwrap();
    // Reading at 8 MiB/s: the backup lasts long enough to kill the store under it.
    let mut a = Host::new(root.path(), "web1", 3, &g, "read_bytes_per_sec = 8388608");
    let _d = a.start();
    let first = a.snapshot(|| {}).unwrap_or_else(|e| panic!("{e:?}\n{}", a.log()));

    for k in 0..8u64 {
        a.write(k * 4 * MIB, &[k as u8 + 1; 65536]);
    }
    // A full-size change so the incremental reads long enough.
    for k in 0..16u64 {
        let piece: Vec<u8> = (0..MIB).map(|i| ((i + k) * 7 % 251) as u8).collect();
        a.write(8 * MIB + k * MIB, &piece);
    }
    let failed = a.snapshot(|| g.kill(1).unwrap());
    let (stage, reason) = failed.expect_err("the backup succeeded with its store killed");
    assert!(reason.contains("s3://") || reason.contains("object store"), "stage {stage}: {reason}");
    eprintln!("failed at {stage}: {reason}");
    // Abandoned at once (never active and unabandoned again), merged in the background.
    let t = std::time::Instant::now();
    loop {
        let st = a.backend_status();
        if st.snapshot.is_none() {
            break;
        }
        assert!(
            !st.disks.iter().any(|d| d.phase == spb::Phase::Active as i32 && d.abandoned.is_empty()),
            "the failed job left its snapshot active: {st:?}"
        );
        assert!(t.elapsed() < JOB_WAIT, "the abandoned snapshot never merged: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    g.restart(1).unwrap();
    assert_eq!(a.list("web1").len(), 1, "the failed backup is not visible");
    let at_cut = a.dir.join("at-cut.raw");
    std::fs::write(&at_cut, &a.model).unwrap();
    let next = a.snapshot(|| {}).unwrap_or_else(|e| panic!("{e:?}\n{}", a.log()));
    assert_eq!(next.kind, pb::BackupKind::Incremental as i32, "{}", next.note);
    assert_ne!(next.id, first.id);
    // The failed job checkpointed nothing: the incremental holds its changes too.
    qemu_img_compare(&a.restore("web1", &next.id, "after.raw"), &at_cut);
    assert_eq!(std::fs::read(&a.image).unwrap(), a.model);
}
