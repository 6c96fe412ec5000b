//! The tonic side: a thin adapter from the generated `Livesnapd` service to [`Daemon`], the
//! local unix socket (mode 0600, no token) and the TCP listener (TLS, bearer token checked on
//! every call by an interceptor).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use livesnap_proto::daemon as pb;
use livesnap_proto::daemon::livesnapd_server::{Livesnapd, LivesnapdServer};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::info;

use super::config::read_token;
use super::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen on the unix socket `{}`", path.display())]
    Unix {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read the TLS {what} `{}`", path.display())]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] super::config::Error),
    #[error("The gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("A server task failed: {0}")]
    Task(String),
}

/// The adapter: each call goes to the daemon, each error through `From<daemon::Error>`.
#[derive(Clone, Debug)]
pub struct Service(pub Arc<Daemon>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Livesnapd for Service {
    async fn list_vms(&self, _r: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsReply>, Status> {
        Ok(Response::new(self.0.list_vms().await?))
    }

    type CreateSnapshotStream = BoxStream<pb::SnapshotEvent>;

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<Self::CreateSnapshotStream>, Status> {
        let (_, rx) = self.0.create_snapshot(r.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }

    async fn list_backups(&self, r: Request<pb::ListBackupsRequest>) -> Result<Response<pb::ListBackupsReply>, Status> {
        Ok(Response::new(self.0.list_backups(r.into_inner().vm).await?))
    }

    async fn get_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::Backup>, Status> {
        Ok(Response::new(self.0.get_backup(r.into_inner()).await?))
    }

    async fn verify_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::VerifyReply>, Status> {
        Ok(Response::new(self.0.verify_backup(r.into_inner()).await?))
    }

    async fn delete_backup(&self, r: Request<pb::BackupRef>) -> Result<Response<pb::DeleteBackupReply>, Status> {
        Ok(Response::new(self.0.delete_backup(r.into_inner()).await?))
    }

    type RestoreBackupStream = BoxStream<pb::RestoreProgress>;

    async fn restore_backup(
        &self,
        r: Request<pb::RestoreRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        let rx = self.0.restore(r.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|r| r.map_err(Status::from)))))
    }

    async fn prune(&self, r: Request<pb::PruneRequest>) -> Result<Response<pb::PruneReply>, Status> {
        Ok(Response::new(self.0.prune(r.into_inner()).await?))
    }
}

/// Checks `authorization: Bearer <token>` on every TCP call.
#[derive(Clone)]
pub struct TokenCheck(Arc<str>);

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(..)")
    }
}

impl TokenCheck {
    pub fn new(token: String) -> TokenCheck {
        TokenCheck(token.into())
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if same(t.trim().as_bytes(), self.0.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the bearer token is wrong")),
            None => Err(Status::unauthenticated("a bearer token is required (authorization: Bearer <token>)")),
        }
    }
}

/// Binds the unix socket with mode 0600 (a stale socket file is replaced).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let err = |source| Error::Unix { path: path.to_owned(), source };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    // SAFETY: umask only changes the process's file mode mask; no memory is involved. The
    // mask makes the socket 0600 from its creation, before anyone can connect.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

/// Serves until `shutdown` resolves: the unix socket, and TCP if configured.
pub async fn serve(
    daemon: Arc<Daemon>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let cfg = daemon.config().clone();
    let unix = bind_unix(&cfg.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let svc = Service(daemon);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let svc = svc.clone();
        let rx = stop_rx.clone();
        info!(socket = %cfg.socket.display(), "serving on the unix socket");
        tasks.spawn(async move {
            Server::builder()
                .add_service(LivesnapdServer::new(svc))
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(rx))
                .await
        });
    }
    if let Some(tcp) = &cfg.tcp {
        let read =
            |what, p: &Path| std::fs::read(p).map_err(|source| Error::TlsFile { what, path: p.to_owned(), source });
        let identity = Identity::from_pem(read("certificate", &tcp.cert)?, read("key", &tcp.key)?);
        let token = read_token(&tcp.token_file)?;
        let mut server =
            Server::builder().tls_config(ServerTlsConfig::new().identity(identity)).map_err(Error::Serve)?;
        let addr = tcp.listen;
        let rx = stop_rx.clone();
        info!(%addr, "serving on TCP (TLS, bearer token)");
        tasks.spawn(async move {
            server
                .add_service(LivesnapdServer::with_interceptor(svc, TokenCheck::new(token)))
                .serve_with_shutdown(addr, stopped(rx))
                .await
        });
    }
    let mut shutdown = Box::pin(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Serve(e)),
            Err(e) => Err(Error::Task(e.to_string())),
        },
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&cfg.socket);
    result
}
