//! The guest workload's log of fsync'd records, shared by the tests that boot a writing guest
//! and check what a backup of it holds.
//!
//! The guest appends record `k` (`R k w1..w8 sum`: eight random words from `$RANDOM` and a
//! checksum of `k` and the words) to `/records.log` on its ext4 disk, fsyncs it, then prints
//! `FSYNCED=k` on its console ([`APPEND`] is that step in busybox `sh`). A backup taken after
//! `FSYNCED=k` was printed must hold records `1..=k`, each whole and valid, in order.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Words of payload per record.
pub const WORDS: usize = 8;
/// The checksum: `sum = k; for w: sum = (sum * MUL + w) % MOD` (the guest's shell arithmetic).
const MUL: u64 = 131;
const MOD: u64 = 2_147_483_647;

/// Busybox `sh`: appends record `$i` to `$LOG`, fsyncs it, records `$i` in `/tmp/fsynced` and
/// prints `FSYNCED=$i`; exits the job if a write or the fsync fails.
pub const APPEND: &str = r#"h=$i
p=
for n in 1 2 3 4 5 6 7 8; do
  w=$RANDOM
  h=$(( (h * 131 + w) % 2147483647 ))
  p="$p $w"
done
printf 'R %d%s %d\n' "$i" "$p" "$h" >>"$LOG" || { echo "WRITE-FAILED=$i"; exit 1; }
sync "$LOG" || { echo "FSYNC-FAILED=$i"; exit 1; }
echo "$i" >/tmp/fsynced
echo "FSYNCED=$i"
"#;

/// A record line's sequence number, or why the line is not a valid record.
pub fn parse_record(line: &str) -> Result<u64, String> {
    let f: Vec<&str> = line.split(' ').collect();
    if f.len() != WORDS + 3 || f[0] != "R" {
        return Err(format!("not a record: {line:?}"));
    }
    let num = |s: &str| s.parse::<u64>().map_err(|_| format!("{s:?} is not a number in {line:?}"));
    let k = num(f[1])?;
    let mut sum = k % MOD;
    for w in &f[2..2 + WORDS] {
        let w = num(w)?;
        if w > 32767 {
            return Err(format!("payload word {w} out of range in {line:?}"));
        }
        sum = (sum * MUL + w) % MOD;
    }
    let want = num(f[2 + WORDS])?;
    if sum != want {
        return Err(format!("checksum {want} wrong (computed {sum}) in {line:?}"));
    }
    Ok(k)
}

/// The records file's text: records `1..=n`, in order, each whole and valid. Its `n`, or what
/// is wrong.
pub fn check_records(text: &str) -> Result<u64, String> {
    let mut n = 0u64;
    for line in text.lines() {
        let k = parse_record(line).map_err(|e| format!("record {} invalid: {e}", n + 1))?;
        if k != n + 1 {
            return Err(format!("records out of order: {line:?} after record {n}"));
        }
        n = k;
    }
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(format!("the last record (after {n}) is cut short"));
    }
    Ok(n)
}

/// The records in `/records.log` of the ext4 image `image` (read with `debugfs`, never mounted),
/// checked: their count, or what is wrong.
pub fn records_in(image: &Path) -> Result<u64, String> {
    let (code, out, err) = run(sbin("debugfs").args(["-R", "cat /records.log"]).arg(image), Duration::from_secs(180))?;
    if code != 0 {
        return Err(format!("debugfs on {} exited {code}: {err}", image.display()));
    }
    check_records(&out)
}

/// The program `name` from `/usr/sbin` (not on every user's `PATH`), else from `PATH`.
pub fn sbin(name: &str) -> Command {
    let p = Path::new("/usr/sbin").join(name);
    Command::new(if p.is_file() { p.into_os_string() } else { name.into() })
}

/// Waits for `child` at most `timeout` (a hang guard); kills it after.
pub fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> Result<ExitStatus, String> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            return Ok(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its end (at most `timeout`): exit code (-1 for a signal), stdout, stderr.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<(i32, String, String), String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>));
    let st = wait_child(&mut child, timeout, &what)?;
    let join = |t: std::thread::JoinHandle<String>| t.join().unwrap_or_default();
    Ok((st.code().unwrap_or(-1), join(out), join(err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the guest's shell arithmetic makes it.
    fn record(k: u64, words: [u64; WORDS]) -> String {
        let mut sum = k;
        let mut line = format!("R {k}");
        for w in words {
            sum = (sum * MUL + w) % MOD;
            line.push_str(&format!(" {w}"));
        }
        format!("{line} {sum}\n")
    }

    #[test]
    fn records_are_checked_whole_and_in_order() {
        let good = record(1, [1, 2, 3, 4, 5, 6, 7, 8]) + &record(2, [32767; WORDS]);
        assert_eq!(check_records(&good), Ok(2));
        assert_eq!(check_records(""), Ok(0));
        assert!(check_records(&good[..good.len() - 1]).is_err(), "cut short");
        assert!(check_records(&good.replace("R 2 ", "R 3 ")).is_err(), "out of order or bad sum");
        assert!(check_records(&good.replacen(" 8 ", " 9 ", 1)).is_err(), "a word changed");
        assert!(check_records(&record(2, [0; WORDS])).is_err(), "does not start at 1");
    }
}
