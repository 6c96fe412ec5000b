//! The guest agent's client.
//!
//! The agent runs in a tenant's VM: whatever it sends is hostile input. So:
//! - every call, the connection and its handshake included, has a timeout ([`Limits`]); a
//!   freeze call gets its deadline on top, as the agent may legitimately use it for hooks;
//! - messages are bounded (`max_decoding_message_size`, HTTP/2 header list size) and each
//!   reply is validated — counts, string lengths, known enum values — before the host uses it;
//! - garbage (not HTTP/2, bad protobuf, unknown enums) is an [`Error`], never a panic.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use livesnap_proto::agent as pb;
use livesnap_proto::agent::agent_client::AgentClient as PbClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::vsock;

/// Where an agent listens.
#[derive(Clone, Debug)]
pub enum Target {
    /// A guest vsock port behind a hybrid vsock unix socket.
    HybridVsock(vsock::HybridAddr),
    /// A guest vsock port reached over AF_VSOCK by the guest's context id (QEMU's
    /// vhost-vsock-pci, `guest-cid=`).
    Vsock { cid: u32, port: u32 },
    /// A plain unix socket (the agent run with `--unix`, tests).
    Unix(PathBuf),
}

/// Bounds on the agent's replies and time.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connecting, the hybrid vsock handshake and HTTP/2's included.
    pub connect_timeout: Duration,
    /// Each call (a freeze gets its deadline on top).
    pub call_timeout: Duration,
    /// Largest reply message.
    pub max_message: usize,
    pub max_filesystems: usize,
    pub max_hooks: usize,
    /// Longest string field except hook output.
    pub max_string: usize,
    /// Longest hook output.
    pub max_hook_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            max_message: 1 << 20,
            max_filesystems: 1024,
            max_hooks: 256,
            max_string: 4096,
            max_hook_output: 16 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to the agent")]
    Connect(#[source] tonic::transport::Error),
    #[error("The agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("The agent refused the call")]
    Rpc(#[source] RpcStatus),
    #[error("The agent's reply is invalid: {0}")]
    InvalidReply(String),
    #[error("The freeze was aborted: {reason}")]
    FreezeAborted { reason: String, report: Box<FreezeReply> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A status the agent answered with (or tonic made of a broken call), as a link of an error
/// chain: its code and message, then its own cause if it has one. Derefs to the status.
#[derive(Debug)]
pub struct RpcStatus(pub tonic::Status);

impl std::fmt::Display for RpcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.message() {
            "" => write!(f, "{}", self.0.code()),
            m => write!(f, "{}: {m}", self.0.code()),
        }
    }
}

impl std::error::Error for RpcStatus {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl std::ops::Deref for RpcStatus {
    type Target = tonic::Status;

    fn deref(&self) -> &tonic::Status {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PingReply {
    pub version: String,
    pub capabilities: Vec<String>,
    pub max_deadline_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsOutcome {
    Frozen,
    Thawed,
    FrozenByOther,
    Unsupported,
    NotFrozen,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub outcome: FsOutcome,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookOutcome {
    Ok,
    Failed,
    TimedOut,
    SpawnFailed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookResult {
    pub name: String,
    pub phase: String,
    pub outcome: HookOutcome,
    pub exit_code: i32,
    pub output: String,
    pub output_truncated: bool,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FreezeReply {
    pub frozen: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub filesystems: Vec<Filesystem>,
    pub hooks: Vec<HookResult>,
    pub deadline_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThawReply {
    pub was_frozen: bool,
    pub filesystems: Vec<Filesystem>,
    pub hooks: Vec<HookResult>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReply {
    pub frozen: bool,
    pub frozen_since_unix_ms: u64,
    pub deadline_unix_ms: u64,
    pub remaining_ms: u64,
    pub snapshot_id: String,
    pub last_thaw_reason: String,
}

/// A connection to one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    client: PbClient<Channel>,
    limits: Limits,
}

impl AgentClient {
    /// Connects within `limits.connect_timeout`.
    pub async fn connect(target: Target, limits: Limits) -> Result<Self> {
        // The URI is not used to reach anything: the connector below does.
        let endpoint = Endpoint::from_static("http://agent.invalid").http2_max_header_list_size(16 * 1024);
        let connect = async {
            match target {
                Target::HybridVsock(addr) => endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let addr = addr.clone();
                        async move { Ok::<_, vsock::Error>(TokioIo::new(vsock::connect(&addr.path, addr.port).await?)) }
                    }))
                    .await,
                Target::Vsock { cid, port } => {
                    endpoint
                        .connect_with_connector(tower::service_fn(move |_: Uri| async move {
                            Ok::<_, vsock::Error>(TokioIo::new(vsock::connect_cid(cid, port).await?))
                        }))
                        .await
                }
                Target::Unix(path) => livesnap_proto::unix_channel(endpoint, path).await,
            }
        };
        let channel = tokio::time::timeout(limits.connect_timeout, connect)
            .await
            .map_err(|_| Error::Timeout(limits.connect_timeout))?
            .map_err(Error::Connect)?;
        let client =
            PbClient::new(channel).max_decoding_message_size(limits.max_message).max_encoding_message_size(64 * 1024);
        Ok(AgentClient { client, limits })
    }

    async fn call<T>(
        &self,
        extra: Duration,
        f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let limit = self.limits.call_timeout.saturating_add(extra);
        match tokio::time::timeout(limit, f).await {
            Err(_) => Err(Error::Timeout(limit)),
            Ok(Err(status)) if status.code() == tonic::Code::Cancelled && status.message().contains("Timeout") => {
                Err(Error::Timeout(limit))
            }
            Ok(Err(status)) => Err(Error::Rpc(RpcStatus(status))),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    pub async fn ping(&self) -> Result<PingReply> {
        let mut c = self.client.clone();
        let r = self.call(Duration::ZERO, c.ping(pb::PingRequest {})).await?;
        Validator(&self.limits).ping(r)
    }

    /// Asks the agent to freeze for at most `deadline`. An aborted freeze (a hook failed, a
    /// filesystem would not freeze) is [`Error::FreezeAborted`] with the agent's report.
    pub async fn freeze(&self, deadline: Duration, snapshot_id: &str) -> Result<FreezeReply> {
        let mut c = self.client.clone();
        let req = pb::FreezeRequest {
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            snapshot_id: snapshot_id.to_string(),
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(self.limits.call_timeout.saturating_add(deadline));
        let r = self.call(deadline, c.freeze(req)).await?;
        Validator(&self.limits).freeze(r)
    }

    pub async fn thaw(&self) -> Result<ThawReply> {
        let mut c = self.client.clone();
        // Thaw hooks run before the reply.
        let r = self.call(self.limits.call_timeout, c.thaw(pb::ThawRequest {})).await?;
        Validator(&self.limits).thaw(r)
    }

    pub async fn status(&self) -> Result<StatusReply> {
        let mut c = self.client.clone();
        let r = self.call(Duration::ZERO, c.status(pb::StatusRequest {})).await?;
        Validator(&self.limits).status(r)
    }
}

/// Checks of untrusted replies against [`Limits`].
pub(crate) struct Validator<'a>(pub(crate) &'a Limits);

impl Validator<'_> {
    pub(crate) fn ping(&self, r: pb::PingReply) -> Result<PingReply> {
        self.count("capabilities", r.capabilities.len(), 64)?;
        self.string("version", &r.version)?;
        for c in &r.capabilities {
            self.string("capability", c)?;
        }
        Ok(PingReply { version: r.version, capabilities: r.capabilities, max_deadline_ms: r.max_deadline_ms })
    }

    /// An aborted freeze is [`Error::FreezeAborted`] with the agent's report.
    pub(crate) fn freeze(&self, r: pb::FreezeReply) -> Result<FreezeReply> {
        self.string("error", &r.error)?;
        let reply = FreezeReply {
            frozen: r.frozen,
            error: r.error,
            filesystems: self.filesystems(r.filesystems)?,
            hooks: self.hooks(r.hooks)?,
            deadline_unix_ms: r.deadline_unix_ms,
        };
        if !reply.frozen {
            let reason = if reply.error.is_empty() { "no reason given".to_string() } else { reply.error.clone() };
            return Err(Error::FreezeAborted { reason, report: Box::new(reply) });
        }
        Ok(reply)
    }

    pub(crate) fn thaw(&self, r: pb::ThawReply) -> Result<ThawReply> {
        self.string("error", &r.error)?;
        Ok(ThawReply {
            was_frozen: r.was_frozen,
            filesystems: self.filesystems(r.filesystems)?,
            hooks: self.hooks(r.hooks)?,
            error: r.error,
        })
    }

    pub(crate) fn status(&self, r: pb::StatusReply) -> Result<StatusReply> {
        self.string("snapshot_id", &r.snapshot_id)?;
        self.string("last_thaw_reason", &r.last_thaw_reason)?;
        Ok(StatusReply {
            frozen: r.frozen,
            frozen_since_unix_ms: r.frozen_since_unix_ms,
            deadline_unix_ms: r.deadline_unix_ms,
            remaining_ms: r.remaining_ms,
            snapshot_id: r.snapshot_id,
            last_thaw_reason: r.last_thaw_reason,
        })
    }

    fn count(&self, what: &str, n: usize, max: usize) -> Result<()> {
        if n > max {
            return Err(Error::InvalidReply(format!("{n} {what} (at most {max})")));
        }
        Ok(())
    }

    fn string_max(&self, what: &str, s: &str, max: usize) -> Result<()> {
        if s.len() > max {
            return Err(Error::InvalidReply(format!("{what} is {} bytes long (at most {max})", s.len())));
        }
        Ok(())
    }

    fn string(&self, what: &str, s: &str) -> Result<()> {
        self.string_max(what, s, self.0.max_string)
    }

    fn filesystems(&self, fss: Vec<pb::Filesystem>) -> Result<Vec<Filesystem>> {
        self.count("filesystems", fss.len(), self.0.max_filesystems)?;
        fss.into_iter()
            .map(|f| {
                for (what, s) in [
                    ("mount_point", &f.mount_point),
                    ("fs_type", &f.fs_type),
                    ("source", &f.source),
                    ("error", &f.error),
                ] {
                    self.string(what, s)?;
                }
                let outcome = match pb::FsOutcome::try_from(f.outcome) {
                    Ok(pb::FsOutcome::FsFrozen) => FsOutcome::Frozen,
                    Ok(pb::FsOutcome::FsThawed) => FsOutcome::Thawed,
                    Ok(pb::FsOutcome::FsFrozenByOther) => FsOutcome::FrozenByOther,
                    Ok(pb::FsOutcome::FsUnsupported) => FsOutcome::Unsupported,
                    Ok(pb::FsOutcome::FsNotFrozen) => FsOutcome::NotFrozen,
                    Ok(pb::FsOutcome::FsFailed) => FsOutcome::Failed,
                    Ok(pb::FsOutcome::Unspecified) | Err(_) => {
                        return Err(Error::InvalidReply(format!("unknown filesystem outcome {}", f.outcome)))
                    }
                };
                Ok(Filesystem {
                    mount_point: f.mount_point,
                    fs_type: f.fs_type,
                    source: f.source,
                    outcome,
                    error: f.error,
                })
            })
            .collect()
    }

    fn hooks(&self, hooks: Vec<pb::HookResult>) -> Result<Vec<HookResult>> {
        self.count("hooks", hooks.len(), self.0.max_hooks)?;
        hooks
            .into_iter()
            .map(|h| {
                self.string("hook name", &h.name)?;
                self.string_max("hook output", &h.output, self.0.max_hook_output)?;
                if !["freeze", "thaw", "freeze-fail"].contains(&h.phase.as_str()) {
                    return Err(Error::InvalidReply(format!("unknown hook phase {:?}", truncate(&h.phase, 32))));
                }
                let outcome = match pb::HookOutcome::try_from(h.outcome) {
                    Ok(pb::HookOutcome::HookOk) => HookOutcome::Ok,
                    Ok(pb::HookOutcome::HookFailed) => HookOutcome::Failed,
                    Ok(pb::HookOutcome::HookTimedOut) => HookOutcome::TimedOut,
                    Ok(pb::HookOutcome::HookSpawnFailed) => HookOutcome::SpawnFailed,
                    Ok(pb::HookOutcome::Unspecified) | Err(_) => {
                        return Err(Error::InvalidReply(format!("unknown hook outcome {}", h.outcome)))
                    }
                };
                Ok(HookResult {
                    name: h.name,
                    phase: h.phase,
                    outcome,
                    exit_code: h.exit_code,
                    output: h.output,
                    output_truncated: h.output_truncated,
                    duration_ms: h.duration_ms,
                })
            })
            .collect()
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use std::time::Instant;

    use livesnap_proto::error::chain;

    use super::*;

    /// No guest has this context id.
    const NO_GUEST: u32 = 0xffff_fff0;

    /// Without a vsock transport the socket cannot be made (EAFNOSUPPORT); with the host's, no
    /// such guest (ENODEV); with a guest's, the kernel gives up after its 2 s connect timeout.
    /// Never a hang up to our own timeout, never a panic.
    #[tokio::test]
    async fn a_vsock_target_that_cannot_be_reached_fails_at_once_naming_its_cid_and_port() {
        let limits = Limits { connect_timeout: Duration::from_secs(30), ..Limits::default() };
        let t0 = Instant::now();
        let e = AgentClient::connect(Target::Vsock { cid: NO_GUEST, port: 7735 }, limits).await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        assert!(matches!(e, Error::Connect(_)), "{e:?}");
        let text = chain(&e);
        assert!(text.starts_with("Cannot connect to the agent: "), "{text}");
        assert!(text.contains(&format!("Cannot connect to vsock cid {NO_GUEST} port 7735: ")), "{text}");
    }

    #[test]
    fn a_refusal_reads_as_its_code_and_message_once() {
        let e = Error::Rpc(RpcStatus(tonic::Status::invalid_argument("Snapshot id is too long")));
        assert_eq!(
            chain(&e),
            "The agent refused the call: Client specified an invalid argument: Snapshot id is too long"
        );
    }
}
