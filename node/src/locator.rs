//! Where each blob of a version lies in its packs, read from disk as lookups need it.
//!
//! A version names its packs; each pack's index says where its blobs are. Opening a version
//! used to decode every index into one map in memory (~70 bytes a blob: 0.7 GB and 5 s
//! before a mount of ten million files served anything). Now each pack's index is turned,
//! once per machine, into a *locator file* beside the cached index (`PACK.loc`): its
//! entries sorted by id, fixed-size, with the first id (its first 8 bytes) of every block of
//! 64 entries at the end ([`Fenced`]); a lookup finds its block among those in memory and
//! reads that block (3 KiB) from the file. A lookup searches the packs whose file
//! is open, the pack of the previous hit first, then from the newest pack back (a version's
//! tree nodes are in packs of their own, listed last, the root's at the very end: a lookup
//! of a directory opens the tree's packs only); packs not yet open are opened (built from
//! their index when there is no file yet) only when a lookup has not found its blob in
//! those that are. Opening a version
//! costs nothing per blob, and memory holds an eighth of a byte a blob, not the entries.
//! (The files were memory-mapped at first: every page a lookup touched, and the kernel maps
//! 64 KiB around each, counted in the process's resident memory, 134 MB of a 10M-chunk
//! pull's, however often the pages were released.)
//!
//! Locator files are derived data in this machine's private cache, written whole and renamed
//! into place, never changed in place, checked for their header and size when opened (a
//! damaged one is rebuilt). A wrong entry in one could only send a read to the wrong bytes,
//! which then fail their BLAKE3 check: no blob is used unverified.
//!
//! After the fences, a locator lists the blobs again in pack order (offset, length, record:
//! 16 bytes a blob), so that a read can keep every blob of the span it read
//! ([`PackLoc::within`]): a pull reads the tree a level at a time, each level's nodes lie all
//! over the tree's packs, and each level's reads, coalesced over gaps, read most of them
//! again.

use crate::error::{Error, Result};
use crate::origins::{Holders, Origins};
use futures::StreamExt;
use shoal_registry::pack::{AnyIndex, Codec, ExternalIndex, Frame, Frames};
use shoal_registry::{DatasetName, Hash};
use shoal_store::sorted::{prefix, FenceWriter, Fenced};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Where a blob lies: pack number in the version, source object (external packs; 0
/// otherwise), offset in the pack's raw bytes (in the object, for an external pack), length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: u32,
    pub object: u32,
    pub offset: u64,
    pub len: u32,
}

const MAGIC: &[u8; 8] = b"SHOALOC3";
/// Magic, the pack's id, blob count, frame count, kind (0 packed, 1 external).
const HEADER: usize = 8 + 32 + 8 + 8 + 8;
/// Codec (1, padded to 8), raw length, stored length.
const FRAME: usize = 24;
/// Id, offset, length, source object.
const RECORD: usize = 32 + 8 + 4 + 4;
/// After the fences, the blobs in pack order: offset, length, number of the record.
const PLACE: usize = 8 + 4 + 4;
/// Packs opened at once when a lookup has to open more. (Opening one whose locator is not
/// on disk yet holds its index read and decoded: ~30 MB for a pack of 262,144 tiny blobs.
/// Four at once were the largest part of a 10M-entry pull's peak; two keep both cores busy.)
const OPEN_AT_ONCE: usize = 2;
/// A locator built from an index of at least this many blobs gives the allocator's free
/// memory back afterwards.
const TRIM_AFTER_BLOBS: usize = 16_384;
/// Packs of recent hits a lookup tries first.
const HINTS: usize = 4;

/// One pack's locator file, open.
pub(crate) struct PackLoc {
    /// Its records.
    records: Fenced,
    /// The pack's frames, when some are compressed.
    pub frames: Option<Arc<Frames>>,
    /// Whether the pack is an external pack (its index then goes in `external`).
    is_external: bool,
    /// The pack's index, when it is an external pack (its source objects are needed to read
    /// it).
    pub external: Option<Arc<ExternalIndex>>,
    /// For an external pack: the origins that keep a copy of it as one pack, and where each
    /// source object starts in the copy.
    pub copies: Option<(Holders, Arc<Vec<u64>>)>,
}

impl PackLoc {
    /// Bytes of one record (an id first, see [`Self::read_records`]).
    pub const RECORD: usize = RECORD;

    /// How many blobs the pack holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Records `from..from + n` in id order into `buf`, [`Self::RECORD`] bytes each, each
    /// starting with its blob's id.
    pub fn read_records(&self, from: usize, n: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.records.read(from, n, buf)
    }

    /// The blobs lying wholly within raw bytes `raw` of a packed pack, in pack order: (id,
    /// offset, length). A binary search of the pack-order list after the fences (a `pread` of
    /// 16 bytes a step), then one read of the places in the span and one of each record.
    pub fn within(&self, raw: std::ops::Range<u64>) -> std::io::Result<Vec<(Hash, u64, u32)>> {
        use std::os::unix::fs::FileExt;
        let file = self.records.file();
        let base = self.records.trailer_at();
        let n = self.records.len();
        let place = |i: usize| -> std::io::Result<(u64, u32, u32)> {
            let mut b = [0u8; PLACE];
            file.read_exact_at(&mut b, base + (i * PLACE) as u64)?;
            Ok(decode_place(&b))
        };
        // The first blob starting at or after raw.start.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if place(mid)?.0 < raw.start {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut rec = Vec::new();
        let mut i = lo;
        'read: while i < n {
            let k = (n - i).min(1024);
            buf.resize(k * PLACE, 0);
            file.read_exact_at(&mut buf, base + (i * PLACE) as u64)?;
            for b in buf.chunks_exact(PLACE) {
                let (offset, len, record) = decode_place(b);
                if offset + u64::from(len) > raw.end {
                    break 'read;
                }
                if record as usize >= n {
                    return Err(std::io::Error::other("a record number past the records"));
                }
                self.records.read(record as usize, 1, &mut rec)?;
                out.push((Hash(rec[..32].try_into().expect("32 bytes")), offset, len));
            }
            i += k;
        }
        Ok(out)
    }

    /// The record of `id`: (source object, offset, length).
    fn find(&self, id: &Hash) -> std::io::Result<Option<(u32, u64, u32)>> {
        self.records.find(id, |r| {
            (
                u32::from_le_bytes(r[44..48].try_into().expect("4 bytes")),
                u64::from_le_bytes(r[32..40].try_into().expect("8 bytes")),
                u32::from_le_bytes(r[40..44].try_into().expect("4 bytes")),
            )
        })
    }
}

/// (offset, length, record) of a place in the pack-order list.
fn decode_place(b: &[u8]) -> (u64, u32, u32) {
    (
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
    )
}

fn loc_path(cache: &Path, pack: &Hash) -> PathBuf {
    cache.join(format!("{pack}.loc"))
}

/// Writes the locator file of `pack` from its (verified) index, whole, then renames it into
/// place.
fn write_loc(cache: &Path, pack: &Hash, idx: &AnyIndex) -> std::io::Result<()> {
    // Sorted by the ids' first 8 bytes, then the whole id: comparing two u64s is most of
    // what sorting a pack's entries costs (memcmp of whole ids was a fifth of opening one).
    // The sort moves 12 bytes an entry (the prefix and the entry's place), not the entries.
    let at = |i: u32| idx.location(i as usize);
    let mut order: Vec<(u64, u32)> = idx
        .locations()
        .enumerate()
        .map(|(i, (id, ..))| (prefix(&id), i as u32))
        .collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| at(a.1).0.cmp(&at(b.1).0)));
    let entries = order.iter().map(|&(_, i)| at(i));
    let frames: &[Frame] = match idx {
        AnyIndex::Packed(p) if !p.frames.is_plain() => p.frames.frames(),
        _ => &[],
    };
    std::fs::create_dir_all(cache)?;
    let tmp = cache.join(format!(".{pack}.loc.{}.tmp", std::process::id()));
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    let written = (|| {
        w.write_all(MAGIC)?;
        w.write_all(pack.as_bytes())?;
        w.write_all(&(order.len() as u64).to_le_bytes())?;
        w.write_all(&(frames.len() as u64).to_le_bytes())?;
        let kind = matches!(idx, AnyIndex::External(_)) as u64;
        w.write_all(&kind.to_le_bytes())?;
        for f in frames {
            let mut b = [0u8; FRAME];
            b[0] = match f.codec {
                Codec::Raw => 0,
                Codec::Zstd => 1,
            };
            b[8..16].copy_from_slice(&f.raw_len.to_le_bytes());
            b[16..24].copy_from_slice(&f.stored_len.to_le_bytes());
            w.write_all(&b)?;
        }
        let mut fences = FenceWriter::default();
        for (id, object, offset, len) in entries {
            fences.push(&id);
            w.write_all(id.as_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&object.to_le_bytes())?;
        }
        w.write_all(&fences.bytes())?;
        // The blobs in pack order: where each one's record went.
        let mut record = vec![0u32; order.len()];
        for (k, &(_, i)) in order.iter().enumerate() {
            record[i as usize] = k as u32;
        }
        for (i, (_, _, offset, len)) in idx.locations().enumerate() {
            w.write_all(&offset.to_le_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&record[i].to_le_bytes())?;
        }
        w.flush()
    })();
    drop(w);
    match written.and_then(|()| std::fs::rename(&tmp, loc_path(cache, pack))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Whether `id` is a packed pack of `origin` (not an external one), its locator file then in
/// `cache`: written there from its index (read from the cache or the origin) if it was not.
///
/// Cancel-safe: a locator file is renamed into place only once written whole.
pub(crate) async fn ensure_packed_loc(
    origin: &shoal_registry::Origin,
    cache: &Path,
    id: &Hash,
) -> Result<bool> {
    let (c, i) = (cache.to_path_buf(), *id);
    let existing = tokio::task::spawn_blocking(move || open_loc(&c, &i).map(|p| p.is_external))
        .await
        .expect("locator task panicked");
    if let Some(external) = existing {
        return Ok(!external);
    }
    let (idx, _) = crate::blobs::pack_index(origin, cache, id).await?;
    if matches!(idx, AnyIndex::External(_)) {
        return Ok(false);
    }
    let (c, i) = (cache.to_path_buf(), *id);
    tokio::task::spawn_blocking(move || {
        write_loc(&c, &i, &idx)
            .and_then(|()| match open_loc(&c, &i) {
                Some(_) => Ok(true),
                None => Err(std::io::Error::other("it does not read back as written")),
            })
            .map_err(|source| Error::Io {
                op: "writing the blob locator of a pack to",
                path: loc_path(&c, &i),
                source,
            })
    })
    .await
    .expect("locator task panicked")
}

/// The locator file of packed pack `id` in `cache`, open, if it is there and whole.
pub(crate) fn open_packed_loc(cache: &Path, id: &Hash) -> Option<PackLoc> {
    open_loc(cache, id).filter(|p| !p.is_external)
}

/// A pack's locator written into `dir` from its blobs' ids (with made-up places).
#[cfg(test)]
pub(crate) fn test_loc(dir: &Path, pack: &Hash, ids: &[Hash]) {
    use shoal_registry::pack::{PackEntry, PackIndex};
    let entries: Vec<PackEntry> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| PackEntry {
            id: *id,
            offset: i as u64 * 10,
            len: 10,
        })
        .collect();
    let idx = PackIndex {
        frames: shoal_registry::pack::Frames::plain(ids.len() as u64 * 10),
        entries,
    };
    write_loc(dir, pack, &AnyIndex::Packed(idx)).unwrap();
}

/// Opens the locator file of `pack`, if there is one whose header names the pack and whose
/// size matches its counts.
fn open_loc(cache: &Path, pack: &Hash) -> Option<PackLoc> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(loc_path(cache, pack)).ok()?;
    let mut head = [0u8; HEADER];
    file.read_exact_at(&mut head, 0).ok()?;
    if &head[..8] != MAGIC || &head[8..40] != pack.as_bytes() {
        return None;
    }
    let count = usize::try_from(u64::from_le_bytes(head[40..48].try_into().ok()?)).ok()?;
    let nframes = usize::try_from(u64::from_le_bytes(head[48..56].try_into().ok()?)).ok()?;
    let external = match u64::from_le_bytes(head[56..64].try_into().ok()?) {
        0 => false,
        1 => true,
        _ => return None,
    };
    let start = nframes.checked_mul(FRAME)?.checked_add(HEADER)?;
    let frames = if nframes == 0 {
        None
    } else {
        let mut b = vec![0u8; nframes * FRAME];
        file.read_exact_at(&mut b, HEADER as u64).ok()?;
        let mut v = Vec::with_capacity(nframes);
        for f in b.chunks_exact(FRAME) {
            v.push(Frame {
                codec: match f[0] {
                    0 => Codec::Raw,
                    1 => Codec::Zstd,
                    _ => return None,
                },
                raw_len: u64::from_le_bytes(f[8..16].try_into().ok()?),
                stored_len: u64::from_le_bytes(f[16..24].try_into().ok()?),
            });
        }
        Some(Arc::new(Frames::new(v)))
    };
    Some(PackLoc {
        records: Fenced::open(file, start as u64, RECORD, count, (count * PLACE) as u64)?,
        frames,
        is_external: external,
        external: None,
        copies: None,
    })
}

/// The locations of a version's blobs (see the module's documentation).
pub(crate) struct Locator {
    origins: Arc<Origins>,
    holders: Holders,
    cache: PathBuf,
    /// The version's dataset, where the records of repacked packs are.
    dataset: DatasetName,
    /// The version's packs, then room for the packs that repacked ones forward to (taken as
    /// they are found, never given back: a slot's number stays its pack's).
    slots: Vec<Slot>,
    /// Slots that have a pack.
    used: AtomicUsize,
    /// Slots open (or retired) so far.
    open: AtomicUsize,
    /// Serialises taking slots for forwarded packs.
    forwarding: tokio::sync::Mutex<()>,
    /// The packs of the last hits, the latest first: the next blob asked for is most often in
    /// one of them (a batch's chunks lie in a pack or two, asked for in id order; with one
    /// hint, every other lookup asked all 448 packs of a 100M-entry version).
    hints: [AtomicU32; HINTS],
    /// Index bytes read from origins.
    index_bytes: AtomicU64,
    /// Where those bytes are also counted (the swarm's origin-read counter).
    swarm: Option<Arc<crate::swarm::Swarm>>,
    /// Packs retired so far (see [`Self::retire`]).
    retired: AtomicUsize,
}

/// One pack of a [`Locator`].
struct Slot {
    id: std::sync::OnceLock<Hash>,
    loc: tokio::sync::OnceCell<PackLoc>,
    /// The pack was repacked and is gone from the origins: its blobs are looked up in the
    /// packs its record forwards to, never in this slot again.
    retired: std::sync::atomic::AtomicBool,
    /// How many records were followed to reach this pack (0 for the version's own).
    depth: AtomicUsize,
}

/// Slots for forwarded packs beyond a version's own: at least this many.
const SPARE_SLOTS: usize = 64;
/// Records followed from one pack at most (a pack repacked, its new pack repacked, ...).
const MAX_FORWARDS: usize = 8;

impl Locator {
    pub fn new(
        origins: Arc<Origins>,
        holders: Holders,
        cache: &Path,
        dataset: DatasetName,
        packs: Vec<Hash>,
        swarm: Option<Arc<crate::swarm::Swarm>>,
    ) -> Locator {
        let n = packs.len();
        let slots: Vec<Slot> = (0..n + n.max(SPARE_SLOTS))
            .map(|i| Slot {
                id: match packs.get(i) {
                    Some(id) => (*id).into(),
                    None => std::sync::OnceLock::new(),
                },
                loc: tokio::sync::OnceCell::new(),
                retired: false.into(),
                depth: AtomicUsize::new(0),
            })
            .collect();
        Locator {
            origins,
            holders,
            cache: cache.to_path_buf(),
            dataset,
            slots,
            used: AtomicUsize::new(n),
            open: AtomicUsize::new(0),
            forwarding: tokio::sync::Mutex::new(()),
            hints: std::array::from_fn(|_| AtomicU32::new(u32::MAX)),
            index_bytes: AtomicU64::new(0),
            swarm,
            retired: AtomicUsize::new(0),
        }
    }

    /// The id of pack number `pack` (a number a [`Loc`] or [`Self::pack`] gave).
    pub fn pack_id(&self, pack: u32) -> Hash {
        *self.slots[pack as usize]
            .id
            .get()
            .expect("a pack number in use")
    }

    /// Pack numbers in use, and not retired, newest (highest) first.
    fn in_use(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.used.load(Ordering::Acquire) as u32)
            .rev()
            .filter(|&p| !self.slots[p as usize].retired.load(Ordering::Acquire))
    }

    /// Index bytes read from the origins so far.
    pub fn index_bytes(&self) -> u64 {
        self.index_bytes.load(Ordering::Relaxed)
    }

    /// A pack already open (any pack a [`Loc`] came from is).
    pub fn pack(&self, pack: u32) -> Option<&PackLoc> {
        let slot = self.slots.get(pack as usize)?;
        if slot.retired.load(Ordering::Acquire) {
            return None;
        }
        slot.loc.get()
    }

    /// Whether any pack opened so far has compressed frames.
    pub fn has_compressed(&self) -> bool {
        self.in_use()
            .any(|p| self.pack(p).is_some_and(|p| p.frames.is_some()))
    }

    fn all_open(&self) -> bool {
        self.open.load(Ordering::Acquire) == self.used.load(Ordering::Acquire)
    }

    /// Where `id` is, among the packs open so far (the last hit's pack first, then newest to
    /// oldest).
    pub fn find(&self, id: &Hash) -> Option<Loc> {
        let at = |pack: u32| -> Option<Loc> {
            let (object, offset, len) = match self.pack(pack)?.find(id) {
                Ok(found) => found?,
                Err(e) => {
                    // A local file that was whole when opened: the blob is then not found
                    // here, which the caller reports.
                    tracing::warn!("reading the locator of {}: {e}", self.pack_id(pack));
                    return None;
                }
            };
            Some(Loc {
                pack,
                object,
                offset,
                len,
            })
        };
        for (i, h) in self.hints.iter().enumerate() {
            let Some(l) = at(h.load(Ordering::Relaxed)) else {
                continue;
            };
            if i > 0 {
                self.hint(l.pack);
            }
            return Some(l);
        }
        let hinted: [u32; HINTS] = std::array::from_fn(|i| self.hints[i].load(Ordering::Relaxed));
        let found = self.in_use().filter(|p| !hinted.contains(p)).find_map(at)?;
        self.hint(found.pack);
        Some(found)
    }

    /// Makes `pack` the first hint (racy between threads: hints only order the search).
    fn hint(&self, pack: u32) {
        let mut carry = pack;
        for h in &self.hints {
            carry = h.swap(carry, Ordering::Relaxed);
            if carry == pack {
                break;
            }
        }
    }

    /// Opens packs, newest first, until each of `ids` is found or every pack is open.
    ///
    /// Cancel-safe: a pack is open once its file is whole; cancelled, the rest stay closed.
    pub async fn prepare(&self, ids: &[Hash]) -> Result<()> {
        // In id order: each pack's last block read then serves the next lookups.
        let mut missing: Vec<&Hash> = ids.iter().collect();
        missing.sort_unstable();
        missing.retain(|id| self.find(id).is_none());
        // One pack first (most lookups are of blobs in the newest packs, or in the pack of
        // the last hit), then twice as many each round: an old blob in a version of
        // hundreds of packs is found in a few rounds, a new one without opening the rest.
        // Each round looks for what is still missing in the packs it opened only: asking
        // every open pack again each round cost ids x packs x rounds lookups (a 100M-entry
        // version's 448 packs: hours).
        let mut batch = 1;
        while !missing.is_empty() && !self.all_open() {
            let was_open: Vec<u32> = self.in_use().filter(|&p| self.pack(p).is_some()).collect();
            let closed: Vec<u32> = self
                .in_use()
                .filter(|&p| self.pack(p).is_none())
                .take(batch)
                .collect();
            self.open_packs(closed).await?;
            let opened: Vec<u32> = self
                .in_use()
                .filter(|p| !was_open.contains(p) && self.pack(*p).is_some())
                .collect();
            missing.retain(|id| {
                !opened.iter().any(|&p| {
                    let found = self.pack(p).and_then(|l| l.find(id).ok().flatten());
                    if found.is_some() {
                        self.hint(p);
                    }
                    found.is_some()
                })
            });
            batch = (batch * 2).min(OPEN_AT_ONCE);
        }
        Ok(())
    }

    /// Opens every pack (a pull looks up every blob).
    ///
    /// Cancel-safe, as [`Self::prepare`].
    pub async fn open_all(&self) -> Result<()> {
        // Packs a repacked one forwards to are found as it is opened: open until none is left.
        while !self.all_open() {
            let closed: Vec<u32> = self.in_use().filter(|&p| self.pack(p).is_none()).collect();
            self.open_packs(closed).await?;
        }
        Ok(())
    }

    /// Opens packs in the background, newest first, a few at a time, for as long as the
    /// locator lives (a mount: so that its first reads of old packs do not wait for them).
    pub fn open_in_background(me: &Arc<Locator>) {
        let weak = Arc::downgrade(me);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                let Some(p) = me.in_use().find(|&p| me.pack(p).is_none()) else {
                    return;
                };
                if let Err(e) = me.open_packs(vec![p]).await {
                    tracing::debug!("opening the locator of pack {}: {e}", me.pack_id(p));
                    return;
                }
            }
        });
    }

    /// Cancel-safe, as [`Self::prepare`].
    async fn open_packs(&self, packs: Vec<u32>) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let mut opening = futures::stream::iter(packs)
            .map(|p| self.open_pack(p))
            .buffer_unordered(OPEN_AT_ONCE);
        while let Some(r) = opening.next().await {
            r?;
        }
        drop(opening);
        if self.all_open() && self.used.load(Ordering::Relaxed) > 16 {
            // The decoded indexes are gone; their memory need not stay with the process.
            shoal_fuse::trim_allocator();
        }
        Ok(())
    }

    /// Cancel-safe, as [`Self::prepare`].
    async fn open_pack(&self, pack: u32) -> Result<()> {
        let slot = &self.slots[pack as usize];
        let started = std::time::Instant::now();
        let mut opened = false;
        let got = slot
            .loc
            .get_or_try_init(|| async {
                let p = self.load_pack(pack).await?;
                opened = true;
                Ok::<_, Error>(p)
            })
            .await;
        match got {
            Ok(_) if opened => {
                self.open.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(
                    pack,
                    of = self.used.load(Ordering::Relaxed),
                    ms = started.elapsed().as_millis() as u64,
                    "pack locator opened"
                );
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if e.is_gone() => self.retire(pack).await.map_err(|f| f.unwrap_or(e)),
            Err(e) => Err(e),
        }
    }

    /// The pack numbered `pack` is gone from the origins holding the version (its index or
    /// its bytes): if the dataset's record of its repacking says where its blobs went, those
    /// packs are added (unopened) and `pack` is never looked in again; its cached index and
    /// locator file are dropped. Err(None) when there is no such record (the caller's error
    /// stands).
    ///
    /// Cancel-safe: a pack is retired only once the packs it forwards to have their slots.
    pub async fn retire(&self, pack: u32) -> std::result::Result<(), Option<Error>> {
        let slot = &self.slots[pack as usize];
        let _one = self.forwarding.lock().await;
        if slot.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        let id = self.pack_id(pack);
        let mut found = None;
        let dataset = &self.dataset;
        for (i, r) in self
            .origins
            .ask_all(|o| async move { o.forward(dataset, &id).await })
            .await
        {
            match r {
                Ok(Some(f)) if self.holders.has(i) => {
                    found = Some(f);
                    break;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let Some(f) = found else { return Err(None) };
        // A chain of records longer than any repack makes is a loop or a lie.
        let depth = slot.depth.load(Ordering::Acquire);
        if depth >= MAX_FORWARDS {
            return Err(Some(Error::Corrupt {
                what: format!("the record of repacked pack {id} of {}", self.dataset),
                reason: format!("it is the {depth}th record followed from one pack"),
            }));
        }
        for target in &f.into {
            if (0..self.used.load(Ordering::Acquire))
                .any(|p| self.slots[p].id.get() == Some(target))
            {
                continue;
            }
            let n = self.used.load(Ordering::Acquire);
            let Some(free) = self.slots.get(n) else {
                return Err(Some(Error::Corrupt {
                    what: format!("version of {}", self.dataset),
                    reason: format!(
                        "more repacked packs than this reader has room for ({}); open the version again",
                        self.slots.len()
                    ),
                }));
            };
            let _ = free.id.set(*target);
            free.depth.store(depth + 1, Ordering::Release);
            self.used.store(n + 1, Ordering::Release);
        }
        slot.retired.store(true, Ordering::Release);
        self.retired.fetch_add(1, Ordering::AcqRel);
        self.open
            .fetch_add(usize::from(slot.loc.get().is_none()), Ordering::AcqRel);
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(loc_path(&cache, &id));
            let _ = std::fs::remove_file(cache.join(format!("{id}.idx")));
        })
        .await
        .expect("cache task panicked");
        tracing::info!(
            "pack {id} of {} was repacked into {} pack(s); reading there",
            self.dataset,
            f.into.len()
        );
        Ok(())
    }

    /// Packs retired so far: a read that failed because a pack was gone is worth retrying
    /// when this grew meanwhile.
    pub fn retirements(&self) -> usize {
        self.retired.load(Ordering::Acquire)
    }

    /// Opens the locator file of one pack, building it from the pack's index first if there
    /// is none (or a damaged one).
    ///
    /// Cancel-safe: the file is renamed into place whole, or not at all.
    async fn load_pack(&self, pack: u32) -> Result<PackLoc> {
        let id = self.pack_id(pack);
        let cache = self.cache.clone();
        let existing = tokio::task::spawn_blocking(move || open_loc(&cache, &id))
            .await
            .expect("locator task panicked");
        let existing = match existing {
            Some(p) if !p.is_external => return Ok(p),
            other => other,
        };
        // No file yet (or an external pack, whose index is needed in memory).
        let t = std::time::Instant::now();
        let (idx, n) =
            crate::blobs::pack_index_any(&self.origins, self.holders, &self.cache, &id).await?;
        tracing::debug!(
            pack,
            bytes = n,
            ms = t.elapsed().as_millis() as u64,
            "pack index read"
        );
        self.index_bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(s) = &self.swarm {
            s.counters.bytes_from_origin.fetch_add(n, Ordering::Relaxed);
        }
        // (A packed pack's index is done with once its locator is written.)
        let (mut p, external) = match (existing, idx) {
            (Some(p), AnyIndex::External(x)) => (p, Some(x)),
            (Some(p), AnyIndex::Packed(_)) => (p, None),
            (None, idx) => {
                let cache = self.cache.clone();
                let (p, external) = tokio::task::spawn_blocking(move || {
                    let p = write_loc(&cache, &id, &idx).map(|()| open_loc(&cache, &id));
                    let external = match idx {
                        AnyIndex::External(x) => Some(x),
                        AnyIndex::Packed(_) => None,
                    };
                    if matches!(&p, Ok(Some(p)) if p.len() >= TRIM_AFTER_BLOBS) {
                        // Its index, read and decoded (~25 MB for a full pack), is gone:
                        // glibc would keep the room, between blocks still in use, for the
                        // rest of the process.
                        shoal_fuse::trim_allocator();
                    }
                    (p, external)
                })
                .await
                .expect("locator task panicked");
                let p = p.and_then(|p| {
                    p.ok_or_else(|| std::io::Error::other("it does not read back as written"))
                });
                match p {
                    Ok(p) => (p, external),
                    Err(source) => {
                        return Err(Error::Io {
                            op: "writing the blob locator of a pack to",
                            path: loc_path(&self.cache, &id),
                            source,
                        })
                    }
                }
            }
        };
        if let Some(x) = external {
            p.copies = copy_of(&self.origins, self.holders, &id, &x).await;
            p.external = Some(Arc::new(x));
        }
        Ok(p)
    }
}

/// For an external pack: the origins holding the version that also keep it as one pack
/// object (copied there by `replicate --copy-sources`), and where each source object starts
/// in the copy. Read there first; the source objects are the fallback.
///
/// Cancel-safe: it only reads.
async fn copy_of(
    origins: &Origins,
    holders: Holders,
    id: &Hash,
    x: &ExternalIndex,
) -> Option<(Holders, Arc<Vec<u64>>)> {
    let (starts, total) = x.object_starts();
    let mut with = Holders(0);
    for (i, r) in origins.ask_all(|o| o.pack_size(id)).await {
        if holders.has(i) && matches!(r, Ok(Some(n)) if n == total) {
            with.0 |= 1 << i;
        }
    }
    (with.0 != 0).then(|| (with, Arc::new(starts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::pack::{PackEntry, PackIndex};

    fn index(n: usize, seed: u8) -> PackIndex {
        let mut entries = Vec::new();
        let mut offset = 0;
        for i in 0..n {
            let len = 1 + (i as u32 % 700);
            entries.push(PackEntry {
                id: shoal_chunker::hash(&[seed, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                offset,
                len,
            });
            offset += len as u64;
        }
        PackIndex {
            entries,
            frames: Frames::plain(offset),
        }
    }

    #[test]
    fn the_blobs_of_a_span_are_those_wholly_inside_it_in_pack_order() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 2, 3, 100, 5000] {
            let idx = index(n, 2);
            let pack = shoal_chunker::hash(&(n + 7).to_le_bytes());
            write_loc(dir.path(), &pack, &AnyIndex::Packed(idx.clone())).unwrap();
            let p = open_loc(dir.path(), &pack).expect("opens");
            let end = idx.frames.raw_len();
            let spans = [
                0..end,
                0..0,
                1..end / 2,
                end / 3..end,
                end / 4..end / 4 + 2000,
            ];
            for raw in spans {
                let want: Vec<(Hash, u64, u32)> = idx
                    .entries
                    .iter()
                    .filter(|e| e.offset >= raw.start && e.offset + e.len as u64 <= raw.end)
                    .map(|e| (e.id, e.offset, e.len))
                    .collect();
                assert_eq!(p.within(raw.clone()).unwrap(), want, "n = {n}, {raw:?}");
            }
        }
    }

    #[test]
    fn every_blob_is_found_where_its_index_puts_it_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 2, 3, 100, 5000, 70_000] {
            let idx = index(n, 1);
            let pack = shoal_chunker::hash(&n.to_le_bytes());
            write_loc(dir.path(), &pack, &AnyIndex::Packed(idx.clone())).unwrap();
            let p = open_loc(dir.path(), &pack).expect("opens");
            assert_eq!(p.records.len(), n);
            assert!(p.frames.is_none());
            for e in &idx.entries {
                assert_eq!(
                    p.find(&e.id).unwrap(),
                    Some((0, e.offset, e.len)),
                    "n = {n}"
                );
            }
            for i in 0..200u64 {
                assert_eq!(
                    p.find(&shoal_chunker::hash(&i.to_le_bytes())).unwrap(),
                    None
                );
            }
            // The smallest and largest ids there can be, absent.
            assert_eq!(p.find(&Hash([0; 32])).unwrap(), None);
            assert_eq!(p.find(&Hash([0xff; 32])).unwrap(), None);
        }
    }

    #[test]
    fn ids_sharing_their_first_bytes_across_blocks_are_found() {
        // 300 ids with the same first 8 bytes (they span five blocks), among random ones.
        let dir = tempfile::tempdir().unwrap();
        let mut idx = index(1000, 4);
        for (i, e) in idx.entries.iter_mut().enumerate().take(300) {
            e.id.0[..8].copy_from_slice(&0x5555_5555_5555_5555u64.to_be_bytes());
            e.id.0[8] = (i % 256) as u8;
            e.id.0[9] = (i / 256) as u8;
        }
        let pack = Hash([6; 32]);
        write_loc(dir.path(), &pack, &AnyIndex::Packed(idx.clone())).unwrap();
        let p = open_loc(dir.path(), &pack).unwrap();
        for e in &idx.entries {
            assert_eq!(p.find(&e.id).unwrap(), Some((0, e.offset, e.len)));
        }
        let mut absent = idx.entries[0].id;
        absent.0[10] ^= 1;
        assert_eq!(p.find(&absent).unwrap(), None);
    }

    #[test]
    fn compressed_frames_survive_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = index(10, 2);
        let total = idx.raw_len();
        let first = idx.entries[5].offset;
        idx.frames = Frames::new(vec![
            Frame {
                codec: Codec::Zstd,
                raw_len: first,
                stored_len: 100,
            },
            Frame {
                codec: Codec::Raw,
                raw_len: total - first,
                stored_len: total - first,
            },
        ]);
        let pack = Hash([7; 32]);
        write_loc(dir.path(), &pack, &AnyIndex::Packed(idx.clone())).unwrap();
        let p = open_loc(dir.path(), &pack).unwrap();
        assert_eq!(p.frames.as_deref(), Some(&idx.frames));
    }

    #[test]
    fn a_damaged_or_foreign_file_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let idx = AnyIndex::Packed(index(1000, 3));
        let pack = Hash([9; 32]);
        write_loc(dir.path(), &pack, &idx).unwrap();
        let path = loc_path(dir.path(), &pack);
        let whole = std::fs::read(&path).unwrap();
        // Cut short.
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(open_loc(dir.path(), &pack).is_none());
        // Another pack's file under this pack's name.
        let other = Hash([8; 32]);
        write_loc(dir.path(), &other, &idx).unwrap();
        std::fs::copy(loc_path(dir.path(), &other), &path).unwrap();
        assert!(open_loc(dir.path(), &pack).is_none());
        // A count that does not match the size.
        let mut bad = whole.clone();
        bad[40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(open_loc(dir.path(), &pack).is_none());
        std::fs::write(&path, &whole).unwrap();
        assert!(open_loc(dir.path(), &pack).is_some());
    }
}
