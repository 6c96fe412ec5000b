//! Hooks: executables in the hooks directory, run around a freeze.
//!
//! As QEMU's `fsfreeze-hook`: in name order with `freeze` before the filesystems freeze; after
//! the thaw in reverse order with `thaw`. When a freeze is aborted, the hooks that were started
//! with `freeze` (the failing one included, so it can undo what it half did) get `freeze-fail`
//! in reverse order (VMware Tools' convention).
//!
//! Skipped: anything not a regular executable file, hidden files, and package-manager
//! leftovers (`*~`, `*.dpkg-*`, `*.rpm*`, `*.ucf-*`). Each hook runs in its own process group
//! with `LIVESNAP_SNAPSHOT_ID` in its environment and stdin from `/dev/null`; it is killed (with
//! its group) at its timeout. Its stdout and stderr are captured up to a bound.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

use crate::sys;

/// The largest output limit per stream: the host takes up to 16 KiB of a hook's output,
/// stdout and stderr together.
pub const MAX_OUTPUT_LIMIT: usize = 8192;

/// How long output is still read after a hook exited (a background child it left may hold
/// the pipes open forever).
const OUTPUT_GRACE: Duration = Duration::from_millis(300);

/// The argument a hook is called with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Freeze,
    Thaw,
    FreezeFail,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Freeze => "freeze",
            Phase::Thaw => "thaw",
            Phase::FreezeFail => "freeze-fail",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Exited non-zero or killed by a signal not ours.
    Failed,
    TimedOut,
    SpawnFailed,
}

/// What one hook run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookResult {
    pub name: String,
    pub phase: Phase,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// stdout then stderr, lossy UTF-8, at most the configured bound.
    pub output: String,
    pub output_truncated: bool,
    pub duration: Duration,
}

impl HookResult {
    /// Why the hook failed, for the host, or `None` if it succeeded.
    pub fn failure(&self) -> Option<String> {
        let why = match self.outcome {
            Outcome::Ok => return None,
            Outcome::Failed => match self.exit_code {
                Some(c) => format!("exited with code {c}"),
                None => "was killed by a signal".to_string(),
            },
            Outcome::TimedOut => format!("timed out after {:?}", self.duration),
            Outcome::SpawnFailed => "could not be started".to_string(),
        };
        let out = self.output.trim();
        let out = if out.is_empty() { String::new() } else { format!(": {}", tail_chars(out, 512)) };
        Some(format!("Hook {} ({}) {why}{out}", self.name, self.phase.as_str()))
    }
}

fn tail_chars(s: &str, n: usize) -> &str {
    match s.char_indices().rev().nth(n) {
        Some((i, _)) => &s[i..],
        None => s,
    }
}

/// The hooks directory and how hooks are run.
#[derive(Clone, Debug)]
pub struct Hooks {
    pub dir: PathBuf,
    /// Per hook run.
    pub timeout: Duration,
    /// Bytes of output kept per stream.
    pub max_output: usize,
}

/// Whether a file name is one of the names hooks skip.
pub fn skipped_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.contains(".dpkg-")
        || name.contains(".rpm")
        || name.contains(".ucf-")
}

impl Hooks {
    /// The hooks to run, in name order. A missing directory means no hooks.
    pub fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut hooks = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(name = ?name, "skipping hook: name is not UTF-8");
                continue;
            };
            if skipped_name(name) {
                tracing::debug!(name, "skipping hook: package-manager leftover or hidden");
                continue;
            }
            // Follows symlinks, as run-parts does.
            let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                tracing::debug!(name, "skipping hook: not an executable file");
                continue;
            }
            hooks.push(entry.path());
        }
        hooks.sort();
        Ok(hooks)
    }

    /// Runs one hook with `phase`, at most `timeout`.
    pub async fn run(&self, hook: &Path, phase: Phase, snapshot_id: &str, timeout: Duration) -> HookResult {
        let name = hook.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let start = Instant::now();
        let mut result = HookResult {
            name,
            phase,
            outcome: Outcome::SpawnFailed,
            exit_code: None,
            output: String::new(),
            output_truncated: false,
            duration: Duration::ZERO,
        };
        let mut cmd = Command::new(hook);
        cmd.arg(phase.as_str())
            .env("LIVESNAP_SNAPSHOT_ID", snapshot_id)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(hook = %result.name, phase = phase.as_str(), error = %livesnap_proto::error::chain(&e), "cannot start hook");
                result.output = e.to_string();
                return result;
            }
        };
        let pgid = child.id();
        let max = self.max_output;
        let out = child.stdout.take().map(|s| Captured::spawn(s, max));
        let err = child.stderr.take().map(|s| Captured::spawn(s, max));
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => {
                result.exit_code = status.code();
                result.outcome = if status.success() { Outcome::Ok } else { Outcome::Failed };
            }
            Ok(Err(e)) => {
                result.outcome = Outcome::Failed;
                result.output = format!("Cannot wait for the hook: {e}\n");
            }
            Err(_) => {
                if let Some(pgid) = pgid {
                    sys::kill_group(pgid);
                }
                let _ = child.kill().await;
                result.outcome = Outcome::TimedOut;
            }
        }
        result.duration = start.elapsed();
        let mut streams = Vec::with_capacity(2);
        for captured in [out, err].into_iter().flatten() {
            streams.push(captured.finish().await);
        }
        let (text, truncated) = output_text(&streams, max);
        result.output.push_str(&text);
        result.output_truncated |= truncated;
        if result.outcome == Outcome::Ok {
            tracing::info!(hook = %result.name, phase = phase.as_str(), "hook succeeded");
        } else {
            tracing::warn!(hook = %result.name, phase = phase.as_str(), outcome = ?result.outcome, code = ?result.exit_code, "hook failed");
        }
        result
    }

    /// Runs `hooks` with `freeze` in order, each within its timeout and what remains until
    /// `deadline`. Stops at the first failure. Returns the results, one per hook started.
    pub async fn run_freeze(&self, hooks: &[PathBuf], snapshot_id: &str, deadline: Instant) -> Vec<HookResult> {
        let mut results = Vec::new();
        for hook in hooks {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.run(hook, Phase::Freeze, snapshot_id, self.timeout.min(left)).await;
            let failed = r.outcome != Outcome::Ok;
            results.push(r);
            if failed {
                break;
            }
        }
        results
    }

    /// Runs `hooks` in reverse order with `phase` (thaw or freeze-fail); a failure does not stop
    /// the others.
    pub async fn run_reverse(&self, hooks: &[PathBuf], phase: Phase, snapshot_id: &str) -> Vec<HookResult> {
        let mut results = Vec::new();
        for hook in hooks.iter().rev() {
            results.push(self.run(hook, phase, snapshot_id, self.timeout).await);
        }
        results
    }
}

/// Adds what was read from a stream to what is kept of it (at most `max` bytes) and notes
/// whether anything was left out.
pub fn keep(kept: &mut (Vec<u8>, bool), read: &[u8], max: usize) {
    let room = max.saturating_sub(kept.0.len());
    kept.0.extend_from_slice(&read[..read.len().min(room)]);
    kept.1 |= read.len() > room;
}

/// The output reported for a hook: its streams (the bytes kept of each, at most `max`, and
/// whether more came), stdout then stderr, as UTF-8; and whether any was cut.
///
/// Each stream's text is cut to `max` bytes on a character boundary: an invalid byte becomes a
/// 3-byte replacement character, and the host refuses a reply whose output passes its limit.
pub fn output_text(streams: &[(Vec<u8>, bool)], max: usize) -> (String, bool) {
    let mut text = String::new();
    let mut truncated = false;
    for (bytes, cut) in streams {
        let s = String::from_utf8_lossy(bytes);
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        text.push_str(&s[..end]);
        truncated |= *cut || end < s.len();
    }
    (text, truncated)
}

/// One output stream of a hook, read by a task of its own: the first `max` bytes kept,
/// whether more came.
struct Captured {
    kept: Arc<Mutex<(Vec<u8>, bool)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Captured {
    fn spawn(mut from: impl AsyncRead + Unpin + Send + 'static, max: usize) -> Self {
        let kept = Arc::new(Mutex::new((Vec::new(), false)));
        let k = Arc::clone(&kept);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => keep(&mut k.lock().unwrap_or_else(std::sync::PoisonError::into_inner), &buf[..n], max),
                }
            }
        });
        Captured { kept, task }
    }

    /// What was read, once the stream ended or [`OUTPUT_GRACE`] passed (a background child of
    /// the hook may hold the pipe open; it is then no longer read).
    async fn finish(mut self) -> (Vec<u8>, bool) {
        if tokio::time::timeout(OUTPUT_GRACE, &mut self.task).await.is_err() {
            self.task.abort();
        }
        let k = self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (k.0.clone(), k.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn hooks(dir: &Path) -> Hooks {
        Hooks { dir: dir.to_path_buf(), timeout: Duration::from_secs(20), max_output: 64 }
    }

    fn names(hooks: &[PathBuf]) -> Vec<String> {
        hooks.iter().map(|h| h.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn listing_is_in_name_order_and_skips_leftovers_and_non_executables() {
        let d = tempfile::tempdir().unwrap();
        for n in ["20-b", "10-a", "30-c~", "40-d.dpkg-old", "50-e.rpmsave", "60-f.dpkg-dist", ".hidden", "70-g.ucf-old"]
        {
            script(d.path(), n, "true", 0o755);
        }
        script(d.path(), "15-not-exec", "true", 0o644);
        std::fs::create_dir(d.path().join("25-dir")).unwrap();
        std::os::unix::fs::symlink(d.path().join("10-a"), d.path().join("12-link")).unwrap();
        let list = hooks(d.path()).list().unwrap();
        assert_eq!(names(&list), ["10-a", "12-link", "20-b"]);
    }

    #[test]
    fn missing_directory_means_no_hooks() {
        let d = tempfile::tempdir().unwrap();
        assert!(hooks(&d.path().join("nope")).list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn freeze_stops_at_the_first_failure_and_reports_its_output() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let log_s = log.display();
        std::fs::create_dir(d.path().join("h")).unwrap();
        let h = d.path().join("h");
        script(&h, "10-ok", &format!("echo \"10 $1 $LIVESNAP_SNAPSHOT_ID\" >>{log_s}"), 0o755);
        script(&h, "20-fail", &format!("echo \"20 $1\" >>{log_s}; echo db busy >&2; exit 3"), 0o755);
        script(&h, "30-never", &format!("echo \"30 $1\" >>{log_s}"), 0o755);
        let hooks = hooks(&h);
        let list = hooks.list().unwrap();
        let r = hooks.run_freeze(&list, "snap-1", Instant::now() + Duration::from_secs(60)).await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].outcome, Outcome::Ok);
        assert_eq!((r[1].outcome, r[1].exit_code), (Outcome::Failed, Some(3)));
        assert_eq!(r[1].output, "db busy\n");
        let why = r[1].failure().unwrap();
        assert!(why.contains("20-fail") && why.contains("code 3") && why.contains("db busy"), "{why}");
        let ran: Vec<PathBuf> = list[..r.len()].to_vec();
        let back = hooks.run_reverse(&ran, Phase::FreezeFail, "snap-1").await;
        assert_eq!(back.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["20-fail", "10-ok"]);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "10 freeze snap-1\n20 freeze\n20 freeze-fail\n10 freeze-fail snap-1\n"
        );
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("child-survived");
        script(d.path(), "10-hang", &format!("(sleep 2; touch {}) & echo started; sleep 600", marker.display()), 0o755);
        let hooks = Hooks { timeout: Duration::from_millis(500), ..hooks(d.path()) };
        let list = hooks.list().unwrap();
        let r = hooks.run_freeze(&list, "s", Instant::now() + Duration::from_secs(60)).await;
        assert_eq!(r[0].outcome, Outcome::TimedOut);
        assert!(r[0].duration < Duration::from_secs(30));
        assert!(r[0].output.starts_with("started"), "{:?}", r[0].output);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the hook's background child outlived the timeout");
    }

    #[tokio::test]
    async fn the_freeze_deadline_bounds_hooks_shorter_than_their_timeout() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "10-slow", "sleep 600", 0o755);
        let hooks = hooks(d.path());
        let list = hooks.list().unwrap();
        let r = hooks.run_freeze(&list, "s", Instant::now() + Duration::from_millis(300)).await;
        assert_eq!(r[0].outcome, Outcome::TimedOut);
    }

    #[tokio::test]
    async fn output_is_bounded_and_a_background_child_holding_the_pipe_does_not_hang() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "10-chatty", "head -c 100000 /dev/zero | tr '\\0' x; (sleep 5) & exit 0", 0o755);
        let hooks = hooks(d.path());
        let list = hooks.list().unwrap();
        let r = hooks.run(&list[0], Phase::Thaw, "s", Duration::from_secs(20)).await;
        assert_eq!(r.outcome, Outcome::Ok);
        assert_eq!(r.output.len(), 64);
        assert!(r.output_truncated);
    }

    /// Found by the hook_output fuzz target: each invalid byte became a 3-byte replacement
    /// character, so a hook printing binary sent up to 3 times the limit, and the host refused
    /// the whole reply (and with it the freeze).
    #[test]
    fn output_that_is_not_utf8_stays_within_the_limit() {
        let binary = vec![0xffu8; 4096];
        let (text, truncated) = output_text(&[(binary.clone(), false), (binary, true)], 4096);
        assert!(text.len() <= 2 * 4096, "{} bytes", text.len());
        assert!(text.starts_with('\u{fffd}'));
        assert!(truncated);
        // Cut on a character boundary, whatever the limit.
        let (text, truncated) = output_text(&[("été".as_bytes().to_vec(), false)], 4);
        assert_eq!((text.as_str(), truncated), ("ét", true));
        let (text, truncated) = output_text(&[(b"ok\n".to_vec(), false), (Vec::new(), false)], 4);
        assert_eq!((text.as_str(), truncated), ("ok\n", false));
    }

    #[tokio::test]
    async fn a_hook_that_cannot_start_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("10-bad-interp");
        std::fs::write(&p, "#!/nonexistent/interpreter\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = hooks(d.path()).run(&p, Phase::Freeze, "s", Duration::from_secs(5)).await;
        assert_eq!(r.outcome, Outcome::SpawnFailed);
        assert!(r.failure().unwrap().contains("could not be started"));
    }
}
