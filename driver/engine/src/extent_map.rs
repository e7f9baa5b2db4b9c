//! A map from byte ranges of a volume to where their newest bytes are.
//!
//! Entries never overlap; inserting a range cuts whatever it covers, so the map holds one
//! entry per distinct extent however often the volume was overwritten. The value type says
//! how to describe its bytes starting further in (`advance`), which is all a cut needs.

use std::collections::BTreeMap;

/// A location that can describe the same bytes starting `by` bytes later.
pub trait Advance: Clone {
    fn advance(&self, by: u64) -> Self;
}

impl Advance for () {
    fn advance(&self, _by: u64) {}
}

impl Advance for blockgate_blockstore::segment::RunLocation {
    fn advance(&self, by: u64) -> Self {
        blockgate_blockstore::segment::RunLocation::advance(*self, by)
    }
}

#[derive(Debug, Clone)]
struct Entry<V> {
    length: u64,
    value: V,
}

/// A piece of a looked-up range: `value` is `None` for a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<V> {
    pub offset: u64,
    pub length: u64,
    pub value: Option<V>,
}

#[derive(Debug, Clone)]
pub struct ExtentMap<V> {
    entries: BTreeMap<u64, Entry<V>>,
}

impl<V> Default for ExtentMap<V> {
    fn default() -> Self {
        ExtentMap {
            entries: BTreeMap::new(),
        }
    }
}

impl<V: Advance> ExtentMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Maps `[offset, offset + length)` to `value`, replacing what was there.
    pub fn insert(&mut self, offset: u64, length: u64, value: V) {
        if length == 0 {
            return;
        }
        self.remove(offset, length);
        self.entries.insert(offset, Entry { length, value });
    }

    /// Unmaps `[offset, offset + length)`.
    pub fn remove(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset.saturating_add(length);
        // An entry starting before the range may reach into it.
        if let Some((&start, entry)) = self.entries.range_mut(..offset).next_back() {
            let entry_end = start + entry.length;
            if entry_end > offset {
                entry.length = offset - start;
                if entry_end > end {
                    let tail = Entry {
                        length: entry_end - end,
                        value: entry.value.advance(end - start),
                    };
                    self.entries.insert(end, tail);
                    return;
                }
            }
        }
        let covered: Vec<u64> = self.entries.range(offset..end).map(|(&k, _)| k).collect();
        for start in covered {
            if let Some(entry) = self.entries.remove(&start) {
                let entry_end = start + entry.length;
                if entry_end > end {
                    let tail = Entry {
                        length: entry_end - end,
                        value: entry.value.advance(end - start),
                    };
                    self.entries.insert(end, tail);
                }
            }
        }
    }

    /// The pieces of `[offset, offset + length)` in order, gaps included.
    pub fn pieces(&self, offset: u64, length: u64) -> Vec<Piece<V>> {
        let mut pieces = Vec::new();
        if length == 0 {
            // An empty range has no pieces (and `offset + 1..offset` is no range).
            return pieces;
        }
        let end = offset.saturating_add(length);
        let mut at = offset;
        let first = self
            .entries
            .range(..=offset)
            .next_back()
            .filter(|(start, entry)| **start + entry.length > offset);
        let rest = self.entries.range(offset.saturating_add(1)..end);
        for (&start, entry) in first.into_iter().chain(rest) {
            if start > at {
                pieces.push(Piece {
                    offset: at,
                    length: start - at,
                    value: None,
                });
                at = start;
            }
            let piece_end = (start + entry.length).min(end);
            pieces.push(Piece {
                offset: at,
                length: piece_end - at,
                value: Some(entry.value.advance(at - start)),
            });
            at = piece_end;
        }
        if at < end {
            pieces.push(Piece {
                offset: at,
                length: end - at,
                value: None,
            });
        }
        pieces
    }

    /// Every entry in offset order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u64, u64, &V)> {
        self.entries
            .iter()
            .map(|(&start, entry)| (start, entry.length, &entry.value))
    }

    /// The first entry starting at or after `offset`, or covering it.
    pub fn next_from(&self, offset: u64) -> Option<(u64, u64, V)> {
        let covering = self
            .entries
            .range(..=offset)
            .next_back()
            .filter(|(start, entry)| **start + entry.length > offset)
            .map(|(&start, entry)| {
                (
                    offset,
                    start + entry.length - offset,
                    entry.value.advance(offset - start),
                )
            });
        covering.or_else(|| {
            self.entries
                .range(offset..)
                .next()
                .map(|(&start, entry)| (start, entry.length, entry.value.clone()))
        })
    }

    /// Bytes covered by entries.
    pub fn covered_bytes(&self) -> u64 {
        self.entries.values().map(|entry| entry.length).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A value that remembers which byte of which write it stands for.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Tag(u32, u64);

    impl Advance for Tag {
        fn advance(&self, by: u64) -> Tag {
            Tag(self.0, self.1 + by)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..200, 1u64..50).prop_map(|(o, l)| Op::Insert(o, l)),
            (0u64..200, 1u64..50).prop_map(|(o, l)| Op::Remove(o, l)),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_byte_array(ops in proptest::collection::vec(op(), 1..60)) {
            let mut map = ExtentMap::new();
            let mut model: Vec<Option<Tag>> = vec![None; 260];
            for (n, op) in ops.iter().enumerate() {
                match *op {
                    Op::Insert(o, l) => {
                        let n = u32::try_from(n).unwrap();
                        map.insert(o, l, Tag(n, 0));
                        for i in 0..l { model[usize::try_from(o + i).unwrap()] = Some(Tag(n, i)); }
                    }
                    Op::Remove(o, l) => {
                        map.remove(o, l);
                        for i in 0..l { model[usize::try_from(o + i).unwrap()] = None; }
                    }
                }
            }
            let pieces = map.pieces(0, 260);
            let mut at = 0u64;
            for piece in &pieces {
                prop_assert_eq!(piece.offset, at);
                for i in 0..piece.length {
                    let expected = &model[usize::try_from(piece.offset + i).unwrap()];
                    let got = piece.value.as_ref().map(|v| v.advance(i));
                    prop_assert_eq!(&got, expected);
                }
                at += piece.length;
            }
            prop_assert_eq!(at, 260);
            let mut previous_end = 0;
            for (start, length, _) in map.iter() {
                prop_assert!(start >= previous_end && length > 0);
                previous_end = start + length;
            }
        }
    }

    #[test]
    fn an_empty_range_has_no_pieces() {
        let mut map = ExtentMap::new();
        map.insert(0, 100, Tag(1, 0));
        assert!(map.pieces(50, 0).is_empty());
        assert!(map.pieces(100, 0).is_empty());
        assert!(map.pieces(u64::MAX, 0).is_empty());
    }

    #[test]
    fn overwrite_in_the_middle_splits() {
        let mut map = ExtentMap::new();
        map.insert(0, 100, Tag(1, 0));
        map.insert(40, 10, Tag(2, 0));
        let pieces = map.pieces(0, 100);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[2].value, Some(Tag(1, 50)));
        assert_eq!(map.next_from(45), Some((45, 5, Tag(2, 5))));
        assert_eq!(map.next_from(100), None);
    }
}
