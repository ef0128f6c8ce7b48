//! Pins, usage and collection of the local store.

use crate::error::Result;
use crate::progress::Progress;
use crate::select::Selection;
use crate::walk::walk;
use crate::Node;
use serde::{Deserialize, Serialize};
use shoal_registry::{DatasetRef, Rev};
use std::collections::HashSet;

/// What `pin` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinReport {
    pub pinned: String,
    pub root: String,
    pub blobs: u64,
    pub bytes: u64,
    pub bytes_from_origin: u64,
    /// Files pinned (of a partial pin, those selected).
    #[serde(default)]
    pub files: u64,
}

impl Node {
    /// Fetches whatever of `reference` is not local, then pins all of it (chunks and tree
    /// nodes) so that no cache pressure evicts it.
    ///
    /// Cancel-safe: the pin is one store transaction taken after every blob is local; a
    /// cancelled pin leaves fetched blobs cached and nothing pinned.
    pub async fn pin(&self, reference: &DatasetRef, progress: &Progress) -> Result<PinReport> {
        self.pin_select(reference, &Selection::default(), progress)
            .await
    }

    /// [`Self::pin`] of the files `select` takes (and every tree node of the version, so
    /// that listing it never needs the network). The pin replaces an earlier one of the same
    /// version.
    ///
    /// Cancel-safe, as [`Self::pin`].
    pub async fn pin_select(
        &self,
        reference: &DatasetRef,
        select: &Selection,
        progress: &Progress,
    ) -> Result<PinReport> {
        let matcher = select.matcher()?;
        if self.swarm().is_none() {
            self.expire_quietly().await;
        }
        let (version, signed) = self.open_version(reference).await?;
        let _in_use = self.using(
            signed.body.root,
            &format!("{}@{version}", reference.dataset),
        );
        let store = self.store()?;
        let blobs = self.blobs(&signed).await?;
        let mut tree = walk(&blobs, signed.body.root).await?;
        if !select.is_all() {
            tree = matcher.select(tree);
            if tree.files.is_empty() {
                return Err(crate::Error::NotFound(format!(
                    "no file of {}@{version} matches {}",
                    reference.dataset,
                    select.describe()
                )));
            }
        }
        let mut seen = HashSet::new();
        let mut all: Vec<(shoal_registry::Hash, u32)> = tree.nodes.clone();
        all.extend(
            tree.files
                .iter()
                .flat_map(|f| f.chunks.iter())
                .map(|c| (c.id, c.len)),
        );
        all.retain(|(id, _)| seen.insert(*id));
        let bytes: u64 = all.iter().map(|b| b.1 as u64).sum();
        if let Some(cap) = self.cache.capacity {
            if bytes > cap / 4 * 3 {
                return Err(crate::Error::Unsafe {
                    path: self.home.store_dir(),
                    reason: format!(
                        "pinning {}@{version} needs {bytes} bytes in the primary disk tier, more than its capacity of {cap} bytes allows \
                         (3/4 of it for live data); raise [cache] capacity or SHOAL_CACHE_CAPACITY",
                        reference.dataset
                    ),
                });
            }
        }
        let s = store.clone();
        let ids: Vec<_> = all.iter().map(|b| b.0).collect();
        let missing: Vec<_> = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| !s.contains(id).unwrap_or(false))
                .collect()
        })
        .await
        .expect("store task panicked");
        progress.phase("fetching", 0);
        blobs.fetch(missing, Some(progress)).await?;
        let name = format!("{}@{version}", reference.dataset);
        let s = store.clone();
        let (n, list) = (name.clone(), all.clone());
        // A pin of the same version (whole or another selection) is replaced.
        tokio::task::spawn_blocking(move || {
            s.unpin(&n)?;
            s.pin(&n, &list)
        })
        .await
        .expect("store task panicked")?;
        Ok(PinReport {
            pinned: name,
            root: format!("b3:{}", signed.body.root),
            blobs: all.len() as u64,
            bytes,
            bytes_from_origin: blobs.bytes_from_origin(),
            files: tree.files.len() as u64,
        })
    }

    /// Releases the pin of `reference`; false if it was not pinned. A version name is matched
    /// without asking the origin; a tag or root id is resolved first.
    ///
    /// Cancel-safe: the unpin is one store transaction.
    pub async fn unpin(&self, reference: &DatasetRef) -> Result<bool> {
        let store = self.store()?;
        if let Rev::Label(l) = &reference.rev {
            if store.unpin(&format!("{}@{l}", reference.dataset))? {
                return Ok(true);
            }
        }
        let (version, _) = self.open_version(reference).await?;
        Ok(store.unpin(&format!("{}@{version}", reference.dataset))?)
    }
}
