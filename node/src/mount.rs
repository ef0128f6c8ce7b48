//! What a FUSE mount reads through: the local store first, then the origin, every blob
//! verified, every wait bounded.

use crate::blobs::Blobs;
use crate::error::{Error, Result};
use crate::walk::load_dir;
use crate::Node;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use serde::{Deserialize, Serialize};
use shoal_fuse::{Source, SourceError};
use shoal_registry::tree::{ChunkList, ChunkRef, Dir, EntryKind, FileContent};
use shoal_registry::{DatasetRef, Hash};
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// A fetch under way, shared by every reader waiting for one of its blobs; yields the bytes.
type Fetch = Shared<BoxFuture<'static, Result<Arc<HashMap<Hash, Bytes>>, Arc<String>>>>;
/// How the in-flight table refers to a fetch: only its waiters keep it alive, so a fetch
/// every waiter gave up on (a read past its timeout, say, with the origin down and the HTTP
/// client backing off) is dropped rather than joined later, stale, by the next reader.
type WeakFetch = WeakShared<BoxFuture<'static, Result<Arc<HashMap<Hash, Bytes>>, Arc<String>>>>;

/// A read order and the reader's position in it (index of the file it opened last).
#[derive(Default)]
struct ReadOrder {
    index: HashMap<String, usize>,
    cursor: usize,
}

/// Where a batch of a mount's reads comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The origin only.
    Origin,
    /// Peers holding the whole version first, then owners, then the origin.
    Any,
    /// The mounting peer that owns the batch's runs (the origin for what it does not deliver).
    Owner(crate::swarm::PeerId),
}

/// Fetches under way: origin reads (which a peer's request may join) and reads that wait on
/// other peers (which it may not).
#[derive(Default)]
struct Inflight {
    origin: HashMap<Hash, WeakFetch>,
    remote: HashMap<Hash, WeakFetch>,
}

/// Blob access for a mount: bounded waits, de-duplicated fetches, background prefetch.
#[derive(Clone)]
pub struct MountSource {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: Arc<Blobs>,
    whole_files: Option<Arc<crate::wholefiles::WholeFiles>>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    inflight: Mutex<Inflight>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Where the reader is in a `--read-order` list.
    order: Mutex<ReadOrder>,
    order_moved: tokio::sync::Notify,
    what: String,
    /// The version is in use while this source lives (the cache's TTL spares it).
    _in_use: crate::expiry::InUse,
}

impl Inner {
    /// Fetches the blobs not yet local, joining fetches already under way for any of them;
    /// returns the verified bytes of what it fetched or joined (the store may not keep them
    /// all under capacity pressure).
    ///
    /// Cancel-safe: the in-flight table holds weak references, so a fetch nobody waits for any
    /// more is dropped, never left stale; what it stored stays verified.
    async fn fetch(self: &Arc<Self>, ids: Vec<Hash>) -> Result<HashMap<Hash, Bytes>, Arc<String>> {
        self.fetch_from(ids, false).await
    }

    /// [`Self::fetch`]; with `for_peer` (a peer asked this node, as owner of their runs, to
    /// read them) from the origin only, joining only origin reads under way: a read that
    /// waits on other peers is never joined, so two owners can never wait on each other.
    ///
    /// Cancel-safe, as [`Self::fetch`].
    async fn fetch_from(
        self: &Arc<Self>,
        ids: Vec<Hash>,
        for_peer: bool,
    ) -> Result<HashMap<Hash, Bytes>, Arc<String>> {
        let store = self.blobs.store().clone();
        let missing: Vec<Hash> = {
            let ids = ids.clone();
            tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .filter(|id| !store.contains(id).unwrap_or(false))
                    .collect()
            })
            .await
            .map_err(|e| Arc::new(e.to_string()))?
        };
        let mut got = HashMap::new();
        if missing.is_empty() {
            return Ok(got);
        }
        // Located before `start` splits them by the owners of their runs.
        self.blobs
            .prepare(&missing)
            .await
            .map_err(|e| Arc::new(e.to_string()))?;
        let waits = self.start(&missing, for_peer);
        let missing: std::collections::HashSet<Hash> = missing.into_iter().collect();
        for w in futures::future::join_all(waits).await {
            for (id, b) in w?.iter() {
                if missing.contains(id) {
                    got.insert(*id, b.clone());
                }
            }
        }
        Ok(got)
    }

    /// The fetches that bring `missing` (blobs not local): those under way that it may join
    /// (see [`Self::fetch_from`]), and new ones for the rest, entered in the in-flight table
    /// before it returns, so that a reader coming next joins them rather than fetching the
    /// same blobs again in small pieces. Never blocks; a fetch runs once someone awaits it.
    fn start(self: &Arc<Self>, missing: &[Hash], for_peer: bool) -> Vec<Fetch> {
        let mut waits = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("inflight poisoned");
            let mut new = Vec::new();
            for id in missing {
                let alive = |m: &HashMap<Hash, WeakFetch>| m.get(id).and_then(WeakShared::upgrade);
                let under_way = match alive(&inflight.origin) {
                    Some(f) => Some(f),
                    None if !for_peer => alive(&inflight.remote),
                    None => None,
                };
                match under_way {
                    Some(f) => waits.push(f),
                    None => new.push(*id),
                }
            }
            if !new.is_empty() {
                let parts: Vec<(Via, Vec<Hash>)> = if for_peer {
                    vec![(Via::Origin, new)]
                } else if self.blobs.complete_peer() {
                    vec![(Via::Any, new)]
                } else {
                    match self.blobs.split_by_owner(&new) {
                        None => vec![(Via::Origin, new)],
                        Some((mine, others)) => std::iter::once((Via::Origin, mine))
                            .chain(others.into_iter().map(|(p, ids)| (Via::Owner(p), ids)))
                            .filter(|(_, ids)| !ids.is_empty())
                            .collect(),
                    }
                };
                tracing::debug!(
                    new = parts.iter().map(|p| p.1.len()).sum::<usize>(),
                    for_peer,
                    parts = parts.len(),
                    "fetching for the mount"
                );
                for (via, batch) in parts {
                    let me = self.clone();
                    let ids = batch.clone();
                    let remote = via != Via::Origin;
                    let fut: Fetch = async move {
                        let r = match via {
                            Via::Origin => me.blobs.fetch_origin_bytes(ids.clone()).await,
                            Via::Any => me.blobs.fetch_bytes(ids.clone()).await,
                            Via::Owner(peer) => me.blobs.fetch_from_owner(peer, ids.clone()).await,
                        };
                        let r = r.map(Arc::new).map_err(|e| Arc::new(e.to_string()));
                        let mut inflight = me.inflight.lock().expect("inflight poisoned");
                        let map = if remote {
                            &mut inflight.remote
                        } else {
                            &mut inflight.origin
                        };
                        for id in &ids {
                            map.remove(id);
                        }
                        r
                    }
                    .boxed()
                    .shared();
                    let map = if remote {
                        &mut inflight.remote
                    } else {
                        &mut inflight.origin
                    };
                    let weak = fut.downgrade().expect("not yet polled");
                    for id in &batch {
                        map.insert(*id, weak.clone());
                    }
                    waits.push(fut);
                }
            }
        }
        waits
    }

    /// Fetches `ids`, retrying failed attempts (a peer may come back, an origin recover)
    /// until the mount's timeout; then fails with the last reason.
    fn block_on_fetch(
        self: &Arc<Self>,
        ids: Vec<Hash>,
        what: impl FnOnce() -> String,
    ) -> Result<HashMap<Hash, Bytes>, SourceError> {
        let me = self.clone();
        let timeout = self.timeout;
        let r = self.rt.block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut pause = Duration::from_millis(100);
            let mut last = None;
            loop {
                match tokio::time::timeout_at(deadline, me.fetch(ids.clone())).await {
                    Ok(Ok(got)) => return Ok(got),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "fetch for a reader failed; retrying");
                        last = Some(e);
                    }
                    Err(_) => return Err(last),
                }
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(last);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
        r.map_err(|last| {
            SourceError(match last {
                Some(e) => format!(
                    "{} of {}: not available within {}s; last attempt: {e}",
                    what(),
                    self.what,
                    timeout.as_secs()
                ),
                None => format!(
                    "{} of {}: not available within {}s",
                    what(),
                    self.what,
                    timeout.as_secs()
                ),
            })
        })
    }

    /// Whether the store holds `id` (its index is in memory: never blocks on I/O).
    fn is_local(&self, id: &Hash) -> bool {
        self.blobs.store().contains(id).unwrap_or(false)
    }

    /// A local chunk, verified; None when it is not local, or was and failed verification
    /// (the store drops it: the caller fetches it again, and the reader never sees the error).
    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, SourceError> {
        match self.blobs.store().get(id) {
            Ok(b) => Ok(b),
            Err(e @ shoal_store::StoreError::Corrupt { .. }) => {
                tracing::warn!("{e}");
                Ok(None)
            }
            Err(e) => Err(SourceError(e.to_string())),
        }
    }

    /// Blobs `ids`, in order: the local ones from the store, the others in one fetch.
    fn blobs(self: &Arc<Self>, ids: &[Hash], what: &str) -> Result<Vec<Vec<u8>>, SourceError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            let b = self.get(id)?;
            if b.is_none() {
                missing.push(*id);
            }
            out.push(b);
        }
        let mut got = if missing.is_empty() {
            HashMap::new()
        } else {
            let n = missing.len();
            self.block_on_fetch(missing, || format!("{n} {what}s"))?
        };
        ids.iter()
            .zip(out)
            .map(|(id, b)| match b {
                Some(b) => Ok(b),
                None => match got.remove(id) {
                    Some(b) => Ok(b.to_vec()),
                    None => self.get(id)?.ok_or_else(|| {
                        SourceError(format!("{what} {id} vanished from the local store"))
                    }),
                },
            })
            .collect()
    }

    fn blob(self: &Arc<Self>, id: &Hash, what: &str) -> Result<Vec<u8>, SourceError> {
        if let Some(b) = self.get(id)? {
            return Ok(b);
        }
        let mut got = self.block_on_fetch(vec![*id], || format!("{what} {id}"))?;
        match got.remove(id) {
            Some(b) => Ok(b.to_vec()),
            None => self
                .get(id)?
                .ok_or_else(|| SourceError(format!("{what} {id} vanished from the local store"))),
        }
    }
}

/// What a mount fetches for the peers mounting the same version.
struct ForPeers(Arc<Inner>);

impl crate::swarm::Through for ForPeers {
    fn fetch_for_peer(
        &self,
        ids: Vec<Hash>,
    ) -> BoxFuture<'static, std::result::Result<HashMap<Hash, Bytes>, String>> {
        let inner = self.0.clone();
        async move {
            let mut got = inner
                .fetch_from(ids.clone(), true)
                .await
                .map_err(|e| e.to_string())?;
            // Fetched meanwhile by a reader here: from the store.
            let store = inner.blobs.store().clone();
            let rest: Vec<Hash> = ids.into_iter().filter(|id| !got.contains_key(id)).collect();
            let local = tokio::task::spawn_blocking(move || {
                rest.into_iter()
                    .filter_map(|id| Some((id, Bytes::from(store.get(&id).ok()??))))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| e.to_string())?;
            got.extend(local);
            Ok(got)
        }
        .boxed()
    }
}

impl MountSource {
    /// Where a local chunk's bytes lie in the store's files (see
    /// [`shoal_store::ChunkStore::locate`]); None when it is not in the primary disk tier.
    pub fn locate(&self, id: &Hash) -> Option<shoal_store::Located> {
        self.inner.blobs.store().locate(id).ok().flatten()
    }

    /// Blobs that left the local store for good since it was opened (see
    /// [`shoal_store::ChunkStore::losses`]): what was located before may have moved.
    pub fn losses(&self) -> u64 {
        self.inner.blobs.store().losses()
    }

    /// Announces the mount to the swarm (if this node has one) and reads from the origin, for
    /// the other nodes mounting the version, the runs this node owns; until dropped.
    pub fn announce(&self) -> Option<crate::swarm::Mounted> {
        let (swarm, root) = self.inner.blobs.swarm()?;
        Some(swarm.mount(*root, Arc::new(ForPeers(self.inner.clone()))))
    }
}

impl Source for MountSource {
    fn dir(&self, id: &Hash) -> Result<Arc<Dir>, SourceError> {
        // A level of the directory's nodes at a time, each level in one fetch.
        match shoal_registry::dirs::load(*id, |ids| self.inner.blobs(ids, "directory node"))? {
            Ok(dir) => Ok(Arc::new(dir)),
            Err((node, e)) => Err(SourceError(format!(
                "directory node {node} (of directory {id}): {e}"
            ))),
        }
    }

    fn chunks(&self, content: &FileContent) -> Result<Arc<Vec<ChunkRef>>, SourceError> {
        match content {
            FileContent::Chunks(c) => Ok(Arc::new(c.clone())),
            FileContent::Lists(lists) => {
                let mut out = Vec::new();
                for r in lists {
                    let bytes = self.inner.blob(&r.id, "chunk list")?;
                    let list = ChunkList::decode(&bytes, r)
                        .map_err(|e| SourceError(format!("chunk list {}: {e}", r.id)))?;
                    out.extend(list.chunks);
                }
                Ok(Arc::new(out))
            }
        }
    }

    fn read(&self, chunks: &[ChunkRef]) -> Result<Vec<Bytes>, SourceError> {
        let mut out: Vec<Option<Bytes>> = Vec::with_capacity(chunks.len());
        let mut missing = Vec::new();
        for c in chunks {
            let b = self.inner.get(&c.id)?;
            if b.is_none() {
                missing.push(c.id);
            }
            out.push(b.map(Bytes::from));
        }
        if !missing.is_empty() {
            tracing::debug!(
                chunks = missing.len(),
                of = chunks.len(),
                "a read waits for chunks not local"
            );
            let first = missing[0];
            let mut got = self
                .inner
                .block_on_fetch(missing, || format!("chunk {first}"))?;
            for (slot, c) in out.iter_mut().zip(chunks) {
                if slot.is_none() {
                    *slot = Some(match got.remove(&c.id) {
                        Some(b) => b,
                        // Fetched by someone else in the meantime, and kept by the store.
                        None => Bytes::from(self.inner.get(&c.id)?.ok_or_else(|| {
                            SourceError(format!("chunk {} vanished from the local store", c.id))
                        })?),
                    });
                }
            }
        }
        Ok(out.into_iter().map(|b| b.expect("filled above")).collect())
    }

    fn opened(&self, path: &str) {
        let mut order = self.inner.order.lock().expect("read order poisoned");
        if let Some(&i) = order.index.get(path) {
            order.cursor = i;
            drop(order);
            self.inner.order_moved.notify_waiters();
        }
    }

    fn is_local(&self, chunks: &[ChunkRef]) -> bool {
        chunks.iter().all(|c| self.inner.is_local(&c.id))
    }

    fn whole_file(&self, chunks: &[ChunkRef], size: u64) -> Option<std::fs::File> {
        self.inner.whole_files.as_ref()?.get(chunks, size)
    }

    fn keep_whole_file(&self, chunks: Arc<Vec<ChunkRef>>, size: u64) {
        let Some(files) = &self.inner.whole_files else {
            return;
        };
        let inner = self.inner.clone();
        files.keep(
            chunks,
            size,
            Arc::new(move |id| inner.get(id).map_err(|e| e.0)),
        );
    }

    fn prefetch(&self, chunks: Vec<ChunkRef>) {
        // The store's index is in memory: what is local is known here, without handing
        // anything to the runtime (two thread hand-offs per small file opened, which were
        // most of a warm small-file read's time).
        let missing: Vec<Hash> = chunks
            .iter()
            .map(|c| c.id)
            .filter(|id| !self.inner.is_local(id))
            .collect();
        if missing.is_empty() {
            return;
        }
        // Entered in the in-flight table now, not once the task below has a slot: a reader
        // reaching these chunks meanwhile joins this fetch (whole runs, one ranged read each)
        // rather than fetching the chunks of each kernel read on its own (tried: 97% of the
        // origin's requests were then of one to three chunks, and 4 mounting nodes read a
        // version 13% slower than the link allows).
        let waits = self.inner.start(&missing, false);
        tracing::debug!(chunks = missing.len(), fetches = waits.len(), "prefetching");
        let slots = self.inner.prefetch_slots.clone();
        self.inner.rt.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            for r in futures::future::join_all(waits).await {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "prefetch failed; readers will retry");
                }
            }
        });
    }
}

/// What to fetch ahead of readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prefetch {
    /// Only what readers ask for (and small files whole on open).
    None,
    /// Ahead of sequential readers.
    Sequential,
    /// The whole version, in the background.
    All,
}

/// Whether large files are read by the kernel from whole-file copies (FUSE passthrough).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Passthrough {
    /// When the version's files average more than the small-file size: taking part in opens
    /// (which passthrough needs) costs a version of small files more than it gains.
    #[default]
    Auto,
    On,
    Off,
}

impl MountSpec {
    /// How far a read order is fetched ahead of the reader unless asked otherwise (as
    /// `shoal mount --read-ahead`'s default).
    pub const DEFAULT_READ_AHEAD: u64 = 512 << 20;
    /// Seconds a read waits for a missing chunk unless asked otherwise (`--timeout`).
    pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
    /// FUSE worker threads unless asked otherwise (`--threads`).
    pub const DEFAULT_THREADS: usize = 2;
}

/// How to mount a version: what `shoal mount` asks for, in-process or of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountSpec {
    /// An existing directory (absolute when sent to a daemon).
    pub mountpoint: PathBuf,
    pub prefetch: Prefetch,
    /// Paths of the version (relative to its root) to fetch in this order ahead of the reader.
    pub read_order: Vec<String>,
    /// How far `read_order` fetching may run ahead of the reader, in bytes.
    pub read_ahead: u64,
    /// Seconds a read waits for a missing chunk before failing with EIO.
    pub timeout_secs: u64,
    /// FUSE worker threads.
    pub threads: usize,
    pub direct_io: bool,
    /// Large files with a whole-file copy are read by the kernel from it (see
    /// `shoal_fuse::MountOptions::passthrough`).
    #[serde(default)]
    pub passthrough: Passthrough,
}

/// What a mount did, reported when it ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountReport {
    pub version: String,
    pub root: String,
    pub mountpoint: String,
    /// "daemon" when a running node daemon served the mount, else "embedded".
    pub served_by: String,
    /// Reads that started a file at its first byte (see `MountStats::files_read`).
    pub files_read: u64,
    /// Read requests that reached the mount (the kernel serves the rest from its page cache).
    pub reads: u64,
    pub bytes_read: u64,
    /// Bytes put into the kernel's page cache ahead of readers, without a read request.
    pub bytes_pushed: u64,
    /// Opens of large files the kernel served from their whole-file copy (no read reached
    /// the mount).
    #[serde(default)]
    pub passthrough_opens: u64,
    pub read_errors: u64,
}

/// A version ready to mount.
pub struct Mountable {
    pub source: MountSource,
    pub root: Hash,
    pub version: String,
    pub created_unix: u64,
    pub stats: shoal_registry::Stats,
}

impl Node {
    /// Opens `reference` for mounting: resolves and verifies it, loads its pack indexes.
    ///
    /// Cancel-safe: it only reads.
    pub async fn mountable(&self, reference: &DatasetRef, timeout: Duration) -> Result<Mountable> {
        let (version, signed) = self.open_version(reference).await?;
        self.mountable_version(reference, &version, &signed, timeout)
            .await
    }

    /// [`Self::mountable`] of a version already resolved and verified.
    ///
    /// Cancel-safe: it only reads.
    pub(crate) async fn mountable_version(
        &self,
        reference: &DatasetRef,
        version: &str,
        signed: &shoal_registry::SignedVersion,
        timeout: Duration,
    ) -> Result<Mountable> {
        let blobs = Arc::new(self.blobs(signed).await?.for_cache_fill());
        blobs.open_in_background();
        let inner = Arc::new(Inner {
            blobs,
            whole_files: self.whole_files(),
            rt: tokio::runtime::Handle::current(),
            timeout,
            inflight: Mutex::default(),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            order: Mutex::default(),
            order_moved: tokio::sync::Notify::new(),
            what: format!("{}@{version}", reference.dataset),
            _in_use: self.using(
                signed.body.root,
                &format!("{}@{version}", reference.dataset),
            ),
        });
        Ok(Mountable {
            source: MountSource { inner },
            root: signed.body.root,
            version: format!("{}@{version}", reference.dataset),
            created_unix: signed.body.created_unix,
            stats: signed.body.stats,
        })
    }
}

impl Node {
    /// Mounts `reference` at `spec.mountpoint` and serves it until it is unmounted (by anyone,
    /// e.g. `shoal unmount`) or `stop` completes (then it unmounts). `mounted` is called with
    /// a one-line notice once the mount is up.
    ///
    /// Not cancel-safe: cancelled, it leaves the mount up (its session runs on a thread of its
    /// own) until someone unmounts it; end it through `stop`.
    #[tracing::instrument(name = "mount", skip_all, fields(reference = %reference, at = %spec.mountpoint.display()))]
    pub async fn serve_mount(
        &self,
        reference: &DatasetRef,
        spec: &MountSpec,
        served_by: &str,
        mounted: impl FnOnce(String),
        stop: impl Future<Output = ()>,
    ) -> Result<MountReport> {
        let mp = &spec.mountpoint;
        let meta = std::fs::metadata(mp).map_err(crate::error::io("mount point", mp))?;
        if !meta.is_dir() {
            return Err(Error::NotFound(format!(
                "mount point {} is not a directory",
                mp.display()
            )));
        }
        if self.swarm().is_none() {
            self.expire_quietly().await;
        }
        let m = self
            .mountable(reference, Duration::from_secs(spec.timeout_secs))
            .await?;
        if !spec.read_order.is_empty() || spec.prefetch == Prefetch::All {
            m.source.spawn_background(
                m.root,
                spec.read_order.clone(),
                spec.prefetch == Prefetch::All,
                spec.read_ahead,
            );
        }
        let defaults = shoal_fuse::MountOptions::default();
        let passthrough = match spec.passthrough {
            Passthrough::On => true,
            Passthrough::Off => false,
            Passthrough::Auto => m.stats.bytes > m.stats.files.saturating_mul(defaults.small_file),
        };
        let opts = shoal_fuse::MountOptions {
            sequential_prefetch: spec.prefetch != Prefetch::None,
            direct_io: spec.direct_io,
            passthrough,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: UNIX_EPOCH + Duration::from_secs(m.created_unix),
            observe_reads: Some(self.metrics().read_observer()),
            ..defaults
        };
        let root = m.root;
        let announced = m.source.announce();
        let fs = shoal_fuse::ShoalFs::new(shoal_fuse::Inodes::new(m.source, m.root, 0o755), opts);
        let stats = fs.stats();
        let cfg = shoal_fuse::MountConfig {
            fsname: format!("shoal:{}", m.version),
            threads: spec.threads,
            // Root (a daemon, typically) lets every user read; file modes still apply. Others
            // would need `user_allow_other` in /etc/fuse.conf.
            allow_other: running_as_root(),
        };
        let session = shoal_fuse::spawn(fs, mp, &cfg)
            .map_err(crate::error::io("mounting a version at", mp))?;
        shoal_fuse::raise_readahead(mp, 4096);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(session.join());
        });
        mounted(format!(
            "mounted {} (b3:{root}) at {}; Ctrl-C or `shoal unmount {}` unmounts",
            m.version,
            mp.display(),
            mp.display()
        ));
        let mut done = Box::pin(done_rx);
        tokio::select! {
            _ = &mut done => {}
            _ = stop => {
                if let Err(e) = unmount(mp) {
                    // A reader still holds it open: detach it now, free it when they close.
                    tracing::warn!("{e}; detaching it lazily");
                    unmount_lazy(mp)?;
                }
                let _ = done.await;
            }
        }
        drop(announced);
        // Keep the cache's index and hit counters for the next mount.
        self.store()?.flush()?;
        Ok(MountReport {
            version: m.version,
            root: format!("b3:{root}"),
            mountpoint: mp.display().to_string(),
            served_by: served_by.to_string(),
            files_read: stats.files_read.load(Ordering::Relaxed),
            reads: stats.reads.load(Ordering::Relaxed),
            bytes_read: stats.bytes_read.load(Ordering::Relaxed),
            bytes_pushed: stats.bytes_pushed.load(Ordering::Relaxed),
            passthrough_opens: stats.passthrough_opens.load(Ordering::Relaxed),
            read_errors: stats.read_errors.load(Ordering::Relaxed),
        })
    }
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Unmounts with `fusermount3 -u`, or `umount` where that is not available (root).
pub fn unmount(mp: &Path) -> Result<()> {
    run_unmount(
        mp,
        &[
            ("fusermount3", &["-u"]),
            ("fusermount", &["-u"]),
            ("umount", &[]),
        ],
    )
}

/// Detaches a busy mount now; the kernel frees it when its last reader closes.
pub fn unmount_lazy(mp: &Path) -> Result<()> {
    run_unmount(mp, &[("fusermount3", &["-uz"]), ("umount", &["-l"])])
}

fn run_unmount(mp: &Path, tools: &[(&str, &[&str])]) -> Result<()> {
    let mut last = String::from("no unmount tool found (install fuse3)");
    for (cmd, args) in tools {
        match std::process::Command::new(cmd).args(*args).arg(mp).output() {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(_) => continue,
        }
    }
    Err(Error::Unmount {
        path: mp.to_path_buf(),
        reason: last,
    })
}

impl MountSource {
    /// Fetches, in the background and in this order, the files named in `paths` (relative to
    /// the version's root), staying at most `lookahead` bytes ahead of the file the reader
    /// opened last; then, with `all`, everything else. Unknown paths are logged and skipped.
    /// Returns immediately.
    pub fn spawn_background(&self, root: Hash, paths: Vec<String>, all: bool, lookahead: u64) {
        {
            let mut order = self.inner.order.lock().expect("read order poisoned");
            for (i, p) in paths.iter().enumerate() {
                order.index.entry(p.clone()).or_insert(i);
            }
        }
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            if let Err(e) = background(&inner, root, paths, all, lookahead).await {
                tracing::warn!(error = %e, "background prefetch stopped");
            }
        });
    }
}

/// Directories a read order's walk keeps decoded (a shuffled order visits each directory
/// many times).
const ORDER_DIRS: usize = 256;

/// The directory whose top node is `id`, from `cache` or read (and kept there).
/// Cancel-safe: it only reads (and stores verified tree nodes).
async fn cached_dir(
    inner: &Arc<Inner>,
    cache: &mut hashlink::LruCache<Hash, Arc<Dir>>,
    id: Hash,
    path: &str,
) -> Result<Arc<Dir>> {
    if let Some(d) = cache.get(&id) {
        return Ok(d.clone());
    }
    let d = Arc::new(load_dir(&inner.blobs, &id, path).await?);
    cache.insert(id, d.clone());
    Ok(d)
}

/// The chunk list of the file at `path`, fetched if need be; None if there is no such file.
/// Directories on the way come from `dirs` when it has them.
/// Cancel-safe: it only reads (and stores verified tree nodes).
async fn file_chunks(
    inner: &Arc<Inner>,
    dirs: &mut hashlink::LruCache<Hash, Arc<Dir>>,
    root: Hash,
    path: &str,
) -> Result<Option<Vec<ChunkRef>>> {
    let mut dir = cached_dir(inner, dirs, root, "").await?;
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for (i, part) in parts.iter().enumerate() {
        let Some(e) = dir.get(part).cloned() else {
            return Ok(None);
        };
        match e.kind {
            EntryKind::Dir { id, .. } if i + 1 < parts.len() => {
                dir = cached_dir(inner, dirs, id, path).await?
            }
            EntryKind::File { content, .. } if i + 1 == parts.len() => {
                return Ok(Some(match content {
                    FileContent::Chunks(c) => c,
                    FileContent::Lists(lists) => {
                        let mut out = Vec::new();
                        for r in lists {
                            let bytes = inner.blobs.get(&r.id).await?;
                            out.extend(
                                ChunkList::decode(&bytes, &r)
                                    .map_err(|e| Error::Corrupt {
                                        what: format!("chunk list {}", r.id),
                                        reason: e.to_string(),
                                    })?
                                    .chunks,
                            );
                        }
                        out
                    }
                }));
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The prefetch of [`MountSource::spawn_background`]. Cancel-safe: what it fetched stays
/// stored and verified.
async fn background(
    inner: &Arc<Inner>,
    root: Hash,
    paths: Vec<String>,
    all: bool,
    lookahead: u64,
) -> Result<()> {
    const BATCH: u64 = 16 << 20;
    let mut batch: Vec<Hash> = Vec::new();
    let mut batch_bytes = 0u64;
    let flush = |batch: &mut Vec<Hash>, bytes: &mut u64| {
        let ids = std::mem::take(batch);
        *bytes = 0;
        let inner = inner.clone();
        async move {
            inner
                .fetch(ids)
                .await
                .map(|_| ())
                .map_err(|e| Error::NotFound(e.to_string()))
        }
    };
    // Bytes of the read order before each entry, to measure how far ahead of the reader we are.
    let mut before: Vec<u64> = vec![0];
    let mut dirs = hashlink::LruCache::new(ORDER_DIRS);
    for (i, p) in paths.iter().enumerate() {
        // Stay within `lookahead` bytes of the file the reader opened last; skip what it has
        // already passed.
        loop {
            let cursor = inner.order.lock().expect("read order poisoned").cursor;
            if cursor > i || before[i] - before[cursor.min(i)] < lookahead {
                break;
            }
            if !batch.is_empty() {
                flush(&mut batch, &mut batch_bytes).await?;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), inner.order_moved.notified())
                .await;
        }
        let cursor = inner.order.lock().expect("read order poisoned").cursor;
        let chunks = match file_chunks(inner, &mut dirs, root, p).await? {
            Some(chunks) => chunks,
            None => {
                tracing::warn!(path = %p, "read-order entry is not a file of this version; skipped");
                Vec::new()
            }
        };
        before.push(before[i] + chunks.iter().map(|c| c.len as u64).sum::<u64>());
        if cursor > i {
            continue;
        }
        for c in chunks {
            batch.push(c.id);
            batch_bytes += c.len as u64;
            if batch_bytes >= BATCH {
                flush(&mut batch, &mut batch_bytes).await?;
            }
        }
    }
    if all {
        let tree = crate::walk::walk(&inner.blobs, root).await?;
        for f in tree.files {
            for c in f.chunks {
                batch.push(c.id);
                batch_bytes += c.len as u64;
                if batch_bytes >= BATCH {
                    flush(&mut batch, &mut batch_bytes).await?;
                }
            }
        }
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut batch_bytes).await?;
    }
    Ok(())
}
