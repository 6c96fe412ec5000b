//! The metrics endpoint: HTTP/1.1 on TCP, `GET /metrics` and nothing else, served with the
//! hyper that tonic brings (no other server crate).
//!
//! Every client may be hostile or slow, and none may hold the daemon: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), a request's head must arrive within
//! [`HEADER_TIMEOUT`] and fit in [`MAX_HEAD`] bytes, and a connection lives at most
//! [`CONNECTION_LIFETIME`] (a client that does not read its answer is cut off there). The
//! work of a scrape runs on the daemon's runtime, bounded by the backends' probe timeouts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::daemon::Daemon;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest wait for a request's head (its request line and headers).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head read (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the endpoint's address (before the daemon serves anything: a taken port stops the
/// start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Bounds on the endpoint's clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    pub header_timeout: Duration,
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: MAX_CONNECTIONS, header_timeout: HEADER_TIMEOUT, lifetime: CONNECTION_LIFETIME }
    }
}

/// Serves `GET /metrics` on `listener` until the runtime stops, and counts the repository
/// every `repository_count` (see [`super::spawn_counter`]).
pub fn serve(daemon: Arc<Daemon>, listener: TcpListener, repository_count: Duration) {
    super::spawn_counter(daemon.clone(), repository_count);
    serve_with(daemon, listener, Limits::default());
}

/// Serves `GET /metrics` on `listener` within `limits` until the runtime stops.
pub(super) fn serve_with(daemon: Arc<Daemon>, listener: TcpListener, limits: Limits) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "serving metrics on GET /metrics");
    }
    let slots = Arc::new(Semaphore::new(limits.connections));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, mostly: wait a little rather than spin.
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(peer = %peer, "metrics: too many connections, closing");
                continue;
            };
            let d = daemon.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req| {
                    let d = d.clone();
                    async move { Ok::<_, Infallible>(answer(&d, &req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), svc);
                match tokio::time::timeout(limits.lifetime, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(peer = %peer, error = %e, "metrics: connection ended"),
                    Err(_) => debug!(peer = %peer, "metrics: connection cut at its lifetime"),
                }
            });
        }
    });
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// `GET /metrics` (or HEAD): the exposition; another method on it: 405; any other path: 404.
/// The request's body is never read.
async fn answer(daemon: &Daemon, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "Not found: livesnapd serves GET /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed: GET /metrics\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let body = daemon.metrics.scrape(daemon).await;
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE));
    r
}
