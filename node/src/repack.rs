//! `shoal origin repack`: rewrites the packs of a dataset whose live bytes (those some version
//! present reads) have fallen below a share of their size into new packs holding only the live
//! blobs, and records where they went (`datasets/<name>/_repacked/<pack>`, a
//! [`Forward`]). Readers that find a pack gone follow its record; `shoal origin gc` deletes
//! the old pack once the record is older than the grace period and covers every version that
//! reaches the pack (docs/lifecycle.md says why that is safe). Which packs are rewritten is
//! [`choose`], pure.

use crate::blobs::{pack_index, Blobs};
use crate::error::{Error, Result};
use crate::lifecycle::reach_through;
use crate::origins::Holders;
use crate::progress::Progress;
use crate::publish::{now_unix, spawn_packer, spawn_uploader, Group};
use crate::Node;
use bytes::Bytes;
use serde::Serialize;
use shoal_registry::pack::AnyIndex;
use shoal_registry::{DatasetName, Forward, Hash, SignedVersion};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Blobs fetched from the old packs at once (bounded memory: at most a pack's worth).
const BATCH_BYTES: u64 = 16 << 20;

/// A pack `shoal origin repack` rewrote (or would, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct RepackedPack {
    pub pack: String,
    /// Raw bytes of its blobs, and of those some version present reads.
    pub bytes: u64,
    pub live_bytes: u64,
    /// Live bytes copied into new packs now (those not already in a pack an earlier repack
    /// of it wrote).
    pub copied_bytes: u64,
    /// `sparse` (live share below the threshold) or `uncovered` (repacked before, and a
    /// version published since reaches it).
    pub why: &'static str,
}

/// What `shoal origin repack` did.
#[derive(Debug, Clone, Serialize)]
pub struct RepackReport {
    pub origin: String,
    pub dataset: String,
    pub dry_run: bool,
    pub threshold: f64,
    pub versions: usize,
    /// Packs the versions read from (named, or forwarded to by earlier repacks; not those
    /// repacked already), their raw bytes, and live bytes among them.
    pub packs: usize,
    pub bytes: u64,
    pub live_bytes: u64,
    pub repacked: Vec<RepackedPack>,
    pub packs_written: usize,
    /// Bytes stored by the new packs and their indexes.
    pub bytes_written: u64,
    /// Stored bytes of the repacked packs: what `shoal origin gc` frees once the grace
    /// period has passed.
    pub bytes_to_free: u64,
    pub seconds: f64,
}

/// Why a pack is rewritten, if it is: packs never repacked whose live share is below
/// `threshold`; and packs repacked before that a version not covered by their record reaches
/// (`covered` false: its live blobs may not all be in the record's packs). Pure.
pub fn choose(
    bytes: u64,
    live_bytes: u64,
    forwarded: Option<bool>,
    threshold: f64,
) -> Option<&'static str> {
    match forwarded {
        Some(true) => None,
        Some(false) => Some("uncovered"),
        None if (live_bytes as f64) < threshold * bytes as f64 => Some("sparse"),
        None => None,
    }
}

impl Node {
    /// Repacks `name` in the first origin: see the module docs. `threshold` is the live share
    /// (0 to 1) below which a pack is rewritten.
    ///
    /// Cancel-safe as a repack: records are written only once every new pack is whole; a
    /// cancelled run leaves packs nothing names, collected by gc after the grace period.
    pub async fn origin_repack(
        &self,
        name: &DatasetName,
        threshold: f64,
        dry_run: bool,
        progress: &Progress,
    ) -> Result<RepackReport> {
        let started = Instant::now();
        let origin = self.origin().clone();
        if !origin.writable() {
            return Err(Error::Usage(format!(
                "origin {} is read-only (http); repack the store it serves",
                origin.url()
            )));
        }
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::Usage(format!(
                "--threshold {threshold}: a share of a pack's bytes, between 0 and 1"
            )));
        }
        let grace = Duration::from_secs(origin.gc_settings().await?.effective_grace_s(now_unix()));
        let cache = self.home.pack_cache_dir();
        progress.phase("listing", 0);
        let removed: HashSet<String> = origin.list_removals(name).await?.into_iter().collect();
        let forwards = origin.forwards(name).await?;
        let mut versions: Vec<(String, SignedVersion)> = Vec::new();
        for v in origin.list_versions(name).await? {
            if removed.contains(&v) {
                continue;
            }
            // Every version object present counts, signed by a trusted key or not: gc keeps
            // what it names either way, so its blobs must stay readable.
            if let Some(sv) = origin.version(name, &v).await? {
                versions.push((v, sv));
            }
        }
        // Every blob a version present reads, and which versions reach each pack.
        progress.phase("reading trees", versions.len() as u64);
        let mut live: HashSet<Hash> = HashSet::new();
        let mut reachers: BTreeMap<Hash, BTreeSet<String>> = BTreeMap::new();
        for (v, sv) in &versions {
            for p in reach_through(&sv.body.packs, &forwards) {
                reachers.entry(p).or_default().insert(v.clone());
            }
            let blobs = self.blobs(sv).await?;
            let walked = crate::walk::walk(&blobs, sv.body.root).await?;
            live.extend(walked.nodes.iter().map(|(id, _)| *id));
            for f in &walked.files {
                live.extend(f.chunks.iter().map(|c| c.id));
            }
            progress.add(1);
        }
        // Each pack's share of live bytes.
        progress.phase("reading pack indexes", reachers.len() as u64);
        let mut report = RepackReport {
            origin: origin.url().to_string(),
            dataset: name.to_string(),
            dry_run,
            threshold,
            versions: versions.len(),
            packs: 0,
            bytes: 0,
            live_bytes: 0,
            repacked: Vec::new(),
            packs_written: 0,
            bytes_written: 0,
            bytes_to_free: 0,
            seconds: 0.0,
        };
        // (pack, the live blobs to copy in pack order (id, len)).
        let mut chosen: Vec<(Hash, Vec<(Hash, u32)>)> = Vec::new();
        for (pack, by) in &reachers {
            progress.add(1);
            let f = forwards.get(pack);
            let covered = f.map(|f| by.iter().all(|v| f.covers.contains(v)));
            if covered == Some(true) {
                // Repacked already, for every version reaching it: its live blobs are
                // counted in the packs its record names.
                continue;
            }
            let idx = match pack_index(&origin, &cache, pack).await {
                Ok((AnyIndex::Packed(idx), _)) => idx,
                // In-place versions' source objects are not rewritten.
                Ok((AnyIndex::External(_), _)) => continue,
                // Retired already: its record says where its blobs are.
                Err(e) if e.is_gone() && forwards.contains_key(pack) => continue,
                Err(e) => return Err(e),
            };
            let bytes: u64 = idx.entries.iter().map(|e| e.len as u64).sum();
            let live_bytes: u64 = idx
                .entries
                .iter()
                .filter(|e| live.contains(&e.id))
                .map(|e| e.len as u64)
                .sum();
            report.packs += 1;
            report.bytes += bytes;
            report.live_bytes += live_bytes;
            let Some(why) = choose(bytes, live_bytes, covered, threshold) else {
                continue;
            };
            // Live blobs already in the packs an earlier repack of this one wrote stay there.
            let mut already: HashSet<Hash> = HashSet::new();
            for p in f.map(|f| f.into.as_slice()).unwrap_or_default() {
                if let Ok((AnyIndex::Packed(i), _)) = pack_index(&origin, &cache, p).await {
                    already.extend(i.entries.iter().map(|e| e.id));
                }
            }
            let mut copy: Vec<(Hash, u32, u64)> = idx
                .entries
                .iter()
                .filter(|e| live.contains(&e.id) && !already.contains(&e.id))
                .map(|e| (e.id, e.len, e.offset))
                .collect();
            copy.sort_by_key(|c| c.2);
            report.repacked.push(RepackedPack {
                pack: pack.to_string(),
                bytes,
                live_bytes,
                copied_bytes: copy.iter().map(|c| c.1 as u64).sum(),
                why,
            });
            report.bytes_to_free +=
                origin.pack_size(pack).await?.unwrap_or(0) + idx.encode().len() as u64;
            chosen.push((
                *pack,
                copy.into_iter().map(|(id, len, _)| (id, len)).collect(),
            ));
        }
        if dry_run || chosen.is_empty() {
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }

        // The live blobs, read from the old packs (verified), into new packs in the order
        // they lay in the old ones (a file's chunks stay together).
        let total: u64 = report.repacked.iter().map(|r| r.copied_bytes).sum();
        progress.phase("repacking", total);
        let blobs = Blobs::over_packs(
            self.origins().clone(),
            Holders(1),
            self.store()?,
            &cache,
            name.clone(),
            chosen.iter().map(|(p, _)| *p).collect(),
        )
        .passing_through();
        let (pack_tx, uploader) = spawn_uploader(origin.clone(), true);
        let (blob_tx, packer) = spawn_packer(pack_tx, true);
        let mut sent: HashSet<Hash> = HashSet::new();
        let copied = async {
            for (_, copy) in &chosen {
                let todo: Vec<(Hash, u32)> = copy
                    .iter()
                    .filter(|(id, _)| sent.insert(*id))
                    .copied()
                    .collect();
                let mut at = 0;
                while at < todo.len() {
                    let mut end = at;
                    let mut size = 0u64;
                    while end < todo.len() && (end == at || size < BATCH_BYTES) {
                        size += todo[end].1 as u64;
                        end += 1;
                    }
                    let ids: Vec<Hash> = todo[at..end].iter().map(|(id, _)| *id).collect();
                    let mut got = blobs.fetch_bytes(ids.clone()).await?;
                    let group: Vec<(Hash, Bytes)> = ids
                        .iter()
                        .map(|id| {
                            got.remove(id)
                                .map(|b| (*id, b))
                                .ok_or_else(|| Error::Corrupt {
                                    what: format!("pack of {name} in {}", origin.url()),
                                    reason: format!("blob {id} was not returned"),
                                })
                        })
                        .collect::<Result<_>>()?;
                    let tx = blob_tx.clone();
                    if tokio::task::block_in_place(|| {
                        tx.send(Group {
                            tree: false,
                            blobs: group,
                        })
                    })
                    .is_err()
                    {
                        break;
                    }
                    progress.add(size);
                    at = end;
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        drop(blob_tx);
        tokio::task::spawn_blocking(move || packer.join())
            .await
            .expect("packer join task panicked")
            .expect("packer panicked");
        let uploaded = uploader.await.expect("uploader panicked");
        copied?;
        let uploaded = uploaded?;
        let mut home: HashMap<Hash, Hash> = HashMap::new();
        for u in &uploaded {
            report.packs_written += 1;
            report.bytes_written += u.bytes;
            for id in &u.ids {
                home.insert(*id, u.pack);
            }
        }
        // As a publish: what it wrote is safe from gc for the grace period only.
        if started.elapsed() > grace - grace / 10 {
            return Err(Error::Usage(format!(
                "this repack took {}, too close to the origin's gc grace period ({}): the packs it wrote may have been collected, so it records nothing; run it again, or lengthen the grace (`shoal origin gc --grace`)",
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                humantime::format_duration(grace),
            )));
        }
        progress.phase("recording", chosen.len() as u64);
        for (pack, copy) in &chosen {
            let mut into: BTreeSet<Hash> = forwards
                .get(pack)
                .map(|f| f.into.iter().copied().collect())
                .unwrap_or_default();
            into.extend(copy.iter().filter_map(|(id, _)| home.get(id)).copied());
            // A blob copied for another pack first (the same blob in two old packs) is where
            // that one's went.
            let f = Forward {
                pack: *pack,
                into: into.into_iter().collect(),
                covers: reachers[pack].iter().cloned().collect(),
                repacked_unix: now_unix(),
            };
            origin.put_forward(name, &f).await?;
            progress.add(1);
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_packs_and_uncovered_ones_are_rewritten() {
        assert_eq!(choose(100, 49, None, 0.5), Some("sparse"));
        assert_eq!(choose(100, 50, None, 0.5), None);
        assert_eq!(choose(100, 0, None, 0.0), None);
        assert_eq!(choose(100, 0, None, 0.01), Some("sparse"));
        // Repacked before: never again for its share, only for versions it does not cover.
        assert_eq!(choose(100, 1, Some(true), 0.5), None);
        assert_eq!(choose(100, 100, Some(false), 0.5), Some("uncovered"));
    }
}
