//! The node's metrics beside the swarm's (`shoal node run --metrics ADDR`): the cache per
//! tier, mount read latency, requests per origin, pulls in progress. Registered afresh on
//! every scrape from shared counters (`swarm::metrics::Extra`).

use crate::progress::Progress;
use crate::Node;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Labels = Vec<(String, String)>;

/// Metrics that outlive a scrape: the mounts' read latency, the pulls under way.
#[derive(Debug)]
pub struct NodeMetrics {
    mount_read_seconds: Histogram,
    mount_read_errors: Counter,
    pulls: Mutex<HashMap<u64, (String, Arc<Progress>)>>,
    next: AtomicU64,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            // 50 us to 3 s.
            mount_read_seconds: Histogram::new(exponential_buckets(0.000_05, 2.5, 13)),
            mount_read_errors: Counter::default(),
            pulls: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }
}

/// A pull listed under `shoal_pull_*` until dropped.
pub struct PullListed {
    metrics: Arc<NodeMetrics>,
    id: u64,
}

impl Drop for PullListed {
    fn drop(&mut self) {
        self.metrics
            .pulls
            .lock()
            .expect("pulls poisoned")
            .remove(&self.id);
    }
}

impl NodeMetrics {
    /// What a mount calls after every read it answers.
    pub fn read_observer(self: &Arc<Self>) -> shoal_fuse::ReadObserver {
        let m = self.clone();
        shoal_fuse::ReadObserver(Arc::new(move |took, failed| {
            m.mount_read_seconds.observe(took.as_secs_f64());
            if failed {
                m.mount_read_errors.inc();
            }
        }))
    }

    /// Lists a pull of `reference` (its progress shown per phase) until the guard drops.
    pub fn pull(self: &Arc<Self>, reference: &str, progress: Arc<Progress>) -> PullListed {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.pulls
            .lock()
            .expect("pulls poisoned")
            .insert(id, (reference.to_string(), progress));
        PullListed {
            metrics: self.clone(),
            id,
        }
    }

    /// Registers everything the node knows into `reg` (called on every scrape).
    pub fn register(&self, node: &Node, reg: &mut Registry) {
        reg.register(
            "mount_read_seconds",
            "How long the mounts took to answer each read that reached them",
            self.mount_read_seconds.clone(),
        );
        reg.register(
            "mount_read_errors",
            "Mount reads answered with an error (EIO)",
            self.mount_read_errors.clone(),
        );

        let done = Family::<Labels, Gauge>::default();
        let total = Family::<Labels, Gauge>::default();
        let pulls = self.pulls.lock().expect("pulls poisoned");
        let mut by_ref: HashMap<(String, &str), (i64, i64)> = HashMap::new();
        for (reference, p) in pulls.values() {
            let (phase, d, t) = p.get();
            let e = by_ref.entry((reference.clone(), phase)).or_default();
            e.0 += d as i64;
            e.1 += t as i64;
        }
        drop(pulls);
        for ((reference, phase), (d, t)) in &by_ref {
            let l = vec![
                ("ref".to_string(), reference.clone()),
                ("phase".to_string(), phase.to_string()),
            ];
            done.get_or_create(&l).set(*d);
            total.get_or_create(&l).set(*t);
        }
        reg.register(
            "pull_done_bytes",
            "Bytes done in the current phase of each pull under way (its rate is the pull's)",
            done,
        );
        reg.register(
            "pull_total_bytes",
            "Bytes the current phase of each pull under way will take",
            total,
        );

        node.origins().metrics().register(reg);

        if let Ok(stats) = node.store().and_then(|s| Ok(s.stats()?)) {
            let used = Family::<Labels, Gauge>::default();
            let capacity = Family::<Labels, Gauge>::default();
            let hits = Family::<Labels, Counter>::default();
            let misses = Family::<Labels, Counter>::default();
            let evictions = Family::<Labels, Counter>::default();
            for (i, t) in stats.tiers.iter().enumerate() {
                let l = vec![
                    ("tier".to_string(), i.to_string()),
                    ("kind".to_string(), t.kind.clone()),
                    ("path".to_string(), t.path.clone().unwrap_or_default()),
                ];
                used.get_or_create(&l).set(t.used_bytes as i64);
                if let Some(c) = t.capacity {
                    capacity.get_or_create(&l).set(c as i64);
                }
                hits.get_or_create(&l).inc_by(t.hits);
                misses.get_or_create(&l).inc_by(t.misses);
                evictions.get_or_create(&l).inc_by(t.evictions);
            }
            reg.register("cache_used_bytes", "Bytes held by each cache tier", used);
            reg.register(
                "cache_capacity_bytes",
                "Bytes each cache tier may hold (absent: unbounded)",
                capacity,
            );
            reg.register(
                "cache_hits",
                "Chunk reads each tier answered (tier 0 is the fastest)",
                hits,
            );
            reg.register(
                "cache_misses",
                "Chunk reads each tier could not answer",
                misses,
            );
            reg.register("cache_evictions", "Chunks each tier evicted", evictions);
            let pinned = Gauge::<i64>::default();
            pinned.set(stats.pinned_bytes as i64);
            reg.register(
                "cache_pinned_bytes",
                "Bytes of pinned versions in the local store",
                pinned,
            );
        }
    }
}
