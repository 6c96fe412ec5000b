//! livesnapd's replies as text and as JSON.
//!
//! Strings from the daemon go to a person's terminal through [`clean`] (no control characters:
//! a VM name or a failure reason cannot move the cursor or retitle the window). Enum values
//! snapctl does not know (a newer daemon) print as `unknown(N)`, never fail the command.

use std::time::{Duration, UNIX_EPOCH};

use indicatif::HumanBytes;
use livesnap_proto::daemon::{
    snapshot_event, AgentState, Backup, BackupKind, ChunkProblem, Consistency, DiskBackup, SnapshotEvent, Vm,
};
use serde_json::{json, Value};

use super::error::code_name;

/// `s` without control characters (each becomes `?`), for a terminal.
pub fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// Microseconds as a person reads them: 850 µs, 23.4 ms, 1.20 s.
pub fn micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// A UNIX time as RFC 3339 in UTC, seconds precision.
pub fn time(unix: u64) -> String {
    match UNIX_EPOCH.checked_add(Duration::from_secs(unix)) {
        Some(t) if unix < 253_402_300_800 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => format!("unix {unix}"),
    }
}

pub fn kind(v: i32) -> String {
    match BackupKind::try_from(v) {
        Ok(BackupKind::Full) => "full".into(),
        Ok(BackupKind::Incremental) => "incremental".into(),
        Ok(BackupKind::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({v})"),
    }
}

pub fn consistency(v: i32) -> String {
    match Consistency::try_from(v) {
        Ok(Consistency::Application) => "application".into(),
        Ok(Consistency::Crash) => "crash".into(),
        Ok(Consistency::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({v})"),
    }
}

pub fn agent(v: i32) -> String {
    match AgentState::try_from(v) {
        Ok(AgentState::None) => "none".into(),
        Ok(AgentState::Reachable) => "reachable".into(),
        Ok(AgentState::Unreachable) => "unreachable".into(),
        Ok(AgentState::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({v})"),
    }
}

/// A gRPC code number as its name; `unknown(N)` for a number outside the codes.
pub fn code(v: i32) -> String {
    match v {
        0..=16 => code_name(tonic::Code::from_i32(v)).into(),
        _ => format!("unknown({v})"),
    }
}

pub fn vm_json(v: &Vm) -> Value {
    json!({
        "name": v.name,
        "control_socket": v.control_socket,
        "disks": v.disks,
        "backend_reachable": v.backend_reachable,
        "agent": agent(v.agent),
        "active_snapshot": v.active_snapshot,
        "last_backup": v.last_backup,
        "running_job": v.running_job,
    })
}

pub fn disk_json(d: &DiskBackup) -> Value {
    json!({
        "disk": d.disk,
        "size": d.size,
        "bytes_read": d.bytes_read,
        "bytes_changed": d.bytes_changed,
        "bytes_stored": d.bytes_stored,
    })
}

pub fn backup_json(b: &Backup) -> Value {
    json!({
        "vm": b.vm,
        "id": b.id,
        "created_unix": b.created_unix,
        "created": time(b.created_unix),
        "kind": kind(b.kind),
        "consistency": consistency(b.consistency),
        "note": b.note,
        "freeze_window_us": b.freeze_window_us,
        "snapshot_id": b.snapshot_id,
        "encrypted": !b.key_id.is_empty(),
        "key_id": (!b.key_id.is_empty()).then_some(&b.key_id),
        "disks": b.disks.iter().map(disk_json).collect::<Vec<_>>(),
    })
}

pub fn problem_json(p: &ChunkProblem) -> Value {
    json!({ "disk": p.disk, "chunk_index": p.chunk_index, "offset": p.offset, "hash": p.hash, "fault": p.fault })
}

/// One event of a snapshot's stream as one JSON object.
pub fn event_json(e: &SnapshotEvent) -> Value {
    use snapshot_event::Event;
    let mut v = match &e.event {
        Some(Event::Quiescing(_)) => json!({ "event": "quiescing" }),
        Some(Event::Frozen(f)) => json!({ "event": "frozen", "filesystems": f.filesystems }),
        Some(Event::Cut(c)) => json!({
            "event": "cut",
            "snapshot_id": c.snapshot_id,
            "crash_consistent_reason": c.crash_consistent_reason,
            "pause_us": c.pause_us,
        }),
        Some(Event::Thawed(t)) => json!({ "event": "thawed", "freeze_window_us": t.freeze_window_us }),
        Some(Event::BackingUp(d)) => json!({
            "event": "backing_up", "disk": d.disk, "bytes_read": d.bytes_read, "bytes_total": d.bytes_total,
        }),
        Some(Event::Merging(m)) => {
            json!({ "event": "merging", "merged_bytes": m.merged_bytes, "remaining_bytes": m.remaining_bytes })
        }
        Some(Event::Done(b)) => json!({ "event": "done", "backup": backup_json(b) }),
        Some(Event::Failed(f)) => json!({
            "event": "failed", "code": code(f.code), "reason": f.reason, "stage": f.stage,
        }),
        // A kind of event newer than snapctl.
        None => json!({ "event": "unknown" }),
    };
    v["job_id"] = json!(e.job_id);
    v
}

/// A backup's consistency in words, with the reason when there is one.
pub fn consistency_line(b: &Backup) -> String {
    let c = match Consistency::try_from(b.consistency) {
        Ok(Consistency::Application) => "application-consistent".to_owned(),
        Ok(Consistency::Crash) => "crash-consistent".to_owned(),
        _ => format!("consistency {}", consistency(b.consistency)),
    };
    // The note may say the consistency again ("crash-consistent: no agent ..."): once is enough.
    let note = b.note.trim();
    let note = match note.get(..c.len() + 1) {
        Some(head) if head.eq_ignore_ascii_case(&format!("{c}:")) => note[c.len() + 1..].trim_start(),
        _ => note,
    };
    if note.is_empty() {
        c
    } else {
        format!("{c} ({})", clean(note))
    }
}

/// The totals of a backup's disks: read, changed, stored.
pub fn totals(b: &Backup) -> (u64, u64, u64) {
    b.disks.iter().fold((0u64, 0u64, 0u64), |(r, c, s), d| {
        (r.saturating_add(d.bytes_read), c.saturating_add(d.bytes_changed), s.saturating_add(d.bytes_stored))
    })
}

/// A backup as a block of text: the summary after a snapshot and `backup show`.
pub fn backup_text(b: &Backup) -> String {
    let mut out = format!("backup {} of {}: {}, {}\n", clean(&b.id), clean(&b.vm), kind(b.kind), consistency_line(b));
    out += &format!("  created        {}\n", time(b.created_unix));
    out += &format!("  snapshot       {}\n", b.snapshot_id);
    out += &format!(
        "  freeze window  {}\n",
        if b.freeze_window_us == 0 { "none (not frozen)".to_owned() } else { micros(b.freeze_window_us) }
    );
    out += &format!(
        "  encryption     {}\n",
        if b.key_id.is_empty() {
            "none (not encrypted)".to_owned()
        } else {
            format!("AES-256-GCM, key {}", clean(&b.key_id))
        }
    );
    for d in &b.disks {
        out += &format!(
            "  disk {:<9} {:>11}: read {}, changed {}, stored {}\n",
            clean(&d.disk),
            bytes(d.size),
            bytes(d.bytes_read),
            bytes(d.bytes_changed),
            bytes(d.bytes_stored)
        );
    }
    let (r, c, s) = totals(b);
    out += &format!("  total          read {}, changed {}, stored {}", bytes(r), bytes(c), bytes(s));
    out
}
