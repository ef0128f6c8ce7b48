//! Blob access for one version: the local store first, then the origin's packs, with every
//! blob verified against its id before it is stored or used.

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::ChunkStore;
use futures::{StreamExt, TryStreamExt};
use shoal_registry::pack::PackIndex;
use shoal_registry::{Hash, Origin, SignedVersion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Adjacent blobs closer than this are read in one ranged request.
const COALESCE_GAP: u64 = 64 << 10;
/// Upper bound on one ranged request.
const MAX_RANGE: u64 = 16 << 20;
/// Ranged reads in flight against the origin.
const ORIGIN_CONCURRENCY: usize = 8;

/// One ranged read: a span of a pack and the blobs inside it (id, offset, len).
struct RangeRead {
    pack: u32,
    start: u64,
    stop: u64,
    blobs: Vec<(Hash, u64, u32)>,
}

#[derive(Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

/// Where each blob of a version lives, and how to get it.
pub struct Blobs {
    store: Arc<dyn ChunkStore>,
    origin: Origin,
    packs: Vec<Hash>,
    locs: HashMap<Hash, Loc>,
    from_origin: AtomicU64,
    durable: bool,
}

/// Reads a pack index from the local cache, or from the origin (then caches it).
pub(crate) async fn pack_index(origin: &Origin, cache: &Path, id: &Hash) -> Result<PackIndex> {
    let path = cache.join(format!("{id}.idx"));
    if let Ok(bytes) = tokio::fs::read(&path).await {
        if id.verify(&bytes) {
            if let Ok(idx) = PackIndex::decode(&bytes) {
                return Ok(idx);
            }
        }
    }
    let (idx, bytes) = origin.pack_index(id).await?;
    // The cache is an optimisation: failing to write it is not an error.
    let tmp: PathBuf = cache.join(format!(".{id}.tmp"));
    if tokio::fs::create_dir_all(cache).await.is_ok()
        && tokio::fs::write(&tmp, &bytes).await.is_ok()
    {
        let _ = tokio::fs::rename(&tmp, &path).await;
    }
    Ok(idx)
}

impl Blobs {
    /// Loads the indexes of every pack the version names.
    pub async fn load(
        origin: Origin,
        store: Arc<dyn ChunkStore>,
        cache: &Path,
        version: &SignedVersion,
    ) -> Result<Blobs> {
        let packs = version.body.packs.clone();
        let indexes: Vec<PackIndex> = futures::stream::iter(packs.iter())
            .map(|id| pack_index(&origin, cache, id))
            .buffered(8)
            .try_collect()
            .await?;
        let mut locs = HashMap::new();
        for (i, idx) in indexes.iter().enumerate() {
            for e in &idx.entries {
                locs.insert(
                    e.id,
                    Loc {
                        pack: i as u32,
                        offset: e.offset,
                        len: e.len,
                    },
                );
            }
        }
        Ok(Blobs {
            store,
            origin,
            packs,
            locs,
            from_origin: AtomicU64::new(0),
            durable: true,
        })
    }

    /// Whether every fetched batch is flushed to the store's index before the next (a killed
    /// pull then resumes from the last batch); a cache filling for a mount can skip that.
    pub fn with_durable_batches(mut self, durable: bool) -> Blobs {
        self.durable = durable;
        self
    }

    /// Bytes read from the origin so far.
    pub fn bytes_from_origin(&self) -> u64 {
        self.from_origin.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// One blob, from the local store or else the origin.
    pub async fn get(&self, id: &Hash) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let key = *id;
        if let Some(b) = tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .expect("store task panicked")?
        {
            return Ok(b);
        }
        self.fetch(vec![*id], None).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .expect("store task panicked")?
            .ok_or_else(|| Error::NotFound(format!("blob {key} vanished from the local store")))
    }

    /// Fetches the given blobs (assumed missing locally) from the origin into the local
    /// store, coalescing neighbours into large ranged reads. Cancel-safe: whatever was stored
    /// before cancellation stays stored and verified.
    pub async fn fetch(&self, mut ids: Vec<Hash>, progress: Option<&Progress>) -> Result<()> {
        ids.sort_unstable();
        ids.dedup();
        let mut wanted: Vec<(Loc, Hash)> = Vec::with_capacity(ids.len());
        for id in ids {
            let loc = self.locs.get(&id).ok_or_else(|| Error::Corrupt {
                what: format!("version in origin {}", self.origin.url()),
                reason: format!("blob {id} is in none of the version's packs"),
            })?;
            wanted.push((*loc, id));
        }
        wanted.sort_unstable_by_key(|(l, _)| (l.pack, l.offset));
        // Group into ranges.
        let mut ranges: Vec<RangeRead> = Vec::new();
        for (loc, id) in wanted {
            let end = loc.offset + loc.len as u64;
            match ranges.last_mut() {
                Some(r)
                    if r.pack == loc.pack
                        && loc.offset >= r.stop
                        && loc.offset - r.stop <= COALESCE_GAP
                        && end - r.start <= MAX_RANGE =>
                {
                    r.stop = end;
                    r.blobs.push((id, loc.offset, loc.len));
                }
                _ => ranges.push(RangeRead {
                    pack: loc.pack,
                    start: loc.offset,
                    stop: end,
                    blobs: vec![(id, loc.offset, loc.len)],
                }),
            }
        }
        futures::stream::iter(ranges)
            .map(|RangeRead { pack, start, stop, blobs }| async move {
                let pack_id = self.packs[pack as usize];
                let data = self.origin.read_pack(&pack_id, start..stop).await?;
                self.from_origin.fetch_add(data.len() as u64, Ordering::Relaxed);
                if data.len() as u64 != stop - start {
                    return Err(Error::Corrupt {
                        what: format!("pack {}", self.origin.pack_path(&pack_id)),
                        reason: format!("range {start}..{stop} returned {} bytes", data.len()),
                    });
                }
                let store = self.store.clone();
                let durable = self.durable;
                let pack_path = self.origin.pack_path(&pack_id);
                let stored = tokio::task::spawn_blocking(move || -> Result<u64> {
                    let mut batch = Vec::with_capacity(blobs.len());
                    let mut n = 0;
                    let mut bad = None;
                    for (id, off, len) in &blobs {
                        let rel = (off - start) as usize;
                        let bytes = &data[rel..rel + *len as usize];
                        if !id.verify(bytes) {
                            bad.get_or_insert(Error::Corrupt {
                                what: format!("blob {id} in pack {pack_path} at offset {off}"),
                                reason: "its bytes do not match its id; the origin's copy is damaged or was tampered with".into(),
                            });
                            continue;
                        }
                        batch.push((*id, bytes));
                        n += *len as u64;
                    }
                    // Keep every good blob of the range, so a retry fetches only the bad ones.
                    store.put_batch(&batch)?;
                    if durable {
                        store.flush()?;
                    }
                    match bad {
                        Some(e) => Err(e),
                        None => Ok(n),
                    }
                })
                .await
                .expect("verify task panicked")?;
                if let Some(p) = progress {
                    p.add(stored);
                }
                Ok(())
            })
            .buffer_unordered(ORIGIN_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}
