//! A control call that fails on the state directory says why, its cause included: over gRPC
//! (with a code that fits the cause) and through `livesnap-blk ctl`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use livesnap_blk::control;
use livesnap_blk::disk::{self, DiskFile, Format};
use livesnap_blk::snap::store::{Dir, FsDir, MetaFile};
use livesnap_blk::snap::{DiskSpec, Options, Vm};
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use tonic::transport::Endpoint;

const RECORD: &str = "snapshot.state";
const FULL: &str = "Cannot write the snapshot record: No space left on device (os error 28)";

/// A state directory whose record file fails every write with ENOSPC once `full` is set.
#[derive(Debug)]
struct FullRecordDir {
    inner: FsDir,
    full: Arc<AtomicBool>,
}

#[derive(Debug)]
struct FullFile {
    inner: Arc<dyn MetaFile>,
    full: Arc<AtomicBool>,
}

impl MetaFile for FullFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn byte_len(&self) -> io::Result<u64> {
        self.inner.byte_len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl FullRecordDir {
    fn wrap(&self, name: &str, file: Arc<dyn MetaFile>) -> Arc<dyn MetaFile> {
        if name == RECORD {
            Arc::new(FullFile { inner: file, full: self.full.clone() })
        } else {
            file
        }
    }
}

impl Dir for FullRecordDir {
    fn path(&self, name: &str) -> PathBuf {
        self.inner.path(name)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn MetaFile>> {
        Ok(self.wrap(name, self.inner.create(name)?))
    }

    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn MetaFile>>> {
        Ok(self.inner.open(name)?.map(|f| self.wrap(name, f)))
    }

    fn create_data(&self, name: &str, size: u64) -> io::Result<Arc<dyn DiskFile>> {
        self.inner.create_data(name, size)
    }

    fn open_data(&self, name: &str) -> io::Result<Arc<dyn DiskFile>> {
        self.inner.open_data(name)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

/// One VM with disk `vda` on a state directory that can be made full, served on `ctl.sock`.
fn serve(dir: &Path, full: Arc<AtomicBool>) -> (Vm, control::ControlServer) {
    let image = dir.join("vda.raw");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let spec =
        DiskSpec { id: "vda".into(), base: disk::open(&image, Some(Format::Raw), false).unwrap(), base_path: image };
    let store = FullRecordDir { inner: FsDir::new(&dir.join("state")).unwrap(), full };
    let opts = Options { background_merge: false, ..Options::default() };
    let vm = Vm::open("vm1", Arc::new(store), vec![spec], opts).unwrap();
    let server = control::serve(&dir.join("ctl.sock"), Arc::new(vm.clone())).unwrap();
    (vm, server)
}

fn begin(socket: &Path) -> Result<pb::BeginReply, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch =
            livesnap_proto::unix_channel(Endpoint::from_static("http://t.invalid"), socket.to_owned()).await.unwrap();
        SnapshotControlClient::new(ch).begin(pb::BeginRequest::default()).await.map(tonic::Response::into_inner)
    })
}

#[test]
fn begin_on_a_full_state_directory_says_no_space_left_over_grpc_and_in_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let (vm, server) = serve(dir.path(), full.clone());
    let socket = dir.path().join("ctl.sock");
    full.store(true, Ordering::SeqCst);

    let status = begin(&socket).unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), FULL);

    let out = Command::new(env!("CARGO_BIN_EXE_livesnap-blk"))
        .arg("ctl")
        .arg("--control")
        .arg(&socket)
        .arg("begin")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("Begin failed: {FULL}")), "{stderr}");
    assert!(out.stdout.is_empty());

    // The failed cut left nothing behind: with space again, the next one is snapshot 1.
    full.store(false, Ordering::SeqCst);
    assert_eq!(begin(&socket).unwrap().snapshot.unwrap().id, 1);
    server.stop();
    vm.shutdown();
}
