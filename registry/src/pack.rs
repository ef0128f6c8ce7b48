//! Packs: many blobs (chunks and tree nodes) concatenated into one large origin object, with a
//! separate index object listing each blob's id, offset and length. A pack is named by the
//! BLAKE3 of its index, so the index is verified by its name and every blob by its id.

use crate::format::{self, DecodeError, Kind};
use bytes::Bytes;
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
                return Err(DecodeError::Invalid(
                    Kind::PackIndex,
                    format!("blob {} at offset {} breaks the layout", e.id, e.offset),
                ));
            }
            next = e.offset + e.len as u64;
        }
        Ok(idx)
    }

    /// Total size of the pack object this index describes.
    pub fn pack_len(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.offset + e.len as u64)
            .unwrap_or(0)
    }
}

/// Accumulates blobs into a pack in memory, without copying them into one buffer.
#[derive(Debug, Default)]
pub struct PackBuilder {
    parts: Vec<Bytes>,
    len: usize,
    index: PackIndex,
}

/// A sealed pack ready to upload.
#[derive(Debug)]
pub struct SealedPack {
    pub id: Hash,
    /// The pack's bytes, blob after blob.
    pub parts: Vec<Bytes>,
    pub index: PackIndex,
    pub index_bytes: Vec<u8>,
}

impl SealedPack {
    /// Size of the pack object in bytes.
    pub fn len(&self) -> u64 {
        self.index.pack_len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// The pack's bytes as one buffer (for tests and small packs).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

impl PackBuilder {
    pub fn push(&mut self, id: Hash, bytes: Bytes) {
        self.index.entries.push(PackEntry {
            id,
            offset: self.len as u64,
            len: bytes.len() as u32,
        });
        self.len += bytes.len();
        self.parts.push(bytes);
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// Seals the pack: encodes the index and names the pack by its hash.
    pub fn seal(self) -> SealedPack {
        let index_bytes = self.index.encode();
        SealedPack {
            id: shoal_chunker::hash(&index_bytes),
            parts: self.parts,
            index: self.index,
            index_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_round_trip_and_layout_check() {
        let mut b = PackBuilder::default();
        b.push(shoal_chunker::hash(b"one"), Bytes::from_static(b"one"));
        b.push(shoal_chunker::hash(b"three"), Bytes::from_static(b"three"));
        let sealed = b.seal();
        assert_eq!(sealed.id, shoal_chunker::hash(&sealed.index_bytes));
        let idx = PackIndex::decode(&sealed.index_bytes).unwrap();
        assert_eq!(idx.pack_len(), 8);
        assert_eq!(&sealed.to_vec()[3..8], b"three");
        let mut bad = idx.clone();
        bad.entries[1].offset = 2;
        assert!(PackIndex::decode(&bad.encode()).is_err());
    }
}
