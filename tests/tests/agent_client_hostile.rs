//! The host's agent client against hostile agents: garbage bytes, silence, huge or invalid
//! replies, a broken hybrid vsock handshake. Each must end in an error, quickly: never a hang,
//! never a panic of the host.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use livesnap_control::agent::{AgentClient, Error, Limits, Target};
use livesnap_control::vsock::HybridAddr;
use livesnap_proto::agent as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

/// Short limits, so that a hang shows as a failed test, not a stuck CI.
fn limits() -> Limits {
    Limits { connect_timeout: Duration::from_secs(2), call_timeout: Duration::from_secs(2), ..Limits::default() }
}

/// Every call against a hostile agent must end within this.
const BOUND: Duration = Duration::from_secs(15);

fn socket() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("agent.sock");
    (d, p)
}

/// A raw server: `each` handles every accepted connection.
fn raw_server<F, Fut>(path: &PathBuf, each: F)
where
    F: Fn(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(each(s));
        }
    });
}

/// Connects and pings; the error, which there must be.
async fn ping_error(target: Target) -> Error {
    let start = Instant::now();
    let r = tokio::time::timeout(BOUND, async {
        let c = AgentClient::connect(target, limits()).await?;
        c.ping().await
    })
    .await
    .expect("the client hung");
    assert!(start.elapsed() < BOUND);
    r.expect_err("a hostile agent's reply was accepted")
}

#[tokio::test]
async fn garbage_instead_of_http2_is_an_error() {
    let (_d, p) = socket();
    raw_server(&p, |mut s| async move {
        let _ = s.write_all(&[0xffu8; 65536]).await;
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    ping_error(Target::Unix(p)).await;
}

#[tokio::test]
async fn a_silent_agent_times_out() {
    let (_d, p) = socket();
    raw_server(&p, |mut s| async move {
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let e = ping_error(Target::Unix(p)).await;
    assert!(matches!(e, Error::Timeout(_) | Error::Connect(_) | Error::Rpc(_)), "{e:?}");
}

#[tokio::test]
async fn a_broken_hybrid_vsock_handshake_is_an_error() {
    let (_d, p) = socket();
    raw_server(&p, |mut s| async move {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"OK OK OK OK OK OK OK OK OK OK OK OK OK OK OK OK OK OK").await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    ping_error(Target::HybridVsock(HybridAddr { path: p, port: 7735 })).await;
}

#[tokio::test]
async fn a_hybrid_vsock_socket_that_never_answers_times_out() {
    let (_d, p) = socket();
    raw_server(&p, |s| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    });
    assert!(matches!(ping_error(Target::HybridVsock(HybridAddr { path: p, port: 1 })).await, Error::Timeout(_)));
}

/// What the hostile gRPC agent answers.
#[derive(Clone, Copy, Debug)]
enum Mode {
    HugeOutput,
    UnknownEnum,
    TooManyFilesystems,
    LongString,
    Silent,
    AbortWithoutReason,
}

#[derive(Debug)]
struct Hostile(Mode);

fn hook(output: String, outcome: i32) -> pb::HookResult {
    pb::HookResult {
        name: "h".into(),
        phase: "freeze".into(),
        outcome,
        exit_code: 0,
        output,
        output_truncated: false,
        duration_ms: 1,
    }
}

fn fs(mount_point: String, outcome: i32) -> pb::Filesystem {
    pb::Filesystem { mount_point, fs_type: "ext4".into(), source: "/dev/vda".into(), outcome, error: String::new() }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Hostile {
    async fn ping(&self, _: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        if let Mode::Silent = self.0 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let version = match self.0 {
            Mode::LongString => "v".repeat(100_000),
            _ => "0.1.0".into(),
        };
        Ok(Response::new(pb::PingReply { version, capabilities: vec![], max_deadline_ms: 1 }))
    }

    async fn freeze(&self, _: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeReply>, Status> {
        let ok = pb::HookOutcome::HookOk as i32;
        let frozen = pb::FsOutcome::FsFrozen as i32;
        let mut r = pb::FreezeReply { frozen: true, ..Default::default() };
        match self.0 {
            Mode::HugeOutput => r.hooks.push(hook("x".repeat(8 << 20), ok)),
            Mode::UnknownEnum => r.filesystems.push(fs("/".into(), 77)),
            Mode::TooManyFilesystems => r.filesystems = (0..5000).map(|i| fs(format!("/m{i}"), frozen)).collect(),
            Mode::LongString => r.hooks.push(hook("x".repeat(100_000), ok)),
            Mode::Silent => tokio::time::sleep(Duration::from_secs(3600)).await,
            Mode::AbortWithoutReason => r.frozen = false,
        }
        Ok(Response::new(r))
    }

    async fn thaw(&self, _: Request<pb::ThawRequest>) -> Result<Response<pb::ThawReply>, Status> {
        Ok(Response::new(pb::ThawReply {
            was_frozen: true,
            hooks: vec![hook(String::new(), 99)],
            ..Default::default()
        }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        if let Mode::Silent = self.0 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(Response::new(pb::StatusReply { snapshot_id: "s".repeat(1 << 16), ..Default::default() }))
    }
}

async fn hostile(mode: Mode) -> (tempfile::TempDir, AgentClient) {
    let (d, p) = socket();
    let l = UnixListener::bind(&p).unwrap();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        pb::agent_server::AgentServer::new(Hostile(mode)).max_encoding_message_size(usize::MAX),
        tokio_stream::wrappers::UnixListenerStream::new(l),
    ));
    let c = AgentClient::connect(Target::Unix(p), limits()).await.unwrap();
    (d, c)
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.expect("the client hung")
}

#[tokio::test]
async fn a_reply_larger_than_the_limit_is_refused() {
    let (_d, c) = hostile(Mode::HugeOutput).await;
    let e = bounded(c.freeze(Duration::from_secs(1), "s")).await.unwrap_err();
    assert!(
        matches!(&e, Error::Rpc(st) if st.code() == tonic::Code::OutOfRange || st.message().contains("message length")),
        "{e:?}"
    );
}

#[tokio::test]
async fn unknown_enum_values_are_refused() {
    let (_d, c) = hostile(Mode::UnknownEnum).await;
    assert!(matches!(bounded(c.freeze(Duration::from_secs(1), "s")).await, Err(Error::InvalidReply(_))));
    assert!(matches!(bounded(c.thaw()).await, Err(Error::InvalidReply(_))));
}

#[tokio::test]
async fn too_many_entries_or_too_long_strings_are_refused() {
    let (_d, c) = hostile(Mode::TooManyFilesystems).await;
    assert!(matches!(bounded(c.freeze(Duration::from_secs(1), "s")).await, Err(Error::InvalidReply(_))));
    let (_d, c) = hostile(Mode::LongString).await;
    assert!(matches!(bounded(c.freeze(Duration::from_secs(1), "s")).await, Err(Error::InvalidReply(_))));
    assert!(matches!(bounded(c.ping()).await, Err(Error::InvalidReply(_))));
    assert!(matches!(bounded(c.status()).await, Err(Error::InvalidReply(_))));
}

#[tokio::test]
async fn an_agent_that_never_answers_a_call_times_out() {
    let (_d, c) = hostile(Mode::Silent).await;
    assert!(matches!(bounded(c.status()).await, Err(Error::Timeout(_))));
    // A freeze may take its deadline, then the call timeout: not more.
    let start = Instant::now();
    assert!(matches!(bounded(c.freeze(Duration::from_secs(1), "s")).await, Err(Error::Timeout(_))));
    assert!(start.elapsed() < BOUND);
}

#[tokio::test]
async fn a_freeze_reply_that_is_not_frozen_is_an_abort_even_without_a_reason() {
    let (_d, c) = hostile(Mode::AbortWithoutReason).await;
    assert!(matches!(bounded(c.freeze(Duration::from_secs(1), "s")).await, Err(Error::FreezeAborted { .. })));
}
