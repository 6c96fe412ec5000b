//! The chunk store: `chunks/XX/HASH`, one file per distinct chunk content.
//!
//! A chunk's name is the SHA-256 of its uncompressed bytes, so `zstd -dc` of the payload piped
//! into `sha256sum` gives the name back. A chunk is written to a temporary name in its final
//! directory, `fsync`ed, then renamed: a crash leaves either no file of that name or the
//! complete one. The directory `fsync` that makes the rename durable is batched: the writer of a
//! backup syncs every directory it renamed into before its manifests are written (a manifest
//! is the only thing that makes a chunk needed).
//!
//! Every chunk read back is checked in full: header, lengths, bounded decompression (never more
//! than the repository's chunk size), and the hash of the result against the name.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{Corruption, Error, Result};

/// Bytes of the chunk file header.
pub const CHUNK_HEADER_LEN: usize = 24;
const CHUNK_MAGIC: &[u8; 8] = b"LSNAPCHK";
const CHUNK_VERSION: u16 = 1;
const ENCODING_STORED: u8 = 0;
const ENCODING_ZSTD: u8 = 1;

/// The SHA-256 of a chunk's uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(Sha256::digest(data).into())
    }

    /// The name of the fan-out directory: the first byte in hex.
    fn dir_name(&self) -> String {
        format!("{:02x}", self.0[0])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

/// Parses 64 lowercase hex digits (the form of chunk file names).
impl FromStr for ChunkHash {
    type Err = ();

    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(());
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(()),
        };
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(ChunkHash(out))
    }
}

/// True when every byte is zero (such a chunk is never stored).
pub fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// Why a chunk could not be read.
#[derive(Debug)]
pub enum ReadFailure {
    Missing,
    Io(io::Error),
    Corrupt(Corruption),
}

/// Per-thread compression and read state, reused from chunk to chunk.
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// Header and payload of the chunk file being written or read.
    file_buf: Vec<u8>,
    /// Compressor output.
    payload: Vec<u8>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec").finish_non_exhaustive()
    }
}

/// The `chunks/` directory of a repository.
#[derive(Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    chunk_size: usize,
    level: i32,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prefix of temporary files; `gc` removes leftovers.
pub const TMP_PREFIX: &str = ".tmp-";

impl ChunkStore {
    pub fn new(dir: PathBuf, chunk_size: usize, level: i32) -> ChunkStore {
        ChunkStore { dir, chunk_size, level }
    }

    /// Creates `chunks/` and its 256 fan-out directories.
    pub fn create_dirs(dir: &Path) -> Result<()> {
        fs::create_dir(dir).map_err(|e| Error::io("create", dir, e))?;
        for b in 0..=255u8 {
            let sub = dir.join(format!("{b:02x}"));
            fs::create_dir(&sub).map_err(|e| Error::io("create", &sub, e))?;
        }
        // The new entries are in `dir`; the empty subdirectories have nothing to sync.
        sync_dir(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, hash: &ChunkHash) -> PathBuf {
        self.dir.join(hash.dir_name()).join(hash.to_string())
    }

    pub fn codec(&self) -> Result<Codec> {
        let compressor = zstd::bulk::Compressor::new(self.level)
            .map_err(|e| Error::io("set up zstd compression for", &self.dir, e))?;
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| Error::io("set up zstd decompression for", &self.dir, e))?;
        // A chunk fits in one window of its own size: refuse frames that ask for more memory.
        let window_log = (self.chunk_size.max(1024).next_power_of_two().trailing_zeros()).max(10);
        decompressor
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(window_log))
            .map_err(|e| Error::io("set up zstd decompression for", &self.dir, e))?;
        Ok(Codec { compressor, decompressor, file_buf: Vec::new(), payload: Vec::new() })
    }

    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.path(hash).exists()
    }

    /// Stores `data` under `hash` unless a chunk of that name exists. Returns the bytes written
    /// (header included), 0 when it was there already. The caller must [`sync_dir`] the chunk's
    /// directory (see [`ChunkStore::dir_of`]) before anything refers to the chunk.
    pub fn put(&self, hash: &ChunkHash, data: &[u8], codec: &mut Codec) -> Result<u64> {
        debug_assert!(data.len() <= self.chunk_size && !data.is_empty());
        let path = self.path(hash);
        if path.exists() {
            return Ok(0);
        }
        let buf = &mut codec.file_buf;
        buf.clear();
        let bound = zstd::zstd_safe::compress_bound(data.len());
        buf.reserve(CHUNK_HEADER_LEN + bound);
        buf.extend_from_slice(&[0u8; CHUNK_HEADER_LEN]);
        let payload = &mut codec.payload;
        payload.clear();
        payload.reserve(bound);
        let compressed = codec
            .compressor
            .compress_to_buffer(data, payload)
            .map_err(|e| Error::io("compress a chunk for", &path, e))?;
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

        let dir = self.dir.join(hash.dir_name());
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{hash}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        write_durably(&tmp, &path, buf)?;
        Ok(buf.len() as u64)
    }

    /// The directory a chunk lives in (to [`sync_dir`] after [`ChunkStore::put`]).
    pub fn dir_of(&self, hash: &ChunkHash) -> PathBuf {
        self.dir.join(hash.dir_name())
    }

    /// Reads, decompresses and checks chunk `hash`, which must hold `expected_len` bytes, into
    /// `out`.
    pub fn read(
        &self,
        hash: &ChunkHash,
        expected_len: usize,
        out: &mut Vec<u8>,
        codec: &mut Codec,
    ) -> std::result::Result<(), ReadFailure> {
        let path = self.path(hash);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadFailure::Missing),
            Err(e) => return Err(ReadFailure::Io(e)),
        };
        let max_file = (CHUNK_HEADER_LEN + zstd::zstd_safe::compress_bound(self.chunk_size)) as u64;
        let len = file.metadata().map_err(ReadFailure::Io)?.len();
        if len > max_file {
            return Err(ReadFailure::Corrupt(Corruption::TooLong { len, max: max_file }));
        }
        let buf = &mut codec.file_buf;
        buf.clear();
        // Bounded even if the file grows under us.
        (&mut file).take(max_file + 1).read_to_end(buf).map_err(ReadFailure::Io)?;
        decode(buf, self.chunk_size, expected_len, out, &mut codec.decompressor).map_err(ReadFailure::Corrupt)?;
        let actual = ChunkHash::of(out);
        if actual != *hash {
            return Err(ReadFailure::Corrupt(Corruption::HashMismatch { actual: actual.to_string() }));
        }
        Ok(())
    }

    /// Every chunk file in the store, and the temporary files apart.
    pub fn list(&self) -> Result<Listing> {
        let mut chunks = Vec::new();
        let mut temps = Vec::new();
        for b in 0..=255u8 {
            let sub = self.dir.join(format!("{b:02x}"));
            let rd = fs::read_dir(&sub).map_err(|e| Error::io("list", &sub, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io("list", &sub, e))?;
                let name = entry.file_name();
                let path = entry.path();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with(TMP_PREFIX) {
                    temps.push(path);
                } else if let Ok(hash) = name.parse::<ChunkHash>() {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    chunks.push((hash, path, len));
                }
            }
        }
        Ok(Listing { chunks, temps })
    }
}

/// The files of the chunk store.
#[derive(Debug)]
pub struct Listing {
    /// Name, path and file size of each chunk.
    pub chunks: Vec<(ChunkHash, PathBuf, u64)>,
    /// Temporary files (leftovers when no writer runs).
    pub temps: Vec<PathBuf>,
}

/// Parses a chunk file image.
fn decode(
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

/// Writes `data` to `tmp`, `fsync`s it and renames it to `dest`. The caller syncs the directory.
pub fn write_durably(tmp: &Path, dest: &Path, data: &[u8]) -> Result<()> {
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::io("create", tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", tmp, e))?;
        fs::rename(tmp, dest).map_err(|e| Error::io("rename", tmp, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// `fsync` of a directory, making renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync", dir, e))
}
