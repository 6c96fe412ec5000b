//! End to end: a snapshot cut and merged under a real guest that never stops writing.
//!
//! The guest (QEMU, TCG) runs `recwriter` (`tests/src/bin/recwriter.rs`) on its raw virtio disk
//! `/dev/vda`, served by `livesnap-blk` with a snapshot engine: numbered, checksummed 4 KiB
//! records written one at a time with `O_DIRECT`, record `k` at offset `k * 4096`. While it
//! writes, the host
//! 1. cuts a snapshot (`Begin` over the control socket);
//! 2. hashes the base image file, waits until the guest has written 1024 more records, and
//!    hashes it again: the two must be equal (the base is frozen);
//! 3. reads the base (a qcow2 base through `qemu-img convert -U`): it must hold exactly a prefix
//!    of the sequence, records `0..n` all valid, with `n > 0` and at least what the guest had
//!    reported before the cut, and every block after them as the host made it before the guest
//!    started (nothing of a later write, nothing torn, nothing zeroed);
//! 4. waits until the guest has written 4096 records past the cut, then merges (`Merge`,
//!    followed to the end) while the guest keeps writing; the disk must then be back in the
//!    direct phase with its delta file gone;
//! 5. lets the guest write some more, then tells it to stop (a line on a second serial port):
//!    it syncs, prints its last completed record and powers off; the host stops `livesnap-blk`
//!    (SIGTERM) and the base alone must hold every record up to that one, valid and in order,
//!    more than the snapshot held, and nothing after it.
//!
//! What the host made before the guest started ("unwritten"): each even MiB of the disk filled
//! with a per-block pattern, each odd MiB zeros (a hole of the raw file, unallocated clusters of
//! the qcow2 one, so the qcow2 base gets clusters allocated by the merge and by direct writes).
//!
//! The workload never rewrites a block, so it does not race a guest write against the merger's
//! copy of the same range; `snap::model_tests` covers that.
//!
//! Needs `ci/install-deps.sh`, `ci/build-guest.sh`, `ci/build-recwriter.sh` (the static
//! `target/guest-bin/recwriter`, or set `LIVESNAP_RECWRITER`) and a built `livesnap-blk`.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use livesnap_tests::daemon::Daemon;
use livesnap_tests::guest::{serial_args, Guest, GuestConfig, GuestFile};
use livesnap_tests::programs;
use livesnap_tests::record::{self, record, RECORD};
use tonic::transport::{Channel, Endpoint};

const DISK_MIB: u64 = 512;
const PROGRESS: &str = "RECWRITER-PROGRESS=";
/// For hangs only: TCG is slow and CI machines are busy.
const WAIT: Duration = Duration::from_secs(300);

const JOB: &str = r#"set -e
# A line on the second serial port (the host's stop socket) stops the writer.
exec 3</dev/ttyS1
( read -r line <&3; echo "STOP-READ=$line"; touch /tmp/stop ) &
echo STOP-LISTENING
/usr/bin/recwriter /dev/vda /tmp/stop
"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Raw,
    Qcow2,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (see ci/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether block `i` was filled with a pattern before the guest started (else zeros).
fn has_pattern(i: u64) -> bool {
    ((i * RECORD as u64) >> 20) % 2 == 0
}

/// The pattern of block `i`, repeated over the block; its last copy cut short.
fn pattern_tag(i: u64) -> String {
    format!("UNWRITTEN block {i} ")
}

/// Block `i` as the host made it before the guest started.
fn unwritten(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; RECORD];
    if has_pattern(i) {
        let tag = pattern_tag(i);
        for c in b.chunks_mut(tag.len()) {
            c.copy_from_slice(&tag.as_bytes()[..c.len()]);
        }
    }
    b
}

/// Whether `block` is `unwritten(i)`, without building it (the scan checks every block, and
/// tests are built without optimisation).
fn is_unwritten(i: u64, block: &[u8]) -> bool {
    if has_pattern(i) {
        let tag = pattern_tag(i);
        block.chunks(tag.len()).all(|c| c == &tag.as_bytes()[..c.len()])
    } else {
        block == [0u8; RECORD]
    }
}

/// What one block of the disk holds.
fn describe(i: u64, block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    if let Some((k, sum_ok)) = record::header(block) {
        return format!(
            "a record header with k={k} (checksum {}, content {})",
            if sum_ok { "ok" } else { "BAD" },
            if block == record(k) { "as written" } else { "NOT as written" }
        );
    }
    if is_unwritten(i, block) {
        return "the unwritten pattern".into();
    }
    format!("something else, starting {:02x?}", &block[..16])
}

/// A raw disk image read back as records.
#[derive(Debug)]
struct Scan {
    /// Records `0..records` are valid, in order.
    records: u64,
    /// Blocks after the prefix that are not as the host made them.
    bad: u64,
    /// What the first of them hold.
    problems: Vec<String>,
}

fn scan(raw: &Path) -> Scan {
    let file = File::open(raw).unwrap();
    let blocks = file.metadata().unwrap().len() / RECORD as u64;
    let mut f = BufReader::with_capacity(1 << 20, file);
    let mut block = vec![0u8; RECORD];
    let mut records = 0;
    let mut problems = Vec::new();
    let mut bad = 0;
    let mut in_prefix = true;
    for i in 0..blocks {
        f.read_exact(&mut block).unwrap();
        if in_prefix && block == record(i) {
            records = i + 1;
            continue;
        }
        in_prefix = false;
        if !is_unwritten(i, &block) {
            bad += 1;
            if problems.len() < 20 {
                problems
                    .push(format!("block {i} (after the prefix of {records} records) holds {}", describe(i, &block)));
            }
        }
    }
    Scan { records, bad, problems }
}

/// The image as a raw disk: itself, or a qcow2 one converted (read-only, sharing the image with
/// the running backend: `-U`).
fn as_raw(image: &Path, format: Format, dir: &Path) -> PathBuf {
    match format {
        Format::Raw => image.to_path_buf(),
        Format::Qcow2 => {
            let out = dir.join("converted.raw");
            let _ = std::fs::remove_file(&out);
            run(Command::new("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(image).arg(&out));
            out
        }
    }
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The records the guest has reported complete so far.
fn progress(guest: &Guest) -> u64 {
    livesnap_tests::guest::last_report(&guest.console(), PROGRESS)
}

/// Waits until the guest has reported at least `records` complete; returns what it reported.
fn wait_progress(guest: &Guest, records: u64) -> u64 {
    let start = Instant::now();
    loop {
        let p = progress(guest);
        if p >= records {
            return p;
        }
        let console = guest.console();
        assert!(
            !console.contains("RECWRITER-FULL"),
            "the disk filled up before the test was done: make DISK_MIB larger"
        );
        assert!(
            !console.contains("LIVESNAP-JOB-EXIT=") && start.elapsed() < WAIT,
            "the guest did not reach {records} records (at {p}); console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn make_image(format: Format, image: &Path, dir: &Path) {
    let raw = match format {
        Format::Raw => image.to_path_buf(),
        Format::Qcow2 => dir.join("seed.raw"),
    };
    write_unwritten(&raw, DISK_MIB);
    if format == Format::Qcow2 {
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(image));
        std::fs::remove_file(&raw).unwrap();
    }
}

/// A raw image of `mib` MiB as the host makes it before the guest starts.
fn write_unwritten(raw: &Path, mib_len: u64) {
    let f = File::create(raw).unwrap();
    f.set_len(mib_len << 20).unwrap();
    for mib in (0..mib_len).step_by(2) {
        let first = (mib << 20) / RECORD as u64;
        let data: Vec<u8> = (first..first + 256).flat_map(unwritten).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, mib << 20).unwrap();
    }
    f.sync_all().unwrap();
}

struct Control {
    rt: tokio::runtime::Runtime,
    client: SnapshotControlClient<Channel>,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let endpoint = Endpoint::from_static("http://x.invalid").timeout(Duration::from_secs(60));
        let channel = rt.block_on(livesnap_proto::unix_channel(endpoint, path.to_path_buf())).unwrap();
        Control { rt, client: SnapshotControlClient::new(channel) }
    }

    fn begin(&mut self) -> pb::Snapshot {
        let reply = self.rt.block_on(self.client.begin(pb::BeginRequest::default())).unwrap().into_inner();
        reply.snapshot.unwrap()
    }

    fn status(&mut self) -> pb::VmStatus {
        self.rt.block_on(self.client.status(pb::StatusRequest {})).unwrap().into_inner()
    }

    /// Merges and follows the progress to the end; returns the reports.
    fn merge(&mut self, id: u64) -> Vec<pb::MergeProgress> {
        let client = &mut self.client;
        self.rt.block_on(async {
            let mut stream = client.merge(pb::MergeRequest { snapshot_id: id }).await.unwrap().into_inner();
            let mut reports = Vec::new();
            loop {
                let next = tokio::time::timeout(WAIT, stream.message()).await.expect("no merge progress for 300 s");
                match next.unwrap() {
                    Some(m) => {
                        let done = m.done;
                        reports.push(m);
                        if done {
                            return reports;
                        }
                    }
                    None => panic!("the merge stream ended before done: {reports:?}"),
                }
            }
        })
    }
}

fn snapshot_cut_under_a_writing_guest_freezes_a_prefix_and_merge_keeps_every_record(format: Format) {
    let dir = tempfile::Builder::new().prefix("livesnap-snapshot-e2e").tempdir().unwrap();
    let d = dir.path();
    let image = d.join(format!("vda.{}", format.name()));
    make_image(format, &image, d);
    let state = d.join("state");
    std::fs::create_dir(&state).unwrap();
    let (disk_sock, ctl_sock, stop_sock) = (d.join("vda.sock"), d.join("control.sock"), d.join("stop.sock"));
    let blk = Daemon::livesnap_blk(
        &[
            "--vm".into(),
            "snap-e2e".into(),
            "--disk".into(),
            format!("id=vda,image={},socket={},format={}", image.display(), disk_sock.display(), format.name()),
            "--state-dir".into(),
            state.display().to_string(),
            "--control".into(),
            ctl_sock.display().to_string(),
        ],
        &[disk_sock.as_path(), ctl_sock.as_path()],
    )
    .unwrap();
    let console_log = d.join("console.log");
    let mut guest = Guest::start(GuestConfig {
        disks: vec![disk_sock],
        job_script: JOB.into(),
        files: vec![GuestFile {
            path: "/usr/bin/recwriter".into(),
            contents: std::fs::read(programs::recwriter_static().unwrap()).unwrap(),
            mode: 0o755,
        }],
        extra_args: serial_args(&stop_sock),
        console_log: Some(console_log.clone()),
        timeout: Duration::from_secs(1200),
        ..GuestConfig::default()
    })
    .unwrap();
    eprintln!("console in {}", console_log.display());
    guest.wait_for_console("STOP-LISTENING", WAIT).unwrap();
    let mut ctl = Control::connect(&ctl_sock);

    // 1. The cut, while the guest writes.
    let before_cut = wait_progress(&guest, 256);
    let snap = ctl.begin();
    let after_cut = progress(&guest);
    eprintln!(
        "snapshot {} cut (guest paused {} µs) between records {before_cut} and {after_cut} reported",
        snap.id, snap.pause_us
    );
    let st = ctl.status();
    assert_eq!(st.snapshot.as_ref().map(|s| s.id), Some(snap.id), "{st:?}");
    let disk = &st.disks[0];
    assert_eq!(
        (disk.phase, disk.snapshot, disk.abandoned.as_str()),
        (pb::Phase::Active as i32, Some(snap.id), ""),
        "{st:?}"
    );
    assert_eq!(Path::new(&disk.base_path), image, "{st:?}");
    let delta = PathBuf::from(&disk.delta_path);
    assert!(delta.is_file(), "{st:?}");

    // 2. The base does not change while the guest keeps writing.
    let hash1 = sha256(&image);
    let p1 = progress(&guest);
    let p2 = wait_progress(&guest, p1 + 1024);
    let hash2 = sha256(&image);
    assert_eq!(
        hash1, hash2,
        "the base changed while the snapshot was active (the guest wrote records {p1}..{p2} meanwhile)"
    );
    let st = ctl.status();
    assert_eq!(st.disks[0].phase, pb::Phase::Active as i32, "{st:?}");
    assert!(st.disks[0].delta_bytes >= 1024 * RECORD as u64, "the guest's writes are not in the delta: {st:?}");

    // 3. It holds a prefix of the guest's records, and nothing else the guest wrote.
    let read_at = Instant::now();
    let frozen_raw = as_raw(&image, format, d);
    assert_eq!(std::fs::metadata(&frozen_raw).unwrap().len(), DISK_MIB << 20);
    let frozen = scan(&frozen_raw);
    eprintln!(
        "the base holds records 0..{} (guest reported {before_cut} before the cut, {p2} now; read in {:?})",
        frozen.records,
        read_at.elapsed()
    );
    assert_eq!(frozen.bad, 0, "the frozen base is not a prefix of the guest's records: {:#?}", frozen.problems);
    assert!(frozen.records > 0 && frozen.records >= before_cut, "{frozen:?}, {before_cut} reported before the cut");
    assert!(frozen.records < p2, "the base holds records written after the cut: {frozen:?}, {p2} reported");

    // 4. The merge, while the guest keeps writing.
    let before_merge = wait_progress(&guest, frozen.records + 4096);
    let reports = ctl.merge(snap.id);
    let after_merge = progress(&guest);
    let last = reports.last().unwrap();
    eprintln!(
        "merged in {} reports (up to {} bytes reported merged) while the guest went from record {before_merge} to {after_merge}",
        reports.len(),
        reports.iter().flat_map(|r| &r.disks).map(|d| d.merged_bytes).max().unwrap_or(0)
    );
    assert!(last.disks.iter().all(|d| d.done), "{last:?}");
    let st = ctl.status();
    assert!(st.snapshot.is_none(), "{st:?}");
    assert_eq!((st.disks[0].phase, st.disks[0].delta_bytes), (pb::Phase::Direct as i32, 0), "{st:?}");
    assert!(!delta.exists(), "the delta {} is still there after the merge", delta.display());

    // 5. More writes, then the guest stops, syncs and powers off.
    wait_progress(&guest, after_merge + 256);
    let mut stop = UnixStream::connect(&stop_sock).unwrap();
    stop.write_all(b"stop\n").unwrap();
    let ended = guest.wait().unwrap();
    assert_eq!(ended.exit_code, 0, "{}", ended.console);
    assert!(!ended.console.contains("RECWRITER-FULL"), "the disk filled up: make DISK_MIB larger");
    let last: i64 = ended.value("RECWRITER-LAST").unwrap().parse().unwrap();
    let written = u64::try_from(last + 1).unwrap();
    // The control service's graceful stop waits for its connections to close; this client's
    // runtime is only driven during calls, so it would never answer the server's GOAWAY.
    drop(ctl);
    let status = blk.stop(libc::SIGTERM, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "livesnap-blk exited with {status}");
    if format == Format::Qcow2 {
        run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&image));
    }
    let end = scan(&as_raw(&image, format, d));
    eprintln!("the guest wrote records 0..={last}; the base holds 0..{}", end.records);
    assert_eq!(end.bad, 0, "the base after the merge: {:#?}", end.problems);
    assert_eq!(end.records, written, "the base after the merge lost records (the guest completed 0..={last})");
    assert!(
        written > frozen.records && written > after_merge,
        "{written} records, {frozen:?}, {after_merge} after the merge"
    );
}

#[test]
fn raw_base_is_frozen_at_the_cut_and_the_merge_keeps_every_record() {
    snapshot_cut_under_a_writing_guest_freezes_a_prefix_and_merge_keeps_every_record(Format::Raw);
}

#[test]
fn qcow2_base_is_frozen_at_the_cut_and_the_merge_keeps_every_record() {
    snapshot_cut_under_a_writing_guest_freezes_a_prefix_and_merge_keeps_every_record(Format::Qcow2);
}

/// The host's reader of the records finds what the e2e tests must fail on: a gap, a torn record,
/// a record out of place, a block zeroed.
#[test]
fn scan_finds_gaps_torn_records_and_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    write_unwritten(&raw, 4);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let put = |i: u64, data: &[u8]| std::os::unix::fs::FileExt::write_all_at(&f, data, i * RECORD as u64).unwrap();
    let s = scan(&raw);
    assert_eq!((s.records, s.bad), (0, 0), "{s:?}");
    for k in 0..300 {
        put(k, &record(k));
    }
    let s = scan(&raw);
    assert_eq!((s.records, s.bad), (300, 0), "{s:?}");

    // A record after a gap.
    put(302, &record(302));
    let s = scan(&raw);
    assert_eq!(s.records, 300);
    assert_eq!(s.bad, 1, "{s:?}");
    assert!(
        s.problems[0].starts_with("block 302 ") && s.problems[0].contains("k=302 (checksum ok, content as written)"),
        "{s:?}"
    );
    put(302, &unwritten(302));

    // A torn record: its second half still the zeros of an odd MiB.
    let mut torn = record(256);
    torn[RECORD / 2..].fill(0);
    put(256, &torn);
    let s = scan(&raw);
    assert_eq!(s.records, 256);
    assert_eq!(s.bad, 44, "every record after the torn one is out of place: {s:?}");
    assert!(s.problems[0].contains("block 256 ") && s.problems[0].contains("checksum BAD"), "{s:?}");
    put(256, &record(256));

    // A block of the pattern zeroed (a hole punched into the base).
    put(600, &[0u8; RECORD]);
    let s = scan(&raw);
    assert_eq!(s.records, 300);
    assert_eq!(
        (s.bad, s.problems.as_slice()),
        (1, ["block 600 (after the prefix of 300 records) holds zeros".to_string()].as_slice()),
        "{s:?}"
    );
}
