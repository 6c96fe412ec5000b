//! The manifest of one disk in one backup: a binary file, see docs/repository.md.
//!
//! `LSNAPMAN` header, the metadata as JSON, the complete chunk table (32 bytes per chunk, all
//! zero for a chunk of zeros, which is not stored), and a SHA-256 of everything before it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hash::ChunkHash;
use crate::{validate_name, Corruption, Error, Result};

const MAGIC: &[u8; 8] = b"LSNAPMAN";
pub const MANIFEST_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// Bytes of a manifest that hold its header and metadata, at most.
pub(crate) const MAX_HEAD_LEN: u64 = (HEADER_LEN + MAX_META_LEN) as u64;
const TRAILER_LEN: usize = 32;
const MAX_META_LEN: usize = 64 * 1024;
/// A manifest larger than this is refused (a 64 TiB disk at 4 MiB chunks needs 512 MiB).
pub(crate) const MAX_MANIFEST_LEN: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every chunk was read from the source.
    Full,
    /// Only the chunks touched by the changed extents were read; the others come from the
    /// parent. The chunk table is complete all the same.
    Incremental,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The guest's applications and filesystems were quiesced at the cut.
    Application,
    /// The state a power cut would have left.
    Crash,
}

/// The snapshot's freeze window (freeze to thaw), microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeWindow {
    pub frozen_unix_us: u64,
    pub thawed_unix_us: u64,
}

impl FreezeWindow {
    pub fn duration_us(&self) -> u64 {
        self.thawed_unix_us.saturating_sub(self.frozen_unix_us)
    }
}

/// What writing one disk of a backup cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Bytes read from the source (the disk being backed up, not the repository).
    pub bytes_read: u64,
    /// Bytes the caller said changed (incremental backups; the disk size for a full one).
    pub bytes_changed: u64,
    /// Chunks built from the source: read whole, or patched (below).
    pub chunks_read: u64,
    /// Of those, chunks of an incremental backup built from the parent's chunk with only the
    /// changed bytes read from the source (every touched chunk not wholly changed).
    #[serde(default)]
    pub chunks_patched: u64,
    /// Chunks of zeros among them (not stored).
    pub chunks_zero: u64,
    /// Chunks that were not in the repository yet.
    pub chunks_new: u64,
    /// Bytes those new chunk files take, headers included.
    pub bytes_stored: u64,
}

/// The JSON part of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMeta {
    pub vm: String,
    pub disk: String,
    pub backup: String,
    /// Disk size in bytes.
    pub size: u64,
    pub chunk_size: u64,
    pub created_unix_us: u64,
    pub kind: Kind,
    /// The backup whose manifest an incremental one started from.
    #[serde(default)]
    pub parent: Option<String>,
    pub consistency: Consistency,
    #[serde(default)]
    pub freeze_window: Option<FreezeWindow>,
    #[serde(default)]
    pub stats: DiskStats,
}

/// One disk of one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub meta: ManifestMeta,
    /// Chunk `i` covers bytes `i * chunk_size ..` of the disk; `None` is a chunk of zeros.
    pub chunks: Vec<Option<ChunkHash>>,
}

impl Manifest {
    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> usize {
        chunk_len(self.meta.size, self.meta.chunk_size, index)
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta).map_err(Error::Serialize)?;
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + 32 * self.chunks.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
        out.extend_from_slice(&meta);
        for c in &self.chunks {
            out.extend_from_slice(&c.map(|h| h.0).unwrap_or([0; 32]));
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses and checks a whole manifest file image.
    pub fn decode(buf: &[u8], chunk_size: u64) -> std::result::Result<Manifest, Corruption> {
        let (meta, count, meta_end) = decode_head(buf, buf.len() as u64, chunk_size)?;
        let table_end = meta_end + 32 * count;
        let (body, trailer) = buf.split_at(table_end);
        if Sha256::digest(body).as_slice() != trailer {
            return Err(Corruption::ChecksumMismatch);
        }
        let chunks = body[meta_end..]
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                (h != [0; 32]).then_some(ChunkHash(h))
            })
            .collect();
        Ok(Manifest { meta, chunks })
    }

    /// Parses the header and metadata of a manifest of `len` bytes whose first bytes (the
    /// 32-byte header and 64 KiB more, or all) are `head` (listing). The lengths are checked
    /// against `len`; the checksum is not (that takes the whole manifest).
    pub fn decode_meta(head: &[u8], len: u64, chunk_size: u64) -> std::result::Result<ManifestMeta, Corruption> {
        decode_head(head, len, chunk_size).map(|(m, ..)| m)
    }
}

/// Checks the header and parses the metadata of a manifest of `file_len` bytes whose first
/// bytes are `buf`. Returns the metadata, the chunk count and where the chunk table begins.
fn decode_head(
    buf: &[u8],
    file_len: u64,
    chunk_size: u64,
) -> std::result::Result<(ManifestMeta, usize, usize), Corruption> {
    let min = (HEADER_LEN + TRAILER_LEN) as u64;
    if file_len < min || buf.len() < HEADER_LEN {
        return Err(Corruption::TooShort { len: file_len, min });
    }
    if &buf[0..8] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version != MANIFEST_VERSION {
        return Err(Corruption::UnsupportedVersion(version));
    }
    let meta_len = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&buf[16..24]);
    let count = u64::from_le_bytes(count_bytes);
    if meta_len > MAX_META_LEN {
        return Err(Corruption::Invalid(format!("metadata length {meta_len} exceeds {MAX_META_LEN}")));
    }
    let expected_len = count
        .checked_mul(32)
        .and_then(|t| t.checked_add((HEADER_LEN + meta_len + TRAILER_LEN) as u64))
        .ok_or_else(|| Corruption::Invalid(format!("chunk count {count} is impossible")))?;
    if expected_len != file_len {
        return Err(Corruption::LengthMismatch { field: "file length", expected: expected_len, actual: file_len });
    }
    let meta_end = HEADER_LEN + meta_len;
    let meta_bytes =
        buf.get(HEADER_LEN..meta_end).ok_or(Corruption::TooShort { len: buf.len() as u64, min: meta_end as u64 })?;
    let meta: ManifestMeta = serde_json::from_slice(meta_bytes).map_err(Corruption::Json)?;
    for (what, name) in [("VM", &meta.vm), ("disk", &meta.disk), ("backup", &meta.backup)] {
        if validate_name(what, name).is_err() {
            return Err(Corruption::BadName { what, name: name.clone() });
        }
    }
    if meta.chunk_size != chunk_size {
        return Err(Corruption::LengthMismatch { field: "chunk size", expected: chunk_size, actual: meta.chunk_size });
    }
    let want = meta.size.div_ceil(chunk_size);
    if want != count {
        return Err(Corruption::LengthMismatch { field: "chunk count", expected: want, actual: count });
    }
    if meta.kind == Kind::Full && meta.parent.is_some() {
        return Err(Corruption::Invalid("a full backup names a parent".into()));
    }
    if let Some(w) = &meta.freeze_window {
        if w.thawed_unix_us < w.frozen_unix_us {
            return Err(Corruption::Invalid("the freeze window ends before it begins".into()));
        }
    }
    let count = usize::try_from(count).map_err(|_| Corruption::Invalid("too many chunks".into()))?;
    Ok((meta, count, meta_end))
}

/// Length of chunk `index` of a disk of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u64, index: usize) -> usize {
    let start = index as u64 * chunk_size;
    size.saturating_sub(start).min(chunk_size) as usize
}
