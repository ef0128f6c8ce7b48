//! Which chunks of a file cover a byte range.

use std::ops::Range;

/// A file's chunk layout: the end offset of each chunk, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileLayout {
    ends: Vec<u64>,
}

/// A piece of a read: take `range` (relative to the chunk) from chunk `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub index: usize,
    pub range: Range<usize>,
}

impl FileLayout {
    /// Builds the layout from chunk lengths.
    pub fn new(lengths: impl IntoIterator<Item = u32>) -> FileLayout {
        let mut end = 0u64;
        let ends = lengths
            .into_iter()
            .map(|l| {
                end += l as u64;
                end
            })
            .collect();
        FileLayout { ends }
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Byte offset at which chunk `index` starts.
    pub fn start(&self, index: usize) -> u64 {
        if index == 0 {
            0
        } else {
            self.ends[index - 1]
        }
    }

    /// The pieces of chunks that make up `len` bytes at `offset`, clipped to the file's end.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Vec::new();
        }
        // First chunk whose end lies beyond `offset`.
        let mut index = self.ends.partition_point(|&e| e <= offset);
        let mut pos = offset;
        let mut out = Vec::new();
        while pos < end {
            let start = self.start(index);
            let stop = self.ends[index].min(end);
            out.push(Piece {
                index,
                range: (pos - start) as usize..(stop - start) as usize,
            });
            pos = stop;
            index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_at_boundaries() {
        let l = FileLayout::new([10, 20, 5]);
        assert_eq!(l.size(), 35);
        assert_eq!(
            l.pieces(0, 10),
            vec![Piece {
                index: 0,
                range: 0..10
            }]
        );
        assert_eq!(
            l.pieces(9, 2),
            vec![
                Piece {
                    index: 0,
                    range: 9..10
                },
                Piece {
                    index: 1,
                    range: 0..1
                }
            ]
        );
        assert_eq!(
            l.pieces(10, 100),
            vec![
                Piece {
                    index: 1,
                    range: 0..20
                },
                Piece {
                    index: 2,
                    range: 0..5
                }
            ]
        );
        assert!(l.pieces(35, 1).is_empty());
        assert!(l.pieces(3, 0).is_empty());
        assert!(FileLayout::new([]).pieces(0, 10).is_empty());
    }

    proptest! {
        #[test]
        fn pieces_cover_exactly_the_request(lens in proptest::collection::vec(1u32..100, 0..20), off in 0u64..2500, len in 0u64..2500) {
            let l = FileLayout::new(lens.iter().copied());
            let pieces = l.pieces(off, len);
            let total: usize = pieces.iter().map(|p| p.range.len()).sum();
            let want = off.saturating_add(len).min(l.size()).saturating_sub(off);
            prop_assert_eq!(total as u64, want);
            let mut pos = off;
            for p in &pieces {
                prop_assert_eq!(l.start(p.index) + p.range.start as u64, pos);
                prop_assert!(p.range.end as u64 <= l.ends[p.index] - l.start(p.index));
                pos += p.range.len() as u64;
            }
        }
    }
}
