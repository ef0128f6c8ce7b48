//! The local chunk store: blob bytes appended to segment files, which blobs each segment
//! holds in a record log beside it (the source of truth, see [`reclog`]), the index by blob
//! id in sorted runs on disk derived from the logs (what lookups search, see [`runs`]), an
//! optional capacity enforced by the [`ClockLfu`] policy, and pins, counters and the index's
//! checkpoint in sled.
//!
//! Crash safety comes from ordering and verification. A batch of blobs is appended to a
//! segment before its record is appended to the segment's log (and evictions after it), so
//! after a killed process every record points at complete bytes (the page cache outlives the
//! process). Segment data is not `fsync`ed per batch: after a power cut an entry
//! may point at bytes that never reached the disk, and since every read is verified, such an
//! entry is detected, dropped and the blob fetched again. Local reads are verified against the
//! blob's id (BLAKE3); reads for a peer, which verifies them against the id itself, are checked
//! against a CRC32 of the bytes kept in the index since the blob was stored (about a
//! quarter of the CPU), so a node still never sends bytes its disk has corrupted. Bytes whose index
//! entry is gone (evicted, or a batch whose index update was lost) are garbage, never served;
//! compaction copies a segment's live blobs forward, switches the index, and only then deletes
//! the old segment.
//!
//! With a capacity, the policy keeps live bytes at or under three quarters of it and
//! compaction keeps the segment files under it; only pinned blobs can push usage beyond.

pub mod policy;
mod reclog;
mod runs;
pub mod sorted;
pub mod tiers;
pub mod wholefiles;

use crate::policy::{ClockLfu, Policy};
use crate::runs::{Index, Run, DELTA_MAX};
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// sled's page cache (sled holds pins, counters, the checkpoint and the removals journaled
/// since it, not the records).
const SLED_CACHE: u64 = 16 << 20;

/// A flush checkpoints the index when its delta holds this many entries (fewer are replayed
/// from the records when the store is next opened, about a microsecond each, unless it is
/// dropped cleanly, which checkpoints whatever there is).
const FLUSH_CHECKPOINT: usize = 65_536;

/// Segments are rolled over at this size, or at a sixteenth of the capacity if smaller.
const SEGMENT_MAX: u64 = 256 << 20;

/// A local store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local store index {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("local store record log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local store {path} is in use by another shoal process (a pull, mount or node); wait for it or stop it")]
    Locked { path: PathBuf },
    #[error("blob {id} in local store segment {path} is corrupt (its bytes do not match its id); it was dropped and will be fetched again")]
    Corrupt { id: Hash, path: PathBuf },
    #[error("cannot pin {name}: blob {id} is not in the local store")]
    NotLocal { name: String, id: Hash },
}

/// How a stored blob may be treated under capacity pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retain {
    /// A cache fill: the policy may decline to keep it (it is still served to the reader).
    Cache,
    /// Wanted here (a pull): always stored, though evictable later unless pinned.
    Keep,
}

/// One pinned version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinInfo {
    pub name: String,
    pub blobs: u64,
    pub bytes: u64,
}

/// What `shoal cache` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheStats {
    pub path: String,
    pub capacity: Option<u64>,
    /// Bytes of segment files on disk (live blobs plus garbage awaiting compaction).
    pub disk_bytes: u64,
    pub live_bytes: u64,
    pub blobs: u64,
    pub pinned_bytes: u64,
    pub pins: Vec<PinInfo>,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub evictions: u64,
    /// Each tier, fastest first (memory, this store, further disk tiers).
    pub tiers: Vec<TierStats>,
    /// Whole-file copies kept for mounts (filled in by the node, not the store).
    #[serde(default)]
    pub whole_files: Option<crate::wholefiles::WholeFileStats>,
    /// `[cache] ttl` in seconds, if set (filled in by the node).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Versions cached here, with their last use (filled in by the node).
    #[serde(default)]
    pub versions: Vec<CachedVersion>,
}

/// A version cached on this machine (see `shoal_node::expiry`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedVersion {
    /// `NAME@VERSION`.
    pub name: String,
    pub root: String,
    pub last_used_unix: u64,
    /// When the TTL takes it unless it is used again (none without a TTL, or while pinned).
    pub expires_unix: Option<u64>,
    pub pinned: bool,
}

/// One tier of the local cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierStats {
    /// "memory" or "disk".
    pub kind: String,
    /// The directory of a disk tier.
    pub path: Option<String>,
    pub capacity: Option<u64>,
    /// Bytes of blobs held.
    pub used_bytes: u64,
    pub blobs: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub evictions: u64,
}

pub(crate) fn rate(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

/// Where blobs live on this machine. Implementations must be safe to share between threads.
pub trait ChunkStore: Send + Sync {
    /// Whether the blob is stored.
    fn contains(&self, id: &Hash) -> Result<bool, StoreError>;
    /// The blob's bytes, verified against `id`; `None` when absent.
    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Reads a blob to send to a peer (which verifies it against its id): checked against the
    /// checksum kept since it was stored rather than re-hashed, and without effect on what a
    /// faster tier keeps for local readers.
    fn get_for_peer(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores verified blobs. They survive the process being killed once this returns, and a
    /// power cut once [`Self::flush`] has returned.
    fn put_batch(&self, blobs: &[(Hash, &[u8])], retain: Retain) -> Result<(), StoreError>;
    /// As [`ChunkStore::put_batch`], each blob with the zstd frame of it that came with it,
    /// if one did (a peer sends a blob as its store keeps it): a store that compresses keeps
    /// that frame as it is rather than compressing the blob again. The caller has checked the
    /// raw bytes against the id and that the frame decompresses to them.
    fn put_batch_packed(&self, blobs: &[Packed<'_>], retain: Retain) -> Result<(), StoreError>;
    /// As [`ChunkStore::get_for_peer`], the bytes as the store keeps them: `(bytes, true)`
    /// when they are a zstd frame of the blob (checked at rest, not decompressed).
    fn get_stored_for_peer(&self, id: &Hash) -> Result<Option<(Vec<u8>, bool)>, StoreError>;
    /// Makes every index update so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Usage, pins and hit rates.
    fn stats(&self) -> Result<CacheStats, StoreError>;
    /// Keeps these blobs (all must be stored) from eviction under `name`; idempotent.
    fn pin(&self, name: &str, blobs: &[(Hash, u32)]) -> Result<(), StoreError>;
    /// Releases a pin; false if there was none.
    fn unpin(&self, name: &str) -> Result<bool, StoreError>;
    /// Drops every blob no pin needs and compacts; returns the disk bytes freed.
    fn gc(&self) -> Result<u64, StoreError>;
    /// Drops those of `ids` that are stored and no pin needs, and compacts what that leaves
    /// as garbage; returns the blobs dropped and the disk bytes freed (the cache's TTL).
    fn drop_unpinned(&self, ids: &[Hash]) -> Result<(u64, u64), StoreError>;
    /// Where the blob's bytes lie in a file of this store, for a reader that reads them from
    /// the page cache itself and verifies them against `id` (the Python file sessions): the
    /// file, open read-only, its name, the offset and the length. Segment files are append-only
    /// and replaced whole by compaction, so the bytes at a location never change while the
    /// file is open. Counts as a read for the eviction policy. None when the blob is absent,
    /// or in no file (the memory tier).
    fn locate(&self, id: &Hash) -> Result<Option<Located>, StoreError> {
        let _ = id;
        Ok(None)
    }
    /// Counts blobs that left this store for good since it was opened (evicted from its last
    /// tier, collected, dropped as corrupt): when it changes, a version held whole may no
    /// longer be.
    fn losses(&self) -> u64;
}

/// Where a blob's bytes lie in a file of the store (see [`ChunkStore::locate`]).
#[derive(Debug, Clone)]
pub struct Located {
    pub file: Arc<File>,
    /// The file's path (names it across calls: the same path is the same file while open).
    pub path: PathBuf,
    pub offset: u64,
    pub len: u32,
}

/// Where a live blob is in its segment, the CRC32 of its bytes (none in entries written
/// before checksums were kept: reads for peers verify those against the id), and which index
/// record lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Offsets in a segment fit 32 bits: segments roll at [`SEGMENT_MAX`] (256 MiB) and a
    /// blob is at most 64 MiB. (In memory only: records keep 64 bits. The index holds one
    /// entry per blob: 56 bytes with these, 72 with 64-bit offsets.)
    pub off: u32,
    pub len: u32,
    pub crc: Option<u32>,
    /// The record's key within the segment (the offset of its first blob).
    pub rec: u32,
}

/// Flag in a [`Loc`]'s length (as kept in records and runs): the bytes stored are one zstd
/// frame of the blob (see [`squeeze`]). Earlier releases never set it.
pub(crate) const ZSTD: u32 = 1 << 29;

/// Largest blob a store decompresses (what a peer may send as one blob).
const MAX_RAW: u64 = 64 << 20;

impl Loc {
    fn off(&self) -> u64 {
        self.off as u64
    }

    /// Bytes it takes in its segment.
    fn stored(&self) -> u32 {
        self.len & (ZSTD - 1)
    }

    fn zstd(&self) -> bool {
        self.len & ZSTD != 0
    }
}

/// A blob as it goes into a segment: its id, the bytes stored, and whether they are a zstd
/// frame of it.
type Stored<'a> = (Hash, &'a [u8], bool);

/// A blob to store: its id, its bytes, and the zstd frame of it it came with, if any (see
/// [`ChunkStore::put_batch_packed`]).
pub type Packed<'a> = (Hash, &'a [u8], Option<&'a [u8]>);

/// `blob` compressed for the store, if that saves at least an eighth of it: zstd level 1.
/// Random and already compressed chunks are told by their byte frequencies
/// (`looks_incompressible`, about a microsecond a chunk: a zstd probe cost a 1 GiB pull of
/// random data 10%) and stored as they are; the rest go through the pack sealer's probe
/// (`Squeezer`). Every warm read of a compressed blob
/// decompresses it (over 1 GB/s a core), hence the higher bar than for packs.
fn squeeze(blob: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static SQUEEZER: std::cell::RefCell<Option<shoal_registry::pack::Squeezer>> =
            std::cell::RefCell::new(shoal_registry::pack::Squeezer::new(1));
    }
    if blob.len() < 256 || shoal_registry::pack::looks_incompressible(blob) {
        return None;
    }
    SQUEEZER
        .with(|z| z.borrow_mut().as_mut().and_then(|z| z.squeeze(&[blob])))
        .filter(|z| z.len() <= blob.len() - blob.len() / 8)
}

/// The blob a zstd frame stored holds: at most [`MAX_RAW`] bytes, exactly the size its
/// header declares (what the store wrote), or None.
pub fn unsqueeze(stored: &[u8]) -> Option<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(stored).ok()??;
    if size > MAX_RAW {
        return None;
    }
    let mut out = vec![0u8; size as usize];
    let n = zstd::bulk::decompress_to_buffer(stored, &mut out).ok()?;
    (n == out.len()).then_some(out)
}

/// A blob's bytes from what its entry `loc` stored, checked as `check` says (a compressed
/// blob's checksum is of its stored bytes); None if they fail.
fn decode(id: &Hash, loc: &Loc, stored: Vec<u8>, check: Check) -> Option<Vec<u8>> {
    let at_rest = match (check, loc.crc) {
        (Check::AtRest, Some(crc)) => {
            if crc32fast::hash(&stored) != crc {
                return None;
            }
            true
        }
        _ => false,
    };
    let raw = if loc.zstd() {
        unsqueeze(&stored)?
    } else {
        stored
    };
    (at_rest || id.verify(&raw)).then_some(raw)
}

/// A segment file: its size, and how much of it live blobs hold (which blobs those are is
/// in [`State::index`]).
#[derive(Default)]
struct Seg {
    size: u64,
    live_bytes: u64,
    live_blobs: u64,
}

impl Seg {
    fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    fn add(&mut self, loc: &Loc) {
        self.live_bytes += loc.stored() as u64;
        self.live_blobs += 1;
    }

    fn sub(&mut self, loc: &Loc) {
        self.live_bytes -= loc.stored() as u64;
        self.live_blobs -= 1;
    }
}

/// How a read is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Against the blob's id (BLAKE3): what a local reader gets.
    Id,
    /// Against the checksum kept since the blob was stored (the id where there is none): what
    /// is sent to a peer, which verifies against the id itself.
    AtRest,
}

struct State {
    active: u32,
    /// Where each live blob is: runs on disk and recent changes in memory (see [`runs`]),
    /// derived from the segments' record logs. An entry naming a segment that is gone is not
    /// live.
    index: Index,
    /// What the runs and the records agreed on when the index was last checkpointed.
    ckpt: Ckpt,
    file: File,
    /// The active segment's record log, and its length up to its last whole frame.
    log: File,
    log_len: u64,
    /// The eviction policy, with a capacity only: without one nothing is evicted, and
    /// keeping its state (about 100 bytes a blob) would only cost memory.
    policy: Option<ClockLfu<Hash>>,
    segs: BTreeMap<u32, Seg>,
    hits: u64,
    misses: u64,
    evictions: u64,
    /// Blobs dropped (collected or corrupt) since the store was opened.
    dropped: u64,
    /// How the index was brought up to date when the store opened: entries replayed after
    /// the checkpoint, or (`None`) rebuilt from every log.
    replayed: Option<u64>,
}

impl State {
    /// Where a live blob is.
    fn live(&self, id: &Hash) -> Option<(u32, Loc)> {
        self.index
            .get(id)
            .filter(|(seg, _)| self.segs.contains_key(seg))
    }

    /// Records `id` as stored at `loc` in `seg` (moved there, if it was live elsewhere).
    fn place(&mut self, id: Hash, seg: u32, loc: Loc) {
        if let Some((was, old)) = self.live(&id) {
            if let Some(s) = self.segs.get_mut(&was) {
                s.sub(&old);
            }
        }
        if let Some(s) = self.segs.get_mut(&seg) {
            s.add(&loc);
        }
        self.index.set(id, Some((seg, loc)));
    }

    fn live_segs(&self) -> BTreeSet<u32> {
        self.segs.keys().copied().collect()
    }
}

/// A checkpoint of the index (kept in sled's `meta` tree under [`MANIFEST`]): its runs, and
/// what they reflect: every record before the watermark (a segment and a length of its log:
/// records appended since are after it) less the removals journaled under generations before `gen`, and
/// the segments' live counts then. Opening a store loads the runs and replays what came
/// after: the removals journaled under `gen`, then the records from the watermark on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ckpt {
    gen: u64,
    /// Segment, and the length of its log then (where the first record not reflected starts).
    wm: (u32, u64),
    /// The highest segment number ever used (numbers are never reused: the runs may still
    /// name a deleted segment).
    max_seg: u32,
    runs: Vec<(u64, usize)>,
    /// Segment, live bytes, live blobs.
    counts: Vec<(u32, u64, u64)>,
}

const MANIFEST: &str = "index-runs";
/// (1: the watermark's second field was an offset in the segment, before record logs; such a
/// checkpoint is not read, and the index is rebuilt once.)
const CKPT_VERSION: u8 = 2;

impl Ckpt {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + 16 * self.runs.len() + 20 * self.counts.len());
        v.push(CKPT_VERSION);
        v.extend_from_slice(&self.gen.to_le_bytes());
        v.extend_from_slice(&self.wm.0.to_le_bytes());
        v.extend_from_slice(&self.wm.1.to_le_bytes());
        v.extend_from_slice(&self.max_seg.to_le_bytes());
        v.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for (no, count) in &self.runs {
            v.extend_from_slice(&no.to_le_bytes());
            v.extend_from_slice(&(*count as u64).to_le_bytes());
        }
        v.extend_from_slice(&(self.counts.len() as u32).to_le_bytes());
        for (seg, bytes, blobs) in &self.counts {
            v.extend_from_slice(&seg.to_le_bytes());
            v.extend_from_slice(&bytes.to_le_bytes());
            v.extend_from_slice(&blobs.to_le_bytes());
        }
        v
    }

    fn decode(v: &[u8]) -> Option<Ckpt> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let b = v.get(at..at.checked_add(n)?)?;
            at += n;
            Some(b)
        };
        let u32_ = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let u64_ = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        if take(1)? != [CKPT_VERSION] {
            return None;
        }
        let gen = u64_(take(8)?);
        let wm = (u32_(take(4)?), u64_(take(8)?));
        let max_seg = u32_(take(4)?);
        let nruns = u32_(take(4)?) as usize;
        let mut runs = Vec::with_capacity(nruns.min(1024));
        for _ in 0..nruns {
            runs.push((u64_(take(8)?), usize::try_from(u64_(take(8)?)).ok()?));
        }
        let nsegs = u32_(take(4)?) as usize;
        let mut counts = Vec::with_capacity(nsegs.min(1 << 16));
        for _ in 0..nsegs {
            counts.push((u32_(take(4)?), u64_(take(8)?), u64_(take(8)?)));
        }
        take(1).is_none().then_some(Ckpt {
            gen,
            wm,
            max_seg,
            runs,
            counts,
        })
    }
}

/// Journal keys (sled tree "journal"): the generation, the blob. A removal is journaled after
/// its frame reaches the segment's log; the journal of a generation is what the next open
/// replays of removals made since the checkpoint.
fn journal_key(gen: u64, id: &Hash) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&gen.to_be_bytes());
    k[8..].copy_from_slice(id.as_bytes());
    k
}

/// [`ChunkStore`] over append-only segment files, their record logs, index runs and sled.
pub struct SegmentStore {
    dir: PathBuf,
    db: sled::Db,
    /// Removals since the checkpoint (see [`journal_key`]).
    journal: sled::Tree,
    pins: sled::Tree,
    pinned: sled::Tree,
    meta: sled::Tree,
    capacity: Option<u64>,
    seg_max: u64,
    /// Store blobs that compress compressed ([`squeeze`]).
    compress: bool,
    state: Mutex<State>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    /// Set by tests to drop the store as a killed process would leave it.
    #[cfg(test)]
    crashed: std::sync::atomic::AtomicBool,
}

fn seg_name(n: u32) -> String {
    format!("{n:08}.seg")
}

/// Stores before record logs kept one sled record per batch of blobs appended together (tree
/// "records"), keyed by segment and the batch's offset in it (12 bytes, big-endian), listing
/// each blob's id, offset, length and CRC32; [`migrate`] moves them into logs. (One record per
/// batch rather than one entry per blob saved the receiver of a 1 GiB pull 0.1-0.15 CPU s,
/// `shoal-bench swarm-lo`, docs/swarm.md: the logs keep that.)
#[cfg(test)]
fn record_key(seg: u32, rec: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&seg.to_be_bytes());
    k[4..].copy_from_slice(&rec.to_be_bytes());
    k
}

fn parse_record_key(k: &[u8]) -> Option<(u32, u64)> {
    Some((
        u32::from_be_bytes(k.get(..4)?.try_into().ok()?),
        u64::from_be_bytes(k.get(4..12)?.try_into().ok()?),
    ))
    .filter(|_| k.len() == 12)
}

/// A sled record of blobs that all have CRCs or all have none.
#[cfg(test)]
fn encode_record<'a>(entries: impl Iterator<Item = (&'a Hash, &'a Loc)>) -> Vec<u8> {
    reclog::record_body(&[], entries)
}

fn decode_record(v: &[u8], rec: u64) -> Option<Vec<(Hash, Loc)>> {
    let (&kind, body) = v.split_first()?;
    reclog::record_entries(kind, body, rec)
}

/// A per-blob index entry as stores kept them before records (tree "blobs"): segment, offset,
/// length and CRC32, big-endian (20 bytes; 16 from before checksums were kept). Migrated to
/// records when such a store is opened.
#[cfg(test)]
fn encode_loc(seg: u32, loc: Loc) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..4].copy_from_slice(&seg.to_be_bytes());
    v[4..12].copy_from_slice(&loc.off().to_be_bytes());
    v[12..16].copy_from_slice(&loc.len.to_be_bytes());
    v[16..].copy_from_slice(&loc.crc.unwrap_or(0).to_be_bytes());
    v
}

fn decode_loc(v: &[u8]) -> Option<(u32, Loc)> {
    if v.len() != 16 && v.len() != 20 {
        return None;
    }
    let crc = match v.get(16..20) {
        Some(c) => Some(u32::from_be_bytes(c.try_into().ok()?)),
        None => None,
    };
    Some((
        u32::from_be_bytes(v[..4].try_into().ok()?),
        Loc {
            off: u32::try_from(u64::from_be_bytes(v[4..12].try_into().ok()?)).ok()?,
            len: u32::from_be_bytes(v[12..16].try_into().ok()?),
            crc,
            rec: 0,
        },
    ))
}

/// Reads `len` bytes at `off` into a new buffer (not zeroed first: the read fills it).
fn read_at(f: &File, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len as usize);
    while buf.len() < len as usize {
        let at = off + buf.len() as u64;
        // Reads into the spare capacity (which may exceed `len`: the excess is cut below).
        if rustix::io::pread(f, rustix::buffer::spare_capacity(&mut buf), at)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    buf.truncate(len as usize);
    Ok(buf)
}

fn counter(meta: &sled::Tree, key: &str) -> u64 {
    meta.get(key)
        .ok()
        .flatten()
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Removes sled's unfinished snapshot files (`snap.*.generating`) under `db`; whether there
/// were any.
fn remove_unfinished_snapshots(db: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(db) else {
        return false;
    };
    let mut removed = false;
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.")
            && name.ends_with(".generating")
            && std::fs::remove_file(e.path()).is_ok()
        {
            tracing::warn!(
                "removed {}: a snapshot of the store's database left unfinished by a killed process",
                e.path().display()
            );
            removed = true;
        }
    }
    removed
}

impl SegmentStore {
    /// Opens (creating if needed) the store under `dir`, with an optional capacity in bytes.
    pub fn open(dir: &Path, capacity: Option<u64>) -> Result<SegmentStore, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let segs_dir = dir.join("segments");
        // Cached data is readable by this user only: the store directory (a disk tier may
        // live outside the state directory) is 0700 and every segment 0600.
        private_dir(dir).map_err(io)?;
        private_dir(&segs_dir).map_err(io)?;
        let db_path = dir.join("index");
        let open = || {
            sled::Config::new()
                .path(&db_path)
                .mode(sled::Mode::HighThroughput)
                // (sled's page cache is 1 GiB by default.)
                .cache_capacity(SLED_CACHE)
                .open()
        };
        let db = match open() {
            // sled 0.34 reads the newest `snap.*` file, including one it was still writing
            // (`snap.<lsn>.generating`, renamed into place only once whole and synced) when
            // a process was killed: the database then never opens again (spacejam/sled#1527).
            // Such a file is never a finished snapshot: without it, sled reads the previous
            // one and replays its log from there.
            Err(sled::Error::Corruption { .. }) if remove_unfinished_snapshots(&db_path) => open(),
            r => r,
        }
        .map_err(|e| match e {
            sled::Error::Io(ref ioe)
                if ioe.kind() == std::io::ErrorKind::WouldBlock
                    || ioe.to_string().contains("lock") =>
            {
                StoreError::Locked {
                    path: dir.to_path_buf(),
                }
            }
            source => StoreError::Db {
                path: db_path.clone(),
                source,
            },
        })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Db {
                path: db_path.clone(),
                source,
            })
        };
        let (journal, pins, pinned, meta) = (
            tree("journal")?,
            tree("pins")?,
            tree("pinned")?,
            tree("meta")?,
        );
        migrate(&db, &segs_dir, &meta).map_err(|source| StoreError::Db {
            path: db_path.clone(),
            source,
        })?;

        let mut segs: BTreeMap<u32, Seg> = BTreeMap::new();
        let mut logs = Vec::new();
        for e in std::fs::read_dir(&segs_dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name();
            let name = name.to_str().unwrap_or_default();
            if let Some(n) = name
                .strip_suffix(".rec")
                .and_then(|s| s.parse::<u32>().ok())
            {
                // (Blob ids say what this user cached: private like the segments.)
                if e.metadata().map_err(io)?.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                logs.push(n);
            }
            let n = name
                .strip_suffix(".seg")
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(n) = n {
                let meta = e.metadata().map_err(io)?;
                if meta.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                let size = meta.len();
                segs.insert(
                    n,
                    Seg {
                        size,
                        ..Seg::default()
                    },
                );
            }
        }
        // The log of a segment compaction deleted (a process killed between the two).
        for n in logs.into_iter().filter(|n| !segs.contains_key(n)) {
            let _ = std::fs::remove_file(reclog::log_path(&segs_dir.join(seg_name(n))));
        }
        let runs_dir = dir.join("runs");
        private_dir(&runs_dir).map_err(io)?;
        let db_err = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        // The runs of the last checkpoint, if its record is readable and every run opens.
        let loaded = meta
            .get(MANIFEST)
            .map_err(db_err)?
            .and_then(|v| Ckpt::decode(&v))
            .and_then(|ck| {
                let runs = ck
                    .runs
                    .iter()
                    .map(|&(no, count)| Run::open(&runs_dir, no, count))
                    .collect::<Option<Vec<Run>>>()?;
                Some((ck, runs))
            });
        // Segment numbers are never reused (see `Ckpt::max_seg`).
        let max_seg = loaded.as_ref().map(|(ck, _)| ck.max_seg).unwrap_or(0);
        let active = match segs.keys().next_back().copied() {
            Some(n) if n >= max_seg => n,
            _ => max_seg + 1,
        };
        let seg_max = capacity
            .map(|c| (c / 16).clamp(64 << 10, SEGMENT_MAX))
            .unwrap_or(SEGMENT_MAX);
        let path = segs_dir.join(seg_name(active));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Io { path, source })?;
        segs.entry(active).or_insert(Seg {
            size: file.metadata().map(|m| m.len()).unwrap_or(0),
            ..Seg::default()
        });
        let log_path = reclog::log_path(&segs_dir.join(seg_name(active)));
        // What the checkpoint's watermark covers was synced whole: only what follows it is
        // checked for a torn tail.
        let whole = loaded
            .as_ref()
            .map(|(ck, _)| ck.wm)
            .filter(|(seg, _)| *seg == active)
            .map_or(0, |(_, len)| len);
        let (log, log_len) =
            reclog::open_append(&log_path, whole).map_err(|source| StoreError::Log {
                path: log_path,
                source,
            })?;
        let (ckpt, runs) = loaded.unwrap_or_default();
        let rebuild = ckpt == Ckpt::default();
        let state = State {
            active,
            index: Index::new(runs_dir, runs),
            ckpt,
            file,
            log,
            log_len,
            policy: None,
            segs,
            hits: counter(&meta, "hits"),
            misses: counter(&meta, "misses"),
            evictions: counter(&meta, "evictions"),
            dropped: 0,
            replayed: None,
        };
        let store = SegmentStore {
            dir: dir.to_path_buf(),
            db,
            journal,
            pins,
            pinned,
            meta,
            capacity,
            seg_max,
            compress: false,
            state: Mutex::new(state),
            readers: RwLock::default(),
            #[cfg(test)]
            crashed: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let mut st = store.lock();
            if rebuild {
                store.rebuild(&mut st)?;
            } else {
                store.replay(&mut st)?;
            }
            // Live bytes stay under 3/4 of the capacity; the rest absorbs garbage between
            // compactions.
            if let Some(cap) = capacity {
                let victims = store.load_policy(&mut st, ClockLfu::new(cap / 4 * 3))?;
                store.unindex(&mut st, &victims)?;
                store.compact_to_capacity(&mut st)?;
            }
            store.maintain(&mut st, false)?;
        }
        Ok(store)
    }

    /// Stores blobs that compress compressed from now on (blobs stored before stay as they
    /// are; a store holds both kinds).
    pub fn with_compression(mut self, on: bool) -> SegmentStore {
        self.compress = on;
        self
    }

    /// Builds the index anew from every segment's log (a store without a checkpoint, from
    /// before runs, or whose runs are damaged or missing), then checkpoints it.
    fn rebuild(&self, st: &mut State) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        // Nothing may name the runs written below until they are complete: the old
        // checkpoint goes first.
        self.meta.remove(MANIFEST).map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        st.index.cancel_merge();
        st.index = Index::new(self.dir.join("runs"), Vec::new());
        st.index.remove_strays();
        for s in st.segs.values_mut() {
            s.live_bytes = 0;
            s.live_blobs = 0;
        }
        let mut n = 0u64;
        for seg in st.live_segs() {
            let mut failed = None;
            self.scan_log(seg, 0, |_, entries| {
                if failed.is_some() {
                    return;
                }
                for (id, loc) in entries {
                    n += 1;
                    st.place(id, seg, loc);
                }
                if st.index.delta_len() >= DELTA_MAX {
                    let live = st.live_segs();
                    match st.index.write_delta(&live) {
                        Ok(retired) => self.remove_runs(&retired),
                        Err(e) => failed = Some(e),
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(self.runs_err()(e));
            }
        }
        // Removals journaled are reflected in the logs.
        self.journal.clear().map_err(|e| self.db_err(e))?;
        self.checkpoint(st)?;
        tracing::info!(
            blobs = n,
            secs = started.elapsed().as_secs_f64(),
            "rebuilt the store's index from its record logs"
        );
        Ok(())
    }

    /// Brings the checkpointed runs up to the logs: the removals journaled since, then the
    /// records appended since.
    fn replay(&self, st: &mut State) -> Result<(), StoreError> {
        for &(seg, bytes, blobs) in &st.ckpt.counts {
            if let Some(s) = st.segs.get_mut(&seg) {
                s.live_bytes = bytes;
                s.live_blobs = blobs;
            }
        }
        // Journals of older generations (left by a process killed after a checkpoint).
        let mut n = 0u64;
        let mut old = sled::Batch::default();
        for kv in self.journal.range(..st.ckpt.gen.to_be_bytes().to_vec()) {
            old.remove(kv.map_err(|e| self.db_err(e))?.0);
        }
        self.journal.apply_batch(old).map_err(|e| self.db_err(e))?;
        for kv in self.journal.scan_prefix(st.ckpt.gen.to_be_bytes()) {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            let Ok(id) = <[u8; 32]>::try_from(&k[8..]) else {
                continue;
            };
            n += 1;
            forget_live(st, &Hash(id));
        }
        let (wseg, woff) = st.ckpt.wm;
        for seg in st.live_segs().into_iter().filter(|s| *s >= wseg) {
            let from = if seg == wseg { woff } else { 0 };
            self.scan_log(seg, from, |_, entries| {
                for (id, loc) in entries {
                    n += 1;
                    if st
                        .live(&id)
                        .is_some_and(|(s, l)| (s, l.off) == (seg, loc.off))
                    {
                        continue;
                    }
                    st.place(id, seg, loc);
                }
            })?;
        }
        st.replayed = Some(n);
        tracing::debug!(
            entries = n,
            "replayed the store's record logs since its checkpoint"
        );
        Ok(())
    }

    /// [`reclog::scan`] of segment `seg`'s log.
    fn scan_log(
        &self,
        seg: u32,
        from: u64,
        f: impl FnMut(u64, Vec<(Hash, Loc)>),
    ) -> Result<(), StoreError> {
        let path = reclog::log_path(&self.seg_path(seg));
        reclog::scan(&path, from, f).map_err(|source| StoreError::Log { path, source })
    }

    /// Fills `policy` with every live blob (and the pins); returns the blobs it evicts at
    /// once (a capacity lowered since the last run).
    fn load_policy(
        &self,
        st: &mut State,
        mut policy: ClockLfu<Hash>,
    ) -> Result<Vec<Hash>, StoreError> {
        for kv in self.pinned.iter() {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            if let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) {
                policy.set_pinned(Hash(id), true);
            }
        }
        let mut victims = Vec::new();
        self.each_live(st, |id, _, loc| {
            victims.extend(policy.insert_forced(id, loc.stored() as u64));
        })?;
        st.policy = Some(policy);
        Ok(victims)
    }

    /// Calls `f` with every live blob (from the logs, each checked against the index),
    /// segment by segment.
    fn each_live(&self, st: &State, mut f: impl FnMut(Hash, u32, Loc)) -> Result<(), StoreError> {
        for seg in st.live_segs() {
            self.scan_log(seg, 0, |_, entries| {
                for (id, loc) in entries {
                    if st
                        .live(&id)
                        .is_some_and(|(s, l)| (s, l.off) == (seg, loc.off))
                    {
                        f(id, seg, loc);
                    }
                }
            })?;
        }
        Ok(())
    }

    fn runs_err(&self) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: self.dir.join("runs"),
            source,
        }
    }

    fn remove_runs(&self, nos: &[u64]) {
        for no in nos {
            let _ = std::fs::remove_file(runs::run_path(&self.dir.join("runs"), *no));
            let _ = std::fs::remove_file(runs::filter_path(&self.dir.join("runs"), *no));
        }
    }

    /// Writes the index's delta as a run and records the checkpoint (see [`Ckpt`]).
    fn checkpoint(&self, st: &mut State) -> Result<(), StoreError> {
        let live = st.live_segs();
        let mut retired = st.index.write_delta(&live).map_err(self.runs_err())?;
        retired.extend(
            st.index
                .finish_merge(false, &live)
                .map_err(self.runs_err())?,
        );
        // The records the runs reflect reach the disk before the checkpoint says so.
        st.log.sync_data().map_err(self.log_err(st.active))?;
        let old_gen = st.ckpt.gen;
        st.ckpt = Ckpt {
            gen: old_gen + 1,
            wm: (st.active, st.log_len),
            max_seg: st.ckpt.max_seg.max(st.active),
            runs: st.index.runs(),
            counts: st
                .segs
                .iter()
                .map(|(n, s)| (*n, s.live_bytes, s.live_blobs))
                .collect(),
        };
        self.meta
            .insert(MANIFEST, st.ckpt.encode())
            .map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        // The journal of the generation just closed, now reflected in the runs.
        let mut done = sled::Batch::default();
        for kv in self.journal.scan_prefix(old_gen.to_be_bytes()) {
            done.remove(kv.map_err(|e| self.db_err(e))?.0);
        }
        self.journal.apply_batch(done).map_err(|e| self.db_err(e))?;
        self.remove_runs(&retired);
        Ok(())
    }

    /// Checkpoints when the delta is full; takes in a finished merge (waiting for it with
    /// `wait`) and starts one that is due.
    fn maintain(&self, st: &mut State, wait: bool) -> Result<(), StoreError> {
        if st.index.delta_len() >= DELTA_MAX {
            return self.checkpoint(st);
        }
        if !st.index.merge_pending(wait) {
            return Ok(());
        }
        let live = st.live_segs();
        let retired = st
            .index
            .finish_merge(wait, &live)
            .map_err(self.runs_err())?;
        if !retired.is_empty() {
            // The checkpoint names the merged run instead of its inputs from now on.
            st.ckpt.runs = st.index.runs();
            self.meta
                .insert(MANIFEST, st.ckpt.encode())
                .map_err(|e| self.db_err(e))?;
            self.db.flush().map_err(|e| self.db_err(e))?;
            self.remove_runs(&retired);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("store state poisoned")
    }

    fn seg_path(&self, n: u32) -> PathBuf {
        self.dir.join("segments").join(seg_name(n))
    }

    fn reader(&self, n: u32) -> Result<Arc<File>, std::io::Error> {
        if let Some(f) = self.readers.read().expect("reader map poisoned").get(&n) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.seg_path(n))?);
        self.readers
            .write()
            .expect("reader map poisoned")
            .insert(n, f.clone());
        Ok(f)
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db {
            path: self.dir.join("index"),
            source,
        }
    }

    fn log_err(&self, seg: u32) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Log {
            path: reclog::log_path(&self.seg_path(seg)),
            source,
        }
    }

    fn io_err(&self, seg: u32) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: self.seg_path(seg),
            source,
        }
    }

    /// Drops a blob's index entry (its bytes become garbage).
    fn drop_entry(&self, st: &mut State, id: &Hash) -> Result<(), StoreError> {
        self.unindex(st, &[*id])?;
        if let Some(p) = &mut st.policy {
            p.remove(id);
        }
        st.dropped += 1;
        Ok(())
    }

    /// Where a live blob is, counted as an access (for the eviction policy) and a hit or miss.
    fn lookup(&self, id: &Hash) -> Option<(u32, Loc)> {
        let mut st = self.lock();
        let found = st.live(id);
        if let Some(p) = &mut st.policy {
            p.access(id);
        }
        match found {
            Some(_) => st.hits += 1,
            None => st.misses += 1,
        }
        found
    }

    /// The bytes `id`'s entry stored at `loc` in `seg`: None if the segment is gone (compacted
    /// since the lookup: look again); bytes cut short are corrupt (the entry is dropped).
    fn read_entry(&self, id: &Hash, seg: u32, loc: &Loc) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .reader(seg)
            .and_then(|f| read_at(&f, loc.off(), loc.stored()))
        {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                match self.corrupt(id, seg)? {
                    Some(e) => Err(e),
                    None => Ok(None),
                }
            }
            Err(e) => Err(self.io_err(seg)(e)),
        }
    }

    /// Drops `id`'s entry in `seg` as corrupt and returns the error to report, unless a
    /// compaction moved the blob since the lookup (None: look again).
    fn corrupt(&self, id: &Hash, seg: u32) -> Result<Option<StoreError>, StoreError> {
        if self.lock().live(id).is_some_and(|(now, _)| now != seg) {
            return Ok(None);
        }
        self.drop_entry(&mut self.lock(), id)?;
        Ok(Some(StoreError::Corrupt {
            id: *id,
            path: self.seg_path(seg),
        }))
    }

    /// Reads a blob, checked as `check` says; a blob that fails the check is dropped (and
    /// reported corrupt).
    fn read(&self, id: &Hash, check: Check) -> Result<Option<Vec<u8>>, StoreError> {
        // Twice at most: a compaction may move the blob between the lookup and the read.
        for _ in 0..2 {
            let Some((seg, loc)) = self.lookup(id) else {
                return Ok(None);
            };
            let Some(stored) = self.read_entry(id, seg, &loc)? else {
                continue;
            };
            if let Some(buf) = decode(id, &loc, stored, check) {
                return Ok(Some(buf));
            }
            if let Some(e) = self.corrupt(id, seg)? {
                return Err(e);
            }
        }
        Ok(None)
    }

    /// Reads a blob for a peer as it is stored (see [`ChunkStore::get_stored_for_peer`]):
    /// checked against the checksum kept since it was stored; an entry without one (written
    /// before checksums were kept, never compressed) is checked against the id.
    fn read_stored(&self, id: &Hash) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        for _ in 0..2 {
            let Some((seg, loc)) = self.lookup(id) else {
                return Ok(None);
            };
            let Some(crc) = loc.crc else {
                return Ok(self.read(id, Check::AtRest)?.map(|b| (b, false)));
            };
            let Some(buf) = self.read_entry(id, seg, &loc)? else {
                continue;
            };
            if crc32fast::hash(&buf) == crc {
                return Ok(Some((buf, loc.zstd())));
            }
            if let Some(e) = self.corrupt(id, seg)? {
                return Err(e);
            }
        }
        Ok(None)
    }

    /// Appends blobs to the active segment (rolling it when full), each write's blobs then as
    /// one record to the segment's log, and places them in the index.
    fn append(&self, st: &mut State, blobs: &[Stored<'_>]) -> Result<(), StoreError> {
        let mut out: Vec<(Hash, u32, Loc)> = Vec::with_capacity(blobs.len());
        // Blobs go to the file as they are (vectored writes), without a staging copy.
        let mut pending: Vec<&[u8]> = Vec::new();
        let mut pending_len = 0u64;
        // Where in `out` the pending write's blobs start.
        let mut first = 0;
        for &(id, bytes, zstd) in blobs {
            let size = st.segs[&st.active].size + pending_len;
            if size > 0 && size + bytes.len() as u64 > self.seg_max {
                self.write(st, &mut pending, &mut pending_len, &out[first..])?;
                first = out.len();
                self.roll(st)?;
            }
            // Segments roll well before 4 GiB (see `Loc`).
            let off = u32::try_from(st.segs[&st.active].size + pending_len).map_err(|_| {
                self.io_err(st.active)(std::io::Error::other("segment beyond 4 GiB"))
            })?;
            let rec = out.get(first).map(|(_, _, l)| l.rec).unwrap_or(off);
            let loc = Loc {
                off,
                len: bytes.len() as u32 | if zstd { ZSTD } else { 0 },
                crc: Some(crc32fast::hash(bytes)),
                rec,
            };
            out.push((id, st.active, loc));
            pending.push(bytes);
            pending_len += bytes.len() as u64;
        }
        self.write(st, &mut pending, &mut pending_len, &out[first..])?;
        for (id, seg, loc) in out {
            // (A compaction's copy replaces the original.)
            st.place(id, seg, loc);
        }
        Ok(())
    }

    /// Writes `pending` (`len` bytes) to the active segment, then its record (`group`, the
    /// same blobs) to the segment's log.
    fn write(
        &self,
        st: &mut State,
        pending: &mut Vec<&[u8]>,
        len: &mut u64,
        group: &[(Hash, u32, Loc)],
    ) -> Result<(), StoreError> {
        if pending.is_empty() {
            return Ok(());
        }
        let seg = st.active;
        let mut slices: Vec<std::io::IoSlice<'_>> =
            pending.iter().map(|b| std::io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match st.file.write_vectored(rest) {
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing");
                    return Err(self.io_err(seg)(e));
                }
                Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Whatever part was written is unreferenced garbage; later appends go
                    // after it.
                    let len = st.file.metadata().map(|m| m.len()).unwrap_or(0);
                    st.segs.get_mut(&seg).expect("active segment").size = len;
                    return Err(self.io_err(seg)(e));
                }
            }
        }
        st.segs.get_mut(&seg).expect("active segment").size += *len;
        pending.clear();
        *len = 0;
        let rec = group[0].2.rec as u64;
        let frame = reclog::record(rec, group.iter().map(|(id, _, loc)| (id, loc)));
        reclog::append(&mut st.log, &mut st.log_len, &frame).map_err(self.log_err(seg))
    }

    /// Copies a segment's live blobs forward, repoints the index, then deletes the segment.
    fn compact(&self, st: &mut State, seg: u32) -> Result<(), StoreError> {
        // The segment's log lists its blobs; those the index still places there are live.
        let mut live: Vec<(Hash, Loc)> = Vec::new();
        self.scan_log(seg, 0, |_, entries| {
            for (id, loc) in entries {
                if st
                    .live(&id)
                    .is_some_and(|(s, l)| (s, l.off) == (seg, loc.off))
                {
                    live.push((id, loc));
                }
            }
        })?;
        let mut copies = Vec::with_capacity(live.len());
        if !live.is_empty() {
            let f = File::open(self.seg_path(seg)).map_err(self.io_err(seg))?;
            for (id, loc) in live {
                // Copied as stored (compressed or not), once checked against the id.
                let read = read_at(&f, loc.off(), loc.stored());
                let good = read
                    .as_ref()
                    .is_ok_and(|b| decode(&id, &loc, b.clone(), Check::Id).is_some());
                match read {
                    Ok(b) if good => copies.push((id, b, loc.zstd())),
                    _ => {
                        tracing::warn!(blob = %id, segment = seg, "dropping a corrupt blob found while compacting");
                        self.drop_entry(st, &id)?;
                    }
                }
            }
        }
        let refs: Vec<Stored<'_>> = copies
            .iter()
            .map(|(id, b, z)| (*id, b.as_slice(), *z))
            .collect();
        let first = st.active;
        self.append(st, &refs)?;
        // The copies are the only home of these blobs once the old segment is gone: they, their
        // records (and the directory entries of any segment the append started) reach the disk
        // before the old segment is deleted.
        if !refs.is_empty() {
            for n in first..=st.active {
                let path = self.seg_path(n);
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(self.io_err(n))?;
                File::open(reclog::log_path(&path))
                    .and_then(|f| f.sync_data())
                    .map_err(self.log_err(n))?;
            }
            File::open(self.dir.join("segments"))
                .and_then(|d| d.sync_all())
                .map_err(self.io_err(st.active))?;
        }
        st.segs.remove(&seg);
        self.readers
            .write()
            .expect("reader map poisoned")
            .remove(&seg);
        // The segment, then its log (a log left alone is removed when the store opens).
        let path = self.seg_path(seg);
        std::fs::remove_file(&path).map_err(self.io_err(seg))?;
        match std::fs::remove_file(reclog::log_path(&path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.log_err(seg)(e)),
            _ => Ok(()),
        }
    }

    /// Removes `ids` from the index, their segments' logs and live counts (their bytes
    /// become garbage for compaction), and journals the removals.
    fn unindex(&self, st: &mut State, ids: &[Hash]) -> Result<(), StoreError> {
        let mut gone: BTreeMap<u32, Vec<(Hash, u32)>> = BTreeMap::new();
        let mut journal = sled::Batch::default();
        for id in ids {
            if let Some((seg, loc)) = forget_live(st, id) {
                gone.entry(seg).or_default().push((*id, loc.off));
                // Journaled, for a store opened before the next checkpoint (see `Ckpt`).
                journal.insert(journal_key(st.ckpt.gen, id).as_slice(), &[]);
            }
        }
        for (seg, gone) in gone {
            let frame = reclog::removal(gone.iter().map(|(id, off)| (id, *off)));
            if seg == st.active {
                reclog::append(&mut st.log, &mut st.log_len, &frame)
            } else {
                // (A segment no longer active has no torn tail to cut: see `reclog`.)
                OpenOptions::new()
                    .append(true)
                    .open(reclog::log_path(&self.seg_path(seg)))
                    .and_then(|mut f| f.write_all(&frame))
            }
            .map_err(self.log_err(seg))?;
        }
        self.journal
            .apply_batch(journal)
            .map_err(|e| self.db_err(e))
    }

    /// Starts a fresh segment, compacts every older one that holds garbage, then
    /// checkpoints.
    fn compact_garbage(&self, st: &mut State) -> Result<(), StoreError> {
        self.roll(st)?;
        let next = st.active;
        let old: Vec<u32> = st
            .segs
            .iter()
            .filter(|(n, s)| **n != next && s.live_bytes() < s.size)
            .map(|(n, _)| *n)
            .collect();
        for n in old {
            self.compact(st, n)?;
        }
        drop_unused(st);
        self.checkpoint(st)
    }

    /// Starts a new active segment.
    fn roll(&self, st: &mut State) -> Result<(), StoreError> {
        let next = st.active + 1;
        let path = self.seg_path(next);
        st.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io_err(next))?;
        (st.log, st.log_len) =
            reclog::open_append(&reclog::log_path(&path), 0).map_err(self.log_err(next))?;
        st.active = next;
        st.segs.insert(
            next,
            Seg {
                size: 0,
                ..Seg::default()
            },
        );
        Ok(())
    }

    /// Compacts the segments with the most garbage until the files fit the capacity.
    fn compact_to_capacity(&self, st: &mut State) -> Result<(), StoreError> {
        let Some(cap) = self.capacity else {
            return Ok(());
        };
        loop {
            let disk: u64 = st.segs.values().map(|s| s.size).sum();
            if disk <= cap {
                return Ok(());
            }
            let victim = st
                .segs
                .iter()
                .filter(|(n, _)| **n != st.active)
                .map(|(n, s)| (*n, s.size - s.live_bytes().min(s.size)))
                .filter(|(_, garbage)| *garbage > 0)
                .max_by_key(|(_, garbage)| *garbage);
            match victim {
                Some((n, _)) => self.compact(st, n)?,
                None => {
                    // Only the active segment holds garbage: start a new one, compact the old.
                    let active = st.active;
                    let garbage = st.segs[&active].size
                        - st.segs[&active].live_bytes().min(st.segs[&active].size);
                    if garbage == 0 {
                        return Ok(()); // only live (or pinned) data left
                    }
                    self.roll(st)?;
                    self.compact(st, active)?;
                }
            }
        }
    }

    /// [`ChunkStore::put_batch`], also returning (with `collect`) the verified bytes of every
    /// blob it evicted or declined to admit, for a slower tier to keep.
    pub(crate) fn put_batch_demoting(
        &self,
        blobs: &[Packed<'_>],
        retain: Retain,
        collect: bool,
    ) -> Result<Vec<(Hash, Vec<u8>)>, StoreError> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        // Compressed before the lock is taken (batches of several peers are stored at once).
        // (A frame that came with a blob is kept as it is.)
        let squeezed: Vec<Option<Vec<u8>>> = if self.compress {
            blobs
                .iter()
                .map(|(_, b, z)| if z.is_some() { None } else { squeeze(b) })
                .collect()
        } else {
            Vec::new()
        };
        let stored = |i: usize| -> (&[u8], bool) {
            if !self.compress {
                return (blobs[i].1, false);
            }
            match (blobs[i].2, squeezed[i].as_ref()) {
                (Some(z), _) => (z, true),
                (None, Some(z)) => (z.as_slice(), true),
                (None, None) => (blobs[i].1, false),
            }
        };
        let mut st = self.lock();
        let mut admitted: Vec<Stored<'_>> = Vec::with_capacity(blobs.len());
        // (A set: a batch of an origin range holds up to a few hundred thousand tiny blobs;
        // searching `admitted` for each was 87% of a 3M-blob pull's CPU.)
        let mut seen = rustc_hash::FxHashSet::default();
        let mut evicted = Vec::new();
        let mut declined = Vec::new();
        for (i, (id, bytes, _)) in blobs.iter().enumerate() {
            if !seen.insert(*id) || st.live(id).is_some() {
                continue;
            }
            let (sb, z) = stored(i);
            let Some(policy) = &mut st.policy else {
                admitted.push((*id, sb, z));
                continue;
            };
            match retain {
                Retain::Keep => {
                    evicted.extend(policy.insert_forced(*id, sb.len() as u64));
                    admitted.push((*id, sb, z));
                }
                Retain::Cache => {
                    let a = policy.insert(*id, sb.len() as u64);
                    evicted.extend(a.evicted);
                    if a.admitted {
                        admitted.push((*id, sb, z));
                    } else if collect {
                        declined.push((*id, bytes.to_vec()));
                    }
                }
            }
        }
        // Something admitted early in this batch may have been evicted by a later one.
        if !evicted.is_empty() {
            let gone: rustc_hash::FxHashSet<&Hash> = evicted.iter().collect();
            admitted.retain(|(id, _, _)| !gone.contains(id));
        }
        // What leaves this tier, read (and verified) before its entries go, for the next tier,
        // and what it declined.
        let mut demoted = declined;
        if collect {
            for id in &evicted {
                let stored = st.live(id);
                match stored {
                    Some((seg, loc)) => {
                        let read = self
                            .reader(seg)
                            .and_then(|f| read_at(&f, loc.off(), loc.stored()));
                        if let Some(buf) = read.ok().and_then(|b| decode(id, &loc, b, Check::Id)) {
                            demoted.push((*id, buf));
                        }
                    }
                    // Admitted and evicted within this batch: never written here.
                    None => {
                        if let Some((_, b, _)) = blobs.iter().find(|(b, _, _)| b == id) {
                            demoted.push((*id, b.to_vec()));
                        }
                    }
                }
            }
        }
        self.append(&mut st, &admitted)?;
        self.unindex(&mut st, &evicted)?;
        st.evictions += evicted.len() as u64;
        if !evicted.is_empty() {
            self.compact_to_capacity(&mut st)?;
        }
        self.maintain(&mut st, false)?;
        Ok(demoted)
    }

    /// The blobs that left this store for good (evictions, blobs dropped since opening), for
    /// [`ChunkStore::losses`].
    pub(crate) fn loss_counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.evictions, st.dropped)
    }

    /// Runs `f` over the pins and pin counts as one sled transaction.
    fn pin_transaction(
        &self,
        f: impl Fn(
            &sled::transaction::TransactionalTree,
            &sled::transaction::TransactionalTree,
        ) -> sled::transaction::ConflictableTransactionResult<(), ()>,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        (&self.pins, &self.pinned)
            .transaction(|(pins, pinned)| f(pins, pinned))
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => self.db_err(e),
                sled::transaction::TransactionError::Abort(()) => {
                    self.db_err(sled::Error::ReportableBug("pin transaction aborted".into()))
                }
            })
    }

    fn pin_list(&self, name: &str) -> Result<Option<Vec<(Hash, u32)>>, StoreError> {
        let Some(v) = self.pins.get(name).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        Ok(Some(
            v.chunks_exact(36)
                .map(|c| {
                    (
                        Hash(c[..32].try_into().expect("32 bytes")),
                        u32::from_be_bytes(c[32..].try_into().expect("4 bytes")),
                    )
                })
                .collect(),
        ))
    }
}

impl Drop for SegmentStore {
    /// Checkpoints what the index's delta holds (so that the next open has nothing to
    /// replay) and stops a merge under way (the next store to open starts it again).
    fn drop(&mut self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.index.cancel_merge();
        #[cfg(test)]
        if self.crashed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if st.index.delta_len() > 0 {
            if let Err(e) = self.checkpoint(&mut st) {
                tracing::warn!("checkpointing the store's index: {e}");
            }
        }
    }
}

impl ChunkStore for SegmentStore {
    fn losses(&self) -> u64 {
        let (evicted, dropped) = self.loss_counts();
        evicted + dropped
    }

    fn contains(&self, id: &Hash) -> Result<bool, StoreError> {
        Ok(self.lock().live(id).is_some())
    }

    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(id, Check::Id)
    }

    fn get_for_peer(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(id, Check::AtRest)
    }

    fn locate(&self, id: &Hash) -> Result<Option<Located>, StoreError> {
        let Some((seg, loc)) = self.lookup(id) else {
            return Ok(None);
        };
        if loc.zstd() {
            // Not in the file as it is: read through `get`.
            return Ok(None);
        }
        match self.reader(seg) {
            Ok(file) => Ok(Some(Located {
                file,
                path: self.seg_path(seg),
                offset: loc.off(),
                len: loc.len,
            })),
            // Compacted away since the lookup: the reader asks again, or reads it the usual way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(seg)(e)),
        }
    }

    fn put_batch(&self, blobs: &[(Hash, &[u8])], retain: Retain) -> Result<(), StoreError> {
        let packed: Vec<Packed<'_>> = blobs.iter().map(|(id, b)| (*id, *b, None)).collect();
        self.put_batch_demoting(&packed, retain, false).map(|_| ())
    }

    fn put_batch_packed(&self, blobs: &[Packed<'_>], retain: Retain) -> Result<(), StoreError> {
        self.put_batch_demoting(blobs, retain, false).map(|_| ())
    }

    fn get_stored_for_peer(&self, id: &Hash) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        self.read_stored(id)
    }

    fn flush(&self) -> Result<(), StoreError> {
        {
            let st = self.lock();
            for (k, v) in [
                ("hits", st.hits),
                ("misses", st.misses),
                ("evictions", st.evictions),
            ] {
                self.meta
                    .insert(k, &v.to_be_bytes())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        let (log, active) = {
            let mut st = self.lock();
            if st.index.delta_len() >= FLUSH_CHECKPOINT {
                // (Syncs the log and sled too.)
                return self.checkpoint(&mut st);
            }
            self.maintain(&mut st, false)?;
            (st.log.try_clone(), st.active)
        };
        // Outside the lock: puts go on meanwhile.
        log.and_then(|l| l.sync_data())
            .map_err(self.log_err(active))?;
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn stats(&self) -> Result<CacheStats, StoreError> {
        let mut pins = Vec::new();
        for kv in self.pins.iter() {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            let name = String::from_utf8_lossy(&k).to_string();
            let list = self.pin_list(&name)?.unwrap_or_default();
            pins.push(PinInfo {
                blobs: list.len() as u64,
                bytes: list.iter().map(|b| b.1 as u64).sum(),
                name,
            });
        }
        let st = self.lock();
        let mut pinned_bytes = 0;
        for kv in self.pinned.iter() {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            if let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) {
                pinned_bytes += st
                    .live(&Hash(id))
                    .map(|(_, l)| l.stored() as u64)
                    .unwrap_or(0);
            }
        }
        let live: u64 = st.segs.values().map(Seg::live_bytes).sum();
        let blobs = st.segs.values().map(|s| s.live_blobs).sum();
        Ok(CacheStats {
            path: self.dir.display().to_string(),
            capacity: self.capacity,
            disk_bytes: st.segs.values().map(|s| s.size).sum(),
            live_bytes: live,
            blobs,
            pinned_bytes,
            pins,
            hits: st.hits,
            misses: st.misses,
            hit_rate: rate(st.hits, st.misses),
            evictions: st.evictions,
            tiers: vec![TierStats {
                kind: "disk".into(),
                path: Some(self.dir.display().to_string()),
                capacity: self.capacity,
                used_bytes: live,
                blobs,
                hits: st.hits,
                misses: st.misses,
                hit_rate: rate(st.hits, st.misses),
                evictions: st.evictions,
            }],
            whole_files: None,
            ttl_s: None,
            versions: Vec::new(),
        })
    }

    fn pin(&self, name: &str, blobs: &[(Hash, u32)]) -> Result<(), StoreError> {
        let mut st = self.lock();
        if self.pins.contains_key(name).map_err(|e| self.db_err(e))? {
            return Ok(());
        }
        for (id, _) in blobs {
            if st.live(id).is_none() {
                return Err(StoreError::NotLocal {
                    name: name.to_string(),
                    id: *id,
                });
            }
        }
        let mut list = Vec::with_capacity(blobs.len() * 36);
        for (id, len) in blobs {
            list.extend_from_slice(id.as_bytes());
            list.extend_from_slice(&len.to_be_bytes());
        }
        // The pin and every count it raises commit together or not at all: a kill part-way
        // leaves the store as it was.
        self.pin_transaction(|pins, pinned| {
            for (id, _) in blobs {
                let n = tx_count(pinned, id)?;
                pinned.insert(id.as_bytes(), &(n + 1).to_be_bytes())?;
            }
            pins.insert(name, list.as_slice())?;
            Ok(())
        })?;
        if let Some(p) = &mut st.policy {
            for (id, _) in blobs {
                p.set_pinned(*id, true);
            }
        }
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn unpin(&self, name: &str) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let Some(list) = self.pin_list(name)? else {
            return Ok(false);
        };
        // Pins and unpins hold the store lock, so the counts cannot change under this.
        let released: Vec<Hash> = list
            .iter()
            .filter(|(id, _)| {
                self.pinned
                    .get(id.as_bytes())
                    .ok()
                    .flatten()
                    .and_then(|v| v.as_ref().try_into().ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0)
                    <= 1
            })
            .map(|(id, _)| *id)
            .collect();
        self.pin_transaction(|pins, pinned| {
            for (id, _) in &list {
                let n = tx_count(pinned, id)?.max(1);
                if n <= 1 {
                    pinned.remove(id.as_bytes())?;
                } else {
                    pinned.insert(id.as_bytes(), &(n - 1).to_be_bytes())?;
                }
            }
            pins.remove(name)?;
            Ok(())
        })?;
        if let Some(p) = &mut st.policy {
            for id in released {
                p.set_pinned(id, false);
            }
        }
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    fn gc(&self) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let before: u64 = st.segs.values().map(|s| s.size).sum();
        let drop: Vec<Hash> = match &mut st.policy {
            Some(p) => p.clear_unpinned(),
            None => {
                let mut live = Vec::new();
                self.each_live(&st, |id, _, _| live.push(id))?;
                let mut drop = Vec::new();
                for id in live {
                    let pinned = self
                        .pinned
                        .contains_key(id.as_bytes())
                        .map_err(|e| self.db_err(e))?;
                    if !pinned {
                        drop.push(id);
                    }
                }
                drop
            }
        };
        st.dropped += drop.len() as u64;
        self.unindex(&mut st, &drop)?;
        self.compact_garbage(&mut st)?;
        let after: u64 = st.segs.values().map(|s| s.size).sum();
        Ok(before.saturating_sub(after))
    }

    fn drop_unpinned(&self, ids: &[Hash]) -> Result<(u64, u64), StoreError> {
        let mut st = self.lock();
        let before: u64 = st.segs.values().map(|s| s.size).sum();
        let mut drop = Vec::new();
        for id in ids {
            let pinned = self
                .pinned
                .contains_key(id.as_bytes())
                .map_err(|e| self.db_err(e))?;
            if !pinned && st.live(id).is_some() {
                drop.push(*id);
            }
        }
        if drop.is_empty() {
            return Ok((0, 0));
        }
        if let Some(p) = &mut st.policy {
            for id in &drop {
                p.remove(id);
            }
        }
        st.dropped += drop.len() as u64;
        self.unindex(&mut st, &drop)?;
        self.compact_garbage(&mut st)?;
        let after: u64 = st.segs.values().map(|s| s.size).sum();
        Ok((drop.len() as u64, before.saturating_sub(after)))
    }
}

/// How many pins hold `id`, read inside a pin transaction.
fn tx_count(
    pinned: &sled::transaction::TransactionalTree,
    id: &Hash,
) -> sled::transaction::ConflictableTransactionResult<u32, ()> {
    Ok(pinned
        .get(id.as_bytes())?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0))
}

/// Creates `dir` (and its parents) or makes it 0700 if it is open to others.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::metadata(dir) {
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(p)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes a blob from the index; returns where it was.
fn forget_live(st: &mut State, id: &Hash) -> Option<(u32, Loc)> {
    let (seg, loc) = st.live(id)?;
    st.index.set(*id, None);
    if let Some(s) = st.segs.get_mut(&seg) {
        s.sub(&loc);
    }
    Some((seg, loc))
}

/// Moves the index of a store from before record logs into logs: records in sled (tree
/// "records"), or older still, one sled entry per blob (tree "blobs"), grouped into records of
/// a few hundred blobs. The checkpoint goes first (the next open rebuilds the index from the
/// logs), the sled trees last: a migration cut short starts again from the beginning, over
/// whatever logs it had written.
fn migrate(db: &sled::Db, segs_dir: &Path, meta: &sled::Tree) -> sled::Result<()> {
    let (legacy, records) = (db.open_tree("blobs")?, db.open_tree("records")?);
    if legacy.is_empty() && records.is_empty() {
        return Ok(());
    }
    meta.remove(MANIFEST)?;
    db.flush()?;
    for e in std::fs::read_dir(segs_dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "rec") {
            std::fs::remove_file(path)?;
        }
    }
    let mut logs: BTreeMap<u32, (File, u64)> = BTreeMap::new();
    let mut write = |seg: u32, rec: u64, entries: &[(Hash, Loc)]| -> std::io::Result<()> {
        let (f, len) = match logs.entry(seg) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(reclog::open_append(
                &reclog::log_path(&segs_dir.join(seg_name(seg))),
                0,
            )?),
        };
        reclog::append(
            f,
            len,
            &reclog::record(rec, entries.iter().map(|(id, l)| (id, l))),
        )
    };
    // Per-blob entries of the oldest stores.
    let mut groups: BTreeMap<(u32, bool), Vec<(Hash, Loc)>> = BTreeMap::new();
    for kv in legacy.iter() {
        let (k, v) = kv?;
        if let (Ok(id), Some((seg, loc))) = (<[u8; 32]>::try_from(k.as_ref()), decode_loc(&v)) {
            groups
                .entry((seg, loc.crc.is_some()))
                .or_default()
                .push((Hash(id), loc));
        }
    }
    // Segment, record offset, entries.
    type Record = (u32, u32, Vec<(Hash, Loc)>);
    let mut recs: Vec<Record> = Vec::new();
    for ((seg, _), mut entries) in groups {
        entries.sort_by_key(|(_, l)| l.off);
        for chunk in entries.chunks(256) {
            let rec = chunk[0].1.off;
            let chunk = chunk.iter().map(|(id, l)| (*id, Loc { rec, ..*l }));
            recs.push((seg, rec, chunk.collect()));
        }
    }
    // In offset order within each log, as appends would have written them.
    recs.sort_by_key(|(seg, rec, _)| (*seg, *rec));
    for (seg, rec, entries) in recs {
        write(seg, rec as u64, &entries)?;
    }
    // Records (keys of removals journaled in the same tree begin with 0xff: skipped).
    for kv in records.iter() {
        let (k, v) = kv?;
        let Some((seg, rec)) = parse_record_key(&k).filter(|(seg, _)| *seg != u32::MAX) else {
            continue;
        };
        if let Some(entries) = decode_record(&v, rec) {
            write(seg, rec, &entries)?;
        }
    }
    for (f, _) in logs.values() {
        f.sync_all()?;
    }
    std::fs::File::open(segs_dir)?.sync_all()?;
    records.clear()?;
    legacy.clear()?;
    db.flush()?;
    Ok(())
}

/// Forgets bookkeeping of empty, non-active segments (their files are gone).
fn drop_unused(st: &mut State) {
    let active = st.active;
    st.segs
        .retain(|n, s| *n == active || s.size > 0 || s.live_blobs > 0);
}

#[cfg(test)]
mod tests;
