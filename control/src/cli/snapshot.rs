//! `snapctl vm snapshot`: asks livesnapd for a snapshot and follows its event stream.
//!
//! Three views of the same stream: a live progress bar (stdout is a terminal), plain lines
//! (stdout is a file or a pipe: stage lines and each disk's progress in steps of 10 %), and
//! JSON (one object per event per line; the last line is the `done` or `failed` event).
//! The stream must end with Done or Failed; one that ends otherwise is an error, and the job
//! may still be running in livesnapd.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use livesnap_proto::daemon::{
    snapshot_event::Event, Backup, BackupMode, CreateSnapshotRequest, QuiesceMode, SnapshotEvent,
};

use super::args::SnapshotArgs;
use super::connect::Daemon;
use super::error::Error;
use super::render::{self, bytes, clean, micros};

/// At most this many disks get a bar (or a progress line) of their own.
const MAX_DISKS_SHOWN: usize = 64;

pub async fn run(d: &mut Daemon, args: SnapshotArgs, json: bool) -> Result<(), Error> {
    let vm = args.vm;
    let action = format!("Cannot snapshot {}", clean(&vm));
    let backup = if args.full {
        BackupMode::Full
    } else if args.incremental {
        BackupMode::Incremental
    } else {
        BackupMode::Auto
    };
    let quiesce = if args.no_quiesce {
        QuiesceMode::Off
    } else if args.require_quiesce {
        QuiesceMode::Required
    } else {
        QuiesceMode::Preferred
    };
    let req = CreateSnapshotRequest {
        vm: vm.clone(),
        backup: backup.into(),
        quiesce: quiesce.into(),
        freeze_timeout_ms: args.freeze_timeout.unwrap_or(0),
    };
    let mut stream = d.client.create_snapshot(req).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let mut view = View::new(json);
    let mut job = String::new();
    // Registered now (not at a first poll), for the whole stream: from here a Ctrl-C
    // detaches, it does not kill snapctl mid-line.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(Error::Signal)?;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = interrupt.recv() => {
                view.abandon();
                return Err(Error::Detached { job: clean(&job), vm: clean(&vm) });
            }
        };
        let ev = match msg {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                view.abandon();
                return Err(Error::BadReply {
                    action: format!("Snapshot of {}", clean(&vm)),
                    reason: format!(
                        "livesnapd's event stream ended before the snapshot was done or failed{}; \
                         see `snapctl vm list` and `snapctl backup list {}`",
                        if job.is_empty() { String::new() } else { format!(" (job {})", clean(&job)) },
                        clean(&vm)
                    ),
                });
            }
            Err(s) => {
                view.abandon();
                return Err(d.error(format!("Snapshot of {}", clean(&vm)), &s));
            }
        };
        if job.is_empty() && !ev.job_id.is_empty() {
            job = ev.job_id.clone();
            view.started(&job, &vm);
        }
        view.event(&ev);
        match ev.event {
            Some(Event::Done(b)) => {
                view.done(&b);
                return Ok(());
            }
            Some(Event::Failed(f)) => {
                view.abandon();
                let stage = if f.stage.is_empty() { String::new() } else { format!(" in {}", clean(&f.stage)) };
                let reason = if f.reason.is_empty() { "no reason given".to_owned() } else { clean(&f.reason) };
                return Err(Error::SnapshotFailed {
                    message: format!("Snapshot of {} failed{stage}: {reason} [{}]", clean(&vm), render::code(f.code)),
                    code: f.code,
                });
            }
            _ => {}
        }
    }
}

enum View {
    Json,
    Plain(Plain),
    Bars(Bars),
}

impl View {
    fn new(json: bool) -> View {
        if json {
            View::Json
        } else if std::io::stdout().is_terminal() {
            View::Bars(Bars::new())
        } else {
            View::Plain(Plain::default())
        }
    }

    fn started(&mut self, job: &str, vm: &str) {
        let line = format!("job {}: snapshot of {}", clean(job), clean(vm));
        match self {
            View::Json => {}
            View::Plain(_) => say(&line),
            View::Bars(b) => b.line(&line),
        }
    }

    fn event(&mut self, ev: &SnapshotEvent) {
        match self {
            View::Json => say(&render::event_json(ev).to_string()),
            View::Plain(p) => {
                if let Some(line) = p.line(ev) {
                    say(&line);
                }
            }
            View::Bars(b) => b.event(ev),
        }
    }

    fn done(&mut self, b: &Backup) {
        match self {
            View::Json => {}
            View::Plain(_) => say(&render::backup_text(b)),
            View::Bars(bars) => {
                bars.finish();
                say(&render::backup_text(b));
            }
        }
    }

    /// The stream ended without Done: the bars go, what they showed stays said above them.
    fn abandon(&mut self) {
        if let View::Bars(b) = self {
            b.abandon();
        }
    }
}

/// One line to stdout, flushed (a pipe's reader sees it now).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A stage line for an event, shared by the plain and the bar views; `None` for progress.
fn stage_line(ev: &SnapshotEvent) -> Option<String> {
    Some(match ev.event.as_ref()? {
        Event::Quiescing(_) => "quiescing the guest".to_owned(),
        Event::Frozen(f) => {
            format!("frozen: {} filesystem{}", f.filesystems, if f.filesystems == 1 { "" } else { "s" })
        }
        Event::Cut(c) => {
            let crash = if c.crash_consistent_reason.is_empty() {
                String::new()
            } else {
                format!(", crash-consistent: {}", clean(&c.crash_consistent_reason))
            };
            format!("cut: snapshot {} (disks paused {}){crash}", c.snapshot_id, micros(c.pause_us))
        }
        Event::Thawed(t) => {
            if t.freeze_window_us == 0 {
                "thawed: nothing was frozen".to_owned()
            } else {
                format!("thawed: freeze window {}", micros(t.freeze_window_us))
            }
        }
        Event::Failed(f) => {
            format!("failed{}", if f.stage.is_empty() { String::new() } else { format!(" in {}", clean(&f.stage)) })
        }
        Event::BackingUp(_) | Event::Merging(_) | Event::Done(_) => return None,
    })
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
    }
}

/// Plain lines: stages, then each disk's progress at every 10 %, merging at its start and end.
#[derive(Default)]
struct Plain {
    /// The last tenth printed per disk.
    disks: HashMap<String, u64>,
    merge_started: bool,
    merge_done: bool,
}

impl Plain {
    fn line(&mut self, ev: &SnapshotEvent) -> Option<String> {
        match ev.event.as_ref()? {
            Event::BackingUp(p) => {
                let tenth = percent(p.bytes_read, p.bytes_total) / 10;
                let known = self.disks.len() < MAX_DISKS_SHOWN || self.disks.contains_key(&p.disk);
                match self.disks.get(&p.disk) {
                    Some(&last) if last >= tenth => None,
                    _ if !known => None,
                    _ => {
                        self.disks.insert(p.disk.clone(), tenth);
                        Some(format!(
                            "backing up {}: {} of {} ({}%)",
                            clean(&p.disk),
                            bytes(p.bytes_read),
                            bytes(p.bytes_total),
                            percent(p.bytes_read, p.bytes_total)
                        ))
                    }
                }
            }
            Event::Merging(m) => {
                let finished = m.remaining_bytes == 0;
                if (self.merge_started && !finished) || self.merge_done {
                    return None;
                }
                self.merge_started = true;
                self.merge_done = finished;
                Some(format!("merging: {} merged, {} remaining", bytes(m.merged_bytes), bytes(m.remaining_bytes)))
            }
            _ => stage_line(ev),
        }
    }
}

/// The live view: stage lines above, a bar per disk, a bar for the merge.
struct Bars {
    multi: MultiProgress,
    disks: HashMap<String, ProgressBar>,
    merge: Option<ProgressBar>,
    style: ProgressStyle,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:32.cyan/blue}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Bars { multi, disks: HashMap::new(), merge: None, style }
    }

    fn line(&self, line: &str) {
        if self.multi.println(line).is_err() {
            say(line);
        }
    }

    fn bar(&self, prefix: String, total: u64) -> ProgressBar {
        let pb = self.multi.add(ProgressBar::new(total));
        pb.set_style(self.style.clone());
        pb.set_prefix(prefix);
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    fn event(&mut self, ev: &SnapshotEvent) {
        match ev.event.as_ref() {
            Some(Event::BackingUp(p)) => {
                if !self.disks.contains_key(&p.disk) && self.disks.len() >= MAX_DISKS_SHOWN {
                    return;
                }
                let pb = match self.disks.get(&p.disk) {
                    Some(pb) => pb.clone(),
                    None => {
                        let pb = self.bar(clean(&p.disk), p.bytes_total);
                        self.disks.insert(p.disk.clone(), pb.clone());
                        pb
                    }
                };
                // A total that grows or a count past it must not confuse the bar.
                pb.set_length(p.bytes_total.max(p.bytes_read));
                pb.set_position(p.bytes_read);
                if p.bytes_read >= p.bytes_total {
                    pb.finish_with_message("read");
                }
            }
            Some(Event::Merging(m)) => {
                for pb in self.disks.values() {
                    if !pb.is_finished() {
                        pb.finish();
                    }
                }
                let total = m.merged_bytes.saturating_add(m.remaining_bytes);
                let pb = match &self.merge {
                    Some(pb) => pb.clone(),
                    None => {
                        let pb = self.bar("merging".into(), total);
                        self.merge = Some(pb.clone());
                        pb
                    }
                };
                pb.set_length(total);
                pb.set_position(m.merged_bytes);
                if m.remaining_bytes == 0 {
                    pb.finish_with_message("merged");
                }
            }
            _ => {
                if let Some(line) = stage_line(ev) {
                    self.line(&line);
                }
            }
        }
    }

    fn finish(&mut self) {
        for pb in self.disks.values().chain(self.merge.as_ref()) {
            if !pb.is_finished() {
                pb.finish();
            }
        }
    }

    fn abandon(&mut self) {
        for pb in self.disks.values().chain(self.merge.as_ref()) {
            pb.abandon();
        }
    }
}
