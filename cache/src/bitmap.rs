//! Per-folio sector bitmaps (which 512-byte sectors of a folio are uptodate, which are dirty).
//!
//! Locking model: none of its own; a bitmap lives inside a folio's state and is only touched with
//! that folio's lock held.

/// A fixed-size set of sector numbers `0..len`, stored one bit per sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SectorBitmap {
    words: Box<[u64]>,
    len: usize,
}

/// Mask of the bits `lo..hi` (both `< 64`, `lo <= hi`; `hi == 64` allowed) within one word.
fn word_mask(lo: usize, hi: usize) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    let lower = (1u64 << lo) - 1;
    upper & !lower
}

impl SectorBitmap {
    /// An empty bitmap for `len` sectors.
    pub(crate) fn new(len: usize) -> Self {
        SectorBitmap {
            words: vec![0u64; len.div_ceil(64)].into_boxed_slice(),
            len,
        }
    }

    /// Calls `f(word index, mask)` for every word overlapping the clamped range `lo..hi`.
    fn for_words(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, u64) -> bool) -> bool {
        let hi = hi.min(self.len);
        let mut s = lo;
        while s < hi {
            let w = s / 64;
            let end = ((w + 1) * 64).min(hi);
            if !f(w, word_mask(s % 64, end - w * 64)) {
                return false;
            }
            s = end;
        }
        true
    }

    /// Marks the sectors `lo..hi`.
    pub(crate) fn set(&mut self, lo: usize, hi: usize) {
        let mut words = std::mem::take(&mut self.words);
        self.for_words(lo, hi, |w, m| {
            if let Some(word) = words.get_mut(w) {
                *word |= m;
            }
            true
        });
        self.words = words;
    }

    /// Unmarks the sectors `lo..hi`.
    pub(crate) fn clear(&mut self, lo: usize, hi: usize) {
        let mut words = std::mem::take(&mut self.words);
        self.for_words(lo, hi, |w, m| {
            if let Some(word) = words.get_mut(w) {
                *word &= !m;
            }
            true
        });
        self.words = words;
    }

    /// Whether every sector in `lo..hi` is marked (true for an empty range).
    pub(crate) fn all(&self, lo: usize, hi: usize) -> bool {
        self.for_words(lo, hi, |w, m| self.words.get(w).is_some_and(|x| x & m == m))
    }

    /// Whether sector `s` is marked.
    pub(crate) fn get(&self, s: usize) -> bool {
        s < self.len
            && self
                .words
                .get(s / 64)
                .is_some_and(|w| w & (1u64 << (s % 64)) != 0)
    }

    /// Whether no sector is marked.
    pub(crate) fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The first sector in `from..to` whose bit equals `value`, if any.
    pub(crate) fn find(&self, from: usize, to: usize, value: bool) -> Option<usize> {
        let to = to.min(self.len);
        let mut s = from;
        while s < to {
            let w = s / 64;
            let word = self.words.get(w).copied().unwrap_or(0);
            let word = if value { word } else { !word };
            let masked = word & word_mask(s % 64, 64);
            if masked != 0 {
                let hit = w * 64 + masked.trailing_zeros() as usize;
                return (hit < to).then_some(hit);
            }
            s = (w + 1) * 64;
        }
        None
    }

    /// The last sector in `from..to` whose bit equals `value`, if any.
    pub(crate) fn rfind(&self, from: usize, to: usize, value: bool) -> Option<usize> {
        (from..to.min(self.len))
            .rev()
            .find(|&s| self.get(s) == value)
    }

    /// The maximal runs of marked sectors within `0..len`, as `(first, end)` pairs.
    #[cfg(test)]
    pub(crate) fn runs(&self, out: &mut Vec<(usize, usize)>) {
        out.clear();
        let mut s = 0;
        while let Some(start) = self.find(s, self.len, true) {
            let end = self.find(start, self.len, false).unwrap_or(self.len);
            out.push((start, end));
            s = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_all_and_runs_agree_with_a_bool_model() {
        let n = 200;
        let mut b = SectorBitmap::new(n);
        let mut model = vec![false; n];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lo = (x % n as u64) as usize;
            let hi = lo + ((x >> 20) % (n - lo + 1) as u64) as usize;
            if x & (1 << 40) != 0 {
                b.set(lo, hi);
                model[lo..hi].iter_mut().for_each(|v| *v = true);
            } else {
                b.clear(lo, hi);
                model[lo..hi].iter_mut().for_each(|v| *v = false);
            }
            let (qlo, qhi) = ((x >> 30) as usize % n, (x >> 45) as usize % (n + 1));
            let (qlo, qhi) = (qlo.min(qhi), qlo.max(qhi));
            assert_eq!(b.all(qlo, qhi), model[qlo..qhi].iter().all(|&v| v));
            assert_eq!(b.find(qlo, qhi, false), (qlo..qhi).find(|&s| !model[s]));
            assert_eq!(b.find(qlo, qhi, true), (qlo..qhi).find(|&s| model[s]));
            assert_eq!(
                b.rfind(qlo, qhi, false),
                (qlo..qhi).rev().find(|&s| !model[s])
            );
            assert_eq!(b.is_empty(), model.iter().all(|&v| !v));
            let mut runs = Vec::new();
            b.runs(&mut runs);
            let mut rebuilt = vec![false; n];
            for (s, e) in runs {
                rebuilt[s..e].iter_mut().for_each(|v| *v = true);
            }
            assert_eq!(rebuilt, model);
        }
    }

    #[test]
    fn ranges_past_the_end_are_clamped() {
        let mut b = SectorBitmap::new(8);
        b.set(4, 100);
        assert!(b.all(4, 8));
        assert!(b.get(7));
        assert!(!b.get(8));
        assert_eq!(b.find(0, 100, true), Some(4));
        assert_eq!(b.find(8, 100, true), None);
    }
}
