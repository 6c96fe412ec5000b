//! Running the agent: recover, listen, serve, thaw on shutdown.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::agent::{Agent, Config};
use crate::args::Args;
use crate::freeze::Freezer;
use crate::hooks::Hooks;
use crate::service::Service;

impl From<&Args> for Config {
    fn from(a: &Args) -> Self {
        Config {
            hooks: Hooks { dir: a.hooks_dir.clone(), timeout: a.hook_timeout, max_output: a.hook_output_limit },
            max_deadline: a.max_deadline,
            state_file: a.state_file.clone(),
        }
    }
}

/// Binds a unix socket at `path` (replacing a stale one).
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("Cannot listen on {}", path.display()))
}

/// Serves `agent` on `listener` until `shutdown` resolves.
pub async fn serve_unix<F: Freezer>(
    agent: Agent<F>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(Service::new(agent).into_server(), UnixListenerStream::new(listener), shutdown)
        .await
        .context("The gRPC server failed")
}

/// The daemon: thaw what a previous run left frozen, serve until SIGTERM/SIGINT, thaw.
pub async fn run<F: Freezer>(args: Args, freezer: F) -> Result<()> {
    let agent = Agent::new(freezer, Config::from(&args));
    if let Some(r) = agent.recover().await? {
        tracing::warn!(filesystems = r.filesystems.len(), error = ?r.error, "recovered: thawed the previous run's freeze");
    }
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %livesnap_proto::error::chain(&e), "cannot watch SIGTERM");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    match &args.unix {
        Some(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(socket = %path.display(), "listening");
            serve_unix(agent.clone(), listener, shutdown).await?;
        }
        None => {
            let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, args.vsock_port)).with_context(|| {
                format!("Cannot listen on vsock port {} (is the vsock transport loaded?)", args.vsock_port)
            })?;
            tracing::info!(port = args.vsock_port, "listening on vsock");
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(Service::new(agent.clone()).into_server(), listener.incoming(), shutdown)
                .await
                .context("The gRPC server failed")?;
        }
    }
    let r = agent.shutdown().await?;
    if r.was_frozen {
        tracing::warn!("thawed at shutdown");
    }
    Ok(())
}
