//! livesnap-blk keeps guest writes through what an operator's bad day brings: a frontend that
//! never flushes (no `VIRTIO_BLK_F_FLUSH`) killed with SIGKILL during a snapshot, and a
//! snapshot record that no longer reads back, which must stop the backend with every delta in
//! place rather than start it on an empty record.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livesnap_tests::blk::BlkQueue;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::frontend::{Frontend, Options};
use livesnap_tests::programs;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// A VM with one raw disk, a state directory and a control socket.
struct Rig {
    _dir: tempfile::TempDir,
    image: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    args: Vec<String>,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("livesnap-recovery").tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 4 * MIB as usize]).unwrap();
        let (state, socket, control) =
            (dir.path().join("state"), dir.path().join("vda.sock"), dir.path().join("control.sock"));
        let args = vec![
            "--vm".into(),
            "recovery".into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--control".into(),
            control.display().to_string(),
            "--disk".into(),
            format!("id=vda,image={},socket={}", image.display(), socket.display()),
        ];
        Rig { _dir: dir, image, state, socket, control, args }
    }

    fn start(&self) -> Daemon {
        Daemon::livesnap_blk(&self.args, &[&self.socket, &self.control]).unwrap()
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(programs::livesnap_blk().unwrap())
            .args(["ctl", "--control", path(&self.control)])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn connect(&self, withhold_features: u64) -> (Frontend, BlkQueue) {
        let opts = Options { timeout: WAIT, withhold_features, ..Options::default() };
        let mut f = Frontend::connect(&self.socket, &opts).unwrap();
        let q = BlkQueue::new(f.take_queues().pop().unwrap(), 16, MIB as u32).unwrap();
        (f, q)
    }

    /// Every file of the state directory with its bytes.
    fn state_files(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(&self.state)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
            })
            .collect()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn kill9(daemon: Daemon) {
    let status = daemon.stop(libc::SIGKILL, WAIT).unwrap();
    assert!(!status.success(), "livesnap-blk exited by itself: {status}");
}

#[test]
fn a_write_acknowledged_without_flush_negotiated_survives_a_sigkill_in_a_snapshot() {
    let rig = Rig::new();
    let daemon = rig.start();
    rig.ctl(&["begin"]);
    // A driver that knows neither FLUSH nor CONFIG_WCE assumes no write-back cache.
    let (mut f, mut q) = rig.connect(1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_CONFIG_WCE);
    assert_eq!(f.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f.read_config().unwrap().wce, 0, "the device must say it is write-through");
    q.write(2048, &[0x5a; 8192]).unwrap();
    kill9(daemon);
    drop((q, f));

    let daemon = rig.start();
    let (_f, mut q) = rig.connect(0);
    assert!(
        q.read(2048, 8192).unwrap().iter().all(|&b| b == 0x5a),
        "a write acknowledged to a driver without FLUSH was lost at a SIGKILL"
    );
    // It went to the snapshot's delta: the frozen base does not have it.
    let base = std::fs::read(&rig.image).unwrap();
    assert!(base[2048 * 512..2048 * 512 + 8192].iter().all(|&b| b == 0));
    drop(daemon);
}

#[test]
fn a_corrupt_record_stops_the_backend_and_keeps_every_delta() {
    let rig = Rig::new();
    let daemon = rig.start();
    rig.ctl(&["begin"]);
    let (f, mut q) = rig.connect(0);
    q.write(0, &[0xc3; 4096]).unwrap();
    q.flush().unwrap();
    drop((q, f));
    kill9(daemon);

    let record = rig.state.join("snapshot.state");
    let good = std::fs::read(&record).unwrap();
    std::fs::write(&record, vec![0u8; good.len()]).unwrap();
    let before = rig.state_files();
    assert!(before.keys().any(|n| n.contains(".delta.")), "{:?}", before.keys());

    // A SIGKILLed backend leaves its socket behind.
    std::fs::remove_file(&rig.socket).unwrap();
    let out = Command::new(programs::livesnap_blk().unwrap()).args(&rig.args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "livesnap-blk served a VM whose record is unreadable: {err}");
    assert!(err.contains("cannot be trusted") && err.contains("Recovery"), "{err}");
    assert!(err.contains("magic and checksum"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!rig.socket.exists(), "a disk socket was created");
    assert_eq!(rig.state_files(), before, "a refused start changed the state directory");

    // The record back, the write made in the snapshot is there.
    std::fs::write(&record, &good).unwrap();
    let _daemon = rig.start();
    let (_f, mut q) = rig.connect(0);
    assert!(q.read(0, 4096).unwrap().iter().all(|&b| b == 0xc3));
}

#[test]
fn recover_folds_the_delta_into_the_image_once_the_record_is_lost() {
    let rig = Rig::new();
    let daemon = rig.start();
    rig.ctl(&["begin"]);
    let (f, mut q) = rig.connect(0);
    q.write(8, &[0xd4; 8192]).unwrap();
    q.flush().unwrap();
    drop((q, f));
    kill9(daemon);
    std::fs::remove_file(rig.state.join("snapshot.state")).unwrap();
    let before = rig.state_files();

    let recover = |extra: &[&str]| {
        let out = Command::new(programs::livesnap_blk().unwrap())
            .args(["recover", "--state-dir", path(&rig.state), "--disk", "vda", "--image", path(&rig.image)])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "recover: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = recover(&["--dry-run"]);
    assert!(said.contains("would copy 8192 bytes in 1 extents"), "{said}");
    assert!(std::fs::read(&rig.image).unwrap()[4096..12288].iter().all(|&b| b == 0), "a dry run wrote the image");
    let said = recover(&[]);
    assert!(said.contains("copied and flushed 8192 bytes"), "{said}");
    let image = std::fs::read(&rig.image).unwrap();
    assert!(image[4096..12288].iter().all(|&b| b == 0xd4));
    assert!(image[..4096].iter().chain(&image[12288..]).all(|&b| b == 0));
    assert_eq!(rig.state_files(), before, "recover changed the state directory");

    // The state directory moved aside, the backend serves the disk with the write.
    std::fs::rename(&rig.state, rig.state.with_extension("old")).unwrap();
    let _daemon = rig.start();
    let (_f, mut q) = rig.connect(0);
    assert!(q.read(8, 8192).unwrap().iter().all(|&b| b == 0xd4));
}
