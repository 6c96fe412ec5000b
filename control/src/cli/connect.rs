//! Reaching livesnapd: its unix socket (local, no token) or its TCP endpoint (TLS, a bearer
//! token), with a bound on the time to connect.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_proto::daemon::livesnapd_client::LivesnapdClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::args::{DaemonOpts, DEFAULT_SOCKET, SOCKET_ENV};
use super::error::{innermost, Error};

/// Time allowed to connect (and, over TCP, for the TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds the bearer token, if any, to every request.
#[derive(Debug, Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

pub type Client = LivesnapdClient<InterceptedService<Channel, Auth>>;

/// A connected livesnapd.
#[derive(Debug)]
pub struct Daemon {
    pub client: Client,
    /// Where it is, as messages name it.
    pub target: String,
}

impl Daemon {
    /// `status` from a call made while doing `action`, as an [`Error`].
    pub fn error(&self, action: impl Into<String>, status: &tonic::Status) -> Error {
        Error::from_status(action, &self.target, status)
    }
}

/// The unix socket `--socket`, else `LIVESNAP_SOCKET`, else the default names.
pub fn socket_path(opts: &DaemonOpts) -> PathBuf {
    if let Some(p) = &opts.socket {
        return p.clone();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

pub async fn connect(opts: &DaemonOpts) -> Result<Daemon, Error> {
    match &opts.addr {
        Some(addr) => connect_tcp(addr, opts.token_file.as_deref(), opts.ca_cert.as_deref()).await,
        None => connect_unix(socket_path(opts)).await,
    }
}

async fn connect_unix(path: PathBuf) -> Result<Daemon, Error> {
    let target = path.display().to_string();
    let endpoint = Endpoint::from_static("http://x.invalid");
    let channel =
        match tokio::time::timeout(CONNECT_TIMEOUT, livesnap_proto::unix_channel(endpoint, path.clone())).await {
            Err(_) => {
                return Err(Error::Unreachable {
                    target,
                    reason: format!("no answer within {} s (is livesnapd stuck?)", CONNECT_TIMEOUT.as_secs()),
                })
            }
            Ok(Err(e)) => return Err(unix_error(&path, &e)),
            Ok(Ok(c)) => c,
        };
    Ok(Daemon { client: LivesnapdClient::with_interceptor(channel, Auth(None)), target })
}

/// A failed connect to the unix socket, said so that a person knows what to do.
fn unix_error(path: &Path, e: &tonic::transport::Error) -> Error {
    let target = path.display().to_string();
    let io = find_io(e);
    match io.map(io::Error::kind) {
        Some(io::ErrorKind::NotFound) => Error::NotRunning { path: target, why: "no socket there" },
        Some(io::ErrorKind::ConnectionRefused) => {
            let why = match std::fs::metadata(path) {
                Ok(m) if !m.file_type().is_socket() => "that path is not a socket",
                _ => "nothing listens on the socket",
            };
            Error::NotRunning { path: target, why }
        }
        Some(io::ErrorKind::PermissionDenied) => Error::Unreachable {
            target,
            reason: "permission denied (the socket is root's: run snapctl as root)".into(),
        },
        _ => Error::Unreachable { target, reason: io.map_or_else(|| innermost(e), |io| io.to_string()) },
    }
}

fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

async fn connect_tcp(addr: &str, token_file: Option<&Path>, ca_cert: Option<&Path>) -> Result<Daemon, Error> {
    let target = addr.to_owned();
    let uri: tonic::transport::Uri =
        addr.parse().map_err(|_| Error::Usage(format!("--addr {addr:?} is not a URL; give https://HOST:PORT")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(Error::Usage(format!(
            "--addr {addr:?}: livesnapd's TCP endpoint speaks TLS only; give https://HOST:PORT"
        )));
    }
    let token = match token_file {
        None => None,
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|source| Error::ReadFile {
                what: "token file",
                path: f.to_owned(),
                source,
            })?;
            let token = text.lines().next().unwrap_or("").trim();
            if token.is_empty() {
                return Err(Error::Usage(format!("The token file {} is empty", f.display())));
            }
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                Error::Usage(format!("The token in {} has characters a header cannot carry", f.display()))
            })?;
            Some(value)
        }
    };
    let mut tls = ClientTlsConfig::new();
    match ca_cert {
        Some(f) => {
            let pem = std::fs::read(f).map_err(|source| Error::ReadFile {
                what: "CA certificate",
                path: f.to_owned(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        None => tls = tls.with_native_roots(),
    }
    let endpoint = Endpoint::from(uri)
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| Error::Usage(format!("Cannot use the TLS settings: {}", innermost(&e))))?;
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect()).await {
        Err(_) => {
            return Err(Error::Unreachable {
                target,
                reason: format!("no answer within {} s", (CONNECT_TIMEOUT * 2).as_secs()),
            })
        }
        Ok(Err(e)) => return Err(Error::Unreachable { target, reason: innermost(&e) }),
        Ok(Ok(c)) => c,
    };
    Ok(Daemon { client: LivesnapdClient::with_interceptor(channel, Auth(token)), target })
}
