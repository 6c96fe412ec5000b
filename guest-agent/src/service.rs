//! The gRPC service: a thin adapter from tonic to [`AgentApi`].

use std::time::Duration;

use livesnap_proto::agent as pb;
use tonic::{Request, Response, Status};

use crate::agent::{self, to_unix_ms, AgentApi, FsOutcome, FsReport};
use crate::hooks::{self, HookResult};

/// What this agent can do, announced by `Ping`.
pub const CAPABILITIES: &[&str] = &["freeze", "hooks", "lease", "freeze-fail"];

#[derive(Debug)]
pub struct Service<A> {
    agent: A,
}

impl<A: AgentApi> Service<A> {
    pub fn new(agent: A) -> Self {
        Service { agent }
    }

    /// The tonic server of this service.
    pub fn into_server(self) -> pb::agent_server::AgentServer<Self> {
        pb::agent_server::AgentServer::new(self)
    }
}

fn fs(r: &FsReport) -> pb::Filesystem {
    let outcome = match r.outcome {
        FsOutcome::Frozen => pb::FsOutcome::FsFrozen,
        FsOutcome::Thawed => pb::FsOutcome::FsThawed,
        FsOutcome::FrozenByOther => pb::FsOutcome::FsFrozenByOther,
        FsOutcome::Unsupported => pb::FsOutcome::FsUnsupported,
        FsOutcome::NotFrozen => pb::FsOutcome::FsNotFrozen,
        FsOutcome::Failed => pb::FsOutcome::FsFailed,
    };
    pb::Filesystem {
        mount_point: r.mount_point.to_string_lossy().into_owned(),
        fs_type: r.fs_type.clone(),
        source: r.source.clone(),
        outcome: outcome.into(),
        error: r.error.clone().unwrap_or_default(),
    }
}

pub(crate) fn hook(r: &HookResult) -> pb::HookResult {
    let outcome = match r.outcome {
        hooks::Outcome::Ok => pb::HookOutcome::HookOk,
        hooks::Outcome::Failed => pb::HookOutcome::HookFailed,
        hooks::Outcome::TimedOut => pb::HookOutcome::HookTimedOut,
        hooks::Outcome::SpawnFailed => pb::HookOutcome::HookSpawnFailed,
    };
    pb::HookResult {
        name: r.name.clone(),
        phase: r.phase.as_str().to_string(),
        outcome: outcome.into(),
        exit_code: r.exit_code.unwrap_or(-1),
        output: r.output.clone(),
        output_truncated: r.output_truncated,
        duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
    }
}

#[tonic::async_trait]
impl<A: AgentApi> pb::agent_server::Agent for Service<A> {
    async fn ping(&self, _: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        Ok(Response::new(pb::PingReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: CAPABILITIES.iter().map(|c| (*c).to_string()).collect(),
            max_deadline_ms: u64::try_from(self.agent.max_deadline().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot = %request.get_ref().snapshot_id))]
    async fn freeze(&self, request: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeReply>, Status> {
        let req = request.into_inner();
        let r = self.agent.freeze(Duration::from_millis(req.deadline_ms), req.snapshot_id).await?;
        Ok(Response::new(pb::FreezeReply {
            frozen: r.frozen,
            error: r.error.unwrap_or_default(),
            filesystems: r.filesystems.iter().map(fs).collect(),
            hooks: r.hooks.iter().map(hook).collect(),
            deadline_unix_ms: to_unix_ms(r.deadline),
        }))
    }

    async fn thaw(&self, _: Request<pb::ThawRequest>) -> Result<Response<pb::ThawReply>, Status> {
        let r = self.agent.thaw().await?;
        Ok(Response::new(pb::ThawReply {
            was_frozen: r.was_frozen,
            filesystems: r.filesystems.iter().map(fs).collect(),
            hooks: r.hooks.iter().map(hook).collect(),
            error: r.error.unwrap_or_default(),
        }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.agent.status().await;
        Ok(Response::new(pb::StatusReply {
            frozen: s.frozen,
            frozen_since_unix_ms: to_unix_ms(s.since),
            deadline_unix_ms: to_unix_ms(s.deadline),
            remaining_ms: u64::try_from(s.remaining.as_millis()).unwrap_or(u64::MAX),
            snapshot_id: s.snapshot_id,
            last_thaw_reason: s.last_thaw_reason.map(agent::ThawReason::as_str).unwrap_or_default().to_string(),
        }))
    }
}
