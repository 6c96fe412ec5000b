//! `livesnap-blk ctl`: the operator's client of the snapshot control service.
//!
//! Prints a line per fact for people, or one JSON document (`--json`; with `merge`, one per
//! progress report) for scripts. Exit status 0 on success, 1 on any error (the reason on stderr).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use livesnap_proto::snapshot as pb;
use livesnap_proto::snapshot::snapshot_control_client::SnapshotControlClient;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

/// Talks to the snapshot control service of a running livesnap-blk.
#[derive(Debug, Parser)]
#[command(name = "livesnap-blk ctl")]
struct Ctl {
    /// The backend's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Most time a call may take (merge: the wait for each progress report).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Cut a snapshot of every disk (or of the --disk ones) at one instant.
    Begin {
        #[arg(long = "disk", value_name = "ID")]
        disks: Vec<String>,
        /// Most bytes each delta may hold before the snapshot is abandoned.
        #[arg(long, value_name = "BYTES")]
        delta_limit: Option<u64>,
    },
    /// Where every disk stands.
    Status,
    /// Blocks of DISK changed since the last checkpoint.
    Changes { disk: String },
    /// Merge SNAPSHOT's deltas back into the bases, following progress until it is complete.
    Merge {
        snapshot: u64,
        /// Start the merge and return without waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Give SNAPSHOT up: its bases stop being frozen and its deltas are merged.
    Abandon {
        snapshot: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The backup of SNAPSHOT is safe: forget the changes up to its cut.
    Checkpoint { snapshot: u64 },
    /// Counters since the backend started.
    Stats,
}

/// The command's definition, for the man pages and the shell completions.
pub fn command() -> clap::Command {
    Ctl::command()
}

/// Runs `livesnap-blk ctl ARGS…`; `args` starts with `ctl`.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let ctl = Ctl::parse_from(args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("Cannot start a runtime")?;
    rt.block_on(ctl.run())
}

fn phase_name(p: i32) -> &'static str {
    match pb::Phase::try_from(p) {
        Ok(pb::Phase::Direct) => "direct",
        Ok(pb::Phase::Active) => "active",
        Ok(pb::Phase::Merging) => "merging",
        _ => "unknown",
    }
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({ "id": s.id, "disks": s.disks, "created_unix": s.created_unix, "pause_us": s.pause_us })
}

fn merge_json(m: &pb::MergeProgress) -> Value {
    let disks: Vec<Value> = m
        .disks
        .iter()
        .map(|d| json!({ "id": d.id, "merged_bytes": d.merged_bytes, "remaining_bytes": d.remaining_bytes, "done": d.done }))
        .collect();
    json!({ "snapshot": m.snapshot_id, "disks": disks, "done": m.done })
}

/// The reason a call failed, without tonic's repetitions: the backend's message holds the
/// whole chain of causes.
fn call_err(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{what} failed: {} ({:?})", s.message(), s.code())
}

impl Ctl {
    async fn connect(&self) -> Result<SnapshotControlClient<Channel>> {
        let endpoint = Endpoint::from_static("http://livesnap-blk.invalid").timeout(self.timeout);
        let channel = tokio::time::timeout(self.timeout, livesnap_proto::unix_channel(endpoint, self.control.clone()))
            .await
            .map_err(|_| anyhow!("No answer from {} within {:?}", self.control.display(), self.timeout))?
            .with_context(|| format!("Cannot connect to the control socket {}", self.control.display()))?;
        Ok(SnapshotControlClient::new(channel))
    }

    fn print(&self, value: &Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }

    async fn run(self) -> Result<()> {
        let mut c = self.connect().await?;
        match &self.cmd {
            Cmd::Begin { disks, delta_limit } => {
                let req = pb::BeginRequest { disks: disks.clone(), delta_limit: delta_limit.unwrap_or(0) };
                let reply = c.begin(req).await.map_err(|s| call_err("Begin", s))?.into_inner();
                let s = reply.snapshot.context("The backend's reply carries no snapshot")?;
                self.print(&snapshot_json(&s), || {
                    format!("snapshot {} cut on {} (guest paused {} µs)", s.id, s.disks.join(", "), s.pause_us)
                });
            }
            Cmd::Status => {
                let st = c.status(pb::StatusRequest {}).await.map_err(|s| call_err("Status", s))?.into_inner();
                let disks: Vec<Value> = st
                    .disks
                    .iter()
                    .map(|d| {
                        json!({
                            "id": d.id, "phase": phase_name(d.phase), "snapshot": d.snapshot, "size": d.size,
                            "base_path": d.base_path, "base_format": d.base_format, "delta_path": d.delta_path,
                            "delta_bytes": d.delta_bytes, "delta_extents": d.delta_extents,
                            "merged_bytes": d.merged_bytes, "abandoned": d.abandoned,
                        })
                    })
                    .collect();
                let value = json!({ "vm": st.vm, "snapshot": st.snapshot.as_ref().map(snapshot_json), "disks": disks });
                self.print(&value, || {
                    let mut out = match &st.snapshot {
                        Some(s) => format!("vm {}: snapshot {} of {}", st.vm, s.id, s.disks.join(", ")),
                        None => format!("vm {}: no snapshot", st.vm),
                    };
                    for d in &st.disks {
                        out.push_str(&format!(
                            "\n  {}: {} ({} {}), delta {} bytes in {} extents",
                            d.id,
                            phase_name(d.phase),
                            d.base_format,
                            d.base_path,
                            d.delta_bytes,
                            d.delta_extents
                        ));
                        if d.merged_bytes > 0 {
                            out.push_str(&format!(", {} bytes merged", d.merged_bytes));
                        }
                        if !d.abandoned.is_empty() {
                            out.push_str(&format!(", abandoned: {}", d.abandoned));
                        }
                    }
                    out
                });
            }
            Cmd::Changes { disk } => {
                let mut stream = c
                    .changes(pb::ChangesRequest { disk: disk.clone() })
                    .await
                    .map_err(|s| call_err("Changes", s))?
                    .into_inner();
                let mut head: Option<pb::ChangesPage> = None;
                let mut extents = Vec::new();
                while let Some(page) = stream.message().await.map_err(|s| call_err("Changes", s))? {
                    extents.extend(page.extents.iter().map(|e| (e.offset, e.length)));
                    head.get_or_insert(page);
                }
                let h = head.context("The backend sent no change page")?;
                let value = json!({
                    "disk": h.disk, "since_checkpoint": h.since_checkpoint, "until_snapshot": h.until_snapshot,
                    "granularity": h.granularity, "trusted": h.trusted, "untrusted_reason": h.untrusted_reason,
                    "changed_bytes": h.changed_bytes, "extents": extents,
                });
                self.print(&value, || {
                    let mut out = format!(
                        "disk {}: {} bytes changed in {} extents (granularity {}), {}",
                        h.disk,
                        h.changed_bytes,
                        extents.len(),
                        h.granularity,
                        if h.trusted { "trusted".to_owned() } else { format!("NOT trusted: {}", h.untrusted_reason) }
                    );
                    for (o, l) in &extents {
                        out.push_str(&format!("\n  {o} +{l}"));
                    }
                    out
                });
            }
            Cmd::Merge { snapshot, no_wait } => {
                let mut stream = c
                    .merge(pb::MergeRequest { snapshot_id: *snapshot })
                    .await
                    .map_err(|s| call_err("Merge", s))?
                    .into_inner();
                loop {
                    let next = tokio::time::timeout(self.timeout, stream.message())
                        .await
                        .map_err(|_| anyhow!("No merge progress within {:?}", self.timeout))?
                        .map_err(|s| call_err("Merge", s))?;
                    let Some(m) = next else {
                        return Err(anyhow!("The merge stream ended before the merge was complete"));
                    };
                    self.print(&merge_json(&m), || {
                        let parts: Vec<String> = m
                            .disks
                            .iter()
                            .map(|d| {
                                if d.done {
                                    format!("{}: done, {} merged", d.id, d.merged_bytes)
                                } else {
                                    format!("{}: {} merged, {} left", d.id, d.merged_bytes, d.remaining_bytes)
                                }
                            })
                            .collect();
                        format!(
                            "snapshot {}: {}{}",
                            m.snapshot_id,
                            parts.join("; "),
                            if m.done { " — merge complete" } else { "" }
                        )
                    });
                    if m.done || *no_wait {
                        return Ok(());
                    }
                }
            }
            Cmd::Abandon { snapshot, reason } => {
                let req = pb::AbandonRequest { snapshot_id: *snapshot, reason: reason.clone() };
                c.abandon(req).await.map_err(|s| call_err("Abandon", s))?;
                self.print(&json!({ "abandoned": snapshot }), || {
                    format!("snapshot {snapshot} abandoned; its deltas are merging")
                });
            }
            Cmd::Checkpoint { snapshot } => {
                c.checkpoint(pb::CheckpointRequest { snapshot_id: *snapshot })
                    .await
                    .map_err(|s| call_err("Checkpoint", s))?;
                self.print(&json!({ "checkpoint": snapshot }), || format!("checkpoint {snapshot} acknowledged"));
            }
            Cmd::Stats => {
                let st = c.stats(pb::StatsRequest {}).await.map_err(|s| call_err("Stats", s))?.into_inner();
                let disks: Vec<Value> = st
                    .disks
                    .iter()
                    .map(|d| {
                        json!({
                            "id": d.id, "reads": d.reads, "writes": d.writes, "read_bytes": d.read_bytes,
                            "written_bytes": d.written_bytes, "flushes": d.flushes, "cuts": d.cuts,
                            "max_cut_pause_us": d.max_cut_pause_us, "merged_bytes": d.merged_bytes,
                        })
                    })
                    .collect();
                self.print(&json!({ "disks": disks }), || {
                    st.disks
                        .iter()
                        .map(|d| {
                            format!(
                                "{}: {} reads ({} B), {} writes ({} B), {} flushes, {} cuts (longest pause {} µs), {} B merged",
                                d.id, d.reads, d.read_bytes, d.writes, d.written_bytes, d.flushes, d.cuts, d.max_cut_pause_us, d.merged_bytes
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
        }
        Ok(())
    }
}
