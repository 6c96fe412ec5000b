//! Entry points of the fuzz targets (`fuzz/` at the repository root) into parsers that are
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

use crate::chunk::{self, Decoder, Encoder};
use crate::{Corruption, Result};

/// The chunk file codec of a repository of one chunk size.
#[derive(Debug)]
pub struct ChunkCodec {
    encoder: Encoder,
    decoder: Decoder,
    chunk_size: usize,
}

impl ChunkCodec {
    pub fn new(chunk_size: usize) -> Result<ChunkCodec> {
        Ok(ChunkCodec { encoder: Encoder::new(3)?, decoder: Decoder::new(chunk_size)?, chunk_size })
    }

    /// The chunk file of `data`, as a backup writes it.
    pub fn encode(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let name = crate::ChunkHash::of(data);
        self.encoder.encode(data, None, &name).map(<[u8]>::to_vec)
    }

    /// Parses a chunk file image that should hold `expected_len` bytes, as a fetch does before
    /// it checks the hash.
    pub fn decode(&mut self, file: &[u8], expected_len: usize) -> std::result::Result<Vec<u8>, Corruption> {
        let mut out = Vec::new();
        chunk::decode(file, self.chunk_size, expected_len, &mut out, self.decoder.decompressor())?;
        Ok(out)
    }
}
