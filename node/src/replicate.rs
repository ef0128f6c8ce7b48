//! Copying versions to another origin (`shoal replicate`): what the target lacks of the
//! versions asked for (packs, their indexes, the dataset's settings, the version objects, the
//! tags that point at them), verified on the way and written in the order a publish writes
//! them, so that the target is never seen holding a version it cannot serve.
//!
//! Order and resumption: a pack is written before its index, and a version object only after
//! every pack it names has its index at the target. A pack whose index is at the target is
//! whole and is never read again; a pack without its index but of the size its index gives was
//! written whole by a copy killed before the index (puts are atomic) and only its index is
//! written. So a copy killed at any point and run again copies no pack twice, and a second
//! version moves only the packs the first did not have.

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::Node;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shoal_registry::pack::{AnyIndex, PackIndex};
use shoal_registry::{AnyTag, DatasetName, DatasetRef, Hash, Origin, SignedVersion};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Packs copied at once. Each is held whole in memory between its read and its put (about
/// `PACK_TARGET`, 64 MiB), so this bounds the copy's memory.
const PACKS_AT_ONCE: usize = 4;

/// What `shoal replicate` did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicateReport {
    /// Where the versions were copied from and to.
    pub from: String,
    pub to: String,
    /// The versions asked for, as NAME@VERSION, each with whether this run created it at the
    /// target (false: it was there already).
    pub versions: Vec<ReplicatedVersion>,
    /// Packs the versions name, those this run wrote, and those the target had.
    pub packs: u64,
    pub packs_copied: u64,
    pub packs_present: u64,
    /// Pack bytes read from the source and written to the target by this run.
    pub pack_bytes_copied: u64,
    /// Every byte written to the target (packs, indexes, versions, tags, settings).
    pub bytes_written: u64,
    /// Tags written at the target (NAME@TAG -> VERSION).
    pub tags: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicatedVersion {
    #[serde(rename = "ref")]
    pub reference: String,
    pub created: bool,
}

/// A pack's index, read and verified from the source, for a pack the target lacks.
struct Missing {
    id: Hash,
    index: AnyIndex,
    index_bytes: Bytes,
}

impl Missing {
    /// The pack's size: 0 for an external pack (its bytes stay in their source objects; the
    /// target names the same objects).
    fn pack_len(&self) -> u64 {
        match &self.index {
            AnyIndex::Packed(idx) => idx.pack_len(),
            AnyIndex::External(_) => 0,
        }
    }
}

impl Node {
    /// Copies the versions `refs` names (and every version of the datasets in `all`) from this
    /// node's origin to `to`: see the module docs. Every version must verify against this
    /// node's trusted keys; every blob is checked against its id before it is written.
    ///
    /// Cancel-safe: what was written is whole and in order (see the module docs); the next
    /// run goes on from there.
    pub async fn replicate(
        &self,
        refs: &[DatasetRef],
        all: &[DatasetName],
        to: &Origin,
        progress: &Progress,
    ) -> Result<ReplicateReport> {
        let started = Instant::now();
        let from = self.origin();
        if !to.writable() {
            return Err(Error::Origin(shoal_registry::OriginError::BadUrl {
                url: to.url().to_string(),
                reason: "an http(s) origin is read-only; replicate to a path, s3://, gs:// or az://, and serve that over HTTP".into(),
            }));
        }
        if from.url() == to.url() {
            return Err(Error::Origin(shoal_registry::OriginError::BadUrl {
                url: to.url().to_string(),
                reason: "it is the origin the versions are read from".into(),
            }));
        }
        progress.phase("resolving", 0);
        // Versions by dataset, each verified.
        let mut versions: BTreeMap<DatasetName, BTreeMap<String, SignedVersion>> = BTreeMap::new();
        for r in refs {
            let (version, signed) = self.open_version(r).await?;
            versions
                .entry(r.dataset.clone())
                .or_default()
                .insert(version, signed);
        }
        for name in all {
            let listed = from.list_versions(name).await?;
            if listed.is_empty() {
                return Err(Error::NotFound(format!(
                    "dataset {name} has no versions in origin {}",
                    from.url()
                )));
            }
            for v in listed {
                let r: DatasetRef = format!("{name}@{v}").parse()?;
                let (version, signed) = self.open_version(&r).await?;
                versions
                    .entry(name.clone())
                    .or_default()
                    .insert(version, signed);
            }
        }
        let written = AtomicU64::new(0);

        // The datasets' settings first, as a publish writes them.
        for name in versions.keys() {
            let cfg = from.dataset_config(name).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "dataset {name} has no settings object in origin {}",
                    from.url()
                ))
            })?;
            let there = to.create_dataset_config(name, cfg.clone()).await?;
            if there.chunking != cfg.chunking {
                return Err(Error::Corrupt {
                    what: format!("dataset {name} in origin {}", to.url()),
                    reason: format!(
                        "it was created there with other chunking ({:?}, here {:?}); its versions cannot be copied into it",
                        there.chunking, cfg.chunking
                    ),
                });
            }
        }

        // Which packs the target lacks, with their indexes from the source.
        let packs: BTreeSet<Hash> = versions
            .values()
            .flat_map(|vs| vs.values())
            .flat_map(|v| v.body.packs.iter().copied())
            .collect();
        progress.phase("checking", packs.len() as u64);
        let missing: Vec<Option<Missing>> = futures::stream::iter(packs.iter().copied())
            .map(|id| async move {
                let present = to.has_pack(&id).await?;
                progress.add(1);
                if present {
                    return Ok::<_, Error>(None);
                }
                let (index, index_bytes) = from.pack_index(&id).await?;
                Ok(Some(Missing {
                    id,
                    index,
                    index_bytes,
                }))
            })
            .buffered(16)
            .try_collect()
            .await?;
        let missing: Vec<Missing> = missing.into_iter().flatten().collect();
        let total: u64 = missing.iter().map(Missing::pack_len).sum();
        progress.phase("copying", total);
        let copied = AtomicU64::new(0);
        let packs_copied = AtomicU64::new(0);
        futures::stream::iter(missing)
            .map(|m| {
                let (copied, packs_copied, written) = (&copied, &packs_copied, &written);
                async move {
                    let len = m.pack_len();
                    if let AnyIndex::Packed(idx) = &m.index {
                        if to.pack_size(&m.id).await? == Some(len) {
                            tracing::info!(pack = %m.id, "pack already at the target without its index (a copy cut short): writing the index only");
                            progress.add(len);
                        } else {
                            let parts = read_pack(from, &m.id, idx, progress).await?;
                            to.put_pack_data(&m.id, parts).await?;
                            copied.fetch_add(len, Ordering::Relaxed);
                            written.fetch_add(len, Ordering::Relaxed);
                            packs_copied.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let n = m.index_bytes.len() as u64;
                    to.put_pack_index(&m.id, m.index_bytes).await?;
                    written.fetch_add(n, Ordering::Relaxed);
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(PACKS_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;

        // The version objects, once everything they name is there.
        progress.phase("versions", 0);
        let mut report_versions = Vec::new();
        for (name, vs) in &versions {
            for (version, signed) in vs {
                let created = match to.version(name, version).await? {
                    Some(there) if there.encode() == signed.encode() => false,
                    Some(_) => {
                        return Err(Error::Origin(shoal_registry::OriginError::AlreadyExists {
                            origin: to.url().to_string(),
                            what: format!("another version {name}@{version} (a different publish of the same name)"),
                        }))
                    }
                    None => {
                        match to.create_version(name, signed).await {
                            Ok(()) => {
                                written.fetch_add(signed.encode().len() as u64, Ordering::Relaxed);
                                true
                            }
                            // Another copy got there first: the same signed object or a
                            // conflicting one, told apart by reading it back.
                            Err(shoal_registry::OriginError::AlreadyExists { .. })
                                if to
                                    .version(name, version)
                                    .await?
                                    .is_some_and(|t| t.encode() == signed.encode()) =>
                            {
                                false
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                };
                report_versions.push(ReplicatedVersion {
                    reference: format!("{name}@{version}"),
                    created,
                });
            }
        }

        // Tags last: every signed, trusted tag of these datasets whose version the target
        // now holds, unless the target's is as new.
        let trusted = self.trusted_keys()?;
        let mut tags = Vec::new();
        for name in versions.keys() {
            for tag in from.list_tags(name).await? {
                let Some(AnyTag::Signed(t)) = from.tag(name, &tag).await? else {
                    continue;
                };
                if let Err(e) = t.verify(name.as_str(), &tag, &trusted) {
                    tracing::warn!("not copying tag {name}@{tag}: {e}");
                    continue;
                }
                if !to.version_exists(name, &t.body.version).await? {
                    continue;
                }
                let (wrote, _) = to.copy_tag(name, &t).await?;
                if wrote {
                    written.fetch_add(t.encode().len() as u64, Ordering::Relaxed);
                    tags.push(format!("{name}@{tag} -> {}", t.body.version));
                }
            }
        }

        let packs_copied = packs_copied.into_inner();
        Ok(ReplicateReport {
            from: from.url().to_string(),
            to: to.url().to_string(),
            versions: report_versions,
            packs: packs.len() as u64,
            packs_copied,
            packs_present: packs.len() as u64 - packs_copied,
            pack_bytes_copied: copied.into_inner(),
            bytes_written: written.into_inner(),
            tags,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Reads a pack from the source in pieces cut at blob boundaries, checking every blob against
/// its id. Cancel-safe: it only reads.
async fn read_pack(
    from: &Origin,
    id: &Hash,
    index: &PackIndex,
    progress: &Progress,
) -> Result<Vec<Bytes>> {
    let reads = crate::verify::pieces(index.entries.iter().map(|e| (e.id, e.offset, e.len)));
    futures::stream::iter(reads)
        .map(|piece| async move {
            let (first, last) = (piece[0], piece[piece.len() - 1]);
            let range = first.1..last.1 + last.2 as u64;
            let data = from.read_pack(id, range.clone()).await?;
            if data.len() as u64 != range.end - range.start {
                return Err(Error::Corrupt {
                    what: format!("pack {} in origin {}", from.pack_path(id), from.url()),
                    reason: format!(
                        "range {}..{} returned {} bytes",
                        range.start,
                        range.end,
                        data.len()
                    ),
                });
            }
            let (data, bad) = tokio::task::spawn_blocking(move || {
                let bad = crate::verify::bad_blobs(&piece, &data);
                (data, bad)
            })
            .await
            .expect("verify task panicked");
            if let Some(blob) = bad.first() {
                return Err(Error::Corrupt {
                    what: format!("blob {blob} in pack {} in origin {}", from.pack_path(id), from.url()),
                    reason: "its bytes do not match its id; the origin's copy is damaged or was tampered with, and nothing of this pack was written".into(),
                });
            }
            progress.add(data.len() as u64);
            Ok(data)
        })
        .buffered(2)
        .try_collect()
        .await
}
