//! The tiered local cache: memory, then the primary disk store (`$SHOAL_HOME/store`), then any
//! further disk tiers, each with its own capacity and [`ClockLfu`] policy.
//!
//! - Reads look in each tier in order. A blob read from a disk tier for the second time (or
//!   more) is offered to memory, whose policy admits it once it is read often enough; one found below the primary tier is
//!   offered to the primary tier (promotion).
//! - Writes go to the primary tier. What a disk tier evicts, or declines to admit (a cache fill
//!   its policy does not find worth a place yet), is demoted: its verified bytes are written to
//!   the next tier, which may in turn demote its own victims. What the last tier
//!   evicts leaves the machine. Memory is filled only by reads, and what it evicts is still on
//!   disk.
//! - Tiers are inclusive: a promoted blob may stay in the slower tier until it ages out.
//! - Pins live in the primary tier: pinning first promotes whatever a version has in slower
//!   tiers, and pinned blobs are never evicted, so a pinned version stays whole on the primary
//!   disk.
//! - Every disk tier is a [`SegmentStore`] with its own crash safety; memory holds only bytes
//!   already verified.

use crate::policy::{ClockLfu, Policy};
use crate::{rate, CacheStats, ChunkStore, Retain, SegmentStore, StoreError, TierStats};
use shoal_chunker::Hash;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// A disk tier after the primary one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTier {
    pub path: PathBuf,
    /// Most bytes it may use; only the last tier may be unbounded.
    pub capacity: Option<u64>,
}

/// How this machine caches blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    /// Bytes of blobs kept in memory (0: no memory tier). Per process: the daemon's memory
    /// tier lives as long as the daemon.
    pub memory: u64,
    /// Capacity of the primary disk tier (None: unbounded).
    pub capacity: Option<u64>,
    /// Further disk tiers, fastest first.
    pub tiers: Vec<DiskTier>,
    /// Capacity of whole-file copies for mounts (0: none); see [`crate::wholefiles`].
    pub files: u64,
    /// How long a cached version not used stays (None: until capacity evicts it); applied by
    /// the node (`shoal_node::expiry`).
    pub ttl: Option<std::time::Duration>,
    /// Keep blobs that compress by at least an eighth compressed on disk (zstd level 1; the
    /// memory tier and whole-file copies stay raw).
    pub compress: bool,
}

/// 256 MiB: enough to keep a data loader's hot chunks without taking much from training.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

impl Default for CacheLayout {
    fn default() -> Self {
        CacheLayout {
            memory: DEFAULT_MEMORY,
            capacity: None,
            tiers: Vec::new(),
            files: crate::wholefiles::DEFAULT_CAPACITY,
            ttl: None,
            compress: true,
        }
    }
}

impl CacheLayout {
    /// Bytes all disk tiers may hold together (None: unbounded).
    pub fn disk_capacity(&self) -> Option<u64> {
        let mut total = self.capacity?;
        for t in &self.tiers {
            total += t.capacity?;
        }
        Some(total)
    }

    /// Why this layout cannot work, if it cannot: a tier with no capacity never evicts, so the
    /// tiers after it would never be used.
    pub fn check(&self) -> Result<(), String> {
        let mut caps = std::iter::once(self.capacity).chain(self.tiers.iter().map(|t| t.capacity));
        let n = self.tiers.len() + 1;
        if let Some(i) = caps.by_ref().take(n - 1).position(|c| c.is_none()) {
            let which = if i == 0 {
                "the primary disk tier ([cache] capacity)".to_string()
            } else {
                format!("disk tier {}", self.tiers[i - 1].path.display())
            };
            return Err(format!(
                "{which} has no capacity, so the tiers after it would never be used"
            ));
        }
        Ok(())
    }
}

struct MemState {
    policy: ClockLfu<Hash>,
    blobs: HashMap<Hash, Vec<u8>>,
    hits: u64,
    misses: u64,
    evictions: u64,
}

/// [`ChunkStore`] over a memory tier and one or more [`SegmentStore`]s.
pub struct TieredStore {
    memory: Option<(u64, Mutex<MemState>)>,
    /// The primary tier first.
    disks: Vec<SegmentStore>,
}

impl TieredStore {
    /// Opens the primary store at `primary` and every tier of `layout`.
    pub fn open(
        primary: &std::path::Path,
        layout: &CacheLayout,
    ) -> Result<TieredStore, StoreError> {
        let mut disks =
            vec![SegmentStore::open(primary, layout.capacity)?.with_compression(layout.compress)];
        for t in &layout.tiers {
            disks.push(SegmentStore::open(&t.path, t.capacity)?.with_compression(layout.compress));
        }
        let memory = (layout.memory > 0).then(|| {
            (
                layout.memory,
                Mutex::new(MemState {
                    policy: ClockLfu::new(layout.memory),
                    blobs: HashMap::new(),
                    hits: 0,
                    misses: 0,
                    evictions: 0,
                }),
            )
        });
        Ok(TieredStore { memory, disks })
    }

    fn mem(&self) -> Option<std::sync::MutexGuard<'_, MemState>> {
        self.memory
            .as_ref()
            .map(|(_, m)| m.lock().expect("memory tier poisoned"))
    }

    /// Writes into disk tier `from`, demoting each tier's victims into the next.
    fn put_from(
        &self,
        from: usize,
        blobs: &[crate::Packed<'_>],
        retain: Retain,
    ) -> Result<(), StoreError> {
        let last = self.disks.len() - 1;
        let mut demoted = self.disks[from].put_batch_demoting(blobs, retain, from < last)?;
        for i in from + 1..=last {
            if demoted.is_empty() {
                break;
            }
            let refs: Vec<crate::Packed<'_>> = demoted
                .iter()
                .map(|(h, b)| (*h, b.as_slice(), None))
                .collect();
            demoted = self.disks[i].put_batch_demoting(&refs, Retain::Keep, i < last)?;
        }
        Ok(())
    }

    /// Offers a blob just read from disk to the memory tier.
    fn offer_memory(&self, id: &Hash, bytes: &[u8]) {
        let Some(mut m) = self.mem() else {
            return;
        };
        // Only blobs read more than once: a single pass over a dataset (which the kernel's
        // page cache serves on its own) costs no copies here and flushes nothing.
        if m.blobs.contains_key(id) || m.policy.count(id) < 2 {
            return;
        }
        let a = m.policy.insert(*id, bytes.len() as u64);
        for v in &a.evicted {
            if m.blobs.remove(v).is_some() {
                m.evictions += 1;
            }
        }
        if a.admitted {
            m.blobs.insert(*id, bytes.to_vec());
        }
    }
}

impl ChunkStore for TieredStore {
    fn contains(&self, id: &Hash) -> Result<bool, StoreError> {
        if self.mem().is_some_and(|m| m.blobs.contains_key(id)) {
            return Ok(true);
        }
        for d in &self.disks {
            if d.contains(id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(mut m) = self.mem() {
            m.policy.access(id);
            if let Some(b) = m.blobs.get(id).cloned() {
                m.hits += 1;
                return Ok(Some(b));
            }
            m.misses += 1;
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(b) = d.get(id)? {
                if i > 0 {
                    self.put_from(0, &[(*id, &b, None)], Retain::Cache)?;
                }
                self.offer_memory(id, &b);
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    fn locate(&self, id: &Hash) -> Result<Option<crate::Located>, StoreError> {
        // The primary tier only: a blob in a slower tier is read (and promoted) the usual way.
        self.disks[0].locate(id)
    }

    fn get_for_peer(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        // Serving peers neither counts as a read here nor fills the memory tier: it is kept
        // for this node's own readers.
        if let Some(b) = self.mem().and_then(|m| m.blobs.get(id).cloned()) {
            return Ok(Some(b));
        }
        for d in &self.disks {
            if let Some(b) = d.get_for_peer(id)? {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    fn put_batch(&self, blobs: &[(Hash, &[u8])], retain: Retain) -> Result<(), StoreError> {
        let packed: Vec<crate::Packed<'_>> = blobs.iter().map(|(id, b)| (*id, *b, None)).collect();
        self.put_from(0, &packed, retain)
    }

    fn put_batch_packed(
        &self,
        blobs: &[crate::Packed<'_>],
        retain: Retain,
    ) -> Result<(), StoreError> {
        self.put_from(0, blobs, retain)
    }

    fn get_stored_for_peer(&self, id: &Hash) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        if let Some(b) = self.mem().and_then(|m| m.blobs.get(id).cloned()) {
            return Ok(Some((b, false)));
        }
        for d in &self.disks {
            if let Some(b) = d.get_stored_for_peer(id)? {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    fn flush(&self) -> Result<(), StoreError> {
        for d in &self.disks {
            d.flush()?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<CacheStats, StoreError> {
        let mut tiers = Vec::new();
        if let (Some((cap, _)), Some(m)) = (&self.memory, self.mem()) {
            tiers.push(TierStats {
                kind: "memory".into(),
                path: None,
                capacity: Some(*cap),
                used_bytes: m.policy.used(),
                blobs: m.blobs.len() as u64,
                hits: m.hits,
                misses: m.misses,
                hit_rate: rate(m.hits, m.misses),
                evictions: m.evictions,
            });
        }
        let mut all = self.disks[0].stats()?;
        for d in &self.disks[1..] {
            let s = d.stats()?;
            all.disk_bytes += s.disk_bytes;
            all.live_bytes += s.live_bytes;
            all.blobs += s.blobs;
            all.tiers.extend(s.tiers);
        }
        tiers.append(&mut all.tiers);
        // Every lookup ends in one tier's hit or in a miss of the last disk tier.
        all.hits = tiers.iter().map(|t| t.hits).sum();
        let last = tiers.last().expect("a disk tier");
        all.misses = last.misses;
        all.evictions = last.evictions;
        all.hit_rate = rate(all.hits, all.misses);
        all.tiers = tiers;
        Ok(all)
    }

    fn pin(&self, name: &str, blobs: &[(Hash, u32)]) -> Result<(), StoreError> {
        // Pins live in the primary tier: bring up what slower tiers hold.
        for (id, _) in blobs {
            if self.disks[0].contains(id)? {
                continue;
            }
            for d in &self.disks[1..] {
                if let Some(b) = d.get(id)? {
                    self.put_from(0, &[(*id, &b, None)], Retain::Keep)?;
                    break;
                }
            }
        }
        self.disks[0].pin(name, blobs)
    }

    fn unpin(&self, name: &str) -> Result<bool, StoreError> {
        self.disks[0].unpin(name)
    }

    fn losses(&self) -> u64 {
        // A slower tier keeps what a faster one evicts: only the last tier's evictions leave.
        let last = self.disks.len() - 1;
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (evicted, dropped) = d.loss_counts();
                dropped + if i == last { evicted } else { 0 }
            })
            .sum()
    }

    fn gc(&self) -> Result<u64, StoreError> {
        if let Some(mut m) = self.mem() {
            let ids: Vec<Hash> = m.blobs.keys().copied().collect();
            for id in ids {
                m.policy.remove(&id);
            }
            m.blobs.clear();
        }
        let mut freed = 0;
        for d in &self.disks {
            freed += d.gc()?;
        }
        Ok(freed)
    }

    fn drop_unpinned(&self, ids: &[Hash]) -> Result<(u64, u64), StoreError> {
        if let Some(mut m) = self.mem() {
            for id in ids {
                if m.blobs.remove(id).is_some() {
                    m.policy.remove(id);
                }
            }
        }
        // Pins live in the primary tier (a pin brings its blobs up first): below it, every
        // copy is only a copy.
        let mut out = self.disks[0].drop_unpinned(ids)?;
        for d in &self.disks[1..] {
            let (n, b) = d.drop_unpinned(ids)?;
            out.0 += n;
            out.1 += b;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(seed: u8, len: usize) -> (Hash, Vec<u8>) {
        let mut x = seed as u64 * 0x9E37_79B9 + 1;
        let b: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        (shoal_chunker::hash(&b), b)
    }

    fn put(s: &TieredStore, blobs: &[(Hash, Vec<u8>)]) {
        let refs: Vec<(Hash, &[u8])> = blobs.iter().map(|(h, b)| (*h, b.as_slice())).collect();
        s.put_batch(&refs, Retain::Keep).unwrap();
    }

    fn layout(memory: u64, primary: u64, second: &std::path::Path, cap: u64) -> CacheLayout {
        CacheLayout {
            memory,
            capacity: Some(primary),
            tiers: vec![DiskTier {
                path: second.to_path_buf(),
                capacity: Some(cap),
            }],
            files: 0,
            ttl: None,
            compress: false,
        }
    }

    #[test]
    fn evictions_demote_to_the_next_tier_and_hits_promote_back() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // Primary holds about 12 of these 16 KiB blobs (3/4 of 256 KiB), the second tier all.
        let s = TieredStore::open(a.path(), &layout(0, 256 << 10, b.path(), 4 << 20)).unwrap();
        let blobs: Vec<_> = (1..=40).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &blobs);
        let st = s.stats().unwrap();
        let (primary, second) = (&st.tiers[0], &st.tiers[1]);
        assert!(primary.used_bytes <= 256 << 10, "{st:?}");
        assert_eq!(primary.blobs + second.blobs, 40, "nothing lost: {st:?}");
        assert!(second.blobs >= 28, "{st:?}");
        // Every blob reads back, verified, from whichever tier has it.
        for (h, b) in &blobs {
            assert_eq!(s.get(h).unwrap().as_deref(), Some(b.as_slice()));
        }
        let st = s.stats().unwrap();
        assert!(st.tiers[1].hits >= 28, "{st:?}");
        assert_eq!(st.misses, 0, "{st:?}");
        // A blob read often from the second tier is promoted into the primary one.
        let (hot, _) = &blobs[0];
        for _ in 0..6 {
            s.get(hot).unwrap().unwrap();
        }
        assert!(s.disks[0].contains(hot).unwrap(), "hot blob promoted");
        // The layout survives a reopen: demoted blobs are still there.
        drop(s);
        let s = TieredStore::open(a.path(), &layout(0, 256 << 10, b.path(), 4 << 20)).unwrap();
        for (h, b) in &blobs {
            assert_eq!(s.get(h).unwrap().as_deref(), Some(b.as_slice()));
        }
    }

    #[test]
    fn the_last_tier_evicts_for_good_and_usage_stays_within_each_capacity() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = TieredStore::open(a.path(), &layout(0, 256 << 10, b.path(), 512 << 10)).unwrap();
        let blobs: Vec<_> = (1..=100).map(|i| blob(i, 16 << 10)).collect();
        for part in blobs.chunks(10) {
            put(&s, part);
        }
        let st = s.stats().unwrap();
        assert!(st.tiers[0].used_bytes <= 256 << 10, "{st:?}");
        assert!(st.tiers[1].used_bytes <= 512 << 10, "{st:?}");
        assert!(st.evictions > 0, "the last tier evicted: {st:?}");
        let held = blobs.iter().filter(|(h, _)| s.contains(h).unwrap()).count();
        assert!((30..100).contains(&held), "{held} held: {st:?}");
        // What is held reads back exactly; what is gone is a miss, never wrong bytes.
        for (h, b) in &blobs {
            if let Some(got) = s.get(h).unwrap() {
                assert_eq!(&got, b);
            }
        }
    }

    #[test]
    fn memory_keeps_hot_blobs_and_counts_hits() {
        let a = tempfile::tempdir().unwrap();
        let s = TieredStore::open(
            a.path(),
            &CacheLayout {
                memory: 64 << 10,
                capacity: None,
                tiers: vec![],
                files: 0,
                ttl: None,
                compress: false,
            },
        )
        .unwrap();
        let blobs: Vec<_> = (1..=8).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &blobs);
        for _ in 0..5 {
            for (h, b) in &blobs[..3] {
                assert_eq!(s.get(h).unwrap().as_deref(), Some(b.as_slice()));
            }
        }
        let st = s.stats().unwrap();
        let mem = &st.tiers[0];
        assert_eq!(mem.kind, "memory");
        assert!(mem.used_bytes <= 64 << 10, "{st:?}");
        assert!(mem.hits >= 8, "repeated reads hit memory: {st:?}");
        assert_eq!(st.hits, mem.hits + st.tiers[1].hits);
        // gc empties memory too.
        s.gc().unwrap();
        assert_eq!(s.stats().unwrap().tiers[0].used_bytes, 0);
    }

    /// Serving peers reads every tier but leaves the memory tier to local readers: repeated
    /// peer reads neither fill it nor count as its hits or misses.
    #[test]
    fn peer_reads_do_not_churn_the_memory_tier() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s =
            TieredStore::open(a.path(), &layout(64 << 10, 128 << 10, b.path(), 4 << 20)).unwrap();
        let blobs: Vec<_> = (1..=20).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &blobs);
        assert!(
            blobs.iter().any(|(h, _)| !s.disks[0].contains(h).unwrap()),
            "some blobs were demoted to the second tier"
        );
        for _ in 0..4 {
            for (h, b) in &blobs {
                assert_eq!(s.get_for_peer(h).unwrap().as_deref(), Some(b.as_slice()));
            }
        }
        let mem = s.stats().unwrap().tiers[0].clone();
        assert_eq!(mem.kind, "memory");
        assert_eq!((mem.used_bytes, mem.hits, mem.misses), (0, 0, 0), "{mem:?}");
        // Local reads still fill it.
        for _ in 0..3 {
            assert!(s.get(&blobs[0].0).unwrap().is_some());
        }
        assert!(s.stats().unwrap().tiers[0].used_bytes > 0);
    }

    #[test]
    fn pinning_brings_a_version_up_from_slower_tiers_and_keeps_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = TieredStore::open(a.path(), &layout(0, 256 << 10, b.path(), 4 << 20)).unwrap();
        let v1: Vec<_> = (1..=6).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &v1);
        // Push v1 down with newer data.
        let other: Vec<_> = (50..=80).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &other);
        let list: Vec<(Hash, u32)> = v1.iter().map(|(h, b)| (*h, b.len() as u32)).collect();
        s.pin("v1", &list).unwrap();
        let more: Vec<_> = (100..=140).map(|i| blob(i, 16 << 10)).collect();
        put(&s, &more);
        for (h, _) in &v1 {
            assert!(
                s.disks[0].contains(h).unwrap(),
                "pinned blob in the primary tier"
            );
        }
        assert!(s.stats().unwrap().pinned_bytes >= 6 * (16 << 10));
    }

    #[test]
    fn a_tier_without_capacity_must_be_last() {
        let l = CacheLayout {
            memory: 0,
            capacity: None,
            tiers: vec![DiskTier {
                path: "/x".into(),
                capacity: None,
            }],
            files: 0,
            ttl: None,
            compress: false,
        };
        assert!(l.check().unwrap_err().contains("primary"));
        let l = CacheLayout {
            capacity: Some(1),
            ..l
        };
        assert!(l.check().is_ok());
    }
}
