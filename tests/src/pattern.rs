//! Data the tests write and check again: patterns in which misplaced, stale or zeroed data
//! shows, and seeded random bytes.

/// Bytes `offset..offset + len` of a disk filled with this pattern: no sector of it is all zeros
/// and every 4 KiB block differs from its neighbours, so a block read from the wrong place or a
/// zeroed one does not pass for it.
pub fn disk(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|i| (i / 4096 * 7 + i % 251 + 1) as u8).collect()
}

/// `len` bytes that differ with `seed` and with position, so that data of one write found in
/// the place of another's is caught.
pub fn seeded(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// `len` pseudo-random bytes, the same for the same `seed`.
pub fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_pattern_has_no_zero_sector_and_blocks_differ() {
        let d = disk(0, 4 << 20);
        assert!(d.chunks(512).all(|s| s.iter().any(|&b| b != 0)));
        let blocks: Vec<&[u8]> = d.chunks(4096).collect();
        assert!(blocks.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(disk(12_345, 100), d[12_345..12_445]);
    }

    #[test]
    fn seeds_give_other_bytes() {
        assert_ne!(seeded(1, 4096), seeded(2, 4096));
        assert_eq!(random(7, 1000), random(7, 1000));
        assert_ne!(random(7, 1000), random(8, 1000));
    }
}
