//! `job list`, `job show` and `job cancel`.

use std::time::Duration;

use livesnap_proto::daemon::{Job, JobRef, JobStatus, ListJobsRequest, StopReason};
use serde_json::{json, Value};

use super::args::JobAction;
use super::commands::{bounded, or_dash, print_json, table};
use super::connect::Daemon;
use super::error::Error;
use super::render::{self, clean};

/// How often `job cancel` asks whether the job has ended.
const POLL: Duration = Duration::from_millis(200);

pub async fn run(d: &mut Daemon, action: JobAction, json: bool) -> Result<(), Error> {
    match action {
        JobAction::List { vm, last } => list(d, vm, last, json).await,
        JobAction::Show { id } => show(d, id, json).await,
        JobAction::Cancel { id, no_wait } => cancel(d, id, no_wait, json).await,
    }
}

pub fn status(v: i32) -> String {
    match JobStatus::try_from(v) {
        Ok(JobStatus::Running) => "running".into(),
        Ok(JobStatus::Ok) => "ok".into(),
        Ok(JobStatus::Failed) => "failed".into(),
        Ok(JobStatus::Cancelled) => "cancelled".into(),
        Ok(JobStatus::Unfinished) => "unfinished".into(),
        Ok(JobStatus::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({v})"),
    }
}

fn stopping(v: i32) -> Option<String> {
    match StopReason::try_from(v) {
        Ok(StopReason::None) => None,
        Ok(StopReason::Cancel) => Some("cancel requested".into()),
        Ok(StopReason::Shutdown) => Some("livesnapd stopping".into()),
        Err(_) => Some(format!("unknown({v})")),
    }
}

/// A job's status as a person reads it: `running (cancel requested)`.
fn status_text(j: &Job) -> String {
    match stopping(j.stopping) {
        Some(s) if j.status == JobStatus::Running as i32 => format!("{} ({s})", status(j.status)),
        _ => status(j.status),
    }
}

fn time_us(us: u64) -> String {
    if us == 0 {
        "-".into()
    } else {
        render::time(us / 1_000_000)
    }
}

pub fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id,
        "vm": j.vm,
        "status": status(j.status),
        "stage": j.stage,
        "started_unix_us": j.started_unix_us,
        "finished_unix_us": (j.finished_unix_us != 0).then_some(j.finished_unix_us),
        "reason": j.reason,
        "snapshot_id": (j.snapshot_id != 0).then_some(j.snapshot_id),
        "stopping": stopping(j.stopping),
    })
}

fn job_text(j: &Job) -> String {
    let mut out = format!(
        "job {}\n  vm        {}\n  status    {}\n  stage     {}\n  started   {}\n  finished  {}\n  snapshot  {}",
        clean(&j.id),
        clean(&j.vm),
        status_text(j),
        clean(&j.stage),
        time_us(j.started_unix_us),
        time_us(j.finished_unix_us),
        if j.snapshot_id == 0 { "-".into() } else { j.snapshot_id.to_string() },
    );
    if !j.reason.is_empty() {
        out += &format!("\n  reason    {}", clean(&j.reason));
    }
    out
}

async fn list(d: &mut Daemon, vm: Option<String>, last: Option<u32>, json: bool) -> Result<(), Error> {
    let vm = vm.unwrap_or_default();
    let action =
        if vm.is_empty() { "Cannot list jobs".to_owned() } else { format!("Cannot list the jobs of {}", clean(&vm)) };
    let mut client = d.client.clone();
    let req = ListJobsRequest { vm: vm.clone(), last: last.unwrap_or(0) };
    let reply = bounded(d, &action, client.list_jobs(req)).await?.into_inner();
    if json {
        print_json(&json!({ "jobs": reply.jobs.iter().map(job_json).collect::<Vec<_>>() }));
        return Ok(());
    }
    if reply.jobs.is_empty() {
        println!("{}", if vm.is_empty() { "no jobs".to_owned() } else { format!("no jobs of {}", clean(&vm)) });
        return Ok(());
    }
    let mut rows = vec![["ID", "VM", "STATUS", "STAGE", "STARTED", "REASON"].map(String::from).to_vec()];
    for j in &reply.jobs {
        rows.push(vec![
            clean(&j.id),
            clean(&j.vm),
            status_text(j),
            clean(&j.stage),
            time_us(j.started_unix_us),
            or_dash(&j.reason),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

async fn show(d: &mut Daemon, id: String, json: bool) -> Result<(), Error> {
    let action = format!("Cannot show job {}", clean(&id));
    let mut client = d.client.clone();
    let j = bounded(d, &action, client.get_job(JobRef { id })).await?.into_inner();
    if json {
        print_json(&job_json(&j));
    } else {
        println!("{}", job_text(&j));
    }
    Ok(())
}

async fn cancel(d: &mut Daemon, id: String, no_wait: bool, json: bool) -> Result<(), Error> {
    let action = format!("Cannot cancel job {}", clean(&id));
    let mut client = d.client.clone();
    let mut j = bounded(d, &action, client.cancel_job(JobRef { id: id.clone() })).await?.into_inner();
    if !no_wait {
        while j.status == JobStatus::Running as i32 {
            tokio::time::sleep(POLL).await;
            j = bounded(d, &action, client.get_job(JobRef { id: id.clone() })).await?.into_inner();
        }
    }
    if json {
        print_json(&job_json(&j));
    } else {
        println!("{}", job_text(&j));
    }
    let ended_otherwise = j.status != JobStatus::Running as i32 && j.status != JobStatus::Cancelled as i32;
    if ended_otherwise {
        return Err(Error::Status {
            action,
            code: tonic::Code::FailedPrecondition,
            message: format!("the job ended {} before the cancel took effect", status(j.status)),
        });
    }
    Ok(())
}
