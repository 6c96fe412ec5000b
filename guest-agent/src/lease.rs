//! The freeze lease's record: what we froze, written under `/run` (tmpfs, never frozen)
//! BEFORE each freeze, so that an agent restarted after a crash thaws exactly those first.
//!
//! Layout (text, one record per line, paths escaped as in [`crate::freeze::escape`]):
//!
//! | line | content |
//! |---|---|
//! | 1 | `livesnap-agent-state 1` (magic and version) |
//! | 2 | `snapshot <escaped id>` |
//! | 3 | `deadline-unix-ms <n>` |
//! | ... | `frozen <escaped mount point>` per filesystem we froze or are freezing, in freeze order |
//! | ... | `hook <escaped path>` per hook that ran `freeze` |
//! | last | `checksum <16 hex digits>`: FNV-1a 64 of every line above, newlines included |
//!
//! The file is replaced atomically (write to a temporary file, rename).

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::freeze::{escape, unescape};

const MAGIC: &str = "livesnap-agent-state 1";

/// What the agent froze, persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    pub snapshot_id: String,
    pub deadline_unix_ms: u64,
    pub frozen: Vec<PathBuf>,
    pub hooks: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot write the state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read the state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("State file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: &'static str },
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl LeaseState {
    pub fn encode(&self) -> String {
        let mut s = format!(
            "{MAGIC}\nsnapshot {}\ndeadline-unix-ms {}\n",
            escape(self.snapshot_id.as_bytes()),
            self.deadline_unix_ms
        );
        for p in &self.frozen {
            s.push_str(&format!("frozen {}\n", escape(p.as_os_str().as_bytes())));
        }
        for p in &self.hooks {
            s.push_str(&format!("hook {}\n", escape(p.as_os_str().as_bytes())));
        }
        let sum = fnv1a(s.as_bytes());
        s.push_str(&format!("checksum {sum:016x}\n"));
        s
    }

    pub fn decode(text: &str) -> Result<LeaseState, &'static str> {
        let body_end = text.rfind("checksum ").ok_or("no checksum")?;
        let (body, sum) = text.split_at(body_end);
        let sum = sum.trim_end().strip_prefix("checksum ").ok_or("no checksum")?;
        if u64::from_str_radix(sum, 16).map_err(|_| "bad checksum")? != fnv1a(body.as_bytes()) {
            return Err("checksum mismatch");
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err("unknown magic or version");
        }
        let mut st = LeaseState::default();
        for line in lines {
            let (key, value) = line.split_once(' ').ok_or("line without a value")?;
            match key {
                "snapshot" => st.snapshot_id = String::from_utf8_lossy(&unescape(value)).into_owned(),
                "deadline-unix-ms" => st.deadline_unix_ms = value.parse().map_err(|_| "bad deadline")?,
                "frozen" => st.frozen.push(PathBuf::from(OsString::from_vec(unescape(value)))),
                "hook" => st.hooks.push(PathBuf::from(OsString::from_vec(unescape(value)))),
                _ => return Err("unknown record"),
            }
        }
        Ok(st)
    }
}

/// The state file at one path.
#[derive(Clone, Debug)]
pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    pub fn write(&self, state: &LeaseState) -> Result<(), Error> {
        let err = |source| Error::Write { path: self.path.clone(), source };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, state.encode()).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }

    /// The recorded state, `None` if there is no file.
    pub fn read(&self) -> Result<Option<LeaseState>, Error> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::Corrupt { path: self.path.clone(), reason: "not UTF-8" })?;
                LeaseState::decode(&text).map(Some).map_err(|reason| Error::Corrupt { path: self.path.clone(), reason })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path: self.path.clone(), source }),
        }
    }

    pub fn remove(&self) -> Result<(), Error> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::Write { path: self.path.clone(), source: e }),
            _ => Ok(()),
        }
    }

    /// The directory the file lives in (for checking it is not on a filesystem we freeze).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_with_odd_paths_and_detects_corruption() {
        let st = LeaseState {
            snapshot_id: "snap 1\n".into(),
            deadline_unix_ms: 1_700_000_000_123,
            frozen: vec![PathBuf::from("/mnt/a b"), PathBuf::from(OsString::from_vec(b"/x\xff\\y".to_vec()))],
            hooks: vec![PathBuf::from("/etc/livesnap/hooks.d/10-db")],
        };
        let text = st.encode();
        assert_eq!(LeaseState::decode(&text).unwrap(), st);
        let tampered = text.replace("/mnt/a", "/mnt/b");
        assert_eq!(LeaseState::decode(&tampered), Err("checksum mismatch"));
        assert!(LeaseState::decode("").is_err());
        assert!(LeaseState::decode(&text[..text.len() / 2]).is_err());
    }

    #[test]
    fn file_is_written_read_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let f = StateFile { path: d.path().join("sub/state") };
        assert_eq!(f.read().unwrap(), None);
        let st = LeaseState { snapshot_id: "s".into(), frozen: vec!["/".into()], ..Default::default() };
        f.write(&st).unwrap();
        assert_eq!(f.read().unwrap(), Some(st));
        f.remove().unwrap();
        f.remove().unwrap();
        assert_eq!(f.read().unwrap(), None);
    }
}
