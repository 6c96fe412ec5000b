//! The chunk file: a 24-byte header and the chunk's bytes, zstd-compressed when that is
//! shorter (docs/repository.md); sealed under a tenant's key, that file is the plaintext of an
//! encrypted chunk file (`LSNAPCHX`: key id, nonce, AES-256-GCM ciphertext and tag, the
//! chunk's name bound as associated data); and [`fetch`], which gets a chunk from a store and
//! checks it.
//!
//! A plain chunk's name is the SHA-256 of its uncompressed bytes, so `zstd -dc` of the payload
//! piped into `sha256sum` gives the name back; an encrypted chunk's name is the HMAC-SHA-256 of
//! its bytes under a key derived from the tenant's data key. Every chunk read back is checked
//! in full: authentication (encrypted), header, lengths, bounded decompression (never more than
//! the repository's chunk size), and the name of the result against the name asked for.

use std::fmt;

use crate::crypto::{self, DataKey, KeyId, KEY_ID_LEN, NONCE_LEN, TAG_LEN};
use crate::hash::ChunkHash;
use crate::store::{self, Fetched, Store};
use crate::{Corruption, Error, Result};

/// Bytes of the chunk file header.
pub const CHUNK_HEADER_LEN: usize = 24;
const CHUNK_MAGIC: &[u8; 8] = b"LSNAPCHK";
const CHUNK_VERSION: u16 = 1;
const ENCODING_STORED: u8 = 0;
const ENCODING_ZSTD: u8 = 1;
const SEALED_MAGIC: &[u8; 8] = b"LSNAPCHX";
const SEALED_VERSION: u16 = 1;
/// Bytes of the encrypted chunk file's header (magic, version, key id, nonce).
pub const SEALED_HEADER_LEN: usize = 32;
/// What sealing adds to a chunk file.
pub const SEALED_OVERHEAD: usize = SEALED_HEADER_LEN + TAG_LEN;

/// True when every byte is zero (such a chunk is never stored).
pub fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// The largest chunk file of a repository of `chunk_size`, encrypted or not.
pub fn max_file_len(chunk_size: usize) -> u64 {
    (SEALED_OVERHEAD + CHUNK_HEADER_LEN + zstd::zstd_safe::compress_bound(chunk_size)) as u64
}

/// The name of a chunk of these bytes: keyed under `key`, the SHA-256 without.
pub fn name_of(key: Option<&DataKey>, data: &[u8]) -> ChunkHash {
    match key {
        Some(k) => k.chunk_name(data),
        None => ChunkHash::of(data),
    }
}

/// Builds chunk files; one per thread, reused from chunk to chunk.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    /// Compressor output.
    payload: Vec<u8>,
    /// The chunk file.
    file: Vec<u8>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    pub fn new(level: i32) -> Result<Encoder> {
        let compressor = zstd::bulk::Compressor::new(level).map_err(Error::Codec)?;
        Ok(Encoder { compressor, payload: Vec::new(), file: Vec::new() })
    }

    /// The chunk file of `data` (not empty, at most the chunk size); sealed under `key` with
    /// `name` (the data's [`name_of`] under that key) bound to it.
    pub fn encode(&mut self, data: &[u8], key: Option<&DataKey>, name: &ChunkHash) -> Result<&[u8]> {
        let buf = &mut self.file;
        buf.clear();
        let base = if key.is_some() { SEALED_HEADER_LEN } else { 0 };
        let bound = zstd::zstd_safe::compress_bound(data.len());
        buf.reserve(SEALED_OVERHEAD + CHUNK_HEADER_LEN + bound);
        buf.extend_from_slice(&[0u8; SEALED_HEADER_LEN][..base]);
        buf.extend_from_slice(&[0u8; CHUNK_HEADER_LEN]);
        let payload = &mut self.payload;
        payload.clear();
        payload.reserve(bound);
        let compressed = self.compressor.compress_to_buffer(data, payload).map_err(Error::Compress)?;
        let encoding = if compressed < data.len() {
            buf.extend_from_slice(&payload[..compressed]);
            ENCODING_ZSTD
        } else {
            buf.extend_from_slice(data);
            ENCODING_STORED
        };
        let payload_len = (buf.len() - base - CHUNK_HEADER_LEN) as u32;
        let h = &mut buf[base..base + CHUNK_HEADER_LEN];
        h[0..8].copy_from_slice(CHUNK_MAGIC);
        h[8..10].copy_from_slice(&CHUNK_VERSION.to_le_bytes());
        h[10] = encoding;
        h[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[16..20].copy_from_slice(&payload_len.to_le_bytes());
        if let Some(key) = key {
            let nonce = crypto::random_nonce().map_err(Error::Random)?;
            let h = &mut buf[..SEALED_HEADER_LEN];
            h[0..8].copy_from_slice(SEALED_MAGIC);
            h[8..10].copy_from_slice(&SEALED_VERSION.to_le_bytes());
            h[12..12 + KEY_ID_LEN].copy_from_slice(&key.id().0);
            h[20..32].copy_from_slice(&nonce);
            let (header, inner) = buf.split_at_mut(SEALED_HEADER_LEN);
            let aad = sealed_aad(header, name);
            let tag = key.seal(&nonce, &aad, inner);
            buf.extend_from_slice(&tag);
        }
        Ok(buf)
    }
}

/// The associated data of an encrypted chunk: its header and its name.
fn sealed_aad(header: &[u8], name: &ChunkHash) -> [u8; SEALED_HEADER_LEN + 32] {
    let mut aad = [0u8; SEALED_HEADER_LEN + 32];
    aad[..SEALED_HEADER_LEN].copy_from_slice(&header[..SEALED_HEADER_LEN]);
    aad[SEALED_HEADER_LEN..].copy_from_slice(&name.0);
    aad
}

/// Checks and decrypts, in place, the encrypted chunk file `buf` named `name` under `key`;
/// returns the range of `buf` that holds the plain chunk file.
pub(crate) fn open_sealed(
    buf: &mut [u8],
    key: &DataKey,
    name: &ChunkHash,
) -> std::result::Result<std::ops::Range<usize>, Corruption> {
    if buf.len() >= 8 && &buf[0..8] == CHUNK_MAGIC {
        return Err(Corruption::NotSealed { key: key.id() });
    }
    let min = SEALED_OVERHEAD + CHUNK_HEADER_LEN;
    if buf.len() < min {
        return Err(Corruption::TooShort { len: buf.len() as u64, min: min as u64 });
    }
    if &buf[0..8] != SEALED_MAGIC {
        return Err(Corruption::BadMagic);
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != SEALED_VERSION || buf[10..12] != [0, 0] {
        return Err(Corruption::UnsupportedVersion(u32::from(version)));
    }
    let mut found = [0u8; KEY_ID_LEN];
    found.copy_from_slice(&buf[12..20]);
    if found != key.id().0 {
        return Err(Corruption::OtherKey { found: KeyId(found), expected: key.id() });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[20..32]);
    let end = buf.len() - TAG_LEN;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&buf[end..]);
    let (header, rest) = buf.split_at_mut(SEALED_HEADER_LEN);
    let aad = sealed_aad(header, name);
    key.open(&nonce, &aad, &mut rest[..end - SEALED_HEADER_LEN], &tag)
        .map_err(|_| Corruption::Unauthentic { key: key.id() })?;
    Ok(SEALED_HEADER_LEN..end)
}

/// Reads chunk files; one per thread, reused from chunk to chunk.
pub struct Decoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    chunk_size: usize,
    /// The chunk file.
    pub(crate) file: Vec<u8>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder").field("chunk_size", &self.chunk_size).finish_non_exhaustive()
    }
}

impl Decoder {
    pub fn new(chunk_size: usize) -> Result<Decoder> {
        let mut decompressor = zstd::bulk::Decompressor::new().map_err(Error::Codec)?;
        // A chunk fits in one window of its own size: refuse frames that ask for more memory.
        let window_log = (chunk_size.max(1024).next_power_of_two().trailing_zeros()).max(10);
        decompressor.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(window_log)).map_err(Error::Codec)?;
        Ok(Decoder { decompressor, chunk_size, file: Vec::new() })
    }

    pub(crate) fn decompressor(&mut self) -> &mut zstd::bulk::Decompressor<'static> {
        &mut self.decompressor
    }
}

/// Why a chunk could not be fetched.
#[derive(Debug)]
pub enum Failure {
    Missing,
    Store(store::Error),
    Corrupt(Corruption),
}

impl Failure {
    pub fn into_error(self, hash: ChunkHash) -> Error {
        match self {
            Failure::Missing => Error::ChunkMissing { hash },
            Failure::Store(source) => Error::ChunkRead { hash, source: Box::new(source) },
            Failure::Corrupt(source) => Error::ChunkCorrupt { hash, source },
        }
    }
}

/// Gets chunk `hash`, which must hold `expected_len` bytes, from `store`, and decodes and
/// checks it into `out`: opened under `key` when the backup is encrypted (a plain chunk is then
/// refused), refused when it is encrypted and the backup is not. On success `out` holds
/// exactly the chunk whose name is `hash`.
pub fn fetch(
    store: &dyn Store,
    hash: &ChunkHash,
    expected_len: usize,
    out: &mut Vec<u8>,
    decoder: &mut Decoder,
    key: Option<&DataKey>,
) -> std::result::Result<(), Failure> {
    let max = max_file_len(decoder.chunk_size);
    match store.get_chunk(hash, max, &mut decoder.file).map_err(Failure::Store)? {
        Fetched::Found => {}
        Fetched::Missing => return Err(Failure::Missing),
        Fetched::TooLong(len) => return Err(Failure::Corrupt(Corruption::TooLong { len, max })),
    }
    let range = match key {
        Some(k) => open_sealed(&mut decoder.file, k, hash).map_err(Failure::Corrupt)?,
        None => {
            let f = &decoder.file;
            if f.len() >= 20 && &f[0..8] == SEALED_MAGIC {
                let mut id = [0u8; KEY_ID_LEN];
                id.copy_from_slice(&f[12..20]);
                return Err(Failure::Corrupt(Corruption::Sealed { key: KeyId(id) }));
            }
            0..f.len()
        }
    };
    decode(&decoder.file[range], decoder.chunk_size, expected_len, out, &mut decoder.decompressor).map_err(|e| {
        out.clear();
        Failure::Corrupt(e)
    })?;
    let actual = name_of(key, out);
    if actual != *hash {
        out.clear();
        return Err(Failure::Corrupt(Corruption::HashMismatch { actual: actual.to_string() }));
    }
    Ok(())
}

/// Parses a chunk file image into `out`, which holds exactly the chunk's bytes on success and
/// anything on failure.
pub(crate) fn decode(
    buf: &[u8],
    chunk_size: usize,
    expected_len: usize,
    out: &mut Vec<u8>,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> std::result::Result<(), Corruption> {
    if buf.len() < CHUNK_HEADER_LEN {
        return Err(Corruption::TooShort { len: buf.len() as u64, min: CHUNK_HEADER_LEN as u64 });
    }
    if &buf[0..8] != CHUNK_MAGIC {
        return Err(Corruption::BadMagic);
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != CHUNK_VERSION {
        return Err(Corruption::UnsupportedVersion(u32::from(version)));
    }
    let encoding = buf[10];
    let data_len = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
    let payload_len = u32::from_le_bytes([buf[16], buf[17], buf[18], buf[19]]) as usize;
    let payload = &buf[CHUNK_HEADER_LEN..];
    if payload.len() != payload_len {
        return Err(Corruption::LengthMismatch {
            field: "payload length",
            expected: payload_len as u64,
            actual: payload.len() as u64,
        });
    }
    if data_len > chunk_size || data_len != expected_len {
        return Err(Corruption::LengthMismatch {
            field: "data length",
            expected: expected_len as u64,
            actual: data_len as u64,
        });
    }
    match encoding {
        ENCODING_STORED => {
            if payload_len != data_len {
                return Err(Corruption::LengthMismatch {
                    field: "stored payload length",
                    expected: data_len as u64,
                    actual: payload_len as u64,
                });
            }
            out.clear();
            out.extend_from_slice(payload);
        }
        ENCODING_ZSTD => {
            // The output slice is exactly `data_len` long (`resize` also shortens): zstd fails
            // rather than write more, and writes all of it or fails the length check below, so
            // what the buffer held before (reused from chunk to chunk) needs no zeroing.
            out.resize(data_len, 0);
            let n = decompressor.decompress_to_buffer(payload, &mut out[..]).map_err(Corruption::Decompress)?;
            if n != data_len {
                return Err(Corruption::LengthMismatch {
                    field: "decompressed length",
                    expected: data_len as u64,
                    actual: n as u64,
                });
            }
        }
        other => return Err(Corruption::UnknownEncoding(other)),
    }
    Ok(())
}
