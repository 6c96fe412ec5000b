//! `backup files VM ID --disk D [--partition N] ls PATH | cat PATH | get PATH --to DIR`.
//!
//! livesnapd reads the tenant's filesystem (in userspace, never mounted) and streams what it
//! finds; `get` writes it here, on the operator's side, through the confined
//! [`Extractor`](crate::files::extract::Extractor). Everything in the replies is the tenant's:
//! names and targets are printed without control characters, kinds checked.

use std::io::Write;
use std::path::PathBuf;

use livesnap_proto::daemon::{self as pb, file_item::Item as PbItem, FilesRequest};
use serde_json::{json, Value};

use super::args::FilesAction;
use super::commands::print_json;
use super::connect::Daemon;
use super::error::Error;
use super::render::{bytes, clean, time};
use crate::files::extract::Extractor;
use crate::files::{FileInfo, Item, Kind, Time};

/// Which disk of which backup.
#[derive(Debug)]
pub struct Target {
    pub vm: String,
    pub id: String,
    pub disk: String,
    pub partition: Option<u32>,
}

impl Target {
    fn request(&self, path: &str) -> FilesRequest {
        FilesRequest {
            vm: self.vm.clone(),
            id: self.id.clone(),
            disk: self.disk.clone(),
            partition: self.partition.unwrap_or(0),
            path: path.to_owned(),
        }
    }

    fn action(&self, verb: &str, path: &str) -> String {
        format!(
            "Cannot {verb} {} in disk {} of backup {} of {}",
            clean(path),
            clean(&self.disk),
            clean(&self.id),
            clean(&self.vm)
        )
    }
}

pub async fn files(d: &mut Daemon, t: Target, action: FilesAction, json: bool) -> Result<(), Error> {
    match action {
        FilesAction::Ls { path } => ls(d, &t, &path, json).await,
        FilesAction::Cat { path } => cat(d, &t, &path).await,
        FilesAction::Get { path, to } => get(d, &t, &path, to, json).await,
    }
}

/// A filesystem entry from the wire; an unknown kind is a bad reply.
pub fn file_info(i: pb::FileInfo) -> Result<FileInfo, String> {
    let kind = match pb::FileKind::try_from(i.kind) {
        Ok(pb::FileKind::File) => Kind::File,
        Ok(pb::FileKind::Directory) => Kind::Dir,
        Ok(pb::FileKind::Symlink) => Kind::Symlink,
        Ok(pb::FileKind::Fifo) => Kind::Fifo,
        Ok(pb::FileKind::CharDevice) => Kind::CharDev,
        Ok(pb::FileKind::BlockDevice) => Kind::BlockDev,
        Ok(pb::FileKind::Socket) => Kind::Socket,
        Ok(pb::FileKind::Unspecified) | Err(_) => return Err(format!("an entry of unknown kind {}", i.kind)),
    };
    Ok(FileInfo {
        name: i.name,
        kind,
        mode: i.mode & 0o7777,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        mtime: Time { secs: i.mtime_sec, nanos: i.mtime_nsec },
        atime: Time { secs: i.atime_sec, nanos: i.atime_nsec },
        target: i.target,
    })
}

fn lossy(b: &[u8]) -> String {
    clean(&String::from_utf8_lossy(b))
}

fn mode_string(i: &FileInfo) -> String {
    let t = match i.kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::CharDev => 'c',
        Kind::BlockDev => 'b',
        Kind::Socket => 's',
    };
    let mut s = String::from(t);
    for shift in [6u32, 3, 0] {
        let bits = (i.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let special = match shift {
            6 => i.mode & 0o4000 != 0,
            3 => i.mode & 0o2000 != 0,
            _ => i.mode & 0o1000 != 0,
        };
        s.push(match (bits & 1 != 0, special, shift) {
            (true, true, 0) => 't',
            (false, true, 0) => 'T',
            (true, true, _) => 's',
            (false, true, _) => 'S',
            (true, false, _) => 'x',
            (false, false, _) => '-',
        });
    }
    s
}

fn info_json(i: &FileInfo) -> Value {
    json!({
        "name": String::from_utf8_lossy(&i.name), "kind": i.kind.as_str(), "mode": i.mode,
        "uid": i.uid, "gid": i.gid, "size": i.size, "mtime": i.mtime.secs, "mtime_nsec": i.mtime.nanos,
        "atime": i.atime.secs, "target": String::from_utf8_lossy(&i.target),
    })
}

fn done_json(d: &pb::FilesDone) -> Value {
    json!({
        "chunks_fetched": d.chunks_fetched, "bytes_fetched": d.bytes_fetched,
        "disk_bytes_fetched": d.disk_bytes_fetched, "disk_size": d.disk_size, "partition": d.partition,
        "entries": d.entries, "data_bytes": d.data_bytes,
    })
}

/// "fetched 3 chunks, 12.00 MiB of the disk's 4.00 GiB (0.29 %)".
fn fetched(d: &pb::FilesDone) -> String {
    let pct = if d.disk_size == 0 { 0.0 } else { d.disk_bytes_fetched as f64 * 100.0 / d.disk_size as f64 };
    format!(
        "fetched {} chunks, {} of the disk's {} ({pct:.2} %), {} from the repository",
        d.chunks_fetched,
        bytes(d.disk_bytes_fetched),
        bytes(d.disk_size),
        bytes(d.bytes_fetched)
    )
}

fn ended(action: String) -> Error {
    Error::BadReply { action, reason: "livesnapd's stream ended before it was done: the reply is incomplete".into() }
}

async fn ls(d: &mut Daemon, t: &Target, path: &str, json: bool) -> Result<(), Error> {
    let action = t.action("list", path);
    let mut s = d.client.list_files(t.request(path)).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let mut entries = Vec::new();
    let done = loop {
        match s.message().await.map_err(|s| d.error(&action, &s))? {
            None => return Err(ended(action)),
            Some(m) => {
                for e in m.entries {
                    entries.push(file_info(e).map_err(|reason| Error::BadReply { action: action.clone(), reason })?);
                }
                if let Some(done) = m.done {
                    break done;
                }
            }
        }
    };
    if json {
        print_json(&json!({ "entries": entries.iter().map(info_json).collect::<Vec<_>>(), "done": done_json(&done) }));
        return Ok(());
    }
    let mut rows = Vec::new();
    for e in &entries {
        let mut name = lossy(&e.name);
        if e.kind == Kind::Symlink {
            name = format!("{name} -> {}", lossy(&e.target));
        }
        let when = u64::try_from(e.mtime.secs).map(time).unwrap_or_else(|_| e.mtime.secs.to_string());
        rows.push(vec![mode_string(e), e.uid.to_string(), e.gid.to_string(), e.size.to_string(), when, name]);
    }
    print!("{}", super::commands::table(&rows));
    eprintln!("{}", fetched(&done));
    Ok(())
}

async fn cat(d: &mut Daemon, t: &Target, path: &str) -> Result<(), Error> {
    let action = t.action("read", path);
    let mut s = d.client.read_file(t.request(path)).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let mut out = std::io::stdout().lock();
    let mut at = 0u64;
    loop {
        match s.message().await.map_err(|s| d.error(&action, &s))? {
            None => return Err(ended(action)),
            Some(m) => {
                if m.offset != at && !m.data.is_empty() {
                    let reason = format!("data at {} where {at} was expected", m.offset);
                    return Err(Error::BadReply { action, reason });
                }
                // A closed pipe (`| head`) ends the command quietly.
                if out.write_all(&m.data).is_err() {
                    return Ok(());
                }
                at += m.data.len() as u64;
                if m.done.is_some() {
                    let _ = out.flush();
                    return Ok(());
                }
            }
        }
    }
}

async fn get(d: &mut Daemon, t: &Target, path: &str, to: PathBuf, json: bool) -> Result<(), Error> {
    let action = t.action("get", path);
    let fail =
        |e: crate::files::extract::Error| Error::Failed(format!("{action}: {}", livesnap_proto::error::chain(&e)));
    let mut x = Extractor::new(&to).map_err(&fail)?;
    let mut s = d.client.get_files(t.request(path)).await.map_err(|s| d.error(&action, &s))?.into_inner();
    let done = loop {
        let m = s.message().await.map_err(|s| d.error(&action, &s))?.ok_or_else(|| ended(action.clone()))?;
        let bad = |reason: String| Error::BadReply { action: action.clone(), reason };
        match m.item {
            Some(PbItem::Entry(e)) => {
                let info =
                    file_info(e.info.ok_or_else(|| bad("an entry without its metadata".into()))?).map_err(bad)?;
                x.item(Item::Entry { path: e.path, info }).map_err(&fail)?;
            }
            Some(PbItem::Data(data)) => x.item(Item::Data { offset: data.offset, data: data.data }).map_err(&fail)?,
            Some(PbItem::Done(done)) => break done,
            None => return Err(bad("an empty item".into())),
        }
    };
    let report = x.finish().map_err(&fail)?;
    for w in &report.warnings {
        eprintln!("snapctl: warning: {}", clean(w));
    }
    if json {
        print_json(&json!({
            "vm": t.vm, "id": t.id, "disk": t.disk, "path": path, "to": to.display().to_string(),
            "files": report.files, "directories": report.dirs, "symlinks": report.symlinks,
            "bytes": report.bytes, "owners_set": report.owners_set, "warnings": report.warnings,
            "done": done_json(&done),
        }));
    } else {
        println!(
            "got {} into {}: {} files, {} directories, {} symlinks, {} of data{}",
            clean(path),
            clean(&to.display().to_string()),
            report.files,
            report.dirs,
            report.symlinks,
            bytes(report.bytes),
            if report.owners_set { "" } else { " (owners not set: not run as root)" }
        );
        println!("{}", fetched(&done));
    }
    Ok(())
}
