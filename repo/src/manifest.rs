//! The manifest of one disk in one backup: a binary file, see docs/repository.md.
//!
//! `LSNAPMAN` header, the metadata as JSON, the complete chunk table (32 bytes per chunk, all
//! zero for a chunk of zeros, which is not stored), and a SHA-256 of everything before it.
//! Encrypted (version 2): the header names the key, the metadata is sealed (AES-256-GCM, bound
//! to the header and to the VM, backup and disk the manifest belongs to), the chunk table stays
//! readable (keyed names) and is authenticated by an HMAC before the SHA-256, so garbage
//! collection can mark chunks without the tenant's key.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::{self, DataKey, KeyId, KEY_ID_LEN, NONCE_LEN, TAG_LEN};
use crate::hash::ChunkHash;
use crate::{validate_name, Corruption, Error, Result};

const MAGIC: &[u8; 8] = b"LSNAPMAN";
pub const MANIFEST_VERSION: u32 = 1;
/// The version of encrypted manifests.
pub const SEALED_VERSION: u32 = 2;
const HEADER_LEN: usize = 32;
/// Bytes of a manifest that hold its header and metadata, at most.
pub(crate) const MAX_HEAD_LEN: u64 = (HEADER_LEN + MAX_META_LEN + NONCE_LEN + TAG_LEN) as u64;
const TRAILER_LEN: usize = 32;
/// The chunk table's MAC in an encrypted manifest.
const MAC_LEN: usize = 32;
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
    /// The key its chunks and metadata are sealed under; `None`: not encrypted.
    pub key: Option<KeyId>,
}

/// Where a manifest is: the VM, backup and disk an encrypted manifest is bound to.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub vm: &'a str,
    pub id: &'a str,
    pub disk: &'a str,
}

impl Place<'_> {
    /// The names, NUL-separated (no name holds a NUL).
    fn bytes(&self) -> Vec<u8> {
        [self.vm.as_bytes(), self.id.as_bytes(), self.disk.as_bytes()].join(&0u8)
    }
}

/// A manifest's header, checked against the file's length.
struct Header {
    key: Option<KeyId>,
    count: usize,
    /// Where the (sealed) metadata ends and the chunk table begins.
    meta_end: usize,
}

impl Header {
    fn table_end(&self) -> usize {
        self.meta_end + 32 * self.count
    }
}

/// The key a manifest is sealed under, from its first bytes; `None` when it is not encrypted
/// (or too short to say: decoding then says what is wrong).
pub fn sealed_key(head: &[u8]) -> Option<KeyId> {
    if head.len() < HEADER_LEN || &head[0..8] != MAGIC || head[8..12] != SEALED_VERSION.to_le_bytes() {
        return None;
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&head[24..32]);
    Some(KeyId(id))
}

impl Manifest {
    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> usize {
        chunk_len(self.meta.size, self.meta.chunk_size, index)
    }

    /// The manifest file: plain without a key; with one, its metadata sealed and bound to its
    /// place (the VM, backup and disk its metadata names) and its chunk table authenticated.
    pub fn encode(&self, key: Option<&DataKey>) -> Result<Vec<u8>> {
        let mut meta = serde_json::to_vec(&self.meta).map_err(Error::Serialize)?;
        let sealed_len = meta.len() + key.map_or(0, |_| NONCE_LEN + TAG_LEN);
        let mut out = Vec::with_capacity(HEADER_LEN + sealed_len + 32 * self.chunks.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&key.map_or(MANIFEST_VERSION, |_| SEALED_VERSION).to_le_bytes());
        out.extend_from_slice(&(sealed_len as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&key.map_or([0; KEY_ID_LEN], |k| k.id().0));
        let place = Place { vm: &self.meta.vm, id: &self.meta.backup, disk: &self.meta.disk };
        match key {
            None => out.extend_from_slice(&meta),
            Some(k) => {
                let nonce = crypto::random_nonce().map_err(Error::Random)?;
                let aad = [&out[..HEADER_LEN], &place.bytes()].concat();
                let tag = k.seal(&nonce, &aad, &mut meta);
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&meta);
                out.extend_from_slice(&tag);
            }
        }
        for c in &self.chunks {
            out.extend_from_slice(&c.map(|h| h.0).unwrap_or([0; 32]));
        }
        if let Some(k) = key {
            let mac = k.table_mac(&[&place.bytes(), &out]);
            out.extend_from_slice(&mac);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses and checks a whole plain manifest file image (an encrypted one is refused).
    pub fn decode(buf: &[u8], chunk_size: u64) -> std::result::Result<Manifest, Corruption> {
        let h = parse_header(buf, buf.len() as u64)?;
        if let Some(key) = h.key {
            return Err(Corruption::Sealed { key });
        }
        check_sum(buf)?;
        let meta = parse_meta(&buf[HEADER_LEN..h.meta_end], chunk_size, h.count)?;
        Ok(Manifest { meta, chunks: table(&buf[h.meta_end..h.table_end()]), key: None })
    }

    /// Parses, authenticates and checks a whole encrypted manifest file image found at `place`,
    /// sealed under `key` (a plain one is refused).
    pub fn open(
        buf: &[u8],
        chunk_size: u64,
        key: &DataKey,
        place: &Place<'_>,
    ) -> std::result::Result<Manifest, Corruption> {
        let h = parse_header(buf, buf.len() as u64)?;
        check_key(&h, key)?;
        check_sum(buf)?;
        let table_end = h.table_end();
        key.check_table_mac(&[&place.bytes(), &buf[..table_end]], &buf[table_end..table_end + 32])
            .map_err(|_| Corruption::Unauthentic { key: key.id() })?;
        let meta = open_meta(buf, &h, chunk_size, key, place)?;
        Ok(Manifest { meta, chunks: table(&buf[h.meta_end..table_end]), key: Some(key.id()) })
    }

    /// Parses the header and metadata of a plain manifest of `len` bytes whose first bytes (the
    /// 32-byte header and 64 KiB more, or all) are `head` (listing). The lengths are checked
    /// against `len`; the checksum is not (that takes the whole manifest).
    pub fn decode_meta(head: &[u8], len: u64, chunk_size: u64) -> std::result::Result<ManifestMeta, Corruption> {
        let h = parse_header(head, len)?;
        if let Some(key) = h.key {
            return Err(Corruption::Sealed { key });
        }
        let bytes = head.get(HEADER_LEN..h.meta_end).ok_or(Corruption::TooShort { len, min: h.meta_end as u64 })?;
        parse_meta(bytes, chunk_size, h.count)
    }

    /// As [`Manifest::decode_meta`] for an encrypted manifest found at `place`: its metadata is
    /// authenticated (and bound to its header and place); the chunk table is not read.
    pub fn open_meta(
        head: &[u8],
        len: u64,
        chunk_size: u64,
        key: &DataKey,
        place: &Place<'_>,
    ) -> std::result::Result<ManifestMeta, Corruption> {
        let h = parse_header(head, len)?;
        check_key(&h, key)?;
        if head.len() < h.meta_end {
            return Err(Corruption::TooShort { len: head.len() as u64, min: h.meta_end as u64 });
        }
        open_meta(head, &h, chunk_size, key, place)
    }

    /// The chunk names a manifest lists, plain or encrypted, without a key: what garbage
    /// collection marks. Checks the structure and the checksum (so a damaged table stops a
    /// collection), not the authenticity of an encrypted one (which needs its key).
    pub fn chunk_names(buf: &[u8]) -> std::result::Result<Vec<Option<ChunkHash>>, Corruption> {
        let h = parse_header(buf, buf.len() as u64)?;
        check_sum(buf)?;
        Ok(table(&buf[h.meta_end..h.table_end()]))
    }
}

fn check_key(h: &Header, key: &DataKey) -> std::result::Result<(), Corruption> {
    match h.key {
        None => Err(Corruption::NotSealed { key: key.id() }),
        Some(found) if found != key.id() => Err(Corruption::OtherKey { found, expected: key.id() }),
        Some(_) => Ok(()),
    }
}

fn check_sum(buf: &[u8]) -> std::result::Result<(), Corruption> {
    let (body, trailer) = buf.split_at(buf.len() - TRAILER_LEN);
    if Sha256::digest(body).as_slice() != trailer {
        return Err(Corruption::ChecksumMismatch);
    }
    Ok(())
}

fn table(bytes: &[u8]) -> Vec<Option<ChunkHash>> {
    bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            (h != [0; 32]).then_some(ChunkHash(h))
        })
        .collect()
}

/// Decrypts and checks the sealed metadata of `buf` (at least its header and metadata).
fn open_meta(
    buf: &[u8],
    h: &Header,
    chunk_size: u64,
    key: &DataKey,
    place: &Place<'_>,
) -> std::result::Result<ManifestMeta, Corruption> {
    let sealed = &buf[HEADER_LEN..h.meta_end];
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[..NONCE_LEN]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&sealed[sealed.len() - TAG_LEN..]);
    let mut meta = sealed[NONCE_LEN..sealed.len() - TAG_LEN].to_vec();
    let aad = [&buf[..HEADER_LEN], &place.bytes()].concat();
    key.open(&nonce, &aad, &mut meta, &tag).map_err(|_| Corruption::Unauthentic { key: key.id() })?;
    parse_meta(&meta, chunk_size, h.count)
}

/// Checks the header of a manifest of `file_len` bytes whose first bytes are `buf`.
fn parse_header(buf: &[u8], file_len: u64) -> std::result::Result<Header, Corruption> {
    let min = (HEADER_LEN + TRAILER_LEN) as u64;
    if file_len < min || buf.len() < HEADER_LEN {
        return Err(Corruption::TooShort { len: file_len, min });
    }
    if &buf[0..8] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let (key, min_meta, trailers) = match version {
        MANIFEST_VERSION => (None, 0, TRAILER_LEN),
        SEALED_VERSION => {
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&buf[24..32]);
            (Some(KeyId(id)), NONCE_LEN + TAG_LEN, TRAILER_LEN + MAC_LEN)
        }
        other => return Err(Corruption::UnsupportedVersion(other)),
    };
    let meta_len = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&buf[16..24]);
    let count = u64::from_le_bytes(count_bytes);
    if meta_len > MAX_META_LEN + min_meta {
        return Err(Corruption::Invalid(format!("metadata length {meta_len} exceeds {}", MAX_META_LEN + min_meta)));
    }
    if meta_len < min_meta {
        return Err(Corruption::Invalid(format!("sealed metadata length {meta_len} is below {min_meta}")));
    }
    let expected_len = count
        .checked_mul(32)
        .and_then(|t| t.checked_add((HEADER_LEN + meta_len + trailers) as u64))
        .ok_or_else(|| Corruption::Invalid(format!("chunk count {count} is impossible")))?;
    if expected_len != file_len {
        return Err(Corruption::LengthMismatch { field: "file length", expected: expected_len, actual: file_len });
    }
    let count = usize::try_from(count).map_err(|_| Corruption::Invalid("too many chunks".into()))?;
    Ok(Header { key, count, meta_end: HEADER_LEN + meta_len })
}

/// Parses and checks the metadata of a manifest of `count` chunks.
fn parse_meta(bytes: &[u8], chunk_size: u64, count: usize) -> std::result::Result<ManifestMeta, Corruption> {
    let meta: ManifestMeta = serde_json::from_slice(bytes).map_err(Corruption::Json)?;
    for (what, name) in [("VM", &meta.vm), ("disk", &meta.disk), ("backup", &meta.backup)] {
        if validate_name(what, name).is_err() {
            return Err(Corruption::BadName { what, name: name.clone() });
        }
    }
    if meta.chunk_size != chunk_size {
        return Err(Corruption::LengthMismatch { field: "chunk size", expected: chunk_size, actual: meta.chunk_size });
    }
    let want = meta.size.div_ceil(chunk_size);
    if want != count as u64 {
        return Err(Corruption::LengthMismatch { field: "chunk count", expected: want, actual: count as u64 });
    }
    if meta.kind == Kind::Full && meta.parent.is_some() {
        return Err(Corruption::Invalid("a full backup names a parent".into()));
    }
    if let Some(w) = &meta.freeze_window {
        if w.thawed_unix_us < w.frozen_unix_us {
            return Err(Corruption::Invalid("the freeze window ends before it begins".into()));
        }
    }
    Ok(meta)
}

/// Length of chunk `index` of a disk of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u64, index: usize) -> usize {
    let start = index as u64 * chunk_size;
    size.saturating_sub(start).min(chunk_size) as usize
}
