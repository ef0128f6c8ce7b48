//! Packs: many blobs (chunks and tree nodes) concatenated into one large origin object, with a
//! separate index object listing each blob's id, offset and length. A pack is named by the
//! BLAKE3 of its index, so the index is verified by its name and every blob by its id.

use crate::format::{self, DecodeError, Kind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;

/// Target size of a pack before it is sealed and uploaded.
pub const PACK_TARGET: usize = 64 << 20;
/// Most blobs in one pack: its index (about 40 bytes a blob) stays near 10 MiB, far under
/// what an origin read or a peer may send ([`crate::origin::MAX_PACK_INDEX`]), however
/// small the files.
pub const PACK_MAX_BLOBS: usize = 256 << 10;

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

/// A pack whose bytes stay where they were published from (an in-place version): its blobs are
/// ranges of objects in a source store, each object as it was at publish (size, ETag or
/// version). Named, like any pack, by the BLAKE3 of this index, and named by the version like
/// any pack, so the signed version covers which objects, and which ranges of them, it reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalIndex {
    /// The source store's URL (a path, s3://bucket/prefix, ...: any origin URL).
    pub source: String,
    pub objects: Vec<SourceObject>,
    /// Each object's chunks back to back from offset 0 to its size, objects in order.
    pub entries: Vec<ExternalEntry>,
}

/// One source object of an [`ExternalIndex`], as it was when published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceObject {
    /// Its key under the source URL (`/`-separated, as the version's tree names the file).
    pub key: String,
    pub size: u64,
    /// What the store said of it when it was read: an ETag, and an object version where the
    /// store keeps them. A read that finds another refuses the object (it changed).
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// Where a blob of an [`ExternalIndex`] sits: object number and offset in that object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalEntry {
    pub id: Hash,
    pub object: u32,
    pub offset: u64,
    pub len: u32,
}

impl ExternalIndex {
    /// Where each object starts, and the total size, with the objects laid back to back in
    /// index order (the layout of a copy of this external pack as one pack).
    pub fn object_starts(&self) -> (Vec<u64>, u64) {
        let mut starts = Vec::with_capacity(self.objects.len());
        let mut total = 0u64;
        for o in &self.objects {
            starts.push(total);
            total += o.size;
        }
        (starts, total)
    }

    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::ExternalIndex, self)
    }

    /// Decodes an index and checks its layout: entries in object order, each object's chunks
    /// back to back from 0 to its size, every object with at least one chunk, keys that
    /// cannot climb out of the source.
    pub fn decode(bytes: &[u8]) -> Result<ExternalIndex, DecodeError> {
        let idx: ExternalIndex = format::decode(Kind::ExternalIndex, bytes)?;
        let bad = |m: String| DecodeError::Invalid(Kind::ExternalIndex, m);
        if idx.source.is_empty() {
            return Err(bad("no source URL".into()));
        }
        for o in &idx.objects {
            if o.key.is_empty()
                || o.key.starts_with('/')
                || o.key
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(bad(format!(
                    "object key {:?} is not a plain relative key",
                    o.key
                )));
            }
        }
        let (mut object, mut next) = (0u32, 0u64);
        let mut seen_any = false;
        for e in &idx.entries {
            if e.len == 0 {
                return Err(bad(format!("blob {} is empty", e.id)));
            }
            if e.object != object || !seen_any {
                // The previous object is done: it must have been covered whole.
                if seen_any && next != idx.objects[object as usize].size {
                    return Err(bad(format!(
                        "object {} is not covered whole",
                        idx.objects[object as usize].key
                    )));
                }
                if (seen_any && e.object != object + 1) || (!seen_any && e.object != 0) {
                    return Err(bad(format!("blob {} is out of object order", e.id)));
                }
                object = e.object;
                next = 0;
                seen_any = true;
            }
            if object as usize >= idx.objects.len() || e.offset != next {
                return Err(bad(format!(
                    "blob {} at offset {} breaks the layout",
                    e.id, e.offset
                )));
            }
            next = e.offset + e.len as u64;
        }
        let covered = if seen_any { object as usize + 1 } else { 0 };
        if covered != idx.objects.len() || (seen_any && next != idx.objects[object as usize].size) {
            return Err(bad("objects not covered whole by their blobs".into()));
        }
        Ok(idx)
    }
}

/// A pack's index of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyIndex {
    Packed(PackIndex),
    External(ExternalIndex),
}

impl AnyIndex {
    /// Decodes whichever kind `bytes` holds.
    pub fn decode(bytes: &[u8]) -> Result<AnyIndex, DecodeError> {
        if bytes.len() > 3 && bytes[3] == Kind::ExternalIndex as u8 {
            ExternalIndex::decode(bytes).map(AnyIndex::External)
        } else {
            PackIndex::decode(bytes).map(AnyIndex::Packed)
        }
    }

    /// Where every blob is: (id, source object, offset, len); the object is 0 in a packed
    /// pack.
    pub fn locations(&self) -> Box<dyn Iterator<Item = (Hash, u32, u64, u32)> + '_> {
        match self {
            AnyIndex::Packed(p) => Box::new(p.entries.iter().map(|e| (e.id, 0, e.offset, e.len))),
            AnyIndex::External(x) => {
                Box::new(x.entries.iter().map(|e| (e.id, e.object, e.offset, e.len)))
            }
        }
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

    /// Whether the pack should be sealed: [`PACK_TARGET`] bytes or [`PACK_MAX_BLOBS`] blobs.
    pub fn full(&self) -> bool {
        self.len >= PACK_TARGET || self.index.entries.len() >= PACK_MAX_BLOBS
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

    #[test]
    fn packs_of_tiny_blobs_seal_by_count_under_the_index_limit() {
        let mut b = PackBuilder::default();
        let mut n = 0u64;
        while !b.full() {
            let bytes = Bytes::from(n.to_string());
            b.push(shoal_chunker::hash(&bytes), bytes);
            n += 1;
        }
        assert_eq!(n as usize, PACK_MAX_BLOBS);
        let sealed = b.seal();
        assert!((sealed.index_bytes.len() as u64) < crate::origin::MAX_PACK_INDEX / 4);
    }

    #[test]
    fn external_indexes_cover_each_object_whole_in_order() {
        let h = |b: &[u8]| shoal_chunker::hash(b);
        let obj = |key: &str, size| SourceObject {
            key: key.into(),
            size,
            e_tag: Some("e".into()),
            version: None,
        };
        let entry = |id, object, offset, len| ExternalEntry {
            id,
            object,
            offset,
            len,
        };
        let good = ExternalIndex {
            source: "s3://b/p".into(),
            objects: vec![obj("a/x.bin", 8), obj("y", 3)],
            entries: vec![
                entry(h(b"1"), 0, 0, 5),
                entry(h(b"2"), 0, 5, 3),
                entry(h(b"3"), 1, 0, 3),
            ],
        };
        let bytes = good.encode();
        assert_eq!(ExternalIndex::decode(&bytes).unwrap(), good);
        assert!(matches!(
            AnyIndex::decode(&bytes).unwrap(),
            AnyIndex::External(_)
        ));
        let check = |f: &dyn Fn(&mut ExternalIndex)| {
            let mut bad = good.clone();
            f(&mut bad);
            ExternalIndex::decode(&bad.encode())
        };
        assert!(check(&|_| {}).is_ok());
        assert!(
            check(&|x| x.objects[0].size = 9).is_err(),
            "a gap at the end"
        );
        assert!(check(&|x| x.entries[1].offset = 6).is_err(), "a gap inside");
        assert!(
            check(&|x| x.entries[2].object = 2).is_err(),
            "no such object"
        );
        assert!(
            check(&|x| x.entries.truncate(2)).is_err(),
            "an object not covered"
        );
        assert!(check(&|x| x.objects[1].key = "../etc/passwd".into()).is_err());
        assert!(check(&|x| x.objects[1].key = "/abs".into()).is_err());
        assert!(check(&|x| x.source.clear()).is_err());
        assert!(
            check(&|x| x.entries.swap(0, 2)).is_err(),
            "out of object order"
        );
    }
}
