//! `snapctl agent ...`: one guest agent, talked to directly to debug a VM by hand.

use std::path::PathBuf;
use std::time::Duration;

use crate::agent::{AgentClient, Error, Filesystem, HookResult, Limits, Target};
use crate::vsock::HybridAddr;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Version and capabilities.
    Ping,
    /// Frozen or not, since when, until when.
    Status,
    /// Run the freeze hooks and freeze the guest's filesystems until thawed or the deadline.
    Freeze {
        /// The agent thaws by itself after this long (e.g. 10s, 500ms, 2m).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// Given to the hooks as LIVESNAP_SNAPSHOT_ID.
        #[arg(long, default_value = "snapctl")]
        snapshot_id: String,
    },
    /// Thaw and run the thaw hooks.
    Thaw,
}

#[derive(Debug, Args)]
pub struct Conn {
    /// The VM's hybrid vsock unix socket and the agent's port: <unix-socket-path>:<port>.
    #[arg(long, global = true, conflicts_with_all = ["unix", "cid"])]
    vsock: Option<HybridAddr>,
    /// The guest's vsock context id, reached over AF_VSOCK (QEMU's vhost-vsock-pci guest-cid).
    #[arg(long, global = true, requires = "port", conflicts_with = "unix")]
    cid: Option<u32>,
    /// The agent's vsock port, with --cid.
    #[arg(long, global = true, requires = "cid")]
    port: Option<u32>,
    /// An agent listening on a plain unix socket (`livesnap-agent --unix`).
    #[arg(long, global = true)]
    unix: Option<PathBuf>,
    /// Time allowed to connect and for each call (a freeze gets its deadline on top).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("Cannot encode JSON")?);
    Ok(())
}

fn print_fs(fss: &[Filesystem]) {
    for f in fss {
        let err = if f.error.is_empty() { String::new() } else { format!(": {}", f.error) };
        println!(
            "  {:<14} {} ({}, {}){err}",
            format!("{:?}", f.outcome).to_lowercase(),
            f.mount_point,
            f.fs_type,
            f.source
        );
    }
}

fn print_hooks(hooks: &[HookResult]) {
    for h in hooks {
        println!("  hook {} {}: {:?} (exit {}, {} ms)", h.name, h.phase, h.outcome, h.exit_code, h.duration_ms);
        for l in h.output.lines() {
            println!("    | {l}");
        }
    }
}

/// Runs one agent command; `Ok(false)`: it ran and failed (exit 1).
pub async fn run(action: AgentAction, conn: Conn, json: bool) -> Result<bool> {
    let target = match (conn.vsock, conn.cid.zip(conn.port), conn.unix) {
        (Some(a), _, _) => Target::HybridVsock(a),
        (None, Some((cid, port)), _) => Target::Vsock { cid, port },
        (None, None, Some(p)) => Target::Unix(p),
        (None, None, None) => {
            anyhow::bail!("Give --vsock <unix-socket-path>:<port>, --cid <cid> --port <port> or --unix <path>")
        }
    };
    let limits = Limits { connect_timeout: conn.timeout, call_timeout: conn.timeout, ..Limits::default() };
    let client = AgentClient::connect(target, limits).await?;
    match action {
        AgentAction::Ping => {
            let r = client.ping().await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "livesnap-agent {} ({}); max deadline {} ms",
                    r.version,
                    r.capabilities.join(", "),
                    r.max_deadline_ms
                );
            }
        }
        AgentAction::Status => {
            let r = client.status().await?;
            if json {
                print_json(&r)?;
            } else if r.frozen {
                println!("frozen (snapshot {:?}), {} ms until the lease thaws", r.snapshot_id, r.remaining_ms);
            } else {
                println!(
                    "not frozen (last thaw: {})",
                    if r.last_thaw_reason.is_empty() { "none" } else { &r.last_thaw_reason }
                );
            }
        }
        AgentAction::Freeze { deadline, snapshot_id } => match client.freeze(deadline, &snapshot_id).await {
            Ok(r) => {
                if json {
                    print_json(&r)?;
                } else {
                    println!("frozen until the thaw or {} ms from now", deadline.as_millis());
                    print_fs(&r.filesystems);
                    print_hooks(&r.hooks);
                }
            }
            Err(Error::FreezeAborted { reason, report }) => {
                if json {
                    print_json(&report)?;
                } else {
                    println!("freeze aborted: {reason}");
                    print_fs(&report.filesystems);
                    print_hooks(&report.hooks);
                }
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        },
        AgentAction::Thaw => {
            let r = client.thaw().await?;
            if json {
                print_json(&r)?;
            } else {
                println!("{}", if r.was_frozen { "thawed" } else { "was not frozen" });
                print_fs(&r.filesystems);
                print_hooks(&r.hooks);
                if !r.error.is_empty() {
                    println!("error: {}", r.error);
                }
            }
            if !r.error.is_empty() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
