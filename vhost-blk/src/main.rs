//! livesnap-blk: serves one VM's disks over vhost-user-blk until SIGTERM.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::info;

use livesnap_blk::args::Args;
use livesnap_blk::disk::{self, DiskFile};
use livesnap_blk::server::DiskServer;
use livesnap_blk::snap::{self, store::FsDir};
use livesnap_blk::virtio::BlkDevice;
use livesnap_blk::{confine, control, restore, sys};

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn run() -> Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "ctl") {
        return livesnap_blk::ctl::run(std::env::args_os().skip(1));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "recover") {
        return livesnap_blk::recover::run(std::env::args_os().skip(1));
    }
    let args = Args::load()?;
    for option in &args.overridden {
        info!(option, "the command line replaces the config file's value");
    }
    // Every thread spawned from here on inherits the mask; the main thread waits for them.
    sys::block_signals(&STOP_SIGNALS).context("Cannot block signals")?;
    let user = args.user.as_ref().map(confine::user::resolve).transpose().context("Cannot use --user")?;
    let hooks = confine::TestHooks::from_env();

    // Everything is opened and bound first, on this thread alone: no other thread may start
    // before the confinement, so that each one inherits it.
    let num_queues = args.num_queues();
    let mut opened = Vec::new();
    let mut restores = HashMap::new();
    for spec in &args.disks {
        let mut disk = disk::open_with(&spec.image, spec.format, spec.readonly, spec.cache)
            .with_context(|| format!("Disk {}", spec.id))?;
        // A live restore's map is opened here, before the confinement, like the image.
        let restoring = restore::disk::open(&spec.image, disk.clone(), restore::Options::default())
            .with_context(|| format!("Disk {}: cannot resume its live restore", spec.id))?;
        if let Some(r) = restoring {
            anyhow::ensure!(!spec.readonly, "Disk {} is being live-restored and cannot be read-only", spec.id);
            let r = Arc::new(r);
            let st = r.status();
            info!(disk = %spec.id, map = %st.map_path.display(), chunks = st.info.chunks_total,
                  done = st.info.chunks_done, "disk is being live-restored");
            restores.insert(spec.id.clone(), r.clone());
            disk = r;
        }
        info!(vm = %args.vm, disk = %spec.id, image = %spec.image.display(), format = %disk.format(),
              size = disk.size(), readonly = spec.readonly, cache = %spec.cache, "serving disk");
        opened.push(snap::DiskSpec { id: spec.id.clone(), base: disk, base_path: spec.image.clone() });
    }
    let (engine, disks): (_, Vec<Arc<dyn DiskFile>>) = match &args.state_dir {
        Some(dir) => {
            let store = FsDir::new(dir).with_context(|| format!("Cannot use state directory {}", dir.display()))?;
            let opts = snap::Options { delta_limit: args.delta_limit, ..snap::Options::default() };
            let vm = snap::Vm::open_deferred(&args.vm, Arc::new(store), opened, opts)
                .context("Cannot recover snapshot state")?;
            let disks = args.disks.iter().filter_map(|d| vm.disk(&d.id)).collect();
            (Some(vm), disks)
        }
        None => (None, opened.into_iter().map(|d| d.base).collect()),
    };

    let mut servers = Vec::new();
    for (spec, disk) in args.disks.iter().zip(disks) {
        let dev = Arc::new(BlkDevice::new(disk, spec.id.clone(), spec.readonly));
        servers.push(
            DiskServer::bind(spec.id.clone(), dev, &spec.socket, num_queues)
                .with_context(|| format!("Disk {}", spec.id))?,
        );
    }
    let restores: control::Restores = Arc::new(restores);
    if let Some(id) = restores.keys().next().filter(|_| args.control.is_none()) {
        anyhow::bail!("Disk {id} is being live-restored: it is fed through --control (which needs --state-dir)");
    }
    let control = match (&args.control, &engine) {
        (Some(path), Some(vm)) => Some(
            control::Bound::bind(path, Arc::new(vm.clone()))
                .with_context(|| format!("Cannot serve control socket {}", path.display()))?
                .with_restores(restores.clone()),
        ),
        _ => None,
    };

    // SAFETY: getuid(2) takes no arguments and cannot fail.
    let uid = user.as_ref().map_or_else(|| unsafe { libc::getuid() }, |c| c.uid);
    let plan = confine::Plan { sandbox: args.sandbox, user, files: confined_files(&args) };
    plan.apply().context("Cannot confine livesnap-blk")?;
    hooks.run();

    let stoppers: Vec<_> = servers.iter().map(|s| (s.stopper(), s.socket().to_owned())).collect();
    let devices: Vec<_> = args.disks.iter().map(|d| d.id.clone()).collect();
    for server in servers {
        std::thread::Builder::new()
            .name("vhost-listener".into())
            .spawn(move || server.run())
            .context("Cannot start a listener thread")?;
    }
    let control = match control {
        Some(bound) => Some(bound.start().context("Cannot start the control service")?),
        None => None,
    };
    if let Some(vm) = &engine {
        vm.resume_merges();
    }
    info!(vm = %args.vm, disks = ?devices, queues = num_queues, snapshots = engine.is_some(),
          restoring = restores.len(), sandbox = args.sandbox, uid, "ready");

    let sig = sys::wait_signal(&STOP_SIGNALS).context("Cannot wait for signals")?;
    info!(signal = sig, "stopping: finishing in-flight requests");
    for (stopper, socket) in &stoppers {
        stopper.stop();
        // Confined, the process may remove nothing outside its state directory: the socket
        // then stays, and the next start replaces it.
        let _ = std::fs::remove_file(socket);
    }
    if let Some(c) = control {
        c.stop();
    }
    if let Some(vm) = &engine {
        vm.shutdown();
    }
    info!("stopped; all disks flushed");
    Ok(())
}

/// What the confined process may still open: its state directory and its images.
fn confined_files(args: &Args) -> confine::Files {
    confine::Files {
        state_dir: args.state_dir.clone(),
        images: args.disks.iter().map(|d| (d.image.clone(), !d.readonly)).collect(),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livesnap-blk: {}", livesnap_proto::error::chain(&*e));
            ExitCode::FAILURE
        }
    }
}
