//! The records `recwriter` (`src/bin/recwriter.rs`) writes in the guest and
//! `tests/snapshot_e2e.rs` reads back: numbered, checksummed blocks in which a torn, stale or
//! misplaced write shows.
//!
//! Record `k`, every integer little-endian:
//!
//! | offset | size | what |
//! |---:|---:|---|
//! | 0 | 8 | magic `LSREC01\0` |
//! | 8 | 8 | `k` |
//! | 16 | 4072 | payload: the bytes of `fastrand::Rng::with_seed(k)` |
//! | 4088 | 8 | FNV-1a 64 of bytes 0..4088 |

/// Bytes per record.
pub const RECORD: usize = 4096;
/// The first bytes of every record.
pub const MAGIC: &[u8; 8] = b"LSREC01\0";

/// Where the checksum starts.
const SUM: usize = RECORD - 8;

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Record `k` into `buf`.
pub fn fill(buf: &mut [u8; RECORD], k: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&k.to_le_bytes());
    fastrand::Rng::with_seed(k).fill(&mut buf[16..SUM]);
    let h = fnv1a64(&buf[..SUM]);
    buf[SUM..].copy_from_slice(&h.to_le_bytes());
}

/// Record `k`.
pub fn record(k: u64) -> Vec<u8> {
    let mut buf = [0; RECORD];
    fill(&mut buf, k);
    buf.to_vec()
}

/// The number in `block`'s header and whether its checksum holds; `None` if `block` is not a
/// whole record's size or does not start with [`MAGIC`].
pub fn header(block: &[u8]) -> Option<(u64, bool)> {
    if block.len() != RECORD || !block.starts_with(MAGIC) {
        return None;
    }
    let k = u64::from_le_bytes(block.get(8..16)?.try_into().ok()?);
    let sum = u64::from_le_bytes(block.get(SUM..)?.try_into().ok()?);
    Some((k, fnv1a64(&block[..SUM]) == sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_the_number_and_catches_a_torn_record() {
        let r = record(42);
        assert_eq!(header(&r), Some((42, true)));
        let mut torn = r.clone();
        torn[RECORD / 2..].fill(0);
        assert_eq!(header(&torn), Some((42, false)));
        assert_eq!(header(&[0; RECORD]), None);
        assert_ne!(record(1)[16..SUM], record(2)[16..SUM]);
    }
}
