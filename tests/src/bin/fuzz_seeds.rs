//! fuzz_seeds: writes the seed corpora of the fuzz targets (`fuzz/`) from real files, made by
//! livesnap's own code, `qemu-img` and the host.
//!
//! ```text
//! cargo run -p livesnap-tests --bin fuzz_seeds -- fuzz/corpus
//! ```
//!
//! Each seed goes to `<dir>/<target>/<name>`. The engine's files come from a snapshot engine run
//! on a temporary raw disk (a cut, writes, flushes, half a merge); the repository's from a full
//! and an incremental backup of a small disk; the qcow2 headers from `qemu-img create`; the agent's
//! replies from the messages its service sends; the config from control/README.md.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livesnap_agent::hooks::{HookResult, Outcome, Phase};
use livesnap_agent::lease::LeaseState;
use livesnap_blk::disk::{Buf, DiskFile, RawDisk};
use livesnap_blk::snap::store::FsDir;
use livesnap_blk::snap::{BeginOptions, DiskSpec, Options, SnapshotControl, Vm};
use livesnap_proto::agent as pb;
use livesnap_repo::{BackupSpec, Consistency, CreateOptions, FileSource, LocalStore, Repository};
use prost::Message;

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(name), bytes).with_context(|| format!("writing seed {target}/{name}"))
    }

    fn copy(&self, target: &str, name: &str, from: &Path) -> Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.put(target, name, &bytes)
    }
}

fn write(disk: &dyn DiskFile, offset: u64, len: usize, byte: u8) -> Result<()> {
    let mut data = vec![byte; len];
    disk.write_vectored_at(&[Buf::from(&mut data[..])], offset)?;
    Ok(())
}

/// snapshot.state, a delta journal and change maps, at two moments of a snapshot's life.
fn engine(seeds: &Seeds, tmp: &Path) -> Result<()> {
    let path = tmp.join("base.raw");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(8 << 20)?;
    let spec = DiskSpec { id: "vda".into(), base: Arc::new(RawDisk::new(file)?), base_path: path };
    let state = tmp.join("state");
    let opts = Options { background_merge: false, granularity: 64 << 10, ..Options::default() };
    let vm = Vm::open("vm", Arc::new(FsDir::new(&state)?), vec![spec], opts)?;
    let disk = vm.disk("vda").context("no disk vda")?;
    write(&*disk, 0, 4096, 1)?;
    write(&*disk, 3 << 20, 65536, 2)?;
    disk.flush()?;
    seeds.copy("snapshot_record", "new-vm", &state.join("snapshot.state"))?;
    seeds.copy("change_map", "gen0-marked", &state.join("vda.cbt.0"))?;

    let snap = vm.begin(BeginOptions::default())?;
    for (i, off) in [0u64, 8192, 1 << 20, (1 << 20) + 4096, 5 << 20, (8 << 20) - 512].into_iter().enumerate() {
        write(&*disk, off, if i == 5 { 512 } else { 4096 }, 3 + i as u8)?;
        if i % 2 == 1 {
            disk.flush()?;
        }
    }
    let id = snap.id;
    seeds.copy("snapshot_record", "active", &state.join("snapshot.state"))?;
    seeds.copy("delta_journal", "active", &state.join(format!("vda.map.{id}")))?;
    seeds.copy("change_map", "gen0-frozen", &state.join("vda.cbt.0"))?;
    seeds.copy("change_map", "gen1-current", &state.join("vda.cbt.1"))?;

    vm.merge(id)?;
    vm.merge_some(1)?;
    seeds.copy("snapshot_record", "merging", &state.join("snapshot.state"))?;
    seeds.copy("delta_journal", "merging", &state.join(format!("vda.map.{id}")))?;
    while vm.merge_some(16)? {}
    vm.checkpoint(id)?;
    seeds.copy("snapshot_record", "checkpointed", &state.join("snapshot.state"))?;
    vm.shutdown();
    Ok(())
}

/// Chunk files and manifests of a full and an incremental backup (64 KiB chunks).
fn repository(seeds: &Seeds, tmp: &Path) -> Result<()> {
    let src = tmp.join("disk.raw");
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, b) in data.iter_mut().enumerate() {
        *b = match i >> 16 {
            0 => (i % 7) as u8, // compressible
            1 | 2 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8 // incompressible: stored
            }
            3 => 0, // zeros: not stored
            _ => (i / 4096) as u8,
        };
    }
    std::fs::write(&src, &data)?;
    let root = tmp.join("repo");
    let repo = Repository::create(&root, CreateOptions { chunk_size: 64 << 10, compression_level: 3 })?;
    let spec = |id: &str, consistency| BackupSpec {
        vm: "web01".into(),
        id: id.into(),
        consistency,
        freeze_window: None,
        created_unix_us: Some(1_700_000_000_000_000),
    };
    let mut w = repo.begin_backup(spec("b1", Consistency::Crash))?;
    w.full("vda", &FileSource::open(&src)?)?;
    w.commit()?;
    let parent = repo.manifest("web01", "b1", "vda")?;
    data[70_000..70_100].fill(0xee);
    std::fs::write(&src, &data)?;
    let mut w = repo.begin_backup(spec("b2", Consistency::Application))?;
    w.incremental("vda", &FileSource::open(&src)?, &parent, &[(70_000, 100)])?;
    w.commit()?;

    let store = LocalStore::open(&root);
    seeds.copy("repo_manifest", "full", &store.manifest_path("web01", "b1", "vda"))?;
    seeds.copy("repo_manifest", "incremental", &store.manifest_path("web01", "b2", "vda"))?;
    let incremental = repo.manifest("web01", "b2", "vda")?;
    for (name, i) in [("compressed", 0), ("stored", 1), ("patched", 1), ("last", 15)] {
        let m = if name == "patched" { &incremental } else { &parent };
        let hash = m.chunks[i].context("a zero chunk")?;
        seeds.copy("repo_chunk", name, &store.chunk_path(&hash))?;
    }

    // Encrypted under the fuzz key: manifests at web01/b3/vda, chunks as name + file, a key file.
    let mut repo = repo;
    repo.set_key("web01", Some(std::sync::Arc::new(livesnap_repo::fuzzing::fuzz_key())));
    let mut w = repo.begin_backup(spec("b3", Consistency::Application))?;
    w.full("vda", &FileSource::open(&src)?)?;
    w.commit()?;
    seeds.copy("repo_manifest", "sealed", &store.manifest_path("web01", "b3", "vda"))?;
    let sealed = repo.manifest("web01", "b3", "vda")?;
    for (name, i) in [("sealed-compressed", 0), ("sealed-stored", 1), ("sealed-last", 15)] {
        let hash = sealed.chunks[i].context("a zero chunk")?;
        let file = std::fs::read(store.chunk_path(&hash))?;
        seeds.put("repo_sealed_chunk", name, &[&hash.0[..], &file].concat())?;
    }
    seeds.put("key_file", "key", &livesnap_repo::fuzzing::fuzz_key_file()?)?;
    Ok(())
}

/// Small disk images for `files_volume`: ext4 made by `mkfs.ext4 -d` (1 KiB blocks) from a
/// little tree, on a bare disk (with and without a journal), in a GPT partition and in an MBR
/// partition (`sfdisk`); each followed by the target's partition byte.
fn files(seeds: &Seeds, tmp: &Path) -> Result<()> {
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("etc/sub"))?;
    std::fs::write(src.join("etc/hostname"), b"web01\n")?;
    std::fs::write(src.join("etc/sub/data"), vec![0x5a; 5000])?;
    std::os::unix::fs::symlink("/etc", src.join("evil"))?;
    std::os::unix::fs::symlink("../../../x", src.join("etc/sub/up"))?;
    let f = std::fs::File::create(src.join("sparse"))?;
    f.set_len(100_000)?;
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", 99_997)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(Command::new("mkfifo").arg(src.join("fifo")))?;
    // (name, partition table, disk KiB, ext4 offset in sectors, ext4 KiB, journal, selector)
    let cases: [(&str, &str, u64, u64, u64, bool, u8); 4] = [
        ("bare", "", 256, 0, 256, false, 0),
        ("bare-journal", "", 2048, 0, 2048, true, 0),
        ("gpt", "gpt", 512, 40, 256, false, 2),
        ("mbr", "dos", 320, 8, 256, false, 1),
    ];
    for (name, table, disk_kib, start, fs_kib, journal, sel) in cases {
        let img = tmp.join(name);
        std::fs::File::create(&img)?.set_len(disk_kib << 10)?;
        if !table.is_empty() {
            // Partition 1: a small one in front (gpt), the ext4 in the last.
            let script = match table {
                "gpt" => format!("label: gpt\nstart=34, size=6, type=L\nstart={start}, size={}, type=L\n", fs_kib * 2),
                _ => format!("label: dos\nstart={start}, size={}, type=83\n", fs_kib * 2),
            };
            let mut c = Command::new("sfdisk")
                .args(["-q", "--no-reread", "--no-tell-kernel"])
                .arg(&img)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .context("running sfdisk")?;
            std::io::Write::write_all(&mut c.stdin.take().context("sfdisk's stdin")?, script.as_bytes())?;
            if !c.wait()?.success() {
                bail!("sfdisk {name} failed");
            }
        }
        let features = if journal { "^resize_inode" } else { "^has_journal,^resize_inode" };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024", "-N", "32", "-O", features, "-E"])
            .arg(format!("offset={}", start * 512))
            .arg("-d")
            .arg(&src)
            .arg(&img)
            .arg(format!("{fs_kib}k")))?;
        let mut bytes = std::fs::read(&img)?;
        bytes.push(sel);
        seeds.put("files_volume", name, &bytes)?;
    }
    Ok(())
}

/// The first 4 KiB of qcow2 images as `qemu-img create` makes them.
fn qcow2(seeds: &Seeds, tmp: &Path) -> Result<()> {
    let base = tmp.join("base.qcow2");
    let cases: [(&str, &[&str]); 6] = [
        ("v3-64M", &["-f", "qcow2"]),
        ("v2-64M", &["-f", "qcow2", "-o", "compat=0.10"]),
        ("v3-512-clusters", &["-f", "qcow2", "-o", "cluster_size=512"]),
        ("v3-2M-clusters", &["-f", "qcow2", "-o", "cluster_size=2M"]),
        ("v3-lazy-refcounts", &["-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=64"]),
        ("v3-backing", &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]),
    ];
    let run = |args: &[&str], path: &Path, size: Option<&str>| -> Result<()> {
        let mut cmd = Command::new("qemu-img");
        cmd.arg("create").arg("-q").args(args).arg(path).args(size);
        let st = cmd.current_dir(tmp).status().context("running qemu-img")?;
        if !st.success() {
            bail!("qemu-img create {args:?} failed");
        }
        Ok(())
    };
    run(&["-f", "qcow2"], &base, Some("64M"))?;
    for (name, args) in cases {
        let path = tmp.join(format!("{name}.qcow2"));
        run(args, &path, if name == "v3-backing" { None } else { Some("64M") })?;
        let bytes = std::fs::read(&path)?;
        seeds.put("qcow2_header", name, &bytes[..bytes.len().min(4096)])?;
    }
    // Small whole images with data for the in-place reader: standard, compressed (deflate,
    // zstd), zero and discarded clusters.
    let bases: [(&str, &str, bool); 4] = [
        ("v3-4k", "cluster_size=4096", false),
        ("v2-512", "compat=0.10,cluster_size=512", false),
        ("deflate-4k", "cluster_size=4096", true),
        ("zstd-4k", "cluster_size=4096,compression_type=zstd", true),
    ];
    for (name, opts, compressed) in bases {
        let path = tmp.join(format!("base-{name}.qcow2"));
        run(&["-f", "qcow2", "-o", opts], &path, Some("256K"))?;
        let io = |path: &Path, cmds: &[&str]| -> Result<()> {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "qcow2"]);
            for c in cmds {
                cmd.args(["-c", c]);
            }
            if !cmd.arg(path).status().context("running qemu-io")?.success() {
                bail!("qemu-io {cmds:?} failed");
            }
            Ok(())
        };
        io(&path, &["write -P 0x11 0 12k", "write -P 0x22 40k 20k", "write -z 64k 8k", "discard 44k 4k"])?;
        let path = if compressed {
            let c = tmp.join(format!("c-{name}.qcow2"));
            let st = Command::new("qemu-img")
                .args(["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", opts])
                .arg(&path)
                .arg(&c)
                .status()
                .context("running qemu-img")?;
            if !st.success() {
                bail!("qemu-img convert -c {opts} failed");
            }
            io(&c, &["write -P 0x33 4k 1k"])?;
            c
        } else {
            path
        };
        seeds.put("qcow2_base", name, &std::fs::read(&path)?)?;
    }
    Ok(())
}

fn hook(name: &str, phase: Phase, outcome: Outcome, output: &str) -> pb::HookResult {
    livesnap_agent::fuzzing::hook_reply(&HookResult {
        name: name.into(),
        phase,
        outcome,
        exit_code: Some(if outcome == Outcome::Ok { 0 } else { 3 }),
        output: output.into(),
        output_truncated: false,
        duration: Duration::from_millis(12),
    })
}

fn fs(mount_point: &str, outcome: pb::FsOutcome) -> pb::Filesystem {
    pb::Filesystem {
        mount_point: mount_point.into(),
        fs_type: "ext4".into(),
        source: "/dev/vda1".into(),
        outcome: outcome.into(),
        error: String::new(),
    }
}

/// The agent's replies, each behind the byte that tells the target which message it is.
fn agent(seeds: &Seeds) -> Result<()> {
    let tagged = |tag: u8, msg: &dyn Fn() -> Vec<u8>| [&[tag][..], &msg()].concat();
    let ping = pb::PingReply {
        version: "0.1.0".into(),
        capabilities: livesnap_agent::service::CAPABILITIES.iter().map(|c| (*c).to_string()).collect(),
        max_deadline_ms: 600_000,
    };
    seeds.put("agent_reply", "ping", &tagged(0, &|| ping.encode_to_vec()))?;
    let frozen = pb::FreezeReply {
        frozen: true,
        error: String::new(),
        filesystems: vec![fs("/", pb::FsOutcome::FsFrozen), fs("/data", pb::FsOutcome::FsFrozenByOther)],
        hooks: vec![hook("10-postgresql", Phase::Freeze, Outcome::Ok, "checkpoint done\n")],
        deadline_unix_ms: 1_700_000_010_000,
    };
    seeds.put("agent_reply", "freeze", &tagged(1, &|| frozen.encode_to_vec()))?;
    let aborted = pb::FreezeReply {
        frozen: false,
        error: "Hook 20-app (freeze) exited with code 3: db busy".into(),
        filesystems: vec![],
        hooks: vec![
            hook("10-ok", Phase::Freeze, Outcome::Ok, ""),
            hook("20-app", Phase::Freeze, Outcome::Failed, "db busy\n"),
            hook("20-app", Phase::FreezeFail, Outcome::Ok, ""),
        ],
        deadline_unix_ms: 0,
    };
    seeds.put("agent_reply", "freeze-aborted", &tagged(1, &|| aborted.encode_to_vec()))?;
    let thaw = pb::ThawReply {
        was_frozen: true,
        filesystems: vec![fs("/data", pb::FsOutcome::FsThawed), fs("/", pb::FsOutcome::FsThawed)],
        hooks: vec![hook("10-postgresql", Phase::Thaw, Outcome::TimedOut, "")],
        error: String::new(),
    };
    seeds.put("agent_reply", "thaw", &tagged(2, &|| thaw.encode_to_vec()))?;
    let status = pb::StatusReply {
        frozen: true,
        frozen_since_unix_ms: 1_700_000_000_000,
        deadline_unix_ms: 1_700_000_010_000,
        remaining_ms: 9_000,
        snapshot_id: "web01-17".into(),
        last_thaw_reason: "lease".into(),
    };
    seeds.put("agent_reply", "status", &tagged(3, &|| status.encode_to_vec()))?;

    seeds.put("vsock_handshake", "ok", b"OK 1073741824\n\0\0\0\x04PRI * HTTP/2.0")?;
    seeds.put("vsock_handshake", "refused", b"ERR no listener on port 7735\n")?;
    seeds.put("vsock_handshake", "address", b"/run/livesnap/web01/vsock.sock:7735")?;

    let state = LeaseState {
        snapshot_id: "web01-17".into(),
        deadline_unix_ms: 1_700_000_010_000,
        frozen: vec!["/".into(), "/mnt/data copy".into()],
        hooks: vec!["/etc/livesnap/hooks.d/10-postgresql".into()],
    };
    seeds.put("agent_state", "frozen", state.encode().as_bytes())?;
    seeds.copy("mountinfo", "host", Path::new("/proc/self/mountinfo"))?;
    Ok(())
}

/// livesnapd's config: the example of control/README.md, and a minimal one with every agent kind.
fn config(seeds: &Seeds, repo_root: &Path) -> Result<()> {
    let readme = std::fs::read_to_string(repo_root.join("control/README.md"))?;
    let start = readme.find("```toml\n").context("no TOML block in control/README.md")? + 8;
    let len = readme[start..].find("```").context("unterminated TOML block")?;
    seeds.put("daemon_config", "readme", &readme.as_bytes()[start..start + len])?;
    seeds.put(
        "daemon_config",
        "every-agent",
        b"repository = \"/r\"\nsocket = \"/s.sock\"\nstate = \"/var/lib/l/state.redb\"\n\
          [defaults]\nfreeze_timeout_ms = 5000\nread_bytes_per_sec = 1048576\n\
          [[vm]]\nname = \"a\"\ncontrol = \"/a.sock\"\nagent = { vsock = \"/v.sock:7735\" }\n\
          [[vm]]\nname = \"b\"\ncontrol = \"/b.sock\"\nagent = { cid = 5, port = 1 }\n\
          [[vm]]\nname = \"c\"\ncontrol = \"/c.sock\"\nagent = { unix = \"/run/agent.sock\" }\n",
    )
}

/// Live-restore maps as livesnapd creates them: small disks, a few chunks and blocks marked.
fn restore_maps(seeds: &Seeds, dir: &Path) -> Result<()> {
    use livesnap_blk::restore::{self, map::Map};
    let id = restore::Identity { vm: "web01".into(), backup_id: "20261207T120000Z".into(), disk: "vda".into() };
    for (name, size, chunk, marks) in [
        ("fresh", 64u64 << 20, 4u64 << 20, 0u64),
        ("half", 40 << 20, 4 << 20, 5),
        ("odd-size", (9 << 20) + 512, 1 << 20, 9),
    ] {
        let image = dir.join(format!("{name}.raw"));
        restore::create_map(&image, &id, size, chunk)?;
        let path = restore::map_path(&image);
        if marks > 0 {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let mut map = Map::open(std::sync::Arc::new(file))?;
            for i in 0..marks {
                map.chunks.set(i);
                map.blocks.set(i * 7);
            }
            map.persist()?;
        }
        seeds.copy("restore_map", name, &path)?;
    }
    Ok(())
}

fn run() -> Result<()> {
    let out = std::env::args().nth(1).context("usage: fuzz_seeds CORPUS_DIR")?;
    let seeds = Seeds { root: PathBuf::from(out) };
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no repository root")?;
    let tmp = tempfile::tempdir()?;
    for (what, dir) in [("engine", "engine"), ("repository", "repo"), ("qcow2", "qcow2"), ("files", "files")] {
        let sub = tmp.path().join(dir);
        std::fs::create_dir_all(&sub)?;
        match what {
            "engine" => engine(&seeds, &sub),
            "repository" => repository(&seeds, &sub),
            "files" => files(&seeds, &sub),
            _ => qcow2(&seeds, &sub),
        }
        .with_context(|| format!("making the {what} seeds"))?;
    }
    agent(&seeds)?;
    config(&seeds, repo_root)?;
    restore_maps(&seeds, tmp.path())?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fuzz_seeds: {e:#}");
            ExitCode::FAILURE
        }
    }
}
