//! A set of byte ranges of a virtual disk, kept coalesced: the delta's extent map.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent ranges `[start, end)`, keyed by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in order, as `(start, end)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Adds `[start, end)`; returns the bytes newly covered.
    pub fn insert(&mut self, mut start: u64, mut end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let before = self.total;
        // Swallow a range that starts before `start` and reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
                self.total -= e - s;
            }
        }
        // Swallow every range that starts inside `[start, end]`.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
            self.total -= e - s;
        }
        self.ranges.insert(start, end);
        self.total += end - start;
        self.total - before
    }

    /// Removes `[start, end)`; returns the pieces that were covered, in order.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut removed = Vec::new();
        if start >= end {
            return removed;
        }
        let first = match self.ranges.range(..start).next_back() {
            Some((&s, &e)) if e > start => s,
            _ => start,
        };
        let hits: Vec<(u64, u64)> = self.ranges.range(first..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in hits {
            self.ranges.remove(&s);
            self.total -= e - s;
            if s < start {
                self.ranges.insert(s, start);
                self.total += start - s;
            }
            if e > end {
                self.ranges.insert(end, e);
                self.total += e - end;
            }
            removed.push((s.max(start), e.min(end)));
        }
        removed
    }

    /// Whether any byte of `[start, end)` is covered.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        match self.ranges.range(..end).next_back() {
            Some((_, &e)) => e > start,
            None => false,
        }
    }

    /// Cuts `[start, end)` into consecutive pieces `(start, end, covered)`.
    pub fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let mut pos = start;
        let first = match self.ranges.range(..=start).next_back() {
            Some((&s, &e)) if e > start => s,
            _ => start,
        };
        for (&s, &e) in self.ranges.range(first..end) {
            let s = s.max(start);
            if s > pos {
                out.push((pos, s, false));
            }
            let e = e.min(end);
            out.push((s, e, true));
            pos = e;
        }
        if pos < end {
            out.push((pos, end, false));
        }
        out
    }

    /// The first range, cut to at most `max` bytes.
    pub fn first(&self, max: u64) -> Option<(u64, u64)> {
        self.ranges.iter().next().map(|(&s, &e)| (s, e.min(s.saturating_add(max))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: one bool per byte.
    fn check(map: &ExtentMap, model: &[bool]) {
        let mut covered = vec![false; model.len()];
        let mut last_end = None;
        for (s, e) in map.iter() {
            assert!(s < e);
            if let Some(le) = last_end {
                assert!(s > le, "ranges must not touch: {map:?}");
            }
            last_end = Some(e);
            for b in &mut covered[s as usize..e as usize] {
                *b = true;
            }
        }
        assert_eq!(covered, model);
        assert_eq!(map.total(), model.iter().filter(|&&b| b).count() as u64);
    }

    #[test]
    fn random_inserts_and_removes_match_a_byte_model() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut map = ExtentMap::new();
            let mut model = vec![false; 256];
            for _ in 0..60 {
                let s = next(256);
                let e = (s + 1 + next(40)).min(256);
                if next(3) == 0 {
                    let removed = map.remove(s, e);
                    let expect: u64 = model[s as usize..e as usize].iter().filter(|&&b| b).count() as u64;
                    assert_eq!(removed.iter().map(|(a, b)| b - a).sum::<u64>(), expect);
                    model[s as usize..e as usize].iter_mut().for_each(|b| *b = false);
                } else {
                    let added = map.insert(s, e);
                    let expect: u64 = model[s as usize..e as usize].iter().filter(|&&b| !b).count() as u64;
                    assert_eq!(added, expect);
                    model[s as usize..e as usize].iter_mut().for_each(|b| *b = true);
                }
                check(&map, &model);
                let (qs, qe) = (next(256), next(256));
                let (qs, qe) = (qs.min(qe), qs.max(qe));
                assert_eq!(map.overlaps(qs, qe), model[qs as usize..qe as usize].iter().any(|&b| b));
                let pieces = map.split(qs, qe);
                let mut pos = qs;
                for (a, b, c) in pieces {
                    assert_eq!(a, pos);
                    assert!(b > a);
                    assert!(model[a as usize..b as usize].iter().all(|&x| x == c));
                    pos = b;
                }
                assert_eq!(pos, qe);
            }
        }
    }
}
