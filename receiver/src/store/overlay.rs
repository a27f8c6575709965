//! The in-memory index of the redo journal: for each disk, which byte ranges
//! the journal overrides and where their newest content is. Pure logic: it
//! owns no file.
//!
//! Pieces never overlap; a later change splits or replaces what it covers,
//! so the index always describes the *result* of the journal, not its
//! history, and applying it to an image in any order gives the same bytes as
//! replaying the journal in order.

use std::collections::BTreeMap;

/// Where the newest content of a piece is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The range reads as zeroes; `no_hole` asks that it stay allocated.
    Zero {
        /// The client asked that no hole be punched.
        no_hole: bool,
    },
    /// The bytes are in the journal file, starting at this file offset.
    Journal(u64),
}

impl Source {
    /// The same source, `by` bytes further into the range.
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Zero { .. } => self,
            Source::Journal(at) => Source::Journal(at + by),
        }
    }
}

/// One overridden range `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// First byte on the disk.
    pub(crate) start: u64,
    /// One past the last byte on the disk.
    pub(crate) end: u64,
    /// Where its content is.
    pub(crate) source: Source,
}

/// The overridden ranges of one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Overlay {
    /// start → (end, source); pieces are disjoint and non-empty.
    pieces: BTreeMap<u64, (u64, Source)>,
}

impl Overlay {
    /// Records that `start..end` now reads from `source`.
    pub(crate) fn insert(&mut self, start: u64, end: u64, source: Source) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some((e, src)) = self.pieces.remove(&s) else {
                continue;
            };
            if s < start {
                self.pieces.insert(s, (start, src));
            }
            if e > end {
                self.pieces.insert(end, (e, src.advanced(end - s)));
            }
        }
        self.pieces.insert(start, (end, source));
    }

    /// The pieces that intersect `start..end`, clipped to it, in order.
    pub(crate) fn pieces_in(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = self
            .pieces
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v));
        for (s, (e, src)) in first
            .into_iter()
            .chain(self.pieces.range(start..end).map(|(s, v)| (*s, *v)))
        {
            let cs = s.max(start);
            out.push(Piece {
                start: cs,
                end: e.min(end),
                source: src.advanced(cs - s),
            });
        }
        out
    }

    /// Every piece, in order.
    pub(crate) fn all(&self) -> impl Iterator<Item = Piece> + '_ {
        self.pieces.iter().map(|(s, (e, src))| Piece {
            start: *s,
            end: *e,
            source: *src,
        })
    }
}

/// A set of byte ranges, kept sorted and merged: the extents of one disk
/// that still wait for a resync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    /// start → end, disjoint, non-adjacent, non-empty.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `start..end`, merging with what it touches.
    pub(crate) fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, re)| **re >= start)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (rs, re) in touching {
            self.ranges.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.ranges.insert(s, e);
    }

    /// Removes `start..end`.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, re)| **re > start)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (rs, re) in overlapping {
            self.ranges.remove(&rs);
            if rs < start {
                self.ranges.insert(rs, start);
            }
            if re > end {
                self.ranges.insert(end, re);
            }
        }
    }

    /// The ranges, in order, as (start, end).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }

    /// Whether the set is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte-level model: which write (index) each byte shows, 0 = none.
    fn model(ops: &[(u64, u64)], size: usize) -> Vec<u64> {
        let mut m = vec![0u64; size];
        for (i, (s, l)) in ops.iter().enumerate() {
            for b in &mut m[*s as usize..(*s + *l) as usize] {
                *b = i as u64 + 1;
            }
        }
        m
    }

    proptest! {
        #[test]
        fn overlay_matches_a_byte_model(ops in proptest::collection::vec((0u64..200, 1u64..60), 0..40)) {
            let size = 260usize;
            let mut o = Overlay::default();
            // Write i's "journal" lives at offset i * 1000, so the source
            // offset says which write and where in it a byte came from.
            for (i, (s, l)) in ops.iter().enumerate() {
                o.insert(*s, s + l, Source::Journal((i as u64 + 1) * 1000));
            }
            let m = model(&ops, size);
            let mut seen = vec![0u64; size];
            let mut last_end = 0;
            for p in o.pieces_in(0, size as u64) {
                prop_assert!(p.start >= last_end && p.start < p.end);
                last_end = p.end;
                for b in p.start..p.end {
                    let Source::Journal(at) = p.source else { unreachable!() };
                    let at = at + (b - p.start);
                    let write = at / 1000;
                    let (ws, _) = ops[write as usize - 1];
                    prop_assert_eq!(at % 1000, b - ws);
                    seen[b as usize] = write;
                }
            }
            prop_assert_eq!(seen, m);
        }

        #[test]
        fn clipped_reads_agree_with_full_reads(ops in proptest::collection::vec((0u64..200, 1u64..60), 0..20), a in 0u64..260, l in 0u64..100) {
            let mut o = Overlay::default();
            for (i, (s, len)) in ops.iter().enumerate() {
                o.insert(*s, s + len, Source::Journal((i as u64 + 1) * 1000));
            }
            let clipped = o.pieces_in(a, a + l);
            for p in &clipped {
                prop_assert!(p.start >= a && p.end <= a + l);
                let full = o.pieces_in(p.start, p.start + 1);
                prop_assert_eq!(full[0].source, p.source);
            }
        }

        #[test]
        fn range_set_matches_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..100, 1u64..30), 0..40)) {
            let mut set = RangeSet::default();
            let mut bits = vec![false; 140];
            for (add, s, l) in ops {
                if add { set.add(s, s + l) } else { set.remove(s, s + l) }
                for b in &mut bits[s as usize..(s + l) as usize] { *b = add; }
            }
            let mut from_set = vec![false; 140];
            let mut last_end = None;
            for (s, e) in set.iter() {
                prop_assert!(s < e);
                prop_assert!(last_end.is_none_or(|le| le < s), "ranges are merged");
                last_end = Some(e);
                for b in &mut from_set[s as usize..e as usize] { *b = true; }
            }
            prop_assert_eq!(from_set, bits);
            prop_assert_eq!(set.is_empty(), !set.iter().any(|_| true));
        }
    }
}
