//! The clients livesnapd calls for one VM: its livesnap-blk's control service and its agent.

use std::path::Path;
use std::time::Duration;

use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use tonic::transport::{Channel, Endpoint};

use super::config::AgentEndpoint;
use super::Error;
use crate::agent::{self, AgentClient, Limits, Target};

/// A connected control service client.
pub type Backend = SnapshotControlClient<Channel>;

/// Connects to the backend's control socket within `timeout`; each unary call is bounded by
/// `call_timeout` (streams are bounded by their callers).
pub async fn connect_backend(vm: &str, socket: &Path, timeout: Duration) -> Result<Backend, Error> {
    let endpoint = Endpoint::from_static("http://livesnap-blk.invalid").connect_timeout(timeout);
    let unavailable =
        |reason: String| Error::BackendUnavailable { vm: vm.to_owned(), socket: socket.to_owned(), reason };
    let channel = tokio::time::timeout(timeout, livesnap_proto::unix_channel(endpoint, socket.to_owned()))
        .await
        .map_err(|_| unavailable(format!("no answer within {timeout:?}")))?
        .map_err(|e| unavailable(error_chain(&e)))?;
    Ok(SnapshotControlClient::new(channel))
}

/// A unary call with a deadline; a status from the backend is [`Error::Backend`].
pub async fn call<T>(
    vm: &str,
    what: &'static str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(Error::BackendTimeout { vm: vm.to_owned(), what, timeout }),
        Ok(Err(status)) => Err(Error::Backend { vm: vm.to_owned(), what, status }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

pub async fn status(vm: &str, b: &Backend, timeout: Duration) -> Result<pb::VmStatus, Error> {
    let mut c = b.clone();
    call(vm, "Status", timeout, c.status(pb::StatusRequest {})).await
}

/// Every page of a disk's change map, joined: the first page's header with all the extents.
pub async fn changes(vm: &str, b: &Backend, disk: &str, timeout: Duration) -> Result<pb::ChangesPage, Error> {
    let mut c = b.clone();
    let fetch = async {
        let mut stream = c.changes(pb::ChangesRequest { disk: disk.to_owned() }).await?.into_inner();
        let mut head: Option<pb::ChangesPage> = None;
        while let Some(page) = stream.message().await? {
            match head.as_mut() {
                Some(h) => h.extents.extend(page.extents),
                None => head = Some(page),
            }
        }
        Ok::<_, tonic::Status>(head)
    };
    match tokio::time::timeout(timeout, fetch).await {
        Err(_) => Err(Error::BackendTimeout { vm: vm.to_owned(), what: "Changes", timeout }),
        Ok(Err(status)) => Err(Error::Backend { vm: vm.to_owned(), what: "Changes", status }),
        Ok(Ok(None)) => Err(Error::Backend {
            vm: vm.to_owned(),
            what: "Changes",
            status: tonic::Status::internal("the backend sent no change page"),
        }),
        Ok(Ok(Some(h))) => Ok(h),
    }
}

/// Connects to the VM's agent.
pub async fn connect_agent(endpoint: &AgentEndpoint, limits: Limits) -> Result<AgentClient, String> {
    let target = match endpoint {
        AgentEndpoint::Hybrid(a) => Target::HybridVsock(a.clone()),
        AgentEndpoint::Unix(p) => Target::Unix(p.clone()),
        AgentEndpoint::Vsock { cid, port } => {
            return Err(format!(
                "AF_VSOCK (cid {cid}, port {port}) is not supported by the agent client yet; use hybrid vsock"
            ))
        }
    };
    AgentClient::connect(target, limits).await.map_err(|e: agent::Error| error_chain(&e))
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
