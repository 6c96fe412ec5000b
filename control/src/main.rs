//! `snapctl`: livesnap's CLI. For now, `snapctl agent ...`: talk to one guest agent directly,
//! to debug a VM by hand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use livesnap_control::agent::{AgentClient, Error, Filesystem, HookResult, Limits, Target};
use livesnap_control::vsock::HybridAddr;
use serde::Serialize;

/// livesnap's command line.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to one guest agent directly (debugging).
    Agent {
        #[command(subcommand)]
        action: AgentAction,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum AgentAction {
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
struct Conn {
    /// The VM's hybrid vsock unix socket and the agent's port: <unix-socket-path>:<port>.
    #[arg(long, global = true, conflicts_with = "unix")]
    vsock: Option<HybridAddr>,
    /// An agent listening on a plain unix socket (`livesnap-agent --unix`).
    #[arg(long, global = true)]
    unix: Option<PathBuf>,
    /// Time allowed to connect and for each call (a freeze gets its deadline on top).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the reply as JSON.
    #[arg(long, global = true)]
    json: bool,
}


fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("cannot encode JSON")?);
    Ok(())
}

fn print_fs(fss: &[Filesystem]) {
    for f in fss {
        let err = if f.error.is_empty() { String::new() } else { format!(": {}", f.error) };
        println!("  {:<14} {} ({}, {}){err}", format!("{:?}", f.outcome).to_lowercase(), f.mount_point, f.fs_type, f.source);
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

async fn run(cli: Cli) -> Result<bool> {
    let Command::Agent { action, conn } = cli.command;
    let target = match (conn.vsock, conn.unix) {
        (Some(a), _) => Target::HybridVsock(a),
        (None, Some(p)) => Target::Unix(p),
        (None, None) => anyhow::bail!("give --vsock <unix-socket-path>:<port> or --unix <path>"),
    };
    let limits = Limits { connect_timeout: conn.timeout, call_timeout: conn.timeout, ..Limits::default() };
    let client = AgentClient::connect(target, limits).await?;
    match action {
        AgentAction::Ping => {
            let r = client.ping().await?;
            if conn.json {
                print_json(&r)?;
            } else {
                println!("livesnap-agent {} ({}); max deadline {} ms", r.version, r.capabilities.join(", "), r.max_deadline_ms);
            }
        }
        AgentAction::Status => {
            let r = client.status().await?;
            if conn.json {
                print_json(&r)?;
            } else if r.frozen {
                println!("frozen (snapshot {:?}), {} ms until the lease thaws", r.snapshot_id, r.remaining_ms);
            } else {
                println!("not frozen (last thaw: {})", if r.last_thaw_reason.is_empty() { "none" } else { &r.last_thaw_reason });
            }
        }
        AgentAction::Freeze { deadline, snapshot_id } => match client.freeze(deadline, &snapshot_id).await {
            Ok(r) => {
                if conn.json {
                    print_json(&r)?;
                } else {
                    println!("frozen until the thaw or {} ms from now", deadline.as_millis());
                    print_fs(&r.filesystems);
                    print_hooks(&r.hooks);
                }
            }
            Err(Error::FreezeAborted { reason, report }) => {
                if conn.json {
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
            if conn.json {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LIVESNAP_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("snapctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
