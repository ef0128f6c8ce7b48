//! Packs: many blobs (chunks and tree nodes) concatenated into one large origin object, with a
//! separate index object listing each blob's id, offset and length. A pack is named by the
//! BLAKE3 of its index, so the index is verified by its name and every blob by its id.

use crate::format::{self, DecodeError, Kind};
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;

/// Target size of a pack before it is sealed and uploaded.
pub const PACK_TARGET: usize = 64 << 20;

/// Where a blob sits inside its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: Hash,
    pub offset: u64,
    pub len: u32,
}

/// The index of one pack, in pack order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    pub entries: Vec<PackEntry>,
}

impl PackIndex {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::PackIndex, self)
    }

    /// Decodes an index and checks that its blobs are laid out back to back without overlap.
    pub fn decode(bytes: &[u8]) -> Result<PackIndex, DecodeError> {
        let idx: PackIndex = format::decode(Kind::PackIndex, bytes)?;
        let mut next = 0u64;
        for e in &idx.entries {
            if e.offset != next || e.len == 0 {
                return Err(DecodeError::Invalid(Kind::PackIndex, format!("blob {} at offset {} breaks the layout", e.id, e.offset)));
            }
            next = e.offset + e.len as u64;
        }
        Ok(idx)
    }

    /// Total size of the pack object this index describes.
    pub fn pack_len(&self) -> u64 {
        self.entries.last().map(|e| e.offset + e.len as u64).unwrap_or(0)
    }
}

/// Accumulates blobs into a pack in memory.
#[derive(Debug, Default)]
pub struct PackBuilder {
    data: Vec<u8>,
    index: PackIndex,
}

/// A sealed pack ready to upload.
#[derive(Debug)]
pub struct SealedPack {
    pub id: Hash,
    pub data: Vec<u8>,
    pub index: PackIndex,
    pub index_bytes: Vec<u8>,
}

impl PackBuilder {
    pub fn push(&mut self, id: Hash, bytes: &[u8]) {
        if self.data.capacity() == 0 {
            self.data.reserve(PACK_TARGET + (1 << 20));
        }
        self.index.entries.push(PackEntry { id, offset: self.data.len() as u64, len: bytes.len() as u32 });
        self.data.extend_from_slice(bytes);
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// Seals the pack: encodes the index and names the pack by its hash.
    pub fn seal(self) -> SealedPack {
        let index_bytes = self.index.encode();
        SealedPack { id: shoal_chunker::hash(&index_bytes), data: self.data, index: self.index, index_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_round_trip_and_layout_check() {
        let mut b = PackBuilder::default();
        b.push(shoal_chunker::hash(b"one"), b"one");
        b.push(shoal_chunker::hash(b"three"), b"three");
        let sealed = b.seal();
        assert_eq!(sealed.id, shoal_chunker::hash(&sealed.index_bytes));
        let idx = PackIndex::decode(&sealed.index_bytes).unwrap();
        assert_eq!(idx.pack_len(), 8);
        assert_eq!(&sealed.data[3..8], b"three");
        let mut bad = idx.clone();
        bad.entries[1].offset = 2;
        assert!(PackIndex::decode(&bad.encode()).is_err());
    }
}
