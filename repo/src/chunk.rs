//! The chunk file: a 24-byte header and the chunk's bytes, zstd-compressed when that is
//! shorter (docs/repository.md); and [`fetch`], which gets a chunk from a store and checks it.
//!
//! A chunk's name is the SHA-256 of its uncompressed bytes, so `zstd -dc` of the payload piped
//! into `sha256sum` gives the name back. Every chunk read back is checked in full: header,
//! lengths, bounded decompression (never more than the repository's chunk size), and the hash
//! of the result against the name.

use std::fmt;

use crate::hash::ChunkHash;
use crate::store::{self, Fetched, Store};
use crate::{Corruption, Error, Result};

/// Bytes of the chunk file header.
pub const CHUNK_HEADER_LEN: usize = 24;
const CHUNK_MAGIC: &[u8; 8] = b"LSNAPCHK";
const CHUNK_VERSION: u16 = 1;
const ENCODING_STORED: u8 = 0;
const ENCODING_ZSTD: u8 = 1;

/// True when every byte is zero (such a chunk is never stored).
pub fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// The largest chunk file of a repository of `chunk_size`.
pub fn max_file_len(chunk_size: usize) -> u64 {
    (CHUNK_HEADER_LEN + zstd::zstd_safe::compress_bound(chunk_size)) as u64
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

    /// The chunk file of `data` (not empty, at most the chunk size).
    pub fn encode(&mut self, data: &[u8]) -> Result<&[u8]> {
        let buf = &mut self.file;
        buf.clear();
        let bound = zstd::zstd_safe::compress_bound(data.len());
        buf.reserve(CHUNK_HEADER_LEN + bound);
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
        let payload_len = (buf.len() - CHUNK_HEADER_LEN) as u32;
        buf[0..8].copy_from_slice(CHUNK_MAGIC);
        buf[8..10].copy_from_slice(&CHUNK_VERSION.to_le_bytes());
        buf[10] = encoding;
        buf[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
        buf[16..20].copy_from_slice(&payload_len.to_le_bytes());
        Ok(buf)
    }
}

/// Reads chunk files; one per thread, reused from chunk to chunk.
pub struct Decoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    chunk_size: usize,
    /// The chunk file.
    file: Vec<u8>,
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
/// checks it into `out`. On success `out` holds exactly the chunk whose hash is `hash`.
pub fn fetch(
    store: &dyn Store,
    hash: &ChunkHash,
    expected_len: usize,
    out: &mut Vec<u8>,
    decoder: &mut Decoder,
) -> std::result::Result<(), Failure> {
    let max = max_file_len(decoder.chunk_size);
    match store.get_chunk(hash, max, &mut decoder.file).map_err(Failure::Store)? {
        Fetched::Found => {}
        Fetched::Missing => return Err(Failure::Missing),
        Fetched::TooLong(len) => return Err(Failure::Corrupt(Corruption::TooLong { len, max })),
    }
    decode(&decoder.file, decoder.chunk_size, expected_len, out, &mut decoder.decompressor)
        .map_err(Failure::Corrupt)?;
    let actual = ChunkHash::of(out);
    if actual != *hash {
        out.clear();
        return Err(Failure::Corrupt(Corruption::HashMismatch { actual: actual.to_string() }));
    }
    Ok(())
}

/// Parses a chunk file image.
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
    out.clear();
    match encoding {
        ENCODING_STORED => {
            if payload_len != data_len {
                return Err(Corruption::LengthMismatch {
                    field: "stored payload length",
                    expected: data_len as u64,
                    actual: payload_len as u64,
                });
            }
            out.extend_from_slice(payload);
        }
        ENCODING_ZSTD => {
            // The output slice is exactly `data_len` long: zstd fails rather than write more.
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
