//! `shoal verify`: reads every blob of a version where it lives (its packs at the origins that
//! hold it, the source objects of an in-place version) and checks each against its id, naming
//! every object that is missing or damaged and every in-place file whose source changed.

use crate::error::Result;
use crate::lifecycle::reach_through;
use crate::progress::Progress;
use crate::Node;
use bytes::Bytes;
use futures::StreamExt;
use shoal_registry::pack::AnyIndex;
use shoal_registry::{DatasetName, DatasetRef, Hash};
use std::collections::BTreeSet;
use std::time::Instant;

/// Bytes of one read while verifying.
const PIECE: u64 = 16 << 20;
/// Reads in flight while verifying.
const READS: usize = 4;

/// What `shoal verify` found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    #[serde(rename = "ref")]
    pub reference: String,
    pub version: String,
    pub packs: u64,
    pub blobs: u64,
    pub bytes_read: u64,
    /// Files of an in-place version whose source object changed or is gone (by key).
    pub changed: Vec<String>,
    /// Every other problem, one line each, naming the object.
    pub problems: Vec<String>,
    /// With `--all`: the versions verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// With `--local`: blobs of the version the local store lacks, and those it held damaged
    /// (dropped, so that they are fetched again). `problems` names them, up to
    /// [`MAX_LISTED`] lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalCounts>,
    pub seconds: f64,
}

/// Counts of `shoal verify --local`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LocalCounts {
    pub missing: u64,
    pub corrupt: u64,
    /// Whether the local store holds every blob of the version, intact.
    pub complete: bool,
}

/// Problems listed one by one (the rest counted).
pub const MAX_LISTED: usize = 1000;

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.changed.is_empty() && self.problems.is_empty()
    }
}

/// Blobs of one read: (id, offset, len), back to back.
pub(crate) type Piece = Vec<(Hash, u64, u32)>;

/// Cuts blobs laid back to back into reads of about [`PIECE`] bytes.
pub(crate) fn pieces(blobs: impl IntoIterator<Item = (Hash, u64, u32)>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for b in blobs {
        match out.last_mut() {
            Some(p) if b.1 + b.2 as u64 - p[0].1 <= PIECE => p.push(b),
            _ => out.push(vec![b]),
        }
    }
    out
}

/// The blobs of `piece` in `data` (read from the piece's first offset) that do not match
/// their ids.
pub(crate) fn bad_blobs(piece: &Piece, data: &Bytes) -> Vec<Hash> {
    let start = piece[0].1;
    piece
        .iter()
        .filter(|(id, off, len)| {
            let at = (off - start) as usize;
            data.get(at..at + *len as usize)
                .is_none_or(|bytes| !id.verify(bytes))
        })
        .map(|(id, _, _)| *id)
        .collect()
}

impl Node {
    /// Verifies every blob of `reference` where it lives: see the module docs.
    ///
    /// Cancel-safe: it only reads.
    pub async fn verify(
        &self,
        reference: &DatasetRef,
        progress: &Progress,
    ) -> Result<VerifyReport> {
        let started = Instant::now();
        let (version, signed) = self.open_version(reference).await?;
        let holders = self.holders_of(&signed.body.root);
        let origins = self.origins().clone();
        let mut report = VerifyReport {
            reference: reference.to_string(),
            version: format!("{}@{version}", reference.dataset),
            packs: signed.body.packs.len() as u64,
            ..Default::default()
        };
        let mut changed = BTreeSet::new();
        // Packs repacked are read where their records say (and are no problem once gone).
        let forwards = origins.forwards(&reference.dataset).await?;
        let packs = reach_through(&signed.body.packs, &forwards);
        report.packs = packs.len() as u64;
        progress.phase("verifying", 0);
        for pack in &packs {
            let forwarded = forwards.contains_key(pack);
            self.verify_pack(
                &origins,
                holders,
                (pack, forwarded),
                &mut report,
                &mut changed,
                progress,
            )
            .await;
        }
        report.changed = changed.into_iter().collect();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Verifies the local store's copy of `reference` (`shoal verify --local`): every blob of
    /// the version reached from the tree nodes the store holds is read and checked against its
    /// id. A blob that does not match is dropped from the store (the next read fetches it
    /// again) and reported corrupt; one absent is reported missing, a tree node absent with
    /// the files under it unchecked. The version is opened as a pull opens it (the origins, or
    /// the signed copy this machine kept when they cannot be reached).
    ///
    /// Cancel-safe: it only reads (and drops blobs that fail their check, as any read does).
    pub async fn verify_local(
        &self,
        reference: &DatasetRef,
        progress: &Progress,
    ) -> Result<VerifyReport> {
        let started = Instant::now();
        let (version, signed) = self.open_version(reference).await?;
        let store = self.store()?;
        let root = signed.body.root;
        let mut report = VerifyReport {
            reference: reference.to_string(),
            version: format!("{}@{version}", reference.dataset),
            ..Default::default()
        };
        progress.phase("verifying", 0);
        // Store reads, on this thread (the runtime moves its other tasks away).
        let report = tokio::task::block_in_place(|| -> Result<VerifyReport> {
            use crate::walk::{Found, Local};
            let mut counts = LocalCounts::default();
            let mut more = 0u64;
            let mut note = |line: String, report: &mut VerifyReport| {
                if report.problems.len() < MAX_LISTED {
                    report.problems.push(line);
                } else {
                    more += 1;
                }
            };
            let slash = |p: &str| format!("/{p}");
            crate::walk::visit_locally(store.as_ref(), root, |b| {
                report.blobs += 1;
                match b {
                    Local::Node {
                        found: Found::Here, ..
                    } => {}
                    Local::Node {
                        id,
                        path,
                        found: Found::Missing,
                    } => {
                        counts.missing += 1;
                        note(
                            format!("tree node {id} of {}: not in the local store (what is under it is not checked)", slash(path)),
                            &mut report,
                        );
                    }
                    Local::Node {
                        id,
                        path,
                        found: Found::Corrupt(why),
                    } => {
                        counts.corrupt += 1;
                        note(
                            format!("tree node {id} of {}: {why}", slash(path)),
                            &mut report,
                        );
                    }
                    Local::Chunk { id, len, path } => match store.get(&id) {
                        Ok(Some(_)) => {
                            report.bytes_read += len as u64;
                            progress.add(len as u64);
                        }
                        Ok(None) => {
                            counts.missing += 1;
                            note(
                                format!("chunk {id} of {}: not in the local store", slash(path)),
                                &mut report,
                            );
                        }
                        Err(e @ crate::store::StoreError::Corrupt { .. }) => {
                            counts.corrupt += 1;
                            note(format!("chunk {id} of {}: {e}", slash(path)), &mut report);
                        }
                        Err(e) => return Err(e.into()),
                    },
                }
                Ok(true)
            })?;
            if more > 0 {
                report.problems.push(format!("... and {more} more"));
            }
            counts.complete = counts.missing == 0 && counts.corrupt == 0;
            report.local = Some(counts);
            Ok(report)
        })?;
        let mut report = report;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Verifies every version of `name`: each pack once, however many versions name it.
    /// A problem names the pack and the versions naming it.
    ///
    /// Cancel-safe: it only reads.
    pub async fn verify_all(
        &self,
        name: &DatasetName,
        progress: &Progress,
    ) -> Result<VerifyReport> {
        let started = Instant::now();
        let origins = self.origins().clone();
        let mut report = VerifyReport {
            reference: name.to_string(),
            version: format!("{name} (every version)"),
            ..Default::default()
        };
        let mut changed = BTreeSet::new();
        // Each pack with the origins that hold the first version naming it, and the versions.
        let mut packs: std::collections::BTreeMap<Hash, (crate::origins::Holders, Vec<String>)> =
            Default::default();
        let forwards = origins.forwards(name).await?;
        for v in origins.list_union(|o| o.list_versions(name)).await? {
            let r: DatasetRef = format!("{name}@{v}").parse()?;
            match self.open_version(&r).await {
                Ok((_, signed)) => {
                    let holders = self.holders_of(&signed.body.root);
                    let reached = reach_through(&signed.body.packs, &forwards);
                    for p in &reached {
                        packs
                            .entry(*p)
                            .or_insert((holders, Vec::new()))
                            .1
                            .push(v.clone());
                    }
                    report.versions.push(v);
                }
                Err(e) => report.problems.push(format!("version {name}@{v}: {e}")),
            }
        }
        report.packs = packs.len() as u64;
        progress.phase("verifying", 0);
        for (pack, (holders, named_by)) in &packs {
            let before = report.problems.len();
            self.verify_pack(
                &origins,
                *holders,
                (pack, forwards.contains_key(pack)),
                &mut report,
                &mut changed,
                progress,
            )
            .await;
            for p in &mut report.problems[before..] {
                p.push_str(&format!(" (named by {})", named_by.join(", ")));
            }
        }
        report.changed = changed.into_iter().collect();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Reads every blob of `pack` where it lives, adding what it finds to `report` (problems)
    /// and `changed` (in-place sources that changed).
    ///
    /// Cancel-safe: it only reads.
    async fn verify_pack(
        &self,
        origins: &crate::origins::Origins,
        holders: crate::origins::Holders,
        (pack, forwarded): (&Hash, bool),
        report: &mut VerifyReport,
        changed: &mut BTreeSet<String>,
        progress: &Progress,
    ) {
        let index = match origins.pack_index(holders, pack).await {
            Ok((idx, _)) => idx,
            // Repacked and retired: its blobs are verified in the packs its record names.
            Err(e) if forwarded && e.is_gone() => {
                report.packs -= 1;
                return;
            }
            Err(e) => {
                report.problems.push(format!("pack index {pack}: {e}"));
                return;
            }
        };
        match index {
            AnyIndex::Packed(idx) => {
                report.blobs += idx.entries.len() as u64;
                let reads = pieces(idx.entries.iter().map(|e| (e.id, e.offset, e.len)));
                let frames = std::sync::Arc::new(idx.frames);
                let mut results = std::pin::pin!(futures::stream::iter(reads)
                    .map(|p| {
                        let (origins, frames) = (&origins, frames.clone());
                        async move {
                            // Compressed frames are read whole and decompressed.
                            let last = p[p.len() - 1];
                            let span = frames.span(p[0].1..last.1 + last.2 as u64);
                            let r =
                                match origins.read_pack(holders, pack, span.stored.clone()).await {
                                    Ok((d, _)) => {
                                        let n = d.len() as u64;
                                        let skip = (p[0].1 - span.raw.start) as usize;
                                        tokio::task::spawn_blocking(move || {
                                            frames.decode(&span, d).map(|raw| raw.slice(skip..))
                                        })
                                        .await
                                        .expect("decompression task panicked")
                                        .map(|raw| (n, raw))
                                        .map_err(|e| format!("{e} (the origin's copy is damaged)"))
                                    }
                                    Err(e) => Err(e.to_string()),
                                };
                            (p, r)
                        }
                    })
                    .buffered(READS));
                // Checked as they come: at most READS pieces held at once.
                while let Some((p, r)) = results.next().await {
                    match r {
                        Ok((n, data)) => {
                            report.bytes_read += n;
                            progress.add(n);
                            for id in bad_blobs(&p, &data) {
                                report.problems.push(format!(
                                    "pack {pack}: blob {id} does not match its id (the origin's copy is damaged)"
                                ));
                            }
                        }
                        Err(e) => report.problems.push(format!("pack {pack}: {e}")),
                    }
                }
            }
            AnyIndex::External(x) => {
                report.blobs += x.entries.len() as u64;
                let source = match shoal_registry::Origin::open(&x.source, false) {
                    Ok(s) => s,
                    Err(e) => {
                        report.problems.push(format!("source of pack {pack}: {e}"));
                        return;
                    }
                };
                for (n, object) in x.objects.iter().enumerate() {
                    let now = match source.head_object(&object.key).await {
                        Ok(now) => now,
                        Err(e) => {
                            report.problems.push(e.to_string());
                            continue;
                        }
                    };
                    let same = now.as_ref().is_some_and(|m| {
                        m.size == object.size && (object.e_tag.is_none() || m.e_tag == object.e_tag)
                    });
                    if !same {
                        changed.insert(object.key.clone());
                        continue;
                    }
                    let blobs = x
                        .entries
                        .iter()
                        .filter(|e| e.object as usize == n)
                        .map(|e| (e.id, e.offset, e.len));
                    let mut reads = std::pin::pin!(futures::stream::iter(pieces(blobs))
                        .map(|p| {
                            let (source, key, e_tag) =
                                (&source, &object.key, object.e_tag.as_deref());
                            async move {
                                let last = p[p.len() - 1];
                                let r = source
                                    .read_object(key, p[0].1..last.1 + last.2 as u64, e_tag)
                                    .await
                                    .map_err(|e| e.to_string());
                                (p, r)
                            }
                        })
                        .buffered(READS));
                    while let Some((p, r)) = reads.next().await {
                        match r {
                            Ok(data) => {
                                report.bytes_read += data.len() as u64;
                                progress.add(data.len() as u64);
                                if !bad_blobs(&p, &data).is_empty() {
                                    changed.insert(object.key.clone());
                                }
                            }
                            Err(_) => {
                                changed.insert(object.key.clone());
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_back_to_back_blobs_and_bad_ones_are_found() {
        let a = shoal_chunker::hash(b"aaaa");
        let b = shoal_chunker::hash(b"bb");
        let p = pieces([(a, 0, 4), (b, 4, 2)]);
        assert_eq!(p.len(), 1);
        assert!(bad_blobs(&p[0], &Bytes::from_static(b"aaaabb")).is_empty());
        assert_eq!(bad_blobs(&p[0], &Bytes::from_static(b"aaaabc")), vec![b]);
        assert_eq!(
            bad_blobs(&p[0], &Bytes::from_static(b"aaaa")),
            vec![b],
            "short read"
        );
        let big = pieces((0..5).map(|i| (a, i * (6 << 20), 6 << 20)));
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
    }
}
