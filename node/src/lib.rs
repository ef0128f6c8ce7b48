//! Shoal's node: the local chunk store and the engines that publish and pull versions.
//!
//! [`Node`] is the embedded node: it owns the local store (opened on first use, since sled
//! allows one process at a time), talks to one origin, and knows which publisher keys it
//! trusts. The store is `shoal-store` and the peers are `shoal-swarm`; this crate drives them
//! (publish, pull and its scheduler's driver, the mount's source, the daemon).

mod blobs;
mod cache;
pub mod daemon;
pub mod error;
pub mod expiry;
mod fetch;
pub mod files;
pub mod home;
mod inspect;
pub mod known;
pub mod lifecycle;
mod locator;
pub mod metrics;
pub mod mount;
mod origin_blobs;
pub mod origins;
pub mod progress;
mod publish;
mod pull;
pub mod repack;
mod replicate;
pub mod select;
mod verify;
mod walk;

pub use shoal_store as store;
pub use shoal_store::{policy, tiers, wholefiles};
pub use shoal_swarm as swarm;
pub use shoal_swarm::limits;

pub use cache::PinReport;
pub use error::{Error, ErrorKind, Result};
pub use home::Home;
pub use inspect::{DiffEntry, DiffReport, LsEntry, VersionInfo};
pub use mount::{
    unmount, unmount_lazy, MountReport, MountSource, MountSpec, Mountable, Passthrough, Prefetch,
};
pub use origins::{OriginSpec, Origins};
pub use progress::Progress;
pub use publish::{PublishOptions, PublishReport, PublishSource, SmallChoice};
pub use pull::{OriginBytes, PullReport};
pub use replicate::{ReplicateOptions, ReplicateReport, ReplicatedVersion};
pub use select::Selection;
pub use verify::VerifyReport;

use origins::Holders;
use shoal_registry::{
    AnyTag, DatasetName, DatasetRef, Hash, Origin, OriginError, Rev, SignedVersion, TrustedKey,
    VersionRef,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use store::ChunkStore;
use swarm::Swarm;
use tiers::{CacheLayout, TieredStore};

/// Opens the local store alone, for commands that need no origin (`shoal cache`, `shoal gc`).
pub fn open_store(home: &Home, layout: &CacheLayout) -> Result<Arc<dyn ChunkStore>> {
    home.ensure()?;
    Ok(Arc::new(TieredStore::open(&home.store_dir(), layout)?))
}

/// Versions whose holders a node remembers (the origins that had them when last resolved).
const MAX_HOLDERS: usize = 4096;

/// An embedded node: state directory, local store, origins and trust settings.
pub struct Node {
    home: Home,
    origins: Arc<Origins>,
    /// Which origins held each version (by root) when it was last resolved.
    holders: Mutex<HashMap<Hash, Holders>>,
    extra_trusted: Vec<TrustedKey>,
    max_tag_age: Option<std::time::Duration>,
    cache: CacheLayout,
    store: Mutex<Option<Arc<TieredStore>>>,
    swarm: OnceLock<Arc<Swarm>>,
    whole_files: Arc<OnceLock<Option<Arc<wholefiles::WholeFiles>>>>,
    /// Mount latency and pulls under way, for the metrics endpoint (shared with siblings).
    metrics: Arc<metrics::NodeMetrics>,
    /// Versions in use in this process (shared with siblings), for the cache's TTL.
    in_use: Arc<expiry::InUseTable>,
}

impl Node {
    /// A node over `home` reading from `origins` (publishing to the first). `extra_trusted`
    /// adds keys (from the config file or the environment) to this machine's own key and
    /// those added with `shoal trust`.
    pub fn new(home: Home, origins: Origins, extra_trusted: Vec<TrustedKey>) -> Node {
        Node {
            home,
            origins: Arc::new(origins),
            holders: Mutex::default(),
            extra_trusted,
            max_tag_age: None,
            cache: CacheLayout::default(),
            store: Mutex::new(None),
            swarm: OnceLock::new(),
            whole_files: Arc::default(),
            metrics: Arc::default(),
            in_use: Arc::default(),
        }
    }

    /// The same node (store, swarm, trust) with other origins.
    pub fn with_origins(&self, origins: Arc<Origins>) -> Node {
        let n = Node {
            home: self.home.clone(),
            origins,
            holders: Mutex::default(),
            extra_trusted: self.extra_trusted.clone(),
            max_tag_age: self.max_tag_age,
            cache: self.cache.clone(),
            store: Mutex::new(self.store.lock().expect("store slot poisoned").clone()),
            swarm: OnceLock::new(),
            whole_files: self.whole_files.clone(),
            metrics: self.metrics.clone(),
            in_use: self.in_use.clone(),
        };
        if let Some(s) = self.swarm.get() {
            let _ = n.swarm.set(s.clone());
        }
        n
    }

    /// The same node, also trusting `keys`.
    pub fn trusting(mut self, keys: Vec<TrustedKey>) -> Node {
        self.extra_trusted.extend(keys);
        self
    }

    /// The cache's TTL (`[cache] ttl`), if set.
    pub fn cache_ttl(&self) -> Option<std::time::Duration> {
        self.cache.ttl
    }

    /// Applies the cache's TTL before a command starts using the store; a failure is only
    /// logged (the command goes on).
    ///
    /// Cancel-safe, as [`Self::expire`].
    pub(crate) async fn expire_quietly(&self) {
        if self.cache.ttl.is_some() {
            if let Err(e) = self.expire(false).await {
                tracing::warn!("applying the cache TTL: {e}");
            }
        }
    }

    /// Lets this node's pulls use a running swarm.
    pub fn attach_swarm(&self, swarm: Arc<Swarm>) {
        let _ = self.swarm.set(swarm);
    }

    pub fn swarm(&self) -> Option<&Arc<Swarm>> {
        self.swarm.get()
    }

    /// Mount latency and pulls under way (what `shoal node run --metrics` adds to the swarm's).
    pub fn metrics(&self) -> &Arc<metrics::NodeMetrics> {
        &self.metrics
    }

    /// How the local cache is laid out: memory, the primary store's capacity, more disk tiers.
    pub fn with_cache(mut self, cache: CacheLayout) -> Node {
        self.cache = cache;
        self
    }

    /// The whole-file copies mounts read through (None when configured off or the directory
    /// cannot be used; mounts then serve every read themselves).
    pub fn whole_files(&self) -> Option<Arc<wholefiles::WholeFiles>> {
        self.whole_files
            .get_or_init(|| {
                if self.cache.files == 0 {
                    return None;
                }
                let dir = self.home.whole_files_dir();
                wholefiles::WholeFiles::open(&dir, self.cache.files)
                    .map_err(|e| {
                        tracing::warn!(dir = %dir.display(), error = %e, "whole-file copies off")
                    })
                    .ok()
            })
            .clone()
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The origin publishes and tags write to (the first configured).
    pub fn origin(&self) -> &Origin {
        self.origins.primary()
    }

    /// Every origin this node reads from.
    pub fn origins(&self) -> &Arc<Origins> {
        &self.origins
    }

    /// The local store, opened on first use.
    pub fn store(&self) -> Result<Arc<dyn ChunkStore>> {
        let mut guard = self.store.lock().expect("store slot poisoned");
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        self.home.ensure()?;
        let s = Arc::new(TieredStore::open(&self.home.store_dir(), &self.cache)?);
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Every key whose versions and tags this node accepts, each with the datasets it may sign.
    pub fn trusted_keys(&self) -> Result<Vec<TrustedKey>> {
        let mut keys: Vec<TrustedKey> = vec![self.home.secret_key()?.public().into()];
        keys.extend(self.home.trusted_keys()?);
        keys.extend(self.extra_trusted.iter().cloned());
        Ok(keys)
    }

    /// Refuses tags nobody re-signed for longer than `age` (a frozen origin serving an old
    /// view); None accepts any age.
    pub fn with_max_tag_age(mut self, age: Option<std::time::Duration>) -> Node {
        self.max_tag_age = age;
        self
    }

    /// Checks a tag read from origin `where_`: signed by a key trusted for the dataset, not
    /// older than the maximum tag age (freeze). The rollback check is [`Self::accept_tag`].
    fn check_tag(
        &self,
        dataset: &str,
        name: &str,
        tag: &AnyTag,
        where_: &str,
        trusted: &[TrustedKey],
    ) -> Result<()> {
        let signed = match tag {
            AnyTag::Signed(t) => t,
            AnyTag::Unsigned(_) => {
                return Err(Error::TagRefused(format!(
                    "tag {dataset}@{name} in origin {where_} is unsigned (written by an older shoal); re-point it with `shoal tag {dataset}@{} {name}` to sign it",
                    tag.version()
                )))
            }
        };
        signed.verify(dataset, name, trusted)?;
        if let Some(max) = self.max_tag_age {
            let age = publish::now_unix().saturating_sub(signed.body.updated_unix);
            if age > max.as_secs() {
                return Err(Error::TagRefused(format!(
                    "tag {dataset}@{name} in origin {where_} was signed {} ago, longer than the maximum tag age ({}) allows; the origin may be frozen (serving an old view), or the publisher must re-sign it (`shoal tag`)",
                    humantime::format_duration(std::time::Duration::from_secs(age)),
                    humantime::format_duration(max)
                )));
            }
        }
        Ok(())
    }

    /// Accepts a checked tag unless it is older than one this node accepted before (a
    /// rollback); remembers its sequence number.
    fn accept_tag(&self, dataset: &str, name: &str, tag: &AnyTag, where_: &str) -> Result<()> {
        if let Err(seen) = self.home.accept_tag(dataset, name, tag.seq())? {
            return Err(Error::TagRefused(format!(
                "tag {dataset}@{name} in origin {where_} has sequence {}, older than sequence {seen} this node accepted before: the origin may have been rolled back (an old tag object put back); refusing it",
                tag.seq()
            )));
        }
        Ok(())
    }

    /// Of the objects the origins hold for `name@version` (`found`, in the origins' order),
    /// the first whose signature verifies, and which origins hold that very object. An error
    /// if some were found and none verifies.
    fn pick_version(
        &self,
        name: &DatasetName,
        version: &str,
        found: &[(usize, SignedVersion)],
        trusted: &[TrustedKey],
    ) -> Result<Option<(SignedVersion, Holders)>> {
        let mut refused = None;
        for (i, v) in found {
            match v.verify(name.as_str(), version, trusted) {
                Ok(()) => {
                    let bytes = v.encode();
                    let holders = found
                        .iter()
                        .filter(|(_, w)| w.encode() == bytes)
                        .fold(Holders(0), |h, (j, _)| Holders(h.0 | 1 << j));
                    return Ok(Some((v.clone(), holders)));
                }
                Err(e) => {
                    if self.origins.len() > 1 {
                        tracing::warn!(
                            "version {name}@{version} in origin {}: {e}",
                            self.origins.get(*i).url()
                        );
                    }
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            Some(e) => Err(e.into()),
            None => Ok(None),
        }
    }

    /// The version `name@version` as the origins hold it (see [`Self::pick_version`]); an
    /// error if no origin could answer.
    ///
    /// Cancel-safe: it only reads.
    async fn find_version(
        &self,
        name: &DatasetName,
        version: &str,
        trusted: &[TrustedKey],
    ) -> Result<Option<(SignedVersion, Holders)>> {
        let (found, errors) = self.origins.versions_named(name, version).await;
        let picked = self.pick_version(name, version, &found, trusted)?;
        match errors.into_iter().next() {
            // None holds it, and one could not say (unreachable, or what it holds is broken).
            Some(e) if picked.is_none() => Err(e.into()),
            _ => Ok(picked),
        }
    }

    /// Resolves `name@label` (a version, else a tag: the newest valid one of any origin).
    ///
    /// Cancel-safe: it only reads (a tag's sequence is remembered once accepted).
    async fn resolve_label(
        &self,
        name: &DatasetName,
        label: &str,
        trusted: &[TrustedKey],
    ) -> Result<(String, SignedVersion, Holders)> {
        let (found, errors) = self.origins.versions_named(name, label).await;
        if let Some((v, holders)) = self.pick_version(name, label, &found, trusted)? {
            return Ok((label.to_string(), v, holders));
        }
        let (tags, tag_errors) = self.origins.tags_named(name, label).await;
        let mut refused = None;
        for (i, tag) in &tags {
            let where_ = self.origins.get(*i).url();
            match self.check_tag(name.as_str(), label, tag, where_, trusted) {
                Ok(()) => {
                    self.accept_tag(name.as_str(), label, tag, where_)?;
                    let target = tag.version();
                    return match self.find_version(name, target, trusted).await? {
                        Some((v, holders)) => Ok((target.to_string(), v, holders)),
                        None => Err(match self.removed_error(name, target, trusted).await {
                            Some(e) => e,
                            None => OriginError::NotFound {
                                origin: self.origins.urls(),
                                what: format!("version {name}@{target} (tag {label} points to it)"),
                            }
                            .into(),
                        }),
                    };
                }
                Err(e) => {
                    if self.origins.len() > 1 {
                        tracing::warn!("{e}; trying the tag in the other origins");
                    }
                    refused.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        // Nothing anywhere: an origin that could not say (unreachable, or holding something
        // broken: too large, corrupt) is the answer rather than "not found".
        if let Some(e) = errors.into_iter().chain(tag_errors).next() {
            return Err(e.into());
        }
        if let Some(e) = self.removed_error(name, label, trusted).await {
            return Err(e);
        }
        Err(OriginError::NotFound {
            origin: self.origins.urls(),
            what: format!("version or tag {name}@{label}"),
        }
        .into())
    }

    /// Resolves `name@b3:<root>`: the first origin (in the origins' order) with a version of
    /// that root whose signature verifies.
    ///
    /// Cancel-safe: it only reads.
    async fn resolve_root(
        &self,
        r: &DatasetRef,
        trusted: &[TrustedKey],
    ) -> Result<(String, SignedVersion, Holders)> {
        let mut failure = None;
        let mut refused = None;
        for (i, got) in self.origins.ask_all(|o| o.resolve(r)).await {
            match got {
                Ok(found) => {
                    match found
                        .signed
                        .verify(r.dataset.as_str(), &found.version, trusted)
                    {
                        Ok(()) => {
                            // Which origins hold it (this one at least, whatever the others say).
                            let holders = match self
                                .find_version(&r.dataset, &found.version, trusted)
                                .await
                            {
                                Ok(Some((_, h))) if h.has(i) => h,
                                _ => Holders(1 << i),
                            };
                            return Ok((found.version, found.signed, holders));
                        }
                        Err(e) => {
                            refused.get_or_insert(e);
                        }
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(e.into());
        }
        match failure {
            Some(e) => Err(e.into()),
            _ => Err(OriginError::NotFound {
                origin: self.origins.urls(),
                what: format!(
                    "a version of {} with root b3:{}",
                    r.dataset,
                    match &r.rev {
                        Rev::Root(root) => root.to_string(),
                        Rev::Label(l) => l.to_string(),
                    }
                ),
            }
            .into()),
        }
    }

    /// Resolves a reference and verifies the version's signature against the trusted keys
    /// (and the tag's, if a tag named it). When the origin cannot be reached, a version seen
    /// before on this machine (by version name or root id, not by tag) still opens from its
    /// cached, re-verified signed copy.
    ///
    /// Cancel-safe: it caches a signed copy only once verified.
    pub async fn open_version(&self, reference: &DatasetRef) -> Result<(String, SignedVersion)> {
        let dataset = reference.dataset.as_str();
        let trusted = self.trusted_keys()?;
        let found = match &reference.rev {
            Rev::Label(label) => {
                self.resolve_label(&reference.dataset, label.as_str(), &trusted)
                    .await
            }
            Rev::Root(_) => self.resolve_root(reference, &trusted).await,
        };
        match found {
            Ok((version, signed, holders)) => {
                self.home.remember_version(dataset, &version, &signed);
                let mut h = self.holders.lock().expect("holders poisoned");
                if h.len() >= MAX_HOLDERS {
                    h.clear();
                }
                h.insert(signed.body.root, holders);
                Ok((version, signed))
            }
            Err(Error::Origin(e @ (OriginError::Store { .. } | OriginError::Timeout { .. }))) => {
                let Some((version, signed)) = self.home.cached_version(dataset, &reference.rev)?
                else {
                    return Err(e.into());
                };
                signed.verify(dataset, &version, &trusted)?;
                tracing::warn!(
                    "{e}; using the signed copy of {dataset}@{version} this machine kept"
                );
                Ok((version, signed))
            }
            Err(e) => Err(e),
        }
    }

    /// The origins that held the version of `root` when it was last resolved (all of them,
    /// if it was not).
    pub(crate) fn holders_of(&self, root: &Hash) -> Holders {
        self.holders
            .lock()
            .expect("holders poisoned")
            .get(root)
            .copied()
            .unwrap_or(Holders::all(self.origins.len()))
    }

    /// Where the blobs of a (verified) version are: the local store, then its packs.
    ///
    /// Cancel-safe, as [`blobs::Blobs::load`].
    pub(crate) async fn blobs(&self, signed: &SignedVersion) -> Result<blobs::Blobs> {
        let holders = self.holders_of(&signed.body.root);
        blobs::Blobs::load(
            self.origins.clone(),
            holders,
            self.store()?,
            &self.home.pack_cache_dir(),
            signed,
            self.swarm.get(),
        )
        .await
    }

    /// Points `tag` at an existing, trusted version.
    ///
    /// Cancel-safe: the tag is one conditional put; cancelled, it either landed whole or not at
    /// all.
    pub async fn tag(&self, target: &VersionRef, tag: &shoal_registry::Label) -> Result<String> {
        let signed = self
            .origin()
            .version(&target.dataset, target.version.as_str())
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no version {target} in origin {} (tags are written to the first origin configured)",
                    self.origin().url()
                ))
            })?;
        signed.verify(
            target.dataset.as_str(),
            target.version.as_str(),
            &self.trusted_keys()?,
        )?;
        let key = self.home.secret_key()?;
        let seq = self
            .origin()
            .set_tag(
                &target.dataset,
                tag.as_str(),
                target.version.as_str(),
                publish::now_unix(),
                &key,
            )
            .await?;
        // This node wrote it: it will not accept an older one.
        let _ = self
            .home
            .accept_tag(target.dataset.as_str(), tag.as_str(), seq)?;
        Ok(format!(
            "{}@{tag} -> {target} (sequence {seq})",
            target.dataset
        ))
    }
}

#[cfg(test)]
mod tests {
    /// Every async fn of the node's crates says whether it is cancel-safe (what a caller that
    /// drops it half-way, in a `select!` or a timeout, is left with).
    #[test]
    fn every_async_fn_states_its_cancel_safety() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut missing = Vec::new();
        for dir in ["src", "swarm/src", "store/src"] {
            for e in std::fs::read_dir(here.join(dir)).unwrap() {
                let path = e.unwrap().path();
                if path.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                for (i, l) in lines.iter().enumerate() {
                    if !l.contains("async fn ")
                        || l.contains('"')
                        || l.trim_start().starts_with("//")
                    {
                        continue;
                    }
                    let mut doc = String::new();
                    let mut j = i;
                    while j > 0 {
                        let above = lines[j - 1].trim_start();
                        if above.starts_with("///") || above.starts_with("#[") {
                            doc.push_str(above);
                            j -= 1;
                        } else {
                            break;
                        }
                    }
                    if doc.contains("#[tokio::test") || doc.contains("#[test") {
                        continue;
                    }
                    if !doc.to_lowercase().contains("cancel") {
                        missing.push(format!("{}:{}: {}", path.display(), i + 1, l.trim()));
                    }
                }
            }
        }
        assert!(missing.len() < 200, "the scan found too much: {missing:?}");
        assert!(
            missing.is_empty(),
            "no word on cancel-safety:\n{}",
            missing.join("\n")
        );
    }
}
