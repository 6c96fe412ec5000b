//! livesnap-blk: serves one VM's disks over vhost-user-blk until SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use tracing::info;

use livesnap_blk::args::Args;
use livesnap_blk::server::DiskServer;
use livesnap_blk::virtio::BlkDevice;
use livesnap_blk::{disk, sys};

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn run() -> Result<()> {
    let args = Args::parse();
    args.validate().map_err(|e| anyhow!(e))?;
    // Every thread spawned from here on inherits the mask; the main thread waits for them.
    sys::block_signals(&STOP_SIGNALS).context("cannot block signals")?;

    let num_queues = args.num_queues();
    let mut servers = Vec::new();
    for spec in &args.disks {
        let disk = disk::open(&spec.image, spec.format, spec.readonly)
            .with_context(|| format!("disk {}", spec.id))?;
        info!(vm = %args.vm, disk = %spec.id, image = %spec.image.display(), format = %disk.format(),
              size = disk.size(), readonly = spec.readonly, "serving disk");
        let dev = Arc::new(BlkDevice::new(disk, spec.id.clone(), spec.readonly));
        servers.push(DiskServer::bind(spec.id.clone(), dev, &spec.socket, num_queues)
            .with_context(|| format!("disk {}", spec.id))?);
    }

    let stoppers: Vec<_> = servers.iter().map(|s| (s.stopper(), s.socket().to_owned())).collect();
    let devices: Vec<_> = args.disks.iter().map(|d| d.id.clone()).collect();
    for server in servers {
        std::thread::Builder::new()
            .name("vhost-listener".into())
            .spawn(move || server.run())
            .context("cannot start a listener thread")?;
    }
    info!(vm = %args.vm, disks = ?devices, queues = num_queues, "ready");

    let sig = sys::wait_signal(&STOP_SIGNALS).context("cannot wait for signals")?;
    info!(signal = sig, "stopping: finishing in-flight requests");
    for (stopper, socket) in &stoppers {
        stopper.stop();
        let _ = std::fs::remove_file(socket);
    }
    info!("stopped; all disks flushed");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livesnap-blk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
