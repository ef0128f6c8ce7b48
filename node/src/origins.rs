//! A node's origins: every object store that may hold its datasets, each with labels and a
//! limit, read through `shoal_sched::origins` (which origin serves each read, measured).
//!
//! Writes (publish, tag) go to the first origin configured, the primary; `shoal replicate`
//! copies versions to the others. Reads go to any origin holding the version: versions and
//! tags are signed, so a mirror need not be trusted, and a version object is written last
//! (by publish and by replicate), so an origin holding it holds every pack it names.
//!
//! This is the thin driver: it carries out the set's picks and reports back what each read
//! did and how long it took.

use crate::error::{Error, Result};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use shoal_registry::pack::AnyIndex;
use shoal_registry::{AnyTag, DatasetName, Hash, Origin, OriginError, SignedVersion};
use shoal_sched::origins::{OriginInfo, OriginSet};
use shoal_swarm::rate::Rate;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Most origins a node may be configured with.
pub const MAX_ORIGINS: usize = 32;
/// Requests in flight at one origin unless configured otherwise.
pub const DEFAULT_MAX_REQUESTS: usize = 8;
/// How long a small request (a version object, a tag, a listing) may take at one origin
/// before the next is asked.
const SMALL_WAIT: Duration = Duration::from_secs(30);

/// One origin as configured: `[[origin]]` in the config file, `--origin`, `SHOAL_ORIGIN`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSpec {
    /// A path, file://, s3://bucket/prefix, gs://, az:// or http(s)://.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Most requests in flight at this origin (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
}

impl OriginSpec {
    pub fn new(url: impl Into<String>) -> OriginSpec {
        OriginSpec {
            url: url.into(),
            ..Default::default()
        }
    }
}

/// Which of a node's origins hold a version (a bit per origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holders(pub u32);

impl Holders {
    pub fn all(n: usize) -> Holders {
        Holders(if n >= 32 { u32::MAX } else { (1 << n) - 1 })
    }
    pub fn has(&self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
}

/// The origins of a node. Cheap to share (`Arc`).
pub struct Origins {
    list: Vec<Origin>,
    specs: Vec<OriginSpec>,
    /// This node's (region, zone), against which the origins are ranked.
    labels: (Option<String>, Option<String>),
    set: Mutex<OriginSet>,
    /// Woken whenever a read ends, for reads waiting on a request limit.
    freed: tokio::sync::Notify,
    /// Bytes per second this node reads from its origins together (`[rates] origin`).
    rate: Option<Arc<Rate>>,
    /// Requests, bytes, errors and latency per origin, for the metrics endpoint.
    metrics: OriginMetrics,
}

/// Per-origin counters and a latency histogram, labelled by the origin's URL.
#[derive(Debug, Clone)]
pub struct OriginMetrics {
    requests: Family<Vec<(String, String)>, Counter>,
    errors: Family<Vec<(String, String)>, Counter>,
    bytes: Family<Vec<(String, String)>, Counter>,
    seconds: Family<Vec<(String, String)>, Histogram>,
}

impl Default for OriginMetrics {
    fn default() -> Self {
        OriginMetrics {
            requests: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            // 1 ms to 33 s.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
        }
    }
}

impl OriginMetrics {
    /// Registers the families (shared: the registry is built afresh on every scrape).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "origin_requests",
            "Requests made to each origin (ranged pack reads, pack indexes, versions, tags, listings)",
            self.requests.clone(),
        );
        reg.register(
            "origin_errors",
            "Origin requests that failed, timed out or returned a wrong length",
            self.errors.clone(),
        );
        reg.register(
            "origin_read_bytes",
            "Bytes of packs read from each origin",
            self.bytes.clone(),
        );
        reg.register(
            "origin_request_seconds",
            "How long each origin request took (ended ones, failed or not)",
            self.seconds.clone(),
        );
    }
}

impl std::fmt::Debug for Origins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|o| o.url()))
            .finish()
    }
}

impl Origins {
    /// Opens every origin of `specs` (the first is created if `create` and it is a local
    /// directory), ranked by their labels against this node's (`region`, `zone`).
    pub fn open(
        specs: Vec<OriginSpec>,
        create: bool,
        region: Option<&str>,
        zone: Option<&str>,
    ) -> Result<Origins> {
        if specs.is_empty() {
            return Err(Error::Origin(OriginError::BadUrl {
                url: String::new(),
                reason: "no origin configured; pass --origin or set SHOAL_ORIGIN".into(),
            }));
        }
        if specs.len() > MAX_ORIGINS {
            return Err(Error::Origin(OriginError::BadUrl {
                url: specs[MAX_ORIGINS].url.clone(),
                reason: format!("at most {MAX_ORIGINS} origins may be configured"),
            }));
        }
        let mut list = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if let Some(j) = specs[..i].iter().position(|o| o.url == s.url) {
                return Err(Error::Origin(OriginError::BadUrl {
                    url: s.url.clone(),
                    reason: format!("listed twice (origins {} and {})", j + 1, i + 1),
                }));
            }
            if s.max_requests == Some(0) {
                return Err(Error::Origin(OriginError::BadUrl {
                    url: s.url.clone(),
                    reason: "max_requests must be at least 1".into(),
                }));
            }
            list.push(Origin::open(&s.url, create && i == 0)?);
        }
        Ok(Self::from_parts(list, specs, region, zone))
    }

    fn from_parts(
        list: Vec<Origin>,
        specs: Vec<OriginSpec>,
        region: Option<&str>,
        zone: Option<&str>,
    ) -> Origins {
        let set = OriginSet::new(specs.iter().map(|s| OriginInfo {
            rank: shoal_sched::origins::rank(s.region.as_deref(), s.zone.as_deref(), region, zone),
            max_requests: s.max_requests.unwrap_or(DEFAULT_MAX_REQUESTS),
        }));
        Origins {
            list,
            specs,
            labels: (region.map(str::to_string), zone.map(str::to_string)),
            set: Mutex::new(set),
            freed: tokio::sync::Notify::new(),
            rate: None,
            metrics: OriginMetrics::default(),
        }
    }

    /// Per-origin requests, errors, bytes and latency.
    pub fn metrics(&self) -> &OriginMetrics {
        &self.metrics
    }

    /// Counts one ended request at origin `i`.
    fn count(&self, i: usize, took: Duration, bytes: u64, failed: bool) {
        let label = vec![("origin".to_string(), self.list[i].url().to_string())];
        let m = &self.metrics;
        m.requests.get_or_create(&label).inc();
        // Created at 0 with the first request: a dashboard shows "no errors", not "no data".
        let errors = m.errors.get_or_create(&label);
        if failed {
            errors.inc();
        }
        if bytes > 0 {
            m.bytes.get_or_create(&label).inc_by(bytes);
        }
        m.seconds.get_or_create(&label).observe(took.as_secs_f64());
    }

    /// These origins read within `rate` (shared with other `Origins` of the same node).
    pub fn with_rate(mut self, rate: Option<Arc<Rate>>) -> Origins {
        self.rate = rate;
        self
    }

    /// The origin rate these origins read within, to share with others of the node.
    pub fn rate(&self) -> Option<Arc<Rate>> {
        self.rate.clone()
    }

    /// Waits until `bytes` more may be read from the origins within the node's rate.
    ///
    /// Cancel-safe: see [`Rate::take`].
    pub async fn throttle(&self, bytes: u64) {
        if let Some(r) = &self.rate {
            r.take(bytes).await;
        }
    }

    /// The origin publishes and tags write to: the first configured.
    pub fn primary(&self) -> &Origin {
        &self.list[0]
    }

    pub fn get(&self, i: usize) -> &Origin {
        &self.list[i]
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn specs(&self) -> &[OriginSpec] {
        &self.specs
    }

    /// This node's (region, zone), as the origins were ranked against.
    pub fn node_labels(&self) -> (Option<&str>, Option<&str>) {
        (self.labels.0.as_deref(), self.labels.1.as_deref())
    }

    /// The origins' URLs, for messages.
    pub fn urls(&self) -> String {
        self.list
            .iter()
            .map(|o| o.url())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn order(&self) -> Vec<usize> {
        self.set
            .lock()
            .expect("origin set poisoned")
            .order(Instant::now())
    }

    /// Asks every origin the same small question at once (`ask(origin)`), each within a
    /// bounded wait, and returns each origin's answer in preference order.
    ///
    /// Cancel-safe: it only reads.
    pub async fn ask_all<'a, T, F, Fut>(&'a self, ask: F) -> Vec<(usize, Result<T, OriginError>)>
    where
        F: Fn(&'a Origin) -> Fut,
        Fut: std::future::Future<Output = Result<T, OriginError>> + 'a,
    {
        let order = self.order();
        let asks = order.iter().map(|&i| {
            let fut = ask(&self.list[i]);
            async move {
                let t = Instant::now();
                let r = match tokio::time::timeout(SMALL_WAIT, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(self.timed_out(i, "a request", SMALL_WAIT)),
                };
                self.small_done(i, t.elapsed(), &r);
                (i, r)
            }
        });
        futures::future::join_all(asks).await
    }

    fn timed_out(&self, i: usize, what: &str, after: Duration) -> OriginError {
        OriginError::Timeout {
            origin: self.list[i].url().to_string(),
            what: what.to_string(),
            secs: after.as_secs_f64(),
        }
    }

    fn small_done<T>(&self, i: usize, took: Duration, r: &Result<T, OriginError>) {
        self.count(i, took, 0, matches!(r, Err(e) if !e.is_not_found()));
        let mut set = self.set.lock().expect("origin set poisoned");
        match r {
            Ok(_) => set.answered(i, took),
            Err(e) if e.is_not_found() => set.answered(i, took),
            Err(OriginError::Store { .. } | OriginError::Timeout { .. }) => {
                set.down(i, Instant::now())
            }
            Err(_) => {}
        }
    }

    /// Every origin's object for `name@version` (unverified), in preference order, with the
    /// errors of those that could not answer.
    ///
    /// Cancel-safe: it only reads.
    pub async fn versions_named(
        &self,
        name: &DatasetName,
        version: &str,
    ) -> (Vec<(usize, SignedVersion)>, Vec<OriginError>) {
        let mut found = Vec::new();
        let mut errors = Vec::new();
        for (i, r) in self.ask_all(|o| o.version(name, version)).await {
            match r {
                Ok(Some(v)) => found.push((i, v)),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        (found, errors)
    }

    /// Every origin's tag `name@tag` (unverified), newest (by sequence) first, with the errors
    /// of those that could not answer.
    ///
    /// Cancel-safe: it only reads.
    pub async fn tags_named(
        &self,
        name: &DatasetName,
        tag: &str,
    ) -> (Vec<(usize, AnyTag)>, Vec<OriginError>) {
        let mut found = Vec::new();
        let mut errors = Vec::new();
        for (i, r) in self.ask_all(|o| o.tag(name, tag)).await {
            match r {
                Ok(Some(t)) => found.push((i, t)),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        found.sort_by_key(|(_, t)| std::cmp::Reverse(t.seq()));
        (found, errors)
    }

    /// The records of `name`'s repacked packs in every origin (a pack's record from the first
    /// origin that has one); an origin that cannot be reached is left out with a warning,
    /// unless none can.
    ///
    /// Cancel-safe: it only reads.
    pub async fn forwards(
        &self,
        name: &shoal_registry::DatasetName,
    ) -> Result<std::collections::HashMap<Hash, shoal_registry::Forward>> {
        let mut answers = self.ask_all(|o| o.forwards(name)).await;
        answers.sort_by_key(|(i, _)| *i);
        let mut out = std::collections::HashMap::new();
        let mut first_err = None;
        let mut answered = false;
        for (_, r) in answers {
            match r {
                Ok(fs) => {
                    answered = true;
                    for (p, f) in fs {
                        out.entry(p).or_insert(f);
                    }
                }
                Err(e) => {
                    tracing::warn!("{e}; reading the other origins' repack records");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !answered => Err(e.into()),
            _ => Ok(out),
        }
    }

    /// Names listed by any origin (`list(origin)`: versions or tags of a dataset), sorted;
    /// an origin that cannot be reached is left out with a warning, unless none can.
    ///
    /// Cancel-safe: it only reads.
    pub async fn list_union<'a, F, Fut>(&'a self, list: F) -> Result<Vec<String>>
    where
        F: Fn(&'a Origin) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<String>, OriginError>> + 'a,
    {
        let mut names = std::collections::BTreeSet::new();
        let mut first_err = None;
        let mut answered = false;
        for (_, r) in self.ask_all(list).await {
            match r {
                Ok(v) => {
                    answered = true;
                    names.extend(v);
                }
                Err(e) => {
                    tracing::warn!("{e}; listing the other origins");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !answered => Err(e.into()),
            _ => Ok(names.into_iter().collect()),
        }
    }

    /// A pack's index from the first origin holding the version that has it intact.
    ///
    /// Cancel-safe: it only reads.
    pub async fn pack_index(&self, holders: Holders, id: &Hash) -> Result<(AnyIndex, Bytes)> {
        let mut last = None;
        for i in self.order().into_iter().filter(|&i| holders.has(i)) {
            let t = Instant::now();
            let r = match tokio::time::timeout(SMALL_WAIT, self.list[i].pack_index(id)).await {
                Ok(r) => r,
                Err(_) => Err(self.timed_out(i, &format!("pack index {id}"), SMALL_WAIT)),
            };
            self.small_done(i, t.elapsed(), &r);
            match r {
                Ok(got) => return Ok(got),
                Err(e) => {
                    if self.list.len() > 1 {
                        tracing::warn!("{e}; trying the next origin");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map(Error::from).unwrap_or_else(|| {
            Error::NotFound(format!("pack index {id}: no origin holds the version"))
        }))
    }

    /// Reads `range` of pack `id` from the origin the set picks among `holders`, and from the
    /// next if that one fails or outlives its deadline; each origin is tried once. Returns the
    /// bytes and which origin sent them (to [`Self::blame`] it if they do not verify).
    ///
    /// Cancel-safe: it only reads; a read dropped half-way is counted as ended.
    pub async fn read_pack(
        &self,
        holders: Holders,
        id: &Hash,
        range: Range<u64>,
    ) -> Result<(Bytes, usize)> {
        let bytes = range.end - range.start;
        let mut tried = Holders(0);
        let mut last: Option<OriginError> = None;
        loop {
            // Every attempt reads the bytes again: each is within the node's origin rate.
            self.throttle(bytes).await;
            let pick = {
                let set = self.set.lock().expect("origin set poisoned");
                let allowed = |i: usize| holders.has(i) && !tried.has(i);
                if !(0..self.list.len()).any(allowed) {
                    return Err(last.map(Error::from).unwrap_or_else(|| {
                        Error::NotFound(format!(
                            "pack {}: no origin holds the version",
                            self.list[0].pack_path(id)
                        ))
                    }));
                }
                set.pick(bytes, allowed, Instant::now())
            };
            let Some(i) = pick else {
                // Every origin allowed is at its request limit: wait for a read to end.
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), self.freed.notified()).await;
                continue;
            };
            let deadline = {
                let mut set = self.set.lock().expect("origin set poisoned");
                tracing::debug!(
                    origin = self.list[i].url(),
                    bytes,
                    expected_ms = set.expected(i, bytes).as_millis() as u64,
                    "origin read"
                );
                set.started(i, bytes);
                set.deadline(i, bytes)
            };
            let mut guard = InFlight {
                origins: self,
                i,
                bytes,
                done: false,
            };
            let t = Instant::now();
            let span = tracing::info_span!(
                "origin.read",
                origin = self.list[i].url(),
                key = self.list[i].pack_path(id),
                offset = range.start,
                bytes
            );
            let r = tokio::time::timeout(deadline, self.list[i].read_pack(id, range.clone()))
                .instrument(span)
                .await;
            guard.done = true;
            let took = t.elapsed();
            match &r {
                Ok(Ok(data)) => self.count(i, took, data.len() as u64, data.len() as u64 != bytes),
                _ => self.count(i, took, 0, true),
            }
            let mut set = self.set.lock().expect("origin set poisoned");
            match r {
                Ok(Ok(data)) if data.len() as u64 == bytes => {
                    set.finished(i, bytes, t.elapsed());
                    drop(set);
                    self.freed.notify_waiters();
                    return Ok((data, i));
                }
                Ok(Ok(data)) => {
                    set.failed(i, bytes, Instant::now());
                    last = Some(OriginError::Corrupt {
                        origin: self.list[i].url().to_string(),
                        key: self.list[i].pack_path(id),
                        reason: format!(
                            "range {}..{} returned {} bytes",
                            range.start,
                            range.end,
                            data.len()
                        ),
                    });
                }
                Ok(Err(e)) => {
                    set.failed(i, bytes, Instant::now());
                    last = Some(e);
                }
                Err(_) => {
                    set.failed(i, bytes, Instant::now());
                    last = Some(self.timed_out(
                        i,
                        &format!(
                            "reading {bytes} bytes of {} (many times what it was measured to take)",
                            self.list[i].pack_path(id)
                        ),
                        deadline,
                    ));
                }
            }
            drop(set);
            self.freed.notify_waiters();
            if let Some(e) = &last {
                if self.list.len() > 1 {
                    tracing::warn!("{e}; reading the range from another origin");
                }
            }
            tried.0 |= 1 << i;
        }
    }

    /// Origin `i` sent bytes that do not match their ids: it is left out for a while, like one
    /// that failed.
    pub fn blame(&self, i: usize) {
        self.set
            .lock()
            .expect("origin set poisoned")
            .down(i, Instant::now());
    }
}

/// A read under way at origin `i`; dropped before it ended (the read was cancelled), it is
/// counted as ended without a measurement.
struct InFlight<'a> {
    origins: &'a Origins,
    i: usize,
    bytes: u64,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Ok(mut set) = self.origins.set.lock() {
                set.absent(self.i, self.bytes);
            }
            self.origins.freed.notify_waiters();
        }
    }
}
