//! Entry points of the fuzz targets (`fuzz/` at the repository root) into parsers that are
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

use std::path::Path;

use crate::chunk::{self, Decoder, Encoder};
use crate::crypto::{self, DataKey, Kek, KeyFileInfo};
use crate::hash::ChunkHash;
use crate::{Corruption, Result};

/// The data key the fuzz targets and their seeds use (never a real one).
pub fn fuzz_key() -> DataKey {
    DataKey::from_secret(&[0x5a; 32], "fuzz")
}

/// The KEK the key file target and its seeds use.
pub fn fuzz_kek() -> Kek {
    Kek::from_secret(&[0xa5; 32], Path::new("fuzz.kek"))
}

/// A key file image of [`fuzz_key`] wrapped by [`fuzz_kek`].
pub fn fuzz_key_file() -> Result<Vec<u8>> {
    crypto::wrap(&fuzz_key(), &fuzz_kek(), 1_700_000_000).map_err(|e| match e {
        crypto::Error::Random(r) => crate::Error::Random(r),
        _ => unreachable!("wrapping fails only for want of randomness"),
    })
}

/// Parses a key file image and opens it with [`fuzz_kek`].
pub fn open_key_file(bytes: &[u8]) -> (std::result::Result<KeyFileInfo, String>, Option<DataKey>) {
    let info = crypto::parse_key_file(bytes);
    let key = crypto::open_key_file(bytes, Path::new("fuzz.key"), &fuzz_kek()).ok();
    (info, key)
}

/// The chunk file codec of a repository of one chunk size, plain and sealed under
/// [`fuzz_key`].
#[derive(Debug)]
pub struct ChunkCodec {
    encoder: Encoder,
    decoder: Decoder,
    chunk_size: usize,
    key: DataKey,
}

impl ChunkCodec {
    pub fn new(chunk_size: usize) -> Result<ChunkCodec> {
        Ok(ChunkCodec { encoder: Encoder::new(3)?, decoder: Decoder::new(chunk_size)?, chunk_size, key: fuzz_key() })
    }

    /// The chunk file of `data`, as a backup writes it.
    pub fn encode(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let name = ChunkHash::of(data);
        self.encoder.encode(data, None, &name).map(<[u8]>::to_vec)
    }

    /// Parses a chunk file image that should hold `expected_len` bytes, as a fetch does before
    /// it checks the hash.
    pub fn decode(&mut self, file: &[u8], expected_len: usize) -> std::result::Result<Vec<u8>, Corruption> {
        let mut out = Vec::new();
        chunk::decode(file, self.chunk_size, expected_len, &mut out, self.decoder.decompressor())?;
        Ok(out)
    }

    /// The encrypted chunk file of `data` under [`fuzz_key`], and its name.
    pub fn seal(&mut self, data: &[u8]) -> Result<(ChunkHash, Vec<u8>)> {
        let name = self.key.chunk_name(data);
        let file = self.encoder.encode(data, Some(&self.key), &name)?.to_vec();
        Ok((name, file))
    }

    /// Opens the encrypted chunk file `file` named `name` under [`fuzz_key`], as a fetch does:
    /// authentication, the plain chunk file inside, and the name of what it holds.
    pub fn open(
        &mut self,
        file: &[u8],
        name: &ChunkHash,
        expected_len: usize,
    ) -> std::result::Result<Vec<u8>, Corruption> {
        let mut buf = file.to_vec();
        let range = chunk::open_sealed(&mut buf, &self.key, name)?;
        let out = self.decode(&buf[range], expected_len)?;
        let actual = self.key.chunk_name(&out);
        if actual != *name {
            return Err(Corruption::HashMismatch { actual: actual.to_string() });
        }
        Ok(out)
    }
}

/// A [`crate::Qcow2Source`] over `bytes`, held in an anonymous memory file.
pub fn qcow2_source(bytes: &[u8]) -> std::io::Result<crate::Qcow2Source> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create(2) with a NUL-terminated name; the descriptor it returns is ours.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    crate::Qcow2Source::new(file)
}
