//! Blob access for one version: the local store first, then the origin's packs, with every
//! blob verified against its id before it is stored or used.

use crate::error::{Error, Result};
use crate::locator::{Loc, Locator};
use crate::origins::{Holders, Origins};
use crate::progress::Progress;
use crate::store::{ChunkStore, Retain};
use crate::swarm::Swarm;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shoal_registry::pack::{AnyIndex, ExternalIndex, Frames};
use shoal_registry::{Hash, Origin, SignedVersion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Adjacent blobs closer than this are read in one ranged request.
const COALESCE_GAP: u64 = 64 << 10;
/// Upper bound on one ranged request.
const MAX_RANGE: u64 = 16 << 20;
/// Upper bound on one ranged request when several origins hold the version: reads are
/// spread over them one range at a time, and the last ones committed to an origin decide
/// when the pull ends. (Two origins behind 100 and 300 Mbit, 1 GiB: with 16 MiB ranges the
/// slower served 19% of the bytes, not its 25%, and the pull took 1.235x the combined link
/// floor.)
const MAX_RANGE_SPREAD: u64 = 4 << 20;
/// Ranged reads in flight against the origin.
const ORIGIN_CONCURRENCY: usize = 8;
/// Bytes of ranged reads held at once, from before a read until its blobs are stored, in
/// units of [`BUDGET_UNIT`]: eight reads of 16 MiB, their frames decoded and their blobs
/// compressed for the store, were most of a 10M-entry pull's peak while it read the tree's
/// levels (a 1M-entry tree is too small to fill them, so the pull's memory grew from 1M to
/// 10M). Four full ranges keep a local origin's reads and the verifying overlapped, and a
/// remote one's 64 MiB in flight (~1 GB/s at 60 ms).
const ORIGIN_BUDGET: u32 = 1024;
/// What one unit of [`ORIGIN_BUDGET`] is.
const BUDGET_UNIT: u64 = 64 << 10;
/// Raw bytes handed to the store at once: it compresses a batch whole before writing it (a
/// 16 MiB range of tree nodes given at once held ~5 MB of compressed nodes; eight ranges, 42 MB
/// of a 10M-entry pull's peak).
const STORE_BATCH: usize = 1 << 20;
/// ... and at most this many blobs (a MiB of tiny blobs is ~100,000 of them, and each batch's
/// per-blob lists of several MB, allocated and freed batch after batch, left the allocator's
/// heap fragmented: 10M-entry pull, 211 MB max RSS for a 156 MB heap peak).
const STORE_BATCH_BLOBS: usize = 4096;
/// Compressed frames kept decoded (each about [`shoal_registry::pack::FRAME_TARGET`] bytes).
const FRAMES_CACHED: usize = 16;
/// How long a mount waits for the peer that owns a run to deliver anything (while it stays
/// connected) before reading the run from the origin itself; an owner that sends nothing at
/// all in that time owns no more runs for this node. Not short: an owner is slow when the
/// origin link is busy, and reading its runs too would only make the link busier. Well under
/// the mount's read timeout (30 s by default), so a stalled owner costs a read seconds, not
/// EIO. (It was 30 s: with a stalled owner, every read of its runs waited that long and some
/// failed.)
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One ranged read: a span of a pack and the blobs inside it (id, offset, len).
#[derive(Clone)]
struct RangeRead {
    /// Whether every blob of the span read is kept, not only `blobs` (packed packs only).
    whole: bool,
    pack: u32,
    /// The source object, in an external pack (0 in a packed one).
    object: u32,
    start: u64,
    stop: u64,
    blobs: Vec<(Hash, u64, u32)>,
}

/// A blob and where it lies in its pack's raw bytes: (id, offset, len).
type Placed = (Hash, u64, u32);

/// Blobs a read keeps that were not asked for (see [`Blobs::fetch_tree`]).
type Extra = rustc_hash::FxHashSet<Hash>;

/// Blobs grouped by the mounting peer that owns their runs.
pub type ByOwner = HashMap<crate::swarm::PeerId, Vec<Hash>>;

/// Where each blob of a version lives, and how to get it.
pub struct Blobs {
    store: Arc<dyn ChunkStore>,
    origins: Arc<Origins>,
    /// The origins that hold the version.
    holders: Holders,
    /// Bytes each origin sent for this version.
    per_origin: Vec<AtomicU64>,
    /// Where each blob is, and each pack's frames (offsets in the locator are raw: frames
    /// say what to read for them), read from disk as lookups need them.
    locator: Arc<Locator>,
    /// Compressed frames decoded lately, by (pack number, raw start): a frame holds many
    /// small blobs that readers ask for a few at a time (a mount reading a directory's files
    /// one by one, a walk reading a tree level by level), and each would otherwise read and
    /// decompress the whole frame again.
    decoded: std::sync::Mutex<hashlink::LruCache<(u32, u64), Bytes>>,
    /// Bytes read from each source store of external packs, by URL.
    per_source: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Source stores of external packs, opened on first read.
    sources: std::sync::Mutex<HashMap<String, Origin>>,
    /// NAME@VERSION, for errors.
    version_name: String,
    from_origin: AtomicU64,
    durable: bool,
    retain: Retain,
    /// Whether blobs read from origins are put in the local store (not for a copy passing
    /// through this node: `replicate`).
    keep: bool,
    /// Peers to ask first for small fetches (tree nodes), with the version's root.
    peers: Option<(Arc<Swarm>, Hash)>,
    /// Ranged reads in flight against the origin, across every fetch of this version (a
    /// mount runs many fetches at once: readers, prefetch, peers' requests), so one version
    /// puts a bounded load on its origin. (On the 200 Mbit `mount-netns` link it changed
    /// neither time nor egress: the extra egress there was gap reads, not drops.)
    origin_slots: tokio::sync::Semaphore,
    /// Bytes of ranged reads held from their read until their blobs are stored (see
    /// [`ORIGIN_BUDGET`]).
    origin_budget: tokio::sync::Semaphore,
    /// Blobs closer than this are read in one ranged request, the gap included.
    coalesce_gap: u64,
}

/// Keeps a verified pack index in the local cache (an optimisation: failing to write it is not
/// an error).
fn cache_pack_index(cache: &Path, id: &Hash, bytes: &[u8]) {
    let tmp: PathBuf = cache.join(format!(".{id}.tmp"));
    if std::fs::create_dir_all(cache).is_ok() && std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, cache.join(format!("{id}.idx")));
    }
}

/// A pack index from the local cache, if it is there and intact.
fn cached_pack_index(cache: &Path, id: &Hash) -> Option<AnyIndex> {
    let bytes = std::fs::read(cache.join(format!("{id}.idx"))).ok()?;
    if !id.verify(&bytes) {
        return None;
    }
    AnyIndex::decode(&bytes).ok()
}

/// Reads a pack index from the local cache, or from `origin` (then caches it); with the
/// bytes read from the origin (0 from the cache).
///
/// Cancel-safe: an index is cached only once read whole and verified.
pub(crate) async fn pack_index(
    origin: &Origin,
    cache: &Path,
    id: &Hash,
) -> Result<(AnyIndex, u64)> {
    cached_or_read(cache, id, async { Ok(origin.pack_index(id).await?) }).await
}

/// Like [`pack_index`], from whichever origin holding the version has it.
///
/// Cancel-safe, as [`pack_index`].
pub(crate) async fn pack_index_any(
    origins: &Origins,
    holders: Holders,
    cache: &Path,
    id: &Hash,
) -> Result<(AnyIndex, u64)> {
    cached_or_read(cache, id, origins.pack_index(holders, id)).await
}

/// A pack index from the local cache, else from `read` (verified there), then cached; with
/// the bytes `read` took (0 from the cache).
///
/// Cancel-safe: an index is cached only once read whole and verified.
async fn cached_or_read(
    cache: &Path,
    id: &Hash,
    read: impl std::future::Future<Output = Result<(AnyIndex, Bytes)>>,
) -> Result<(AnyIndex, u64)> {
    let (c, i) = (cache.to_path_buf(), *id);
    if let Some(idx) = tokio::task::spawn_blocking(move || cached_pack_index(&c, &i))
        .await
        .expect("cache task panicked")
    {
        return Ok((idx, 0));
    }
    let (idx, bytes) = read.await?;
    let n = bytes.len() as u64;
    keep_pack_index(cache, id, bytes).await;
    Ok((idx, n))
}

/// Caches a verified pack index (see [`cache_pack_index`]) off the async threads.
///
/// Cancel-safe: the file is renamed into place whole, or not at all.
async fn keep_pack_index(cache: &Path, id: &Hash, bytes: bytes::Bytes) {
    let (cache, id) = (cache.to_path_buf(), *id);
    tokio::task::spawn_blocking(move || cache_pack_index(&cache, &id, &bytes))
        .await
        .expect("cache task panicked")
}

impl Blobs {
    /// Where the version's blobs are: nothing is read per pack here (see [`Locator`]); the
    /// pack indexes peers hold are fetched from them first, when this node has a swarm.
    ///
    /// Cancel-safe: it only reads (indexes it cached stay cached and valid).
    pub async fn load(
        origins: Arc<Origins>,
        holders: Holders,
        store: Arc<dyn ChunkStore>,
        cache: &Path,
        version: &SignedVersion,
        swarm: Option<&Arc<Swarm>>,
    ) -> Result<Blobs> {
        let packs = version.body.packs.clone();
        if let Some(swarm) = swarm {
            // Pack indexes are named by their hash: peers holding the version can serve them.
            let absent: Vec<Hash> = packs
                .iter()
                .filter(|id| !cache.join(format!("{id}.idx")).exists())
                .copied()
                .collect();
            if !absent.is_empty() {
                let root = &version.body.root;
                let mut got =
                    shoal_swarm::ask::from_complete_peers(swarm, root, &absent, Retain::Keep).await;
                // At a cold start nobody holds the version yet: one of the nodes pulling it
                // reads the indexes from the origin for all of them.
                let rest: Vec<Hash> = absent
                    .iter()
                    .filter(|id| !got.contains_key(id))
                    .copied()
                    .collect();
                got.extend(
                    shoal_swarm::ask::from_pulling_owner(swarm, root, &rest, Retain::Keep).await,
                );
                let cache = cache.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    for (id, bytes) in got {
                        cache_pack_index(&cache, &id, &bytes);
                    }
                })
                .await
                .expect("cache task panicked");
            }
        }
        let mut b = Blobs::over_packs(
            origins,
            holders,
            store,
            cache,
            version.body.dataset.parse()?,
            packs,
        );
        b.version_name = format!("{}@{}", version.body.dataset, version.body.version);
        b.peers = swarm.map(|s| (s.clone(), version.body.root));
        Ok(b)
    }

    /// The blobs of some packs of `dataset` (not a version's: `shoal origin repack` reading
    /// the live blobs of the packs it rewrites), from the origins in `holders` only.
    pub(crate) fn over_packs(
        origins: Arc<Origins>,
        holders: Holders,
        store: Arc<dyn ChunkStore>,
        cache: &Path,
        dataset: shoal_registry::DatasetName,
        packs: Vec<Hash>,
    ) -> Blobs {
        let version_name = format!("packs of {dataset}");
        let locator = Arc::new(Locator::new(
            origins.clone(),
            holders,
            cache,
            dataset,
            packs,
            None,
        ));
        Blobs {
            store,
            locator,
            decoded: std::sync::Mutex::new(hashlink::LruCache::new(FRAMES_CACHED)),
            per_source: Default::default(),
            sources: Default::default(),
            version_name,
            per_origin: (0..origins.len()).map(|_| AtomicU64::new(0)).collect(),
            origins,
            holders,
            from_origin: AtomicU64::new(0),
            durable: true,
            retain: Retain::Keep,
            keep: true,
            peers: None,
            origin_slots: tokio::sync::Semaphore::new(ORIGIN_CONCURRENCY),
            origin_budget: tokio::sync::Semaphore::new(ORIGIN_BUDGET as usize),
            coalesce_gap: COALESCE_GAP,
        }
    }

    /// Fills a cache instead of keeping a version: batches are not flushed one by one (a
    /// killed mount loses at most half a second of cache entries) and the store's policy may
    /// decline to keep a blob under capacity pressure.
    ///
    /// Gaps are not read over: in a mount, a gap between the blobs a read wants is a blob
    /// already local or being read by another fetch (a reader, the prefetcher, a peer's
    /// request), and reading it again only costs origin bandwidth.
    pub fn for_cache_fill(mut self) -> Blobs {
        self.durable = false;
        self.retain = Retain::Cache;
        self.coalesce_gap = 0;
        self
    }

    /// For bytes passing through this node (`replicate`): read from origins without being
    /// stored, from peers as a cache fill, without reading over gaps.
    pub fn passing_through(self) -> Blobs {
        let mut b = self.for_cache_fill();
        b.keep = false;
        b
    }

    /// Bytes read from the origins so far.
    pub fn bytes_from_origin(&self) -> u64 {
        self.from_origin.load(Ordering::Relaxed) + self.locator.index_bytes()
    }

    /// Pack bytes each origin sent so far (by origin URL; pack indexes not included), then
    /// those each source store of an in-place version sent.
    pub fn bytes_per_origin(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .per_origin
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    self.origins.get(i).url().to_string(),
                    n.load(Ordering::Relaxed),
                )
            })
            .collect();
        out.extend(
            self.per_source
                .lock()
                .expect("poisoned")
                .iter()
                .map(|(url, n)| (url.clone(), *n)),
        );
        out
    }

    /// Where a blob sits in the origin: (pack number in the version, offset).
    /// (In an external pack, the offset is the object's number in the top 24 bits above its
    /// offset in the object: an order, not a byte position.)
    ///
    /// Looks among the packs whose locators are open: see [`Self::open_all`] and
    /// [`Self::prepare`].
    pub fn locate(&self, id: &Hash) -> Option<(u32, u64)> {
        self.locator
            .find(id)
            .map(|l| (l.pack, ((l.object as u64) << 40) | l.offset))
    }

    /// Opens the locator of every pack of the version (before looking up all its blobs).
    ///
    /// Cancel-safe: it only reads, and writes locator files whole.
    pub async fn open_all(&self) -> Result<()> {
        self.locator.open_all().await
    }

    /// Opens pack locators until each of `ids` is found (or every pack's is open).
    ///
    /// Cancel-safe, as [`Self::open_all`].
    pub async fn prepare(&self, ids: &[Hash]) -> Result<()> {
        self.locator.prepare(ids).await
    }

    /// Opens the locators of the version's packs in the background while `self` lives (a
    /// mount: its reads of old packs then seldom wait for them).
    pub fn open_in_background(&self) {
        Locator::open_in_background(&self.locator)
    }

    /// Whether any of the version's packs opened so far has compressed frames.
    pub fn has_compressed(&self) -> bool {
        self.locator.has_compressed()
    }

    fn frames(&self, pack: u32) -> Option<&Arc<Frames>> {
        self.locator.pack(pack)?.frames.as_ref()
    }

    fn pack_id(&self, pack: u32) -> Hash {
        self.locator.pack_id(pack)
    }

    /// The compressed frame a blob lies in, if it does: (pack number, where the frame begins
    /// in the pack's raw bytes). Blobs of one frame are read together.
    pub fn frame_of(&self, id: &Hash) -> Option<(u32, u64)> {
        let l = self.locator.find(id)?;
        let at = self.frames(l.pack)?.compressed_at(l.offset)?;
        Some((l.pack, at))
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// One blob, from the local store or else the origin.
    ///
    /// Cancel-safe: a blob is stored only once verified.
    pub async fn get(&self, id: &Hash) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let key = *id;
        if let Some(b) = tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .expect("store task panicked")?
        {
            return Ok(b);
        }
        // The bytes come back verified whether or not the store decided to keep them.
        self.fetch_bytes(vec![key])
            .await?
            .remove(&key)
            .map(|b| b.to_vec())
            .ok_or_else(|| Error::NotFound(format!("blob {key} was not returned by the origin")))
    }

    /// Fetches the given blobs (assumed missing locally) from the origin into the local
    /// store, coalescing neighbours into large ranged reads. Cancel-safe: whatever was stored
    /// before cancellation stays stored and verified.
    pub async fn fetch(&self, ids: Vec<Hash>, progress: Option<&Progress>) -> Result<()> {
        self.fetch_spans(ids, progress, false).await
    }

    /// [`Self::fetch`] for tree nodes of a whole version read a level at a time: every blob
    /// of each packed span read from the origin is kept, not only those asked for (the next
    /// levels' nodes lie between this level's, and reading them again level by level read
    /// the tree's packs about twice). Cancel-safe, as [`Self::fetch`].
    pub async fn fetch_tree(&self, ids: Vec<Hash>) -> Result<()> {
        self.fetch_spans(ids, None, true).await
    }

    /// [`Self::fetch`], keeping every blob of the spans read with `whole`.
    ///
    /// Cancel-safe, as [`Self::fetch`].
    async fn fetch_spans(
        &self,
        mut ids: Vec<Hash>,
        progress: Option<&Progress>,
        whole: bool,
    ) -> Result<()> {
        if let Some((swarm, root)) = &self.peers {
            let got = shoal_swarm::ask::from_complete_peers(swarm, root, &ids, self.retain).await;
            ids.retain(|id| !got.contains_key(id));
            let got = shoal_swarm::ask::from_pulling_owner(swarm, root, &ids, self.retain).await;
            ids.retain(|id| !got.contains_key(id));
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.fetch_inner(ids, progress, false, whole)
            .await
            .map(|_| ())
    }

    /// Fetches blobs from the origin only.
    ///
    /// Cancel-safe, as [`Self::fetch`].
    pub async fn fetch_origin(&self, ids: Vec<Hash>, progress: Option<&Progress>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.fetch_inner(ids, progress, false, false)
            .await
            .map(|_| ())
    }

    /// Like [`Self::fetch`], and also returns the verified bytes (for a reader that needs them
    /// whether or not the store keeps them).
    ///
    /// For a mount: after peers holding the whole version, peers mounting it too are asked
    /// for the runs they own (see [`Self::split_by_owner`]); this node reads the runs it owns,
    /// and any an owner did not deliver, from the origin.
    ///
    /// Cancel-safe: what arrived before cancellation stays stored and verified; the rest is
    /// fetched again by whoever asks next.
    pub async fn fetch_bytes(&self, mut ids: Vec<Hash>) -> Result<HashMap<Hash, Bytes>> {
        let Some((swarm, root)) = &self.peers else {
            return self.fetch_inner(ids, None, true, false).await;
        };
        let mut out = shoal_swarm::ask::from_complete_peers(swarm, root, &ids, self.retain).await;
        ids.retain(|id| !out.contains_key(id));
        // Located before they are split by the owners of their runs.
        self.prepare(&ids).await?;
        if let Some((mine, others)) = self.split_by_owner(&ids) {
            let asks = others
                .into_iter()
                .map(|(peer, ids)| self.fetch_from_owner(peer, ids));
            let (asked, own) = futures::future::join(
                futures::future::join_all(asks),
                self.fetch_origin_bytes(mine),
            )
            .await;
            for got in asked {
                out.extend(got?);
            }
            out.extend(own?);
            return Ok(out);
        }
        out.extend(self.fetch_origin_bytes(ids).await?);
        Ok(out)
    }

    /// Whether a connected peer holds the whole version (then it is asked before anyone).
    pub fn complete_peer(&self) -> bool {
        self.peers.as_ref().is_some_and(|(swarm, root)| {
            !shoal_swarm::ask::peers_holding(swarm, root, crate::swarm::Holding::Complete)
                .is_empty()
        })
    }

    /// With other nodes mounting this version: `ids` split into those in runs this node owns
    /// and those of each other owner. The version's packs are cut into runs of [`shoal_sched::owners::MOUNT_RUN`]
    /// bytes, each owned by one mounting node (rendezvous hashing), which reads it from the
    /// origin for everyone. None when no other node mounts it.
    pub fn split_by_owner(&self, ids: &[Hash]) -> Option<(Vec<Hash>, ByOwner)> {
        use shoal_swarm::ask as fetch;
        let (swarm, root) = self.peers.as_ref()?;
        let nodes = fetch::mounting_nodes(swarm, root);
        if nodes.len() < 2 || ids.is_empty() {
            return None;
        }
        let mut by_owner = ByOwner::new();
        for id in ids {
            let run = self.locator.find(id).map_or(0, |l| {
                let pack = &self.pack_id(l.pack).0;
                let pack = u64::from_le_bytes(pack[..8].try_into().expect("8 bytes"));
                // A blob of a compressed frame goes with the frame's start: a frame is read
                // whole, so it belongs to one owner.
                let at = self.frame_of(id).map_or(l.offset, |f| f.1);
                shoal_sched::owners::mount_run(pack, ((l.object as u64) << 40) | at)
            });
            by_owner
                .entry(shoal_sched::owners::owner(&nodes, run))
                .or_default()
                .push(*id);
        }
        let mine = by_owner.remove(&swarm.peer_id).unwrap_or_default();
        Some((mine, by_owner))
    }

    /// Asks the mounting peer that owns their runs for `ids` (it reads them from its origin if
    /// it lacks them); reads from the origin whatever it does not deliver.
    ///
    /// Cancel-safe, as [`Self::fetch_bytes`] (a stall is counted against the owner only when
    /// its wait ran out).
    pub async fn fetch_from_owner(
        &self,
        peer: crate::swarm::PeerId,
        mut ids: Vec<Hash>,
    ) -> Result<HashMap<Hash, Bytes>> {
        let Some((swarm, root)) = &self.peers else {
            return self.fetch_origin_bytes(ids).await;
        };
        let mut got =
            shoal_swarm::ask::ask_peer(swarm, peer, &ids, Some(*root), self.retain, OWNER_WAIT)
                .await;
        if got.is_empty() && !ids.is_empty() {
            // Nothing at all within the wait: it owns no runs for this node any more (while
            // it stays connected), so later reads do not wait on it too.
            tracing::warn!(%peer, "sent none of the runs it owns for {}s; reading them from the origin, and its runs from now on are shared out among the other mounting nodes", OWNER_WAIT.as_secs());
            swarm.report(peer, shoal_swarm::Report::OwnerStall).await;
        }
        if got.len() < ids.len() {
            tracing::info!(
                %peer,
                "{} of {} chunks not delivered by the peer that owns their runs; reading them from the origin",
                ids.len() - got.len(),
                ids.len()
            );
            ids.retain(|id| !got.contains_key(id));
            got.extend(self.fetch_origin_bytes(ids).await?);
        }
        Ok(got)
    }

    /// Fetches blobs from the origin only, returning their verified bytes.
    ///
    /// Cancel-safe, as [`Self::fetch`].
    pub async fn fetch_origin_bytes(&self, ids: Vec<Hash>) -> Result<HashMap<Hash, Bytes>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.fetch_inner(ids, None, true, false).await
    }

    /// The swarm and version root this version's fetches consult, if any.
    pub fn swarm(&self) -> Option<&(Arc<Swarm>, Hash)> {
        self.peers.as_ref()
    }

    /// Ranged reads from the origins (or, for an in-place version, from its source objects),
    /// verified and stored batch by batch; read again where a pack turned out to be gone
    /// because it was repacked (its blobs are then looked up where its record says).
    /// Cancel-safe: what was stored stays stored and verified.
    async fn fetch_inner(
        &self,
        ids: Vec<Hash>,
        progress: Option<&Progress>,
        want: bool,
        whole: bool,
    ) -> Result<HashMap<Hash, Bytes>> {
        let mut attempts = 0;
        loop {
            let retired = self.locator.retirements();
            match self.fetch_once(ids.clone(), progress, want, whole).await {
                Err(e) if e.is_gone() && attempts < 4 && self.locator.retirements() > retired => {
                    attempts += 1;
                    tracing::debug!("{e}; reading again where the repacked pack's blobs went");
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`Self::fetch_inner`].
    ///
    /// Cancel-safe, as [`Self::fetch_inner`].
    async fn fetch_once(
        &self,
        mut ids: Vec<Hash>,
        progress: Option<&Progress>,
        want: bool,
        whole: bool,
    ) -> Result<HashMap<Hash, Bytes>> {
        ids.sort_unstable();
        ids.dedup();
        self.locator.prepare(&ids).await?;
        let mut wanted: Vec<(Loc, Hash)> = Vec::with_capacity(ids.len());
        for id in ids {
            let loc = self.locator.find(&id).ok_or_else(|| Error::Corrupt {
                what: format!("version in origin {}", self.origins.urls()),
                reason: format!("blob {id} is in none of the version's packs"),
            })?;
            wanted.push((loc, id));
        }
        // Blobs of compressed frames decoded lately are taken from there.
        let mut cached: HashMap<(u32, u64), (Bytes, Vec<Placed>)> = HashMap::new();
        if self.locator.has_compressed() {
            let mut decoded = self.decoded.lock().expect("poisoned");
            wanted.retain(|(l, id)| {
                let Some(at) = self.frames(l.pack).and_then(|f| f.compressed_at(l.offset)) else {
                    return true;
                };
                let Some(frame) = decoded.get(&(l.pack, at)) else {
                    return true;
                };
                cached
                    .entry((l.pack, at))
                    .or_insert_with(|| (frame.clone(), Vec::new()))
                    .1
                    .push((*id, l.offset, l.len));
                false
            });
        }
        wanted.sort_unstable_by_key(|(l, _)| (l.pack, l.object, l.offset));
        let max_range = if self.holders.0.count_ones() > 1 {
            MAX_RANGE_SPREAD
        } else {
            MAX_RANGE
        };
        // Group into ranges.
        let mut ranges: Vec<RangeRead> = Vec::new();
        for (loc, id) in wanted {
            // In a compressed frame, what is read is the whole frame: blobs sharing one are
            // read together, whatever the gap between them.
            let (start, end) = match self.frames(loc.pack) {
                Some(f) => {
                    let span = f.span(loc.offset..loc.offset + loc.len as u64);
                    (span.raw.start, span.raw.end)
                }
                None => (loc.offset, loc.offset + loc.len as u64),
            };
            match ranges.last_mut() {
                Some(r)
                    if r.pack == loc.pack
                        && r.object == loc.object
                        && (start < r.stop
                            || (start - r.stop <= self.coalesce_gap
                                && end - r.start <= max_range)) =>
                {
                    r.stop = r.stop.max(end);
                    r.blobs.push((id, loc.offset, loc.len));
                }
                _ => ranges.push(RangeRead {
                    whole,
                    pack: loc.pack,
                    object: loc.object,
                    start,
                    stop: end,
                    blobs: vec![(id, loc.offset, loc.len)],
                }),
            }
        }
        let from_cache =
            futures::stream::iter(cached).map(|((pack, at), (frame, blobs))| async move {
                let label = format!("a decoded frame of pack {}", self.pack_id(pack));
                let kept = self
                    .keep_range(
                        frame,
                        at,
                        blobs,
                        Extra::default(),
                        want,
                        label,
                        "it was damaged in memory",
                    )
                    .await;
                if kept.is_err() {
                    self.decoded.lock().expect("poisoned").remove(&(pack, at));
                }
                let (stored, got) = kept?;
                if let Some(p) = progress {
                    p.add(stored);
                }
                Ok::<_, Error>(got)
            });
        futures::stream::iter(ranges)
            .map(|r| async move {
                let external = self
                    .locator
                    .pack(r.pack)
                    .and_then(|p| Some((p.external.clone()?, p.copies.clone())));
                let (stored, got) = match external {
                    Some((x, copies)) => self.external_range(&x, copies, r, want).await?,
                    None => self.packed_range(r, want).await?,
                };
                if let Some(p) = progress {
                    p.add(stored);
                }
                Ok(got)
            })
            .buffer_unordered(ORIGIN_CONCURRENCY)
            .chain(from_cache.buffer_unordered(2))
            .try_collect::<Vec<Vec<(Hash, Bytes)>>>()
            .await
            .map(|v| v.into_iter().flatten().collect())
    }

    /// One range of a pack, from the origins holding the version: one whose bytes do not
    /// verify is left out (for this range, and backed off for later reads) and the range read
    /// from another.
    ///
    /// Cancel-safe, as [`Self::fetch_inner`].
    async fn packed_range(&self, r: RangeRead, want: bool) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        self.pack_range(self.holders, 0, r, want).await
    }

    /// [`Self::packed_range`] from the origins in `holders`, of a pack whose bytes for the
    /// range start `shift` bytes later than the range's offsets say (the start of the source
    /// object in a copy of an external pack; 0 in a packed one).
    ///
    /// Cancel-safe, as [`Self::fetch_inner`].
    async fn pack_range(
        &self,
        mut holders: Holders,
        shift: u64,
        r: RangeRead,
        want: bool,
    ) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        let pack_id = self.pack_id(r.pack);
        // A pack with compressed frames: whole frames are read and decompressed.
        let frames = self.frames(r.pack).filter(|_| shift == 0);
        let span = frames.map(|f| f.span(r.start..r.stop));
        let (stored, start) = match &span {
            Some(s) => (s.stored.clone(), s.raw.start),
            None => (shift + r.start..shift + r.stop, r.start),
        };
        let _budget = self.budget(stored.end - stored.start).await;
        loop {
            let slot = self.origin_slots.acquire().await.expect("never closed");
            let read = self
                .origins
                .read_pack(holders, &pack_id, stored.clone())
                .await;
            drop(slot);
            let (data, from) = match read {
                Ok(got) => got,
                Err(e) if e.is_gone() && shift == 0 => {
                    // Repacked and retired since its index was read: the caller reads again
                    // where the record says its blobs went.
                    let _ = self.locator.retire(r.pack).await;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            self.count_origin_bytes(data.len() as u64);
            self.per_origin[from].fetch_add(data.len() as u64, Ordering::Relaxed);
            let origin = self.origins.get(from);
            let label = format!(
                "pack {} in origin {}",
                origin.pack_path(&pack_id),
                origin.url()
            );
            let why = "the origin's copy is damaged or was tampered with";
            let raw = span.as_ref().map_or(r.start..r.stop, |s| s.raw.clone());
            let (blobs, extra) = if r.whole && shift == 0 {
                self.span_blobs(r.pack, raw, &r.blobs).await
            } else {
                (r.blobs.clone(), Extra::default())
            };
            let kept = match (frames, &span) {
                (Some(f), Some(span)) if !f.is_plain() => {
                    self.keep_frames(f, span, data, r.pack, blobs, extra, want, label, why)
                        .await
                }
                _ => {
                    self.keep_range(data, start, blobs, extra, want, label, why)
                        .await
                }
            };
            match kept {
                Err(e @ Error::Corrupt { .. }) => {
                    self.origins.blame(from);
                    holders.0 &= !(1 << from);
                    if holders.0 == 0 {
                        return Err(e);
                    }
                    tracing::warn!("{e}; reading the range from another origin");
                }
                other => return other,
            }
        }
    }

    /// One range of a source object of an in-place version, read where the data lives, and
    /// refused (naming the object and the version) if the object changed since it was
    /// published.
    ///
    /// Cancel-safe, as [`Self::fetch_inner`].
    async fn external_range(
        &self,
        x: &ExternalIndex,
        copies: Option<(Holders, Arc<Vec<u64>>)>,
        r: RangeRead,
        want: bool,
    ) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        if let Some((copies, starts)) = copies {
            let shift = starts[r.object as usize];
            match self.pack_range(copies, shift, r.clone(), want).await {
                Ok(got) => return Ok(got),
                Err(e) => tracing::warn!("{e}; reading the range from its source object"),
            }
        }
        let object = &x.objects[r.object as usize];
        let source = self.source(&x.source)?;
        let at = format!("{}/{}", x.source.trim_end_matches('/'), object.key);
        let changed = || Error::Corrupt {
            what: format!("source object {at} of {}", self.version_name),
            reason: "it changed since the version was published (its ETag or size differs); \
                     publish a new version, or restore the object"
                .into(),
        };
        let _budget = self.budget(r.stop - r.start).await;
        let slot = self.origin_slots.acquire().await.expect("never closed");
        self.origins.throttle(r.stop - r.start).await;
        let data = match source
            .read_object(&object.key, r.start..r.stop, object.e_tag.as_deref())
            .await
        {
            Ok(d) => d,
            Err(shoal_registry::OriginError::Changed { .. }) => return Err(changed()),
            Err(e) => return Err(e.into()),
        };
        drop(slot);
        self.count_origin_bytes(data.len() as u64);
        *self
            .per_source
            .lock()
            .expect("poisoned")
            .entry(x.source.clone())
            .or_default() += data.len() as u64;
        if data.len() as u64 != r.stop - r.start {
            return Err(changed());
        }
        self.keep_range(
            data,
            r.start,
            r.blobs,
            Extra::default(),
            want,
            format!("source object {at} of {}", self.version_name),
            "the object changed since the version was published",
        )
        .await
        .map_err(|e| match e {
            Error::Corrupt { .. } => changed(),
            e => e,
        })
    }

    /// Bytes of pack `pack` as the origins holding the version store them (`range` in the pack
    /// object, not raw offsets), unverified: the caller checks them.
    ///
    /// Cancel-safe: it only reads.
    pub async fn read_stored(&self, pack: &Hash, range: std::ops::Range<u64>) -> Result<Bytes> {
        let slot = self.origin_slots.acquire().await.expect("never closed");
        let (data, from) = self.origins.read_pack(self.holders, pack, range).await?;
        drop(slot);
        self.count_origin_bytes(data.len() as u64);
        self.per_origin[from].fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// A source store of an in-place version, opened once.
    fn source(&self, url: &str) -> Result<Origin> {
        let mut sources = self.sources.lock().expect("sources poisoned");
        if let Some(o) = sources.get(url) {
            return Ok(o.clone());
        }
        let o = Origin::open(url, false)?;
        sources.insert(url.to_string(), o.clone());
        Ok(o)
    }

    fn count_origin_bytes(&self, n: u64) {
        self.from_origin.fetch_add(n, Ordering::Relaxed);
        if let Some((swarm, _)) = &self.peers {
            // What the origin sent, gaps between wanted blobs included.
            swarm
                .counters
                .bytes_from_origin
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Room for a ranged read of `len` bytes in [`ORIGIN_BUDGET`], held until dropped. (A
    /// task holds one at a time: none is taken while another is held.)
    ///
    /// Cancel-safe: waiting takes nothing.
    async fn budget(&self, len: u64) -> tokio::sync::SemaphorePermit<'_> {
        let units = len.div_ceil(BUDGET_UNIT).clamp(1, u64::from(ORIGIN_BUDGET)) as u32;
        self.origin_budget
            .acquire_many(units)
            .await
            .expect("never closed")
    }

    /// `asked` and every other blob lying wholly within raw bytes `raw` of packed pack
    /// `pack`, in pack order (just `asked` if the locator cannot say).
    ///
    /// Cancel-safe: it only reads.
    async fn span_blobs(
        &self,
        pack: u32,
        raw: std::ops::Range<u64>,
        asked: &[Placed],
    ) -> (Vec<Placed>, Extra) {
        let locator = self.locator.clone();
        let mut all = asked.to_vec();
        let mut extra = Extra::default();
        let found = tokio::task::spawn_blocking(move || {
            locator.pack(pack).map(|p| p.within(raw)).transpose()
        })
        .await
        .expect("locator task panicked");
        match found {
            Ok(Some(within)) => {
                let asked: Extra = asked.iter().map(|b| b.0).collect();
                for b in within {
                    if !asked.contains(&b.0) && extra.insert(b.0) {
                        all.push(b);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("the blobs of a span of pack {}: {e}", self.pack_id(pack)),
        }
        (all, extra)
    }

    /// What keeps the blobs read, away from the async side.
    fn keeper(&self) -> Keeper {
        Keeper {
            store: self.store.clone(),
            durable: self.durable,
            retain: self.retain,
            keep: self.keep,
        }
    }

    /// [`Keeper::keep`] on a blocking thread.
    ///
    /// Cancel-safe: a blob is stored only once verified.
    #[allow(clippy::too_many_arguments)]
    async fn keep_range(
        &self,
        data: Bytes,
        start: u64,
        blobs: Vec<Placed>,
        extra: Extra,
        want: bool,
        label: String,
        why: &'static str,
    ) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        let keeper = self.keeper();
        tokio::task::spawn_blocking(move || {
            keeper.keep(&data, start, &blobs, &extra, want, &label, why)
        })
        .await
        .expect("verify task panicked")
    }

    /// [`Keeper::keep`] of `blobs` (and `extra`), read from pack `pack`, which has compressed
    /// frames: `data` (the pack object's bytes at `span.stored`) decoded and kept a frame at a
    /// time on a blocking
    /// thread: a read of 16 MiB of raw bytes holds one frame decoded, not all of them (eight
    /// reads decoded whole were 110 MB of a 10M-entry pull's peak). The first and last
    /// compressed frames, which may hold blobs other fetches want, are kept decoded once
    /// every blob of the range verified (a frame is its own buffer: nothing is copied).
    ///
    /// Cancel-safe: a blob is stored only once verified.
    #[allow(clippy::too_many_arguments)]
    async fn keep_frames(
        &self,
        frames: &Arc<Frames>,
        span: &shoal_registry::pack::Span,
        data: Bytes,
        pack: u32,
        mut blobs: Vec<Placed>,
        extra: Extra,
        want: bool,
        label: String,
        why: &'static str,
    ) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        let keeper = self.keeper();
        let (frames, span) = (frames.clone(), span.clone());
        let (kept, edges) = tokio::task::spawn_blocking(move || {
            blobs.sort_unstable_by_key(|b| b.1);
            let corrupt = |e: shoal_registry::pack::FrameError| Error::Corrupt {
                what: label.clone(),
                reason: format!("{e}; {why}"),
            };
            let pieces = match frames.pieces(&span, data) {
                Ok(p) => p,
                Err(e) => return (Err(corrupt(e)), Vec::new()),
            };
            let (mut stored, mut got, mut bad, mut edges) = (0, Vec::new(), None, Vec::new());
            let mut rest = &blobs[..];
            for piece in pieces {
                let piece = match piece {
                    Ok(p) => p,
                    Err(e) => return (Err(bad.unwrap_or(corrupt(e))), Vec::new()),
                };
                let end = piece.at + piece.bytes.len() as u64;
                let (mine, later) = rest.split_at(rest.partition_point(|b| b.1 < end));
                rest = later;
                if piece.compressed && piece.edge {
                    edges.push((piece.at, piece.bytes.clone()));
                }
                if mine.is_empty() {
                    continue;
                }
                match keeper.keep(&piece.bytes, piece.at, mine, &extra, want, &label, why) {
                    Ok((n, g)) => {
                        stored += n;
                        got.extend(g);
                    }
                    Err(e) => {
                        bad.get_or_insert(e);
                    }
                }
            }
            match bad {
                Some(e) => (Err(e), Vec::new()),
                None => (Ok((stored, got)), edges),
            }
        })
        .await
        .expect("verify task panicked");
        if !edges.is_empty() {
            let mut cache = self.decoded.lock().expect("poisoned");
            for (at, frame) in edges {
                cache.insert((pack, at), frame);
            }
        }
        kept
    }
}

/// Verifies and stores blobs read from origins (see [`Keeper::keep`]).
struct Keeper {
    store: Arc<dyn ChunkStore>,
    durable: bool,
    retain: Retain,
    keep: bool,
}

impl Keeper {
    /// Verifies the blobs of a range read (`data`, starting at raw offset `start`) and
    /// stores the good ones (unless passing through); returns the bytes stored and (with
    /// `want`) the blobs. A blob that does not match its id is an error naming it (`label`,
    /// and `why` it would not match), after the good ones were kept, so a retry fetches only
    /// the bad ones. Blobs in `extra` were not asked for (they lay in the span read): stored
    /// if they verify, passed over if not, neither counted nor returned.
    #[allow(clippy::too_many_arguments)]
    fn keep(
        &self,
        data: &Bytes,
        start: u64,
        blobs: &[Placed],
        extra: &Extra,
        want: bool,
        label: &str,
        why: &str,
    ) -> Result<(u64, Vec<(Hash, Bytes)>)> {
        let mut batch = Vec::with_capacity(blobs.len());
        // (Collected as verified: looking each asked blob up in `batch` afterwards was
        // quadratic in a range's blobs, ~100,000 tiny ones in 16 MiB.)
        let mut got = Vec::new();
        let mut n = 0;
        let mut bad = None;
        for (id, off, len) in blobs {
            let rel = (off - start) as usize;
            let bytes = &data[rel..rel + *len as usize];
            let asked = !extra.contains(id);
            if !id.verify(bytes) {
                if !asked {
                    tracing::debug!(what = %label, %id, "a blob read beside those asked for does not match its id");
                    continue;
                }
                bad.get_or_insert(Error::Corrupt {
                    what: format!("blob {id} in {label} at offset {off}"),
                    reason: format!("its bytes do not match its id; {why}"),
                });
                continue;
            }
            batch.push((*id, bytes));
            if asked {
                n += *len as u64;
                if want {
                    got.push((*id, data.slice(rel..rel + *len as usize)));
                }
            }
        }
        if self.keep {
            // A few at a time: the store compresses a batch before it writes any of it.
            let mut from = 0;
            while from < batch.len() {
                let mut to = from;
                let mut bytes = 0;
                while to < batch.len()
                    && (to == from
                        || (bytes + batch[to].1.len() <= STORE_BATCH
                            && to - from < STORE_BATCH_BLOBS))
                {
                    bytes += batch[to].1.len();
                    to += 1;
                }
                self.store.put_batch(&batch[from..to], self.retain)?;
                from = to;
            }
            if self.durable {
                self.store.flush()?;
            }
        }
        let stop = start + data.len() as u64;
        tracing::debug!(what = %label, start, stop, blobs = batch.len(), durable = self.durable, "origin range stored");
        match bad {
            Some(e) => Err(e),
            None => Ok((n, got)),
        }
    }
}
