//! `vm list` and the `backup` commands: one call each (restore follows a stream).

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use livesnap_proto::daemon::{
    BackupRef, ImageFormat, ListBackupsRequest, ListVmsRequest, PruneRequest, RestoreRequest,
};
use serde_json::{json, Value};

use super::args::{BackupAction, Format, KeepArgs};
use super::connect::Daemon;
use super::error::Error;
use super::render::{self, bytes, clean, micros};

/// Bound on a call that only reads or deletes records (not verify, prune or restore, whose
/// time grows with the data).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `fut`, at most [`CALL_TIMEOUT`].
pub(super) async fn bounded<T>(
    d: &Daemon,
    action: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Err(_) => Err(Error::Unreachable {
            target: d.target.clone(),
            reason: format!("{action}: no reply within {} s", CALL_TIMEOUT.as_secs()),
        }),
        Ok(r) => r.map_err(|s| d.error(action, &s)),
    }
}

pub(super) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// Rows as columns padded to their widest cell (the last column is not padded).
pub(super) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line += c;
            } else {
                line += &format!("{c:<w$}  ", w = widths[i]);
            }
        }
        out += line.trim_end();
        out += "\n";
    }
    out
}

pub(super) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        clean(s)
    }
}

pub async fn vm_list(d: &mut Daemon, json: bool) -> Result<(), Error> {
    let action = "Cannot list VMs";
    let mut client = d.client.clone();
    let reply = bounded(d, action, client.list_vms(ListVmsRequest {})).await?.into_inner();
    if json {
        print_json(&json!({ "vms": reply.vms.iter().map(render::vm_json).collect::<Vec<_>>() }));
        return Ok(());
    }
    if reply.vms.is_empty() {
        println!("no VMs in livesnapd's configuration");
        return Ok(());
    }
    let mut rows =
        vec![["NAME", "BACKEND", "AGENT", "DISKS", "SNAPSHOT", "LAST BACKUP", "JOB"].map(String::from).to_vec()];
    for v in &reply.vms {
        rows.push(vec![
            clean(&v.name),
            if v.backend_reachable { "reachable".into() } else { "unreachable".into() },
            render::agent(v.agent),
            if v.disks.is_empty() { "-".into() } else { clean(&v.disks.join(",")) },
            if v.active_snapshot == 0 { "-".into() } else { v.active_snapshot.to_string() },
            or_dash(&v.last_backup),
            or_dash(&v.running_job),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

pub async fn backup(d: &mut Daemon, action: BackupAction, json: bool) -> Result<(), Error> {
    match action {
        BackupAction::List { vm } => list(d, vm, json).await,
        BackupAction::Show { vm, id } => show(d, vm, id, json).await,
        BackupAction::Verify { vm, id } => verify(d, vm, id, json).await,
        BackupAction::Restore { vm, id, disk, to, format, live: false } => {
            restore(d, vm, id, disk, to, format, json).await
        }
        BackupAction::Restore { vm, id, disk, to, format, live: true } => {
            live_restore(d, vm, id, disk, to, format, json).await
        }
        BackupAction::Files { vm, id, disk, partition, action } => {
            super::files::files(d, super::files::Target { vm, id, disk, partition }, action, json).await
        }
        BackupAction::Delete { vm, id } => delete(d, vm, id, json).await,
        BackupAction::Prune { vm, keep, dry_run } => prune(d, vm, keep, dry_run, json).await,
    }
}

async fn list(d: &mut Daemon, vm: Option<String>, json: bool) -> Result<(), Error> {
    let vm = vm.unwrap_or_default();
    let action = if vm.is_empty() {
        "Cannot list backups".to_owned()
    } else {
        format!("Cannot list the backups of {}", clean(&vm))
    };
    let mut client = d.client.clone();
    let reply = bounded(d, &action, client.list_backups(ListBackupsRequest { vm: vm.clone() })).await?.into_inner();
    if json {
        print_json(&json!({ "backups": reply.backups.iter().map(render::backup_json).collect::<Vec<_>>() }));
        return Ok(());
    }
    if reply.backups.is_empty() {
        if vm.is_empty() {
            println!("no backups");
        } else {
            println!("no backups of {}", clean(&vm));
        }
        return Ok(());
    }
    let mut rows =
        vec![["VM", "ID", "CREATED", "KIND", "CONSISTENCY", "FREEZE", "SIZE", "STORED"].map(String::from).to_vec()];
    for b in &reply.backups {
        let size = b.disks.iter().fold(0u64, |s, d| s.saturating_add(d.size));
        rows.push(vec![
            clean(&b.vm),
            clean(&b.id),
            render::time(b.created_unix),
            render::kind(b.kind),
            render::consistency(b.consistency),
            if b.freeze_window_us == 0 { "-".into() } else { micros(b.freeze_window_us) },
            bytes(size),
            bytes(render::totals(b).2),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

async fn show(d: &mut Daemon, vm: String, id: String, json: bool) -> Result<(), Error> {
    let action = format!("Cannot show backup {} of {}", clean(&id), clean(&vm));
    let mut client = d.client.clone();
    let b = bounded(d, &action, client.get_backup(BackupRef { vm, id })).await?.into_inner();
    if json {
        print_json(&render::backup_json(&b));
    } else {
        println!("{}", render::backup_text(&b));
    }
    Ok(())
}

async fn verify(d: &mut Daemon, vm: String, id: String, json: bool) -> Result<(), Error> {
    let action = format!("Cannot verify backup {} of {}", clean(&id), clean(&vm));
    let name = format!("backup {} of {}", clean(&id), clean(&vm));
    let damaged = format!("Backup {} of {} is damaged", clean(&id), clean(&vm));
    let r = d.client.verify_backup(BackupRef { vm, id }).await.map_err(|s| d.error(&action, &s))?.into_inner();
    // A reply that says ok and lists problems is not ok.
    let ok = r.ok && r.problems.is_empty();
    if json {
        print_json(&json!({
            "ok": ok,
            "chunks_checked": r.chunks_checked,
            "problems": r.problems.iter().map(render::problem_json).collect::<Vec<_>>(),
        }));
    } else if ok {
        println!("{name}: ok, {} chunks checked", r.chunks_checked);
    } else {
        println!("{name}: DAMAGED, {} problem(s) in {} chunks checked", r.problems.len(), r.chunks_checked);
        for p in &r.problems {
            println!(
                "  disk {} chunk {} at offset {} ({}): {}",
                clean(&p.disk),
                p.chunk_index,
                p.offset,
                or_dash(&p.hash),
                or_dash(&p.fault)
            );
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Error::Failed(format!("{damaged}: {} problem(s)", r.problems.len())))
    }
}

/// The request of `backup restore`: `--to` as typed (livesnapd resolves it beneath its restore
/// directory), the format from `--format` or the file's extension.
fn restore_request(
    vm: &str,
    id: &str,
    disk: &str,
    to: &Path,
    format: Option<Format>,
    live: bool,
) -> Result<RestoreRequest, Error> {
    let format =
        format.unwrap_or(if to.extension().is_some_and(|e| e == "qcow2") { Format::Qcow2 } else { Format::Raw });
    let target_path = to.to_str().ok_or_else(|| Error::Usage(format!("--to {}: not UTF-8", to.display())))?;
    Ok(RestoreRequest {
        vm: vm.to_owned(),
        id: id.to_owned(),
        disk: disk.to_owned(),
        target_path: target_path.to_owned(),
        format: match format {
            Format::Raw => ImageFormat::Raw,
            Format::Qcow2 => ImageFormat::Qcow2,
        }
        .into(),
        live,
    })
}

async fn restore(
    d: &mut Daemon,
    vm: String,
    id: String,
    disk: String,
    to: PathBuf,
    format: Option<Format>,
    json: bool,
) -> Result<(), Error> {
    // As typed: livesnapd resolves it beneath its restore directory, on its own host.
    let path = to;
    let action = format!("Cannot restore disk {} of backup {} of {}", clean(&disk), clean(&id), clean(&vm));
    let req = restore_request(&vm, &id, &disk, &path, format, false)?;
    let target_path = req.target_path.clone();
    let format_name = if req.format == i32::from(ImageFormat::Qcow2) { "qcow2" } else { "raw" };
    let mut stream = d.client.restore_backup(req).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let bar = (!json && std::io::stdout().is_terminal()).then(|| {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        if let Ok(style) = ProgressStyle::with_template(
            "   restoring [{bar:32.cyan/blue}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    });
    let (written, total) = loop {
        match stream.message().await {
            Ok(Some(p)) => {
                if let Some(pb) = &bar {
                    pb.set_length(p.bytes_total.max(p.bytes_written));
                    pb.set_position(p.bytes_written);
                }
                if p.done {
                    break (p.bytes_written, p.bytes_total);
                }
            }
            Ok(None) => {
                if let Some(pb) = &bar {
                    pb.abandon();
                }
                return Err(Error::BadReply {
                    action,
                    reason: format!(
                        "livesnapd's progress stream ended before the restore was done; {} may be incomplete",
                        path.display()
                    ),
                });
            }
            Err(s) => {
                if let Some(pb) = &bar {
                    pb.abandon();
                }
                return Err(d.error(&action, &s));
            }
        }
    };
    if let Some(pb) = &bar {
        pb.finish();
    }
    if json {
        print_json(&json!({
            "vm": vm, "id": id, "disk": disk, "path": target_path, "format": format_name,
            "bytes_written": written, "bytes_total": total,
        }));
    } else {
        let within = if path.is_absolute() { "" } else { " in livesnapd's restore directory" };
        println!(
            "restored disk {} of backup {} of {} to {}{within} ({format_name}, {} written)",
            clean(&disk),
            clean(&id),
            clean(&vm),
            clean(&target_path),
            bytes(written)
        );
    }
    Ok(())
}

/// `backup restore --live`: the target created, then the job's progress until complete.
async fn live_restore(
    d: &mut Daemon,
    vm: String,
    id: String,
    disk: String,
    to: PathBuf,
    format: Option<Format>,
    json: bool,
) -> Result<(), Error> {
    let action = format!("Cannot live-restore disk {} of backup {} of {}", clean(&disk), clean(&id), clean(&vm));
    let req = restore_request(&vm, &id, &disk, &to, format, true)?;
    let target_path = req.target_path.clone();
    // Registered before the call (not at a first poll): from here a Ctrl-C detaches.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut stream = d.client.restore_backup(req).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let mut job = String::new();
    let mut bar: Option<ProgressBar> = None;
    let mut last_state = None;
    loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = interrupt.recv() => {
                if let Some(pb) = &bar {
                    pb.abandon();
                }
                return Err(Error::LiveDetached { job: clean(&job), target: clean(&target_path) });
            }
        };
        let p = match next {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(Error::BadReply {
                    action,
                    reason: format!(
                        "livesnapd's progress stream ended before the restore was complete (job {})",
                        clean(&job)
                    ),
                })
            }
            Err(s) => {
                if let Some(pb) = &bar {
                    pb.abandon();
                }
                return Err(d.error(&action, &s));
            }
        };
        if job.is_empty() {
            job = p.job_id.clone();
            if !json {
                println!(
                    "live restore job {}: created {} (and its map {}).
Start VM {} with {} as disk {}: livesnapd feeds it from backup {} while the guest runs.
Ctrl-C leaves the job running (snapctl job show {}).",
                    clean(&job),
                    clean(&p.target_path),
                    clean(&p.map_path),
                    clean(&vm),
                    clean(&p.target_path),
                    clean(&disk),
                    clean(&id),
                    clean(&job),
                );
            }
        }
        let state = livesnap_proto::daemon::LiveRestoreState::try_from(p.state).ok();
        if !json && state != last_state {
            let what = match state {
                Some(livesnap_proto::daemon::LiveRestoreState::Waiting) => {
                    "waiting for the VM's livesnap-blk to serve the target"
                }
                Some(livesnap_proto::daemon::LiveRestoreState::Feeding) => "feeding the VM's livesnap-blk",
                Some(livesnap_proto::daemon::LiveRestoreState::Complete) => "complete",
                _ => "in an unknown state",
            };
            if let Some(pb) = &bar {
                pb.println(format!("   {what}"));
            } else {
                println!("   {what}");
            }
            last_state = state;
        }
        if !json && bar.is_none() && std::io::stdout().is_terminal() {
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template("   chunks [{bar:32.cyan/blue}] {pos}/{len}") {
                pb.set_style(style.progress_chars("=> "));
            }
            bar = Some(pb);
        }
        if let Some(pb) = &bar {
            pb.set_length(p.chunks_total);
            pb.set_position(p.chunks_done);
        }
        if p.done {
            if let Some(pb) = &bar {
                pb.finish();
            }
            if json {
                print_json(&json!({
                    "vm": vm, "id": id, "disk": disk, "job": p.job_id, "path": p.target_path,
                    "chunks_total": p.chunks_total, "complete": true,
                }));
            } else {
                println!(
                    "live restore of disk {} complete: {} is a plain image now",
                    clean(&disk),
                    clean(&p.target_path)
                );
            }
            return Ok(());
        }
    }
}

async fn delete(d: &mut Daemon, vm: String, id: String, json: bool) -> Result<(), Error> {
    let action = format!("Cannot delete backup {} of {}", clean(&id), clean(&vm));
    let mut client = d.client.clone();
    bounded(d, &action, client.delete_backup(BackupRef { vm: vm.clone(), id: id.clone() })).await?;
    if json {
        print_json(&json!({ "vm": vm, "id": id, "deleted": true }));
    } else {
        println!("deleted backup {} of {}", clean(&id), clean(&vm));
    }
    Ok(())
}

async fn prune(d: &mut Daemon, vm: String, keep: KeepArgs, dry_run: bool, json: bool) -> Result<(), Error> {
    let action = format!("Cannot prune the backups of {}", clean(&vm));
    let req = PruneRequest {
        vm: vm.clone(),
        keep_last: keep.last.unwrap_or(0),
        keep_hourly: keep.hourly.unwrap_or(0),
        keep_daily: keep.daily.unwrap_or(0),
        keep_weekly: keep.weekly.unwrap_or(0),
        keep_monthly: keep.monthly.unwrap_or(0),
        keep_yearly: keep.yearly.unwrap_or(0),
        dry_run,
    };
    let r = d.client.prune(req).await.map_err(|s| d.error(&action, &s))?.into_inner();
    if json {
        print_json(&json!({
            "vm": vm,
            "keep": r.keep,
            "dry_run": r.dry_run,
            "backups": r.backups.iter().map(|b| json!({
                "id": b.id, "created_unix": b.created_unix, "created": render::time(b.created_unix),
                "keep": b.keep, "rule": (!b.rule.is_empty()).then_some(&b.rule),
            })).collect::<Vec<Value>>(),
            "deleted": r.deleted,
            "chunks_removed": r.chunks_removed,
            "bytes_freed": r.bytes_freed,
            "gc_deferred": (!r.gc_deferred.is_empty()).then_some(&r.gc_deferred),
        }));
        return Ok(());
    }
    if r.backups.is_empty() {
        println!("{} has no backups", clean(&vm));
        return Ok(());
    }
    let mut rows = vec![["ID", "CREATED", "DECISION", "KEPT BY"].map(String::from).to_vec()];
    for b in &r.backups {
        rows.push(vec![
            clean(&b.id),
            render::time(b.created_unix),
            if b.keep { "keep".into() } else { "remove".into() },
            if b.rule.is_empty() { "-".into() } else { clean(&b.rule) },
        ]);
    }
    print!("{}", table(&rows));
    let removed = r.backups.iter().filter(|b| !b.keep).count();
    if r.dry_run {
        println!(
            "dry run ({}): would keep {}, remove {removed}; nothing deleted",
            clean(&r.keep),
            r.backups.len() - removed
        );
    } else if r.deleted.is_empty() {
        println!("nothing to prune ({}): all {} kept", clean(&r.keep), r.backups.len());
    } else {
        let gc = if r.gc_deferred.is_empty() {
            format!("removed {} chunks, freed {}", r.chunks_removed, bytes(r.bytes_freed))
        } else {
            format!("chunks not collected yet: {}", clean(&r.gc_deferred))
        };
        println!(
            "pruned ({}): kept {}, deleted {}; {gc}",
            clean(&r.keep),
            r.backups.len() - r.deleted.len(),
            r.deleted.len()
        );
    }
    Ok(())
}
