//! Cache eviction policies, pure and deterministic: they decide, the store acts.
//!
//! Training reads a whole dataset every epoch, in a new random order. When the dataset is
//! larger than the cache, LRU keeps evicting what the next epoch will want, because every
//! block looks equally recent. [`ClockLfu`] resists that the way TinyLFU does: eviction picks a
//! victim with CLOCK (a block read since the hand last passed gets another round), and a new
//! block is admitted only if it has been read at least two times more than that victim, counted over a
//! window that halves periodically so old popularity fades. Under the epoch pattern a stable
//! part of the dataset stays cached and hits every epoch; a one-off scan cannot flush it.
//! [`Lru`] is the baseline the benchmark compares against. Pinned blocks are never evicted.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::VecDeque;
use std::hash::Hash;

/// What [`Policy::insert`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission<K> {
    /// Whether the new key is now cached.
    pub admitted: bool,
    /// Keys evicted to make room.
    pub evicted: Vec<K>,
}

/// A cache policy over keys `K` with sizes in bytes.
pub trait Policy<K> {
    /// A read of `key`; returns whether it was cached.
    fn access(&mut self, key: &K) -> bool;
    /// Offers `key` of `size` bytes (after a miss); says whether it was admitted and what was
    /// evicted for it.
    fn insert(&mut self, key: K, size: u64) -> Admission<K>;
    /// Forgets `key` (deleted by someone else).
    fn remove(&mut self, key: &K);
    /// Bytes currently cached.
    fn used(&self) -> u64;
    /// Marks `key` as never to be evicted (or no longer so).
    fn set_pinned(&mut self, key: K, pinned: bool);
}

/// CLOCK eviction with frequency-gated admission (TinyLFU-style, exact counts).
pub struct ClockLfu<K> {
    capacity: u64,
    used: u64,
    queue: VecDeque<K>,
    /// size, read since the hand last passed
    entries: HashMap<K, (u64, bool)>,
    counts: HashMap<K, u32>,
    events: u64,
    pinned: HashSet<K>,
}

impl<K: Hash + Eq + Copy> ClockLfu<K> {
    pub fn new(capacity: u64) -> ClockLfu<K> {
        ClockLfu {
            capacity,
            used: 0,
            queue: VecDeque::new(),
            entries: HashMap::default(),
            counts: HashMap::default(),
            events: 0,
            pinned: HashSet::default(),
        }
    }

    /// Reads of `k` counted in the current window.
    pub fn count(&self, k: &K) -> u32 {
        self.counts.get(k).copied().unwrap_or(0)
    }

    /// Counts a read; every so often all counts halve, so yesterday's favourites can lose.
    fn bump(&mut self, k: K) {
        *self.counts.entry(k).or_insert(0) += 1;
        self.events += 1;
        let window = 10 * (self.entries.len() as u64).max(1024);
        if self.events >= window {
            self.events = 0;
            self.counts.retain(|_, c| {
                *c /= 2;
                *c > 0
            });
        }
    }

    /// The next victim under CLOCK, taken off the queue; `None` if only pinned keys remain.
    fn next_victim(&mut self) -> Option<K> {
        for _ in 0..2 * self.queue.len() + 1 {
            let k = self.queue.pop_front()?;
            let e = self.entries.get_mut(&k).expect("queued key has an entry");
            if self.pinned.contains(&k) || e.1 {
                e.1 = false;
                self.queue.push_back(k);
                continue;
            }
            return Some(k);
        }
        None
    }
}

impl<K: Hash + Eq + Copy> ClockLfu<K> {
    /// Admits `key` whatever its count (a pull, or a block that must stay), evicting unpinned
    /// victims in CLOCK order; returns them. Only pinned keys can push usage over capacity.
    pub fn insert_forced(&mut self, key: K, size: u64) -> Vec<K> {
        let mut evicted = Vec::new();
        if self.entries.contains_key(&key) {
            return evicted;
        }
        while self.used + size > self.capacity {
            let Some(victim) = self.next_victim() else {
                break;
            };
            let (vsize, _) = self.entries.remove(&victim).expect("victim has an entry");
            self.used -= vsize;
            evicted.push(victim);
        }
        self.entries.insert(key, (size, false));
        self.queue.push_back(key);
        self.used += size;
        evicted
    }

    /// Forgets every cached key that is not pinned and returns them (a full collection).
    pub fn clear_unpinned(&mut self) -> Vec<K> {
        let dropped: Vec<K> = self
            .entries
            .keys()
            .filter(|k| !self.pinned.contains(k))
            .copied()
            .collect();
        for k in &dropped {
            if let Some((size, _)) = self.entries.remove(k) {
                self.used -= size;
            }
        }
        let entries = &self.entries;
        self.queue.retain(|k| entries.contains_key(k));
        dropped
    }
}

impl<K: Hash + Eq + Copy> Policy<K> for ClockLfu<K> {
    fn access(&mut self, key: &K) -> bool {
        self.bump(*key);
        match self.entries.get_mut(key) {
            Some(e) => {
                e.1 = true;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: K, size: u64) -> Admission<K> {
        let mut evicted = Vec::new();
        if self.entries.contains_key(&key) {
            return Admission {
                admitted: true,
                evicted,
            };
        }
        let forced = self.pinned.contains(&key);
        if size > self.capacity && !forced {
            return Admission {
                admitted: false,
                evicted,
            };
        }
        while self.used + size > self.capacity {
            let Some(victim) = self.next_victim() else {
                break;
            };
            if !forced && self.count(&key) <= self.count(&victim) + 1 {
                // Not clearly more popular than what it would replace: keep the incumbent. The
                // margin of one read stops churn under epochs, where a block just read always
                // leads one not yet read this epoch by exactly one.
                self.queue.push_front(victim);
                return Admission {
                    admitted: false,
                    evicted,
                };
            }
            let (vsize, _) = self.entries.remove(&victim).expect("victim has an entry");
            self.used -= vsize;
            evicted.push(victim);
        }
        if self.used + size > self.capacity && !forced {
            return Admission {
                admitted: false,
                evicted,
            };
        }
        self.entries.insert(key, (size, false));
        self.queue.push_back(key);
        self.used += size;
        Admission {
            admitted: true,
            evicted,
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some((size, _)) = self.entries.remove(key) {
            self.used -= size;
            self.queue.retain(|k| k != key);
        }
    }

    fn used(&self) -> u64 {
        self.used
    }

    fn set_pinned(&mut self, key: K, pinned: bool) {
        if pinned {
            self.pinned.insert(key);
        } else {
            self.pinned.remove(&key);
        }
    }
}

/// Least recently used, for comparison.
pub struct Lru<K> {
    capacity: u64,
    used: u64,
    tick: u64,
    entries: HashMap<K, (u64, u64)>,
    order: std::collections::BTreeMap<u64, K>,
    pinned: HashSet<K>,
}

impl<K: Hash + Eq + Copy> Lru<K> {
    pub fn new(capacity: u64) -> Lru<K> {
        Lru {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::default(),
            order: Default::default(),
            pinned: HashSet::default(),
        }
    }
}

impl<K: Hash + Eq + Copy> Policy<K> for Lru<K> {
    fn access(&mut self, key: &K) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(key) {
            Some((t, _)) => {
                self.order.remove(t);
                *t = tick;
                self.order.insert(tick, *key);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: K, size: u64) -> Admission<K> {
        let mut out = Vec::new();
        if self.entries.contains_key(&key) {
            return Admission {
                admitted: true,
                evicted: out,
            };
        }
        self.tick += 1;
        self.entries.insert(key, (self.tick, size));
        self.order.insert(self.tick, key);
        self.used += size;
        let mut skipped = Vec::new();
        while self.used > self.capacity {
            let Some((t, k)) = self.order.pop_first() else {
                break;
            };
            if self.pinned.contains(&k) {
                skipped.push((t, k));
                continue;
            }
            let (_, size) = self.entries.remove(&k).expect("ordered key has an entry");
            self.used -= size;
            out.push(k);
        }
        self.order.extend(skipped);
        Admission {
            admitted: true,
            evicted: out,
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some((t, size)) = self.entries.remove(key) {
            self.order.remove(&t);
            self.used -= size;
        }
    }

    fn used(&self) -> u64 {
        self.used
    }

    fn set_pinned(&mut self, key: K, pinned: bool) {
        if pinned {
            self.pinned.insert(key);
        } else {
            self.pinned.remove(&key);
        }
    }
}

/// Replays `epochs` passes over `n` equal blocks, each pass in a new seeded random order,
/// through `policy`; returns the hit rate of each epoch.
pub fn simulate_epochs(policy: &mut dyn Policy<u32>, n: u32, epochs: usize, seed: u64) -> Vec<f64> {
    let mut order: Vec<u32> = (0..n).collect();
    let mut x = seed | 1;
    let mut rates = Vec::new();
    for _ in 0..epochs {
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut hits = 0;
        for &k in &order {
            if policy.access(&k) {
                hits += 1;
            } else {
                policy.insert(k, 1);
            }
        }
        rates.push(hits as f64 / n as f64);
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_capacity(p: &mut dyn Policy<u32>, cap: u64) {
        for k in 0..1000 {
            // Read each key a growing number of times, so newcomers do get admitted.
            for _ in 0..(k / 100 + 1) {
                p.access(&k);
            }
            p.insert(k, 3);
            assert!(p.used() <= cap, "used {} > capacity {cap}", p.used());
        }
        assert!(p.used() > 0 || cap < 3);
    }

    #[test]
    fn both_policies_respect_capacity_exactly_at_and_around_the_limit() {
        for cap in [2, 3, 4, 299, 300, 301] {
            check_capacity(&mut ClockLfu::new(cap), cap);
            check_capacity(&mut Lru::new(cap), cap);
        }
    }

    #[test]
    fn pinned_keys_are_never_evicted() {
        for p in [
            &mut ClockLfu::new(100) as &mut dyn Policy<u32>,
            &mut Lru::new(100),
        ] {
            p.set_pinned(7, true);
            p.insert(7, 10);
            for k in 100..1000 {
                for _ in 0..3 {
                    p.access(&k);
                }
                p.insert(k, 10);
            }
            assert!(p.access(&7), "pinned key evicted");
            assert!(p.used() <= 100);
        }
    }

    #[test]
    fn clocklfu_keeps_part_of_a_cyclic_workload_that_lru_loses() {
        let (n, cap) = (10_000, 5_000);
        let lru = simulate_epochs(&mut Lru::new(cap), n, 5, 42);
        let lfu = simulate_epochs(&mut ClockLfu::new(cap), n, 5, 42);
        let steady = |r: &[f64]| r[2..].iter().sum::<f64>() / (r.len() - 2) as f64;
        // Half the data fits: the best possible is a 50% hit rate from the second epoch on.
        assert!(steady(&lfu) > 0.4, "clock-lfu {lfu:?}");
        assert!(
            steady(&lfu) > steady(&lru) + 0.2,
            "clock-lfu {lfu:?} vs lru {lru:?}"
        );
    }

    #[test]
    fn repeated_reads_stay_cached_and_scans_do_not_flush() {
        let mut p = ClockLfu::new(10);
        p.access(&1);
        p.insert(1, 1);
        assert!(p.access(&1));
        for k in 2..100 {
            if !p.access(&k) {
                p.insert(k, 1);
            }
            p.access(&1);
        }
        assert!(p.access(&1), "a block read all the time stays");
    }
}
