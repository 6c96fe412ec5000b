//! Reaching a guest's vsock port: through the host-side unix socket of vhost-device-vsock,
//! Cloud Hypervisor or Firecracker (hybrid vsock, [`connect`]), or over AF_VSOCK by the
//! guest's context id where the host runs the vhost-vsock transport ([`connect_cid`]).
//!
//! Hybrid protocol: connect to the unix socket, send `CONNECT <port>\n`, read
//! `OK <host-port>\n`; the socket is then the stream to the guest's port.

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

/// The longest handshake reply line accepted (`OK 4294967295` is 13 bytes).
const MAX_REPLY_LINE: usize = 32;

/// A guest port behind a hybrid vsock unix socket: `<path>:<port>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridAddr {
    pub path: PathBuf,
    pub port: u32,
}

impl FromStr for HybridAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected <unix-socket-path>:<port>"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        if path.is_empty() {
            return Err(format!("{s:?}: empty socket path"));
        }
        Ok(HybridAddr { path: PathBuf::from(path), port })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Hybrid vsock handshake failed")]
    Io(#[source] io::Error),
    #[error("Hybrid vsock handshake refused or malformed: {0:?}")]
    BadReply(String),
    #[error("Cannot connect to vsock cid {cid} port {port}")]
    Vsock {
        cid: u32,
        port: u32,
        #[source]
        source: io::Error,
    },
}

/// Connects to guest port `port` through the hybrid vsock socket at `path`. The caller bounds
/// the time.
pub async fn connect(path: &Path, port: u32) -> Result<UnixStream, Error> {
    let mut s =
        UnixStream::connect(path).await.map_err(|source| Error::Connect { path: path.to_path_buf(), source })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(Error::Io)?;
    read_reply(&mut s).await?;
    Ok(s)
}

/// Reads the handshake's reply line (`OK <host-port>\n`) and nothing after it; returns the
/// host port.
pub(crate) async fn read_reply(s: &mut (impl AsyncRead + Unpin)) -> Result<u32, Error> {
    // Byte by byte: what follows the newline is the guest's stream.
    let mut line = Vec::with_capacity(MAX_REPLY_LINE);
    loop {
        let b = s.read_u8().await.map_err(Error::Io)?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_REPLY_LINE {
            return Err(Error::BadReply(String::from_utf8_lossy(&line).into_owned()));
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    match text.strip_prefix("OK ").and_then(|n| n.trim().parse::<u32>().ok()) {
        Some(port) => Ok(port),
        None => Err(Error::BadReply(text)),
    }
}

/// Connects to port `port` of the guest with context id `cid` over AF_VSOCK. Fails at once
/// where the host has no vsock transport. The caller bounds the time.
pub async fn connect_cid(cid: u32, port: u32) -> Result<VsockStream, Error> {
    VsockStream::connect(VsockAddr::new(cid, port)).await.map_err(|source| Error::Vsock { cid, port, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn addresses_parse_with_colons_in_the_path() {
        assert_eq!("/run/vm:1/v.sock:7735".parse(), Ok(HybridAddr { path: "/run/vm:1/v.sock".into(), port: 7735 }));
        assert!("/run/v.sock".parse::<HybridAddr>().is_err());
        assert!("/run/v.sock:x".parse::<HybridAddr>().is_err());
        assert!(":5".parse::<HybridAddr>().is_err());
    }

    async fn handshake_with(reply: &'static [u8]) -> Result<Vec<u8>, Error> {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 11];
            s.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"CONNECT 42\n");
            s.write_all(reply).await.unwrap();
        });
        let r = connect(&path, 42).await;
        server.await.unwrap();
        let mut s = r?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        Ok(rest)
    }

    #[tokio::test]
    async fn handshake_leaves_the_stream_after_the_ok_line() {
        assert_eq!(handshake_with(b"OK 1073741824\nhello").await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn refused_or_endless_or_cut_handshakes_are_errors() {
        assert!(matches!(handshake_with(b"ERR no listener\n").await, Err(Error::BadReply(_))));
        assert!(matches!(handshake_with(b"OK abc\n").await, Err(Error::BadReply(_))));
        assert!(matches!(handshake_with(&[b'O'; 4096]).await, Err(Error::BadReply(_))));
        assert!(matches!(handshake_with(b"OK 1").await, Err(Error::Io(_))));
    }
}
