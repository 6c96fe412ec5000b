//! The agent's gRPC service in-process over a unix socket, with a fake freezer (no privileges,
//! no filesystem frozen), driven by the host's client from `livesnap-control` and by `snapctl`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_agent::agent::Agent;
use livesnap_agent::fake::{AgentHome, FakeFreezer};
use livesnap_control::agent::{AgentClient, Error, FsOutcome, HookOutcome, Limits, Target};

struct Server {
    /// Holds the home's folder and the socket.
    _dir: tempfile::TempDir,
    home: AgentHome,
    socket: PathBuf,
    fake: FakeFreezer,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(mounts: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let home = AgentHome::new(dir.path()).unwrap();
        let fake = FakeFreezer::new(mounts);
        let agent = Agent::new(fake.clone(), home.config());
        let socket = dir.path().join("agent.sock");
        let listener = livesnap_agent::serve::bind_unix(&socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(livesnap_agent::serve::serve_unix(agent, listener, async {
            let _ = rx.await;
        }));
        Server { _dir: dir, home, socket, fake, _stop: tx }
    }

    fn hook(&self, name: &str, extra: &str) {
        self.home.hook(name, extra).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        self.home.calls()
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(Target::Unix(self.socket.clone()), Limits::default()).await.unwrap()
    }
}

#[tokio::test]
async fn ping_freeze_status_thaw_over_grpc() {
    let s = Server::start(&["/data", "/"]).await;
    s.hook("10-db", "echo flushed");
    let c = s.client().await;
    let p = c.ping().await.unwrap();
    assert_eq!(p.version, env!("CARGO_PKG_VERSION"));
    assert!(p.capabilities.iter().any(|c| c == "lease"));

    let f = c.freeze(Duration::from_secs(60), "snap-7").await.unwrap();
    assert!(f.frozen);
    assert_eq!(
        f.filesystems.iter().map(|f| (f.mount_point.as_str(), &f.outcome)).collect::<Vec<_>>(),
        [("/data", &FsOutcome::Frozen), ("/", &FsOutcome::Frozen)]
    );
    assert_eq!(f.hooks[0].output, "flushed\n");
    assert!(f.deadline_unix_ms > 0);
    let st = c.status().await.unwrap();
    assert!(st.frozen && st.snapshot_id == "snap-7" && st.remaining_ms > 0 && st.remaining_ms <= 60_000);

    let t = c.thaw().await.unwrap();
    assert!(t.was_frozen);
    assert_eq!(t.filesystems.iter().map(|f| f.mount_point.as_str()).collect::<Vec<_>>(), ["/", "/data"]);
    assert_eq!(s.calls(), ["10-db freeze", "10-db thaw"]);
    let st = c.status().await.unwrap();
    assert!(!st.frozen);
    assert_eq!(st.last_thaw_reason, "host");
}

#[tokio::test]
async fn a_failing_hook_reaches_the_host_as_an_aborted_freeze() {
    let s = Server::start(&["/"]).await;
    s.hook("10-db", "echo 'lock wait timeout' >&2; exit 1");
    let c = s.client().await;
    match c.freeze(Duration::from_secs(60), "s").await {
        Err(Error::FreezeAborted { reason, report }) => {
            assert!(reason.contains("10-db") && reason.contains("lock wait timeout"), "{reason}");
            assert_eq!(
                report.hooks.iter().map(|h| (h.phase.as_str(), &h.outcome)).collect::<Vec<_>>(),
                [("freeze", &HookOutcome::Failed), ("freeze-fail", &HookOutcome::Failed)]
            );
        }
        other => panic!("expected an aborted freeze, got {other:?}"),
    }
    assert!(s.fake.log().is_empty());
    assert!(!c.status().await.unwrap().frozen);
}

#[tokio::test]
async fn refusals_carry_fitting_grpc_codes() {
    let s = Server::start(&["/"]).await;
    let c = s.client().await;
    match c.freeze(Duration::from_secs(601), "s").await {
        Err(Error::Rpc(st)) => assert_eq!(st.code(), tonic::Code::InvalidArgument),
        other => panic!("{other:?}"),
    }
    c.freeze(Duration::from_secs(60), "a").await.unwrap();
    match c.freeze(Duration::from_secs(60), "b").await {
        Err(Error::Rpc(st)) => assert_eq!(st.code(), tonic::Code::FailedPrecondition),
        other => panic!("{other:?}"),
    }
    c.thaw().await.unwrap();
}

/// The host disappears in the middle of a freeze (its client times out and drops the
/// connection while a hook runs): the freeze completes in the guest and the lease thaws.
#[tokio::test]
async fn a_host_gone_mid_freeze_leaves_a_freeze_the_lease_thaws() {
    let s = Server::start(&["/data", "/"]).await;
    s.hook("10-slow", "sleep 1");
    {
        let limits = Limits { call_timeout: Duration::from_millis(100), ..Limits::default() };
        let c = AgentClient::connect(Target::Unix(s.socket.clone()), limits).await.unwrap();
        // The client's own bound is its call timeout plus the deadline: give a deadline the
        // hook outlives on the client's side only by dropping the call.
        let call = c.freeze(Duration::from_secs(3), "gone");
        assert!(tokio::time::timeout(Duration::from_millis(300), call).await.is_err());
    } // connection dropped
    let start = Instant::now();
    while s.fake.frozen().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the freeze never completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while !s.fake.frozen().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the lease did not thaw");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Status waits for the thaw in progress, its hooks included.
    let c = s.client().await;
    assert_eq!(c.status().await.unwrap().last_thaw_reason, "lease");
    assert_eq!(s.calls(), ["10-slow freeze", "10-slow thaw"]);
}

/// `snapctl agent ... --unix ... --json` prints what the agent answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapctl_talks_to_an_agent_with_json_output() {
    let bin = livesnap_tests::programs::snapctl().unwrap();
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "livesnap-control", "--bin", "snapctl"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let s = Server::start(&["/data"]).await;
    s.hook("10-x", "");
    let sock = s.socket.display().to_string();
    let run = |args: &[&str]| {
        let bin = bin.clone();
        let mut full: Vec<String> = vec!["agent".into()];
        full.extend(args.iter().map(|a| a.to_string()));
        full.extend(["--unix".to_string(), sock.clone(), "--json".to_string()]);
        async move { tokio::task::spawn_blocking(move || Command::new(bin).args(full).output().unwrap()).await.unwrap() }
    };
    let out = run(&["freeze", "--deadline", "30s", "--snapshot-id", "cli"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["frozen"], true);
    assert_eq!(v["filesystems"][0]["outcome"], "frozen");
    let out = run(&["status"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot_id"], "cli");
    let out = run(&["thaw"]).await;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["was_frozen"], true);
    assert_eq!(s.calls(), ["10-x freeze", "10-x thaw"]);

    s.hook("20-fail", "exit 4");
    let out = run(&["freeze"]).await;
    assert!(!out.status.success(), "an aborted freeze exits non-zero");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["frozen"], false);
    assert!(v["error"].as_str().unwrap().contains("20-fail"));
}
