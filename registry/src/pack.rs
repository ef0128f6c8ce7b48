//! Packs: many blobs (chunks and tree nodes) concatenated into one large origin object, with a
//! separate index object listing each blob's id, offset and length. A pack is named by the
//! BLAKE3 of its index, so the index is verified by its name and every blob by its id.

use crate::format::{self, DecodeError, Kind};
use bytes::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;
use std::ops::Range;

/// Target size of a pack before it is sealed and uploaded.
pub const PACK_TARGET: usize = 64 << 20;
/// Most blobs in one pack: its index (about 40 bytes a blob) stays near 10 MiB, far under
/// what an origin read or a peer may send ([`crate::origin::MAX_PACK_INDEX`]), however
/// small the files.
pub const PACK_MAX_BLOBS: usize = 256 << 10;

/// Raw bytes a compressed frame holds at least: consecutive blobs of a pack are compressed
/// together until a frame reaches this size. Measured by hand (a build taking the frame size
/// from the environment; not a repository command) on a real source tree (Django 4.2.20,
/// 6,729 files, 42.7 MB) against `tar | zstd -3` of it (9.45 MB), the whole origin (packs,
/// indexes, tree nodes) at zstd level 3: frames of 128 KiB 1.21x, 256 KiB 1.17x, 512 KiB
/// 1.12x, 1 MiB 1.08x (level 6 would reach 1.06x at 256 KiB, but compresses at a third of
/// the speed). A cold random read of a compressible pack reads and decompresses one frame
/// (about 0.7 ms of CPU for 1 MiB); warm reads come from the local store, raw.
pub const FRAME_TARGET: usize = 1 << 20;
/// Largest raw size of a compressed frame (a blob larger than this is stored raw): what one
/// decompression may produce, whatever an index says.
pub const MAX_ZSTD_FRAME: u64 = 16 << 20;
/// The zstd level packs are compressed at. Measured by hand (the level-3 packs of Django
/// 4.2.20 decompressed and compressed again with python-zstandard; 1 MiB frames, one core): level 3 10.26 MB at 289 MB/s, 4 10.25 MB, 5 9.64 MB at 126 MB/s, 6
/// 9.37 MB at 97 MB/s, 9 9.20 MB at 71 MB/s; with the indexes and tree, level 3 put the
/// origin at 1.149x `tar | zstd -3`, level 5 at about 1.08x. Decompression runs at over
/// 1 GB/s a core whatever the level; compression runs once, at publish, on every core.
pub const ZSTD_LEVEL: i32 = 5;

/// Where a blob sits inside its pack: `offset` counts raw bytes (the blobs back to back, as
/// they are before compression).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: Hash,
    pub offset: u64,
    pub len: u32,
}

/// How a frame's bytes are stored in the pack object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// As they are: any part of the frame can be read alone.
    Raw,
    /// One zstd frame: read and decompressed whole.
    Zstd,
}

/// A run of consecutive whole blobs of a pack, stored one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub codec: Codec,
    pub raw_len: u64,
    pub stored_len: u64,
}

/// A pack's frames, with where each starts in the raw stream and in the pack object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    frames: Vec<Frame>,
    /// Start of each frame, and the end (one more than frames), raw and stored.
    raw: Vec<u64>,
    stored: Vec<u64>,
}

/// A read of a pack: the bytes of the pack object to read, and the raw bytes they decode to
/// (whole compressed frames, so possibly wider than what was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub stored: Range<u64>,
    pub raw: Range<u64>,
    /// The frames it touches.
    frames: Range<usize>,
}

/// Why the bytes read for a [`Span`] do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(String);

impl Frames {
    pub fn new(frames: Vec<Frame>) -> Frames {
        let (mut raw, mut stored) = (vec![0u64], vec![0u64]);
        for f in &frames {
            raw.push(raw.last().expect("non-empty") + f.raw_len);
            stored.push(stored.last().expect("non-empty") + f.stored_len);
        }
        Frames {
            frames,
            raw,
            stored,
        }
    }

    /// A pack stored as it is (a format v1 pack): one raw frame.
    pub fn plain(len: u64) -> Frames {
        Frames::new(if len == 0 {
            Vec::new()
        } else {
            vec![Frame {
                codec: Codec::Raw,
                raw_len: len,
                stored_len: len,
            }]
        })
    }

    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Whether no frame is compressed.
    pub fn is_plain(&self) -> bool {
        self.frames.iter().all(|f| f.codec == Codec::Raw)
    }

    pub fn raw_len(&self) -> u64 {
        *self.raw.last().expect("non-empty")
    }

    pub fn stored_len(&self) -> u64 {
        *self.stored.last().expect("non-empty")
    }

    /// Where the compressed frame holding raw offset `at` begins (raw), if that frame is
    /// compressed.
    pub fn compressed_at(&self, at: u64) -> Option<u64> {
        let f = self.raw.partition_point(|s| *s <= at).checked_sub(1)?;
        (self.frames.get(f)?.codec == Codec::Zstd).then_some(self.raw[f])
    }

    /// What to read for the raw bytes `raw` (within the pack): raw frames only where they
    /// overlap it, compressed frames whole.
    pub fn span(&self, raw: Range<u64>) -> Span {
        assert!(
            raw.start < raw.end && raw.end <= self.raw_len(),
            "a span inside the pack"
        );
        let first = self.raw.partition_point(|s| *s <= raw.start) - 1;
        let last = self.raw.partition_point(|s| *s < raw.end) - 1;
        let (stored_start, raw_start) = match self.frames[first].codec {
            Codec::Raw => (self.stored[first] + raw.start - self.raw[first], raw.start),
            Codec::Zstd => (self.stored[first], self.raw[first]),
        };
        let (stored_end, raw_end) = match self.frames[last].codec {
            Codec::Raw => (self.stored[last] + raw.end - self.raw[last], raw.end),
            Codec::Zstd => (self.stored[last + 1], self.raw[last + 1]),
        };
        Span {
            stored: stored_start..stored_end,
            raw: raw_start..raw_end,
            frames: first..last + 1,
        }
    }

    /// The raw bytes of `span` from `data` (the pack object's bytes at `span.stored`), a frame
    /// at a time and only as the caller asks for the next: a raw frame as a slice of `data`
    /// (the part of it `span` covers), a compressed one decompressed into a buffer of its own
    /// (so that a reader of a long span holds one frame decoded, not the whole span). Each
    /// compressed frame is decompressed into at most its declared size, and must fill it
    /// exactly.
    pub fn pieces<'a>(
        &'a self,
        span: &'a Span,
        data: Bytes,
    ) -> Result<impl Iterator<Item = Result<Piece, FrameError>> + 'a, FrameError> {
        let want = span.stored.end - span.stored.start;
        if data.len() as u64 != want {
            return Err(FrameError(format!(
                "{} bytes read at {}..{}, not {want}",
                data.len(),
                span.stored.start,
                span.stored.end
            )));
        }
        let base = span.stored.start;
        let edge = |i: usize| i == span.frames.start || i + 1 == span.frames.end;
        Ok(span.frames.clone().map(move |i| {
            let f = self.frames[i];
            let from = (self.stored[i].max(base) - base) as usize;
            let to = (self.stored[i + 1].min(span.stored.end) - base) as usize;
            let stored = data.slice(from..to);
            match f.codec {
                Codec::Raw => Ok(Piece {
                    at: self.raw[i].max(span.raw.start),
                    bytes: stored,
                    compressed: false,
                    edge: edge(i),
                }),
                Codec::Zstd => {
                    let mut out = vec![0; f.raw_len as usize];
                    let n = zstd::bulk::decompress_to_buffer(&stored, &mut out).map_err(|e| {
                        FrameError(format!(
                            "compressed frame at {} does not decompress: {e}",
                            self.stored[i]
                        ))
                    })?;
                    if n as u64 != f.raw_len {
                        return Err(FrameError(format!(
                            "compressed frame at {} holds {n} bytes, not {}",
                            self.stored[i], f.raw_len
                        )));
                    }
                    Ok(Piece {
                        at: self.raw[i],
                        bytes: out.into(),
                        compressed: true,
                        edge: edge(i),
                    })
                }
            }
        }))
    }

    /// The raw bytes of `span` from `data`, the pack object's bytes at `span.stored`, in one
    /// buffer (see [`Frames::pieces`]).
    pub fn decode(&self, span: &Span, data: Bytes) -> Result<Bytes, FrameError> {
        if self.frames[span.frames.clone()]
            .iter()
            .all(|f| f.codec == Codec::Raw)
        {
            return self.pieces(span, data.clone()).map(|_| data);
        }
        let mut out = Vec::with_capacity((span.raw.end - span.raw.start) as usize);
        for piece in self.pieces(span, data)? {
            out.extend_from_slice(&piece?.bytes);
        }
        Ok(out.into())
    }
}

/// One frame's part of a read (see [`Frames::pieces`]).
#[derive(Debug, Clone)]
pub struct Piece {
    /// Where its bytes begin in the pack's raw bytes.
    pub at: u64,
    pub bytes: Bytes,
    /// Whether the frame was compressed (then `bytes` is the whole frame).
    pub compressed: bool,
    /// Whether it is the first or the last frame the read touches (the frames between hold
    /// only blobs the read was for).
    pub edge: bool,
}

/// The index of one pack, in pack order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackIndex {
    pub entries: Vec<PackEntry>,
    /// How the blobs are stored: one raw frame in a format v1 pack.
    pub frames: Frames,
}

/// A format v1 index: blobs stored as they are.
#[derive(Serialize, Deserialize)]
struct IndexV1 {
    #[serde(deserialize_with = "entries")]
    entries: Vec<PackEntry>,
}

/// A format v2 index: blobs in frames, some compressed.
#[derive(Serialize, Deserialize)]
struct IndexV2 {
    #[serde(deserialize_with = "entries")]
    entries: Vec<PackEntry>,
    frames: Vec<Frame>,
}

/// An index's entries, room made for as many as it declares up to a full pack's. (serde
/// reserves at most 1 MiB for a list it is told the length of, then doubles: a full pack's
/// 262,144 entries grew through 8 and 17 MB buffers held at once, twice the list, in each of
/// the indexes a pull opens side by side.)
fn entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PackEntry>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<PackEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of pack entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PACK_MAX_BLOBS));
            while let Some(e) = seq.next_element()? {
                v.push(e);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Entries)
}

impl PackIndex {
    /// A v1 index when no frame is compressed (what any release reads), else v2.
    pub fn encode(&self) -> Vec<u8> {
        // The bodies borrow nothing: cloning the entries keeps the frozen types simple, and
        // an index is encoded once per pack.
        if self.frames.is_plain() {
            format::encode(
                Kind::PackIndex,
                &IndexV1 {
                    entries: self.entries.clone(),
                },
            )
        } else {
            format::encode_v(
                Kind::PackIndex,
                format::V2,
                &IndexV2 {
                    entries: self.entries.clone(),
                    frames: self.frames.frames.clone(),
                },
            )
        }
    }

    /// Decodes an index and checks that its blobs are laid out back to back without overlap,
    /// and that its frames hold whole blobs and cover them exactly.
    pub fn decode(bytes: &[u8]) -> Result<PackIndex, DecodeError> {
        let bad = |m: String| DecodeError::Invalid(Kind::PackIndex, m);
        let (entries, frames) = match format::version_of(Kind::PackIndex, bytes)? {
            format::V2 => {
                let b: IndexV2 = format::decode_v(Kind::PackIndex, format::V2, bytes)?;
                (b.entries, Some(b.frames))
            }
            _ => {
                let b: IndexV1 = format::decode(Kind::PackIndex, bytes)?;
                (b.entries, None)
            }
        };
        let mut next = 0u64;
        for e in &entries {
            if e.offset != next || e.len == 0 {
                return Err(bad(format!(
                    "blob {} at offset {} breaks the layout",
                    e.id, e.offset
                )));
            }
            next = e.offset + e.len as u64;
        }
        let frames = match frames {
            None => Frames::plain(next),
            Some(frames) => {
                // Each frame ends where a blob ends, and the last where the last blob does.
                let mut blob = 0usize;
                let mut end = 0u64;
                for f in &frames {
                    let ok = f.raw_len > 0
                        && f.stored_len > 0
                        && match f.codec {
                            Codec::Raw => f.stored_len == f.raw_len,
                            Codec::Zstd => f.raw_len <= MAX_ZSTD_FRAME,
                        };
                    if !ok {
                        return Err(bad(format!(
                            "frame at raw offset {end} has sizes {f:?} its codec cannot have"
                        )));
                    }
                    end += f.raw_len;
                    while blob < entries.len() && entries[blob].offset < end {
                        blob += 1;
                    }
                    let blob_end = blob
                        .checked_sub(1)
                        .map(|b| entries[b].offset + entries[b].len as u64);
                    if blob_end != Some(end) {
                        return Err(bad(format!(
                            "frame ending at raw offset {end} cuts a blob or holds none"
                        )));
                    }
                }
                if end != next {
                    return Err(bad(format!("frames cover {end} bytes, the blobs {next}")));
                }
                Frames::new(frames)
            }
        };
        Ok(PackIndex { entries, frames })
    }

    /// Size of the pack object this index describes (its stored bytes).
    pub fn pack_len(&self) -> u64 {
        self.frames.stored_len()
    }

    /// Size of its blobs, back to back.
    pub fn raw_len(&self) -> u64 {
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

    /// How many blobs the index places.
    pub fn len(&self) -> usize {
        match self {
            AnyIndex::Packed(p) => p.entries.len(),
            AnyIndex::External(x) => x.entries.len(),
        }
    }

    /// Whether the index places no blob.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the `i`th blob is: (id, source object, offset, len); the object is 0 in a
    /// packed pack. Panics past [`Self::len`].
    pub fn location(&self, i: usize) -> (Hash, u32, u64, u32) {
        match self {
            AnyIndex::Packed(p) => {
                let e = &p.entries[i];
                (e.id, 0, e.offset, e.len)
            }
            AnyIndex::External(x) => {
                let e = &x.entries[i];
                (e.id, e.object, e.offset, e.len)
            }
        }
    }

    /// Where every blob is, in index order (see [`Self::location`]).
    pub fn locations(&self) -> impl Iterator<Item = (Hash, u32, u64, u32)> + '_ {
        (0..self.len()).map(|i| self.location(i))
    }
}

/// Accumulates blobs into a pack in memory, without copying them into one buffer: frames are
/// cut as blobs come, and compressed when the pack is sealed.
#[derive(Debug)]
pub struct PackBuilder {
    parts: Vec<Bytes>,
    len: usize,
    entries: Vec<PackEntry>,
    /// Where each closed frame ends, in parts.
    cuts: Vec<usize>,
    /// Raw bytes in the frame still open.
    open: usize,
    compress: bool,
}

impl Default for PackBuilder {
    fn default() -> Self {
        PackBuilder {
            parts: Vec::new(),
            len: 0,
            entries: Vec::new(),
            cuts: Vec::new(),
            open: 0,
            compress: true,
        }
    }
}

/// A sealed pack ready to upload.
#[derive(Debug)]
pub struct SealedPack {
    pub id: Hash,
    /// The pack object's bytes, frame after frame.
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

/// The threads that compress frames: a pool of their own, not rayon's global one, whose
/// threads may all be waiting on whoever seals packs (publish chunks files on the global pool
/// and its workers block when the packer falls behind: sealing there deadlocked).
fn sealing_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("shoal-seal-{i}"))
            .build()
            .expect("starting the sealing threads")
    })
}

/// The zstd level of [`Squeezer`]'s probe.
const PROBE_LEVEL: i32 = 1;

/// Bytes of each sample [`Squeezer`] takes to guess whether a frame compresses.
const PROBE: usize = 2 << 10;

/// Whether `bytes` look like random or already compressed data, from the byte frequencies of
/// four 512-byte samples: their collision entropy (Renyi order 2) is over 7.5 bits a byte
/// (uniform bytes: 8; text: 4 to 6). About a microsecond, against tens for a zstd probe: what
/// a per-chunk decision can afford on the data plane (btrfs decides with a similar sample).
pub fn looks_incompressible(bytes: &[u8]) -> bool {
    const SAMPLE: usize = 512;
    let mut counts = [0u32; 256];
    let mut n = 0u64;
    if bytes.len() <= 4 * SAMPLE {
        for &b in bytes {
            counts[b as usize] += 1;
        }
        n = bytes.len() as u64;
    } else {
        for q in 0..4 {
            let at = q * (bytes.len() - SAMPLE) / 3;
            for &b in &bytes[at..at + SAMPLE] {
                counts[b as usize] += 1;
            }
            n += SAMPLE as u64;
        }
    }
    if n < 256 {
        return false;
    }
    // sum(p^2) < 2^-7.5, in integers: sum(c^2) * 2^7.5 < n^2 (2^7.5 ~ 181.02).
    let sq: u64 = counts.iter().map(|&c| c as u64 * c as u64).sum();
    sq * 181 < n * n
}

/// Compresses frames of bytes when that pays: a zstd level-1 probe over samples from four
/// places in a frame (8 KiB of it) must save a tenth before the frame is compressed at all,
/// and the result is kept only if it saves at least 3%. Random and already compressed data
/// (JPEG, gzip, Parquet) costs a few percent of one compression. Packs use it at seal (at
/// [`ZSTD_LEVEL`]), the bulk channel for each group of an answer and the local store for each
/// chunk (at level 1; the store asks [`looks_incompressible`] first).
pub struct Squeezer {
    probe: zstd::bulk::Compressor<'static>,
    z: zstd::bulk::Compressor<'static>,
}

impl Squeezer {
    /// A squeezer compressing at zstd `level`, or None if zstd cannot start one.
    pub fn new(level: i32) -> Option<Squeezer> {
        Some(Squeezer {
            probe: zstd::bulk::Compressor::new(PROBE_LEVEL).ok()?,
            z: zstd::bulk::Compressor::new(level).ok()?,
        })
    }

    /// `frame` (its parts, back to back) compressed, if that saves at least 3% of it.
    pub fn squeeze<B: AsRef<[u8]>>(&mut self, frame: &[B]) -> Option<Vec<u8>> {
        let len: usize = frame.iter().map(|p| p.as_ref().len()).sum();
        if len < 64 {
            return None;
        }
        // The bytes at raw offset `at` of the frame, at most `n` of them, from one part.
        let at = |mut at: usize, n: usize| -> &[u8] {
            for p in frame {
                let p = p.as_ref();
                if at < p.len() {
                    return &p[at..(at + n).min(p.len())];
                }
                at -= p.len();
            }
            &[]
        };
        if len > 8 * PROBE {
            let mut sample = Vec::with_capacity(4 * PROBE);
            for q in 0..4 {
                sample.extend_from_slice(at(q * len / 4, PROBE));
            }
            let small = self.probe.compress(&sample).ok()?;
            if small.len() * 10 > sample.len() * 9 {
                return None;
            }
        }
        let whole: std::borrow::Cow<'_, [u8]> = match frame {
            [one] => one.as_ref().into(),
            _ => {
                let mut v = Vec::with_capacity(len);
                for p in frame {
                    v.extend_from_slice(p.as_ref());
                }
                v.into()
            }
        };
        let mut out = self.z.compress(&whole).ok()?;
        // Allocated for the worst case (a little over `len`): given back, so that a batch of
        // squeezed blobs holds what they take (tree nodes shrink ~4x; a 10M-chunk pull held
        // 67 MB of such room at its peak).
        out.shrink_to_fit();
        (out.len() * 100 <= len * 97).then_some(out)
    }
}

impl PackBuilder {
    /// A builder that stores every blob as it is (a format v1 pack).
    pub fn plain() -> PackBuilder {
        PackBuilder {
            compress: false,
            ..Default::default()
        }
    }

    pub fn push(&mut self, id: Hash, bytes: Bytes) {
        let n = bytes.len();
        if n as u64 > MAX_ZSTD_FRAME && self.open > 0 {
            // Too large to compress: a raw frame of its own.
            self.cut();
        }
        self.entries.push(PackEntry {
            id,
            offset: self.len as u64,
            len: n as u32,
        });
        self.len += n;
        self.open += n;
        self.parts.push(bytes);
        if self.open >= FRAME_TARGET {
            self.cut();
        }
    }

    fn cut(&mut self) {
        self.cuts.push(self.parts.len());
        self.open = 0;
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pack should be sealed: [`PACK_TARGET`] bytes or [`PACK_MAX_BLOBS`] blobs.
    pub fn full(&self) -> bool {
        self.len >= PACK_TARGET || self.entries.len() >= PACK_MAX_BLOBS
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Seals the pack: compresses the frames that pay for it (CPU-bound: about 3 ms per
    /// MiB of text, a few percent of that for incompressible data), encodes the index and
    /// names the pack by its hash.
    pub fn seal(mut self) -> SealedPack {
        if self.open > 0 {
            self.cut();
        }
        let mut parts: Vec<Bytes> = Vec::with_capacity(self.parts.len());
        let mut frames: Vec<Frame> = Vec::new();
        // The frames, then each compressed (or not) on the rayon pool: a pack's frames
        // compress in parallel, so publish of text keeps up on machines of many cores.
        let mut from = 0usize;
        let mut raw = std::mem::take(&mut self.parts).into_iter();
        let raw_frames: Vec<Vec<Bytes>> = std::mem::take(&mut self.cuts)
            .into_iter()
            .map(|cut| {
                let frame: Vec<Bytes> = raw.by_ref().take(cut - from).collect();
                from = cut;
                frame
            })
            .collect();
        let compress = self.compress;
        let done: Vec<(Vec<Bytes>, Option<Vec<u8>>)> = sealing_pool().install(|| {
            raw_frames
                .into_par_iter()
                .map_init(
                    // The probe at level 1: it only tells whether a frame compresses, and at
                    // level 5 it cost random data's publish about 6%.
                    || compress.then(|| Squeezer::new(ZSTD_LEVEL)).flatten(),
                    |z, frame| {
                        let out = z.as_mut().and_then(|z| z.squeeze(&frame));
                        (frame, out)
                    },
                )
                .collect()
        });
        for (frame, out) in done {
            let raw_len: u64 = frame.iter().map(|p| p.len() as u64).sum();
            match out {
                Some(out) => {
                    frames.push(Frame {
                        codec: Codec::Zstd,
                        raw_len,
                        stored_len: out.len() as u64,
                    });
                    parts.push(out.into());
                }
                None => {
                    // Consecutive raw frames are one: any part of it can be read alone.
                    match frames.last_mut() {
                        Some(f) if f.codec == Codec::Raw => {
                            f.raw_len += raw_len;
                            f.stored_len += raw_len;
                        }
                        _ => frames.push(Frame {
                            codec: Codec::Raw,
                            raw_len,
                            stored_len: raw_len,
                        }),
                    }
                    parts.extend(frame);
                }
            }
        }
        let index = PackIndex {
            entries: self.entries,
            frames: Frames::new(frames),
        };
        let index_bytes = index.encode();
        SealedPack {
            id: shoal_chunker::hash(&index_bytes),
            parts,
            index,
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

    /// Text-like blobs: lines of words and numbers, compressible about 3-5x like code.
    fn text(seed: u64, len: usize) -> Bytes {
        let words = [
            "fn", "let", "self", "return", "match", "impl", "struct", "pub", "use",
        ];
        let mut s = String::new();
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        while s.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(words[(x % words.len() as u64) as usize]);
            s.push_str(&format!(" {} ", x % 1000));
            if x % 7 == 0 {
                s.push('\n');
            }
        }
        s.truncate(len);
        Bytes::from(s)
    }

    fn random(seed: u64, len: usize) -> Bytes {
        let mut x = seed.wrapping_mul(0x2545F4914F6CDD1D) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    /// Every blob of `sealed`, read through spans of one to five blobs from its stored bytes.
    fn read_back(sealed: &SealedPack, blobs: &[Bytes]) {
        let idx = PackIndex::decode(&sealed.index_bytes).unwrap();
        assert_eq!(idx, sealed.index);
        let stored = Bytes::from(sealed.to_vec());
        assert_eq!(stored.len() as u64, idx.pack_len());
        for width in 1..=5usize {
            for group in idx.entries.chunks(width) {
                let (first, last) = (group[0], group[group.len() - 1]);
                let span = idx.frames.span(first.offset..last.offset + last.len as u64);
                assert!(span.raw.start <= first.offset);
                let data = stored.slice(span.stored.start as usize..span.stored.end as usize);
                // A frame at a time: contiguous, whole blobs in each, a compressed frame whole.
                let pieces: Vec<Piece> = idx
                    .frames
                    .pieces(&span, data.clone())
                    .unwrap()
                    .map(|p| p.unwrap())
                    .collect();
                let mut at = span.raw.start;
                assert!(pieces[0].edge && pieces[pieces.len() - 1].edge);
                for (i, p) in pieces.iter().enumerate() {
                    assert_eq!(p.edge, i == 0 || i + 1 == pieces.len());
                    assert_eq!(p.at, at);
                    at += p.bytes.len() as u64;
                    if p.compressed {
                        assert_eq!(idx.frames.compressed_at(p.at), Some(p.at));
                    }
                }
                assert_eq!(at, span.raw.end);
                for e in group {
                    let p = pieces.iter().rev().find(|p| p.at <= e.offset).unwrap();
                    assert!(e.offset + e.len as u64 <= p.at + p.bytes.len() as u64);
                }
                let raw = idx.frames.decode(&span, data).unwrap();
                assert_eq!(raw.len() as u64, span.raw.end - span.raw.start);
                assert_eq!(
                    raw,
                    pieces
                        .iter()
                        .flat_map(|p| p.bytes.to_vec())
                        .collect::<Vec<u8>>()
                );
                for e in group {
                    let at = (e.offset - span.raw.start) as usize;
                    let bytes = &raw[at..at + e.len as usize];
                    assert!(e.id.verify(bytes));
                    assert!(blobs.iter().any(|b| b.as_ref() == bytes));
                }
            }
        }
    }

    fn build(blobs: &[Bytes]) -> SealedPack {
        let mut b = PackBuilder::default();
        for x in blobs {
            b.push(shoal_chunker::hash(x), x.clone());
        }
        b.seal()
    }

    #[test]
    fn compressible_blobs_are_stored_in_zstd_frames_and_read_back_from_any_span() {
        let blobs: Vec<Bytes> = (0..500)
            .map(|i| text(i, 700 + (i as usize * 37) % 9000))
            .collect();
        let sealed = build(&blobs);
        let raw: u64 = blobs.iter().map(|b| b.len() as u64).sum();
        assert_eq!(sealed.index.raw_len(), raw);
        assert!(
            sealed.len() * 2 < raw,
            "text compresses: {} of {raw}",
            sealed.len()
        );
        assert_eq!(sealed.index_bytes[4], format::V2);
        let frames = sealed.index.frames.frames();
        assert!(frames.iter().all(|f| f.codec == Codec::Zstd));
        assert!(frames.len() >= 2);
        assert!(frames
            .iter()
            .all(|f| f.raw_len < (FRAME_TARGET + 10_000) as u64));
        read_back(&sealed, &blobs);
    }

    #[test]
    fn random_blobs_stay_raw_in_a_v1_pack_and_mixed_packs_read_back() {
        let blobs: Vec<Bytes> = (0..40).map(|i| random(i, 30_000)).collect();
        let sealed = build(&blobs);
        assert_eq!(
            sealed.index_bytes[4],
            format::V1,
            "nothing compressed: a v1 index"
        );
        assert_eq!(sealed.len(), sealed.index.raw_len());
        assert_eq!(sealed.to_vec(), blobs.concat());
        read_back(&sealed, &blobs);
        // Random, text, random: raw frames around a compressed one, each read alone.
        let mut mixed: Vec<Bytes> = (0..40).map(|i| random(100 + i, 40_000)).collect();
        mixed.extend((0..300).map(|i| text(i, 5_000)));
        mixed.extend((0..40).map(|i| random(200 + i, 40_000)));
        let sealed = build(&mixed);
        let codecs: Vec<Codec> = sealed
            .index
            .frames
            .frames()
            .iter()
            .map(|f| f.codec)
            .collect();
        assert_eq!(codecs.first(), Some(&Codec::Raw));
        assert_eq!(codecs.last(), Some(&Codec::Raw));
        assert!(codecs.contains(&Codec::Zstd));
        // A blob inside a raw frame is read alone, not with its frame.
        let e = sealed.index.entries[3];
        let span = sealed.index.frames.span(e.offset..e.offset + e.len as u64);
        assert_eq!(span.stored.end - span.stored.start, e.len as u64);
        read_back(&sealed, &mixed);
        // A plain builder never compresses.
        let mut p = PackBuilder::plain();
        for x in &mixed {
            p.push(shoal_chunker::hash(x), x.clone());
        }
        assert!(p.seal().index.frames.is_plain());
    }

    #[test]
    fn lying_frames_are_refused_and_decompression_is_bounded() {
        let blobs: Vec<Bytes> = (0..400).map(|i| text(i, 6_000)).collect();
        let sealed = build(&blobs);
        let frames = sealed.index.frames.frames().to_vec();
        assert!(frames.len() >= 2);
        let with = |f: &dyn Fn(&mut Vec<Frame>)| {
            let mut fr = frames.clone();
            f(&mut fr);
            let bytes = format::encode_v(
                Kind::PackIndex,
                format::V2,
                &IndexV2 {
                    entries: sealed.index.entries.clone(),
                    frames: fr,
                },
            );
            PackIndex::decode(&bytes)
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|f| f[0].raw_len += 1).is_err(), "cuts a blob");
        assert!(
            with(&|f| {
                f.pop();
            })
            .is_err(),
            "covers less than the blobs"
        );
        assert!(with(&|f| f[0].stored_len = 0).is_err());
        assert!(
            with(&|f| f[0].codec = Codec::Raw).is_err(),
            "raw of another size"
        );
        assert!(with(&|f| {
            let all: u64 = f.iter().map(|x| x.raw_len).sum();
            *f = vec![Frame {
                codec: Codec::Zstd,
                raw_len: all,
                stored_len: 1,
            }];
        })
        .is_ok());
        // An index that says a frame holds less than it does: the decompression stops at
        // the declared size and fails, it does not grow.
        let mut idx = sealed.index.clone();
        let mut fr = frames.clone();
        fr[0].raw_len -= 1;
        idx.frames = Frames::new(fr);
        let span = idx.frames.span(0..1);
        let stored = Bytes::from(sealed.to_vec());
        let data = stored.slice(span.stored.start as usize..span.stored.end as usize);
        assert!(idx.frames.decode(&span, data).is_err());
        // A bomb: 16 MiB of zeros in a frame that claims 1 KiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).unwrap();
        let f = Frames::new(vec![Frame {
            codec: Codec::Zstd,
            raw_len: 1024,
            stored_len: bomb.len() as u64,
        }]);
        let span = f.span(0..1024);
        assert!(f.decode(&span, bomb.into()).is_err());
        // Bytes of the wrong length, or not zstd at all.
        let span = sealed.index.frames.span(0..10);
        let short = stored.slice(0..(span.stored.end - 1) as usize);
        assert!(sealed.index.frames.decode(&span, short).is_err());
        let junk = Bytes::from(vec![7u8; span.stored.end as usize]);
        assert!(sealed.index.frames.decode(&span, junk).is_err());
    }

    #[test]
    fn byte_frequencies_tell_random_and_compressed_bytes_from_text() {
        let mut random = vec![0u8; 200_000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // Real text: this file's own source.
        let text = include_bytes!("pack.rs");
        let zipped = zstd::bulk::compress(text, 3).unwrap();
        assert!(zipped.len() > 4096);
        assert!(looks_incompressible(&random));
        assert!(looks_incompressible(&random[..3000]));
        assert!(
            looks_incompressible(&zipped),
            "compressed bytes look random"
        );
        assert!(!looks_incompressible(text));
        assert!(!looks_incompressible(&vec![0u8; 100_000]));
        assert!(
            !looks_incompressible(&random[..100]),
            "too few bytes to tell"
        );
    }
}
