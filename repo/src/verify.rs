//! [`Repository::verify`]: every chunk of a backup re-read and re-hashed.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::chunk::{self, Decoder, Failure};
use crate::error::chain;
use crate::hash::ChunkHash;
use crate::{Repository, Result};

/// One position of one disk whose chunk is bad.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkProblem {
    pub disk: String,
    /// Chunk index in the disk's manifest.
    pub index: usize,
    /// Byte offset in the disk.
    pub offset: u64,
    pub hash: String,
    pub fault: ChunkFault,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum ChunkFault {
    /// No chunk of that name.
    Missing,
    /// The chunk is there but is not that chunk (the reason says how).
    Corrupt(String),
    /// The chunk could not be read (the reason, with its causes).
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub vm: String,
    pub id: String,
    /// Distinct chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Uncompressed bytes they hold.
    pub bytes_checked: u64,
    /// Zero chunks (nothing to read).
    pub chunks_zero: u64,
    /// Every bad position, by disk and index; empty when the backup is whole.
    pub problems: Vec<ChunkProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Repository {
    /// Re-reads and re-hashes every chunk backup `vm`/`id` refers to. A damaged manifest is an
    /// error; bad chunks are reported, each position that uses them.
    pub fn verify(&self, vm: &str, id: &str) -> Result<VerifyReport> {
        let backup = self.get(vm, id)?;
        let key = self.key_for(vm, id, backup.info.key)?;
        let mut jobs: HashMap<(ChunkHash, usize), Vec<(usize, usize)>> = HashMap::new();
        let mut chunks_zero = 0;
        for (d, m) in backup.manifests.iter().enumerate() {
            for (i, c) in m.chunks.iter().enumerate() {
                match c {
                    Some(h) => jobs.entry((*h, m.chunk_len(i))).or_default().push((d, i)),
                    None => chunks_zero += 1,
                }
            }
        }
        let jobs: Vec<_> = jobs.into_iter().collect();
        let cs = self.chunk_size() as usize;
        let store = &*self.store;
        let faults: Vec<Option<ChunkFault>> = self.pool.install(|| {
            jobs.par_iter()
                .map_init(
                    || None::<(Decoder, Vec<u8>)>,
                    |state, ((hash, len), _)| -> Result<Option<ChunkFault>> {
                        let (decoder, buf) = match state {
                            Some(s) => s,
                            None => state.insert((Decoder::new(cs)?, Vec::new())),
                        };
                        Ok(match chunk::fetch(store, hash, *len, buf, decoder, key) {
                            Ok(()) => None,
                            Err(Failure::Missing) => Some(ChunkFault::Missing),
                            Err(Failure::Corrupt(c)) => Some(ChunkFault::Corrupt(chain(&c))),
                            Err(Failure::Store(e)) => Some(ChunkFault::Unreadable(chain(&e))),
                        })
                    },
                )
                .collect::<Result<_>>()
        })?;
        let mut report = VerifyReport {
            vm: vm.into(),
            id: id.into(),
            chunks_checked: jobs.len() as u64,
            bytes_checked: jobs.iter().map(|((_, len), _)| *len as u64).sum(),
            chunks_zero,
            problems: Vec::new(),
        };
        for (((hash, _), positions), fault) in jobs.iter().zip(faults) {
            let Some(fault) = fault else { continue };
            for &(d, i) in positions {
                let m = &backup.manifests[d];
                report.problems.push(ChunkProblem {
                    disk: m.meta.disk.clone(),
                    index: i,
                    offset: i as u64 * m.meta.chunk_size,
                    hash: hash.to_string(),
                    fault: fault.clone(),
                });
            }
        }
        report.problems.sort_by(|a, b| (&a.disk, a.index).cmp(&(&b.disk, b.index)));
        if report.is_ok() {
            tracing::info!(vm, backup = id, chunks = report.chunks_checked, "backup verified");
        } else {
            tracing::error!(vm, backup = id, problems = report.problems.len(), "backup damaged");
        }
        Ok(report)
    }
}
