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
//!
//! Where the bytes come from: each blob from the local store if this node has it, else from
//! peers holding the whole version (when the copy runs in the daemon), else from the nearest
//! origin holding the version, another one taking over a read that fails or stalls; every
//! blob is checked against its id before it is written. Packs are rebuilt from their blobs
//! (a pack is its blobs back to back) and streamed to the target part by part.
//!
//! An in-place version's external packs name source objects, which the target names too;
//! with `copy_sources` their bytes are also written to the target as a pack under the
//! external index's id (the objects back to back in index order), which readers holding the
//! version there read first, so the copy serves even if a source object later changes or
//! cannot be reached.

use crate::blobs::Blobs;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::pull::OriginBytes;
use crate::Node;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use shoal_registry::pack::{AnyIndex, Codec, Frame, ZSTD_LEVEL};
use shoal_registry::{AnyTag, DatasetName, DatasetRef, Hash, Origin, SignedVersion};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Packs copied at once. Each holds at most [`ONE_PUT`] bytes, or a few pieces
/// ([`crate::verify`]'s 16 MiB) and the writer's parts, in memory: this bounds the copy's
/// memory (about 320 MiB).
const PACKS_AT_ONCE: usize = 4;

/// Packs up to this size are written in one put (held whole in memory: the packs a publish
/// writes are at most `PACK_TARGET`, 64 MiB, and a blob); larger ones (copies of external
/// packs) part by part.
const ONE_PUT: u64 = 80 << 20;

/// Pieces of one pack read ahead of the one being written.
const PIECES_AHEAD: usize = 2;

/// How `shoal replicate` copies.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicateOptions {
    /// Also write the bytes of in-place versions' source objects to the target, as packs.
    #[serde(default)]
    pub copy_sources: bool,
}

/// What `shoal replicate` did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicateReport {
    /// Where the versions were copied from (the origins holding them) and to.
    pub from: String,
    pub to: String,
    /// The versions asked for, as NAME@VERSION, each with whether this run created it at the
    /// target (false: it was there already).
    pub versions: Vec<ReplicatedVersion>,
    /// Packs the versions name, those this run wrote, and those the target had.
    pub packs: u64,
    pub packs_copied: u64,
    pub packs_present: u64,
    /// Of the packs written, copies of in-place versions' source objects.
    #[serde(default)]
    pub sources_copied: u64,
    /// Pack bytes read and written to the target by this run.
    pub pack_bytes_copied: u64,
    /// Where those bytes came from: this node's store, peers, each origin (and each source
    /// store of in-place versions).
    #[serde(default)]
    pub bytes_local: u64,
    #[serde(default)]
    pub bytes_from_peers: u64,
    #[serde(default)]
    pub origins: Vec<OriginBytes>,
    /// Every byte written to the target (packs, indexes, versions, tags, settings).
    pub bytes_written: u64,
    /// Tags written at the target (NAME@TAG -> VERSION).
    pub tags: Vec<String>,
    /// Versions removed at the source (with `--all`) that this run removed at the target
    /// (their removal records copied, their version objects and tags deleted there).
    #[serde(default)]
    pub removals: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicatedVersion {
    #[serde(rename = "ref")]
    pub reference: String,
    pub created: bool,
}

/// A pack the target lacks (its index, its bytes, or both), with its index read and verified.
struct Missing {
    id: Hash,
    index: AnyIndex,
    index_bytes: Bytes,
    /// Its bytes must be written (a packed pack not there whole; with `copy_sources`, an
    /// external pack's copy).
    data: bool,
    /// Its index must be written.
    index_missing: bool,
}

impl Missing {
    /// The pack's blobs in the order they lie in it (id, offset, len), back to back from 0:
    /// an external pack's are its objects' chunks, the objects one after the other.
    fn layout(&self) -> Result<Vec<(Hash, u64, u32)>> {
        let blobs: Vec<(Hash, u64, u32)> = match &self.index {
            AnyIndex::Packed(idx) => {
                let mut v: Vec<_> = idx
                    .entries
                    .iter()
                    .map(|e| (e.id, e.offset, e.len))
                    .collect();
                v.sort_unstable_by_key(|b| b.1);
                v
            }
            AnyIndex::External(x) => {
                let (starts, _) = x.object_starts();
                x.entries
                    .iter()
                    .map(|e| (e.id, starts[e.object as usize] + e.offset, e.len))
                    .collect()
            }
        };
        let mut end = 0u64;
        for (id, offset, len) in &blobs {
            if *offset != end {
                return Err(Error::Corrupt {
                    what: format!("pack index {}", self.id),
                    reason: format!(
                        "blob {id} starts at {offset}, not where the one before it ends ({end}); \
                         only packs of blobs back to back can be copied"
                    ),
                });
            }
            end += *len as u64;
        }
        Ok(blobs)
    }

    /// The size of the pack object it needs at the target.
    fn pack_len(&self) -> u64 {
        match &self.index {
            AnyIndex::Packed(idx) => idx.pack_len(),
            AnyIndex::External(x) => x.object_starts().1,
        }
    }
}

/// Pack bytes of a copy by where they came from.
#[derive(Default)]
struct Sources {
    local: AtomicU64,
    fetched: AtomicU64,
}

impl Node {
    /// Copies the versions `refs` names (and every version of the datasets in `all`) from this
    /// node's origins (or its store, or peers) to `to`: see the module docs. Every version
    /// must verify against this node's trusted keys; every blob is checked against its id
    /// before it is written.
    ///
    /// Cancel-safe: what was written is whole and in order (see the module docs); the next
    /// run goes on from there.
    #[tracing::instrument(name = "replicate", skip_all)]
    pub async fn replicate(
        &self,
        refs: &[DatasetRef],
        all: &[DatasetName],
        to: &Origin,
        options: &ReplicateOptions,
        progress: &Progress,
    ) -> Result<ReplicateReport> {
        let started = Instant::now();
        if !to.writable() {
            return Err(Error::Origin(shoal_registry::OriginError::BadUrl {
                url: to.url().to_string(),
                reason: "an http(s) origin is read-only; replicate to a path, s3://, gs:// or az://, and serve that over HTTP".into(),
            }));
        }
        if self.origins.len() == 1 && self.origin().url() == to.url() {
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
            let listed = self.origins.list_union(|o| o.list_versions(name)).await?;
            if listed.is_empty() {
                return Err(Error::NotFound(format!(
                    "dataset {name} has no versions in origin {}",
                    self.origins.urls()
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
            let cfg = self
                .origins
                .ask_all(|o| o.dataset_config(name))
                .await
                .into_iter()
                .find_map(|(_, r)| r.ok().flatten())
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "dataset {name} has no settings object in origin {}",
                        self.origins.urls()
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

        // Which packs the target lacks, with their indexes, each under the first version
        // that names it (its bytes are read through that version).
        // A repacked pack's blobs are where its record says: those packs are copied, and the
        // record (a repacked pack gone from here is not).
        let mut forwards: BTreeMap<&DatasetName, HashMap<Hash, shoal_registry::Forward>> =
            BTreeMap::new();
        for name in versions.keys() {
            forwards.insert(name, self.origins.forwards(name).await?);
        }
        let mut by_version: Vec<(&SignedVersion, Vec<Hash>)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, vs) in &versions {
            let fw = &forwards[name];
            for v in vs.values() {
                let reached = crate::lifecycle::reach_through(&v.body.packs, fw);
                let new: Vec<Hash> = reached.into_iter().filter(|id| seen.insert(*id)).collect();
                by_version.push((v, new));
            }
        }
        let forwarded: HashSet<Hash> = forwards.values().flat_map(|f| f.keys()).copied().collect();
        let packs = seen.len() as u64;
        progress.phase("checking", packs);
        let mut work: Vec<(&SignedVersion, Vec<Missing>)> = Vec::new();
        for (v, ids) in by_version {
            let holders = self.holders_of(&v.body.root);
            let missing: Vec<Option<Missing>> = futures::stream::iter(ids)
                .map(|id| {
                    let forwarded = forwarded.contains(&id);
                    async move {
                        let m = match self.missing_at(to, holders, id, options).await {
                            // Repacked and gone: its record goes instead.
                            Err(e) if forwarded && e.is_gone() => Ok(None),
                            m => m,
                        };
                        progress.add(1);
                        m
                    }
                })
                .buffered(16)
                .try_collect()
                .await?;
            work.push((v, missing.into_iter().flatten().collect()));
        }
        let total: u64 = work
            .iter()
            .flat_map(|(_, ms)| ms)
            .filter(|m| m.data)
            .map(Missing::pack_len)
            .sum();
        progress.phase("copying", total);
        let copied = AtomicU64::new(0);
        let (packs_copied, sources_copied) = (AtomicU64::new(0), AtomicU64::new(0));
        let sources = Sources::default();
        let mut per_origin: BTreeMap<String, u64> = BTreeMap::new();
        for (v, missing) in work {
            if missing.is_empty() {
                continue;
            }
            let blobs = if missing.iter().any(|m| m.data) {
                Some(self.blobs(v).await?.passing_through())
            } else {
                None
            };
            let store = self.store()?;
            futures::stream::iter(missing)
                .map(|m| {
                    let (copied, packs_copied, sources_copied, written) =
                        (&copied, &packs_copied, &sources_copied, &written);
                    let (blobs, store, sources) = (&blobs, &store, &sources);
                    async move {
                        if let (true, Some(blobs)) = (m.data, blobs) {
                            let len = copy_pack(&m, blobs, store, to, sources, progress).await?;
                            copied.fetch_add(len, Ordering::Relaxed);
                            written.fetch_add(len, Ordering::Relaxed);
                            packs_copied.fetch_add(1, Ordering::Relaxed);
                            if matches!(m.index, AnyIndex::External(_)) {
                                sources_copied.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if m.index_missing {
                            let n = m.index_bytes.len() as u64;
                            to.put_pack_index(&m.id, m.index_bytes).await?;
                            written.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok::<_, Error>(())
                    }
                })
                .buffer_unordered(PACKS_AT_ONCE)
                .try_collect::<Vec<()>>()
                .await?;
            if let Some(blobs) = &blobs {
                for (url, n) in blobs.bytes_per_origin() {
                    *per_origin.entry(url).or_default() += n;
                }
            }
        }

        // Records of repacked packs, once the packs they forward to are there.
        for (name, fw) in &forwards {
            for f in fw.values().filter(|f| seen.contains(&f.pack)) {
                let bytes = f.encode().len() as u64;
                to.put_forward(name, f).await?;
                written.fetch_add(bytes, Ordering::Relaxed);
            }
        }

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
        // now holds, unless the target's is as new. Of a tag several origins hold, the
        // newest valid one.
        let trusted = self.trusted_keys()?;
        let mut tags = Vec::new();
        for name in versions.keys() {
            let tag_names = self.origins.list_union(|o| o.list_tags(name)).await?;
            for tag in tag_names {
                let (found, _) = self.origins.tags_named(name, &tag).await;
                let newest = found.into_iter().find_map(|(_, t)| match t {
                    AnyTag::Signed(t) => match t.verify(name.as_str(), &tag, &trusted) {
                        Ok(()) => Some(t),
                        Err(e) => {
                            tracing::warn!("not copying tag {name}@{tag}: {e}");
                            None
                        }
                    },
                    _ => None,
                });
                let Some(t) = newest else { continue };
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

        // Removals of the datasets copied whole: the record (byte for byte), then the
        // target's tags pointing at the version, then its version object, as `shoal rm` does,
        // so that nodes reading the mirror learn of the removal too.
        let mut removals = Vec::new();
        for name in all {
            for v in self.origins.list_union(|o| o.list_removals(name)).await? {
                let record = self
                    .origins
                    .ask_all(|o| o.removal(name, &v))
                    .await
                    .into_iter()
                    .find_map(|(_, r)| r.ok().flatten());
                let Some(r) = record else { continue };
                if let Err(e) = r.verify(name.as_str(), &v, &trusted) {
                    tracing::warn!("not copying the removal of {name}@{v}: {e}");
                    continue;
                }
                let recorded = match to.create_removal(name, &r).await {
                    Ok(()) => {
                        written.fetch_add(r.encode().len() as u64, Ordering::Relaxed);
                        true
                    }
                    Err(shoal_registry::OriginError::AlreadyExists { .. }) => false,
                    Err(e) => return Err(e.into()),
                };
                // A mirror that had the record and not the version is done with it (a run
                // cut short between the record and the version object is finished here).
                let had = to.version_exists(name, &v).await?;
                if recorded || had {
                    for t in to.list_tags(name).await? {
                        if to
                            .tag(name, &t)
                            .await?
                            .is_some_and(|tag| tag.version() == v)
                        {
                            to.delete_tag(name, &t).await?;
                        }
                    }
                    to.delete_version(name, &v).await?;
                }
                if had {
                    removals.push(format!("{name}@{v}"));
                }
            }
        }

        let packs_copied = packs_copied.into_inner();
        let origins: Vec<OriginBytes> = per_origin
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(origin, bytes)| OriginBytes { origin, bytes })
            .collect();
        let from_origins: u64 = origins.iter().map(|o| o.bytes).sum();
        let fetched = sources.fetched.into_inner();
        Ok(ReplicateReport {
            from: self.origins.urls(),
            to: to.url().to_string(),
            versions: report_versions,
            packs,
            packs_copied,
            packs_present: packs - packs_copied,
            sources_copied: sources_copied.into_inner(),
            pack_bytes_copied: copied.into_inner(),
            bytes_local: sources.local.into_inner(),
            bytes_from_peers: fetched.saturating_sub(from_origins),
            origins,
            bytes_written: written.into_inner(),
            tags,
            removals,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// What of pack `id` the target lacks, if anything, with its index from the origins
    /// holding the version (nearest first).
    ///
    /// Cancel-safe: it only reads.
    async fn missing_at(
        &self,
        to: &Origin,
        holders: crate::origins::Holders,
        id: Hash,
        options: &ReplicateOptions,
    ) -> Result<Option<Missing>> {
        let index_missing = !to.has_pack(&id).await?;
        if !index_missing && !options.copy_sources {
            return Ok(None);
        }
        let (index, index_bytes) = self.origins.pack_index(holders, &id).await?;
        let mut m = Missing {
            id,
            index,
            index_bytes,
            data: false,
            index_missing,
        };
        let external = matches!(m.index, AnyIndex::External(_));
        if external && !options.copy_sources {
            return Ok(index_missing.then_some(m));
        }
        let len = m.pack_len();
        if len == 0 {
            // An in-place version of empty files only: nothing to copy.
            return Ok(index_missing.then_some(m));
        }
        if to.pack_size(&id).await? == Some(len) {
            if index_missing {
                tracing::info!(pack = %id, "pack already at the target without its index (a copy cut short): writing the index only");
            }
        } else {
            m.data = true;
        }
        Ok((m.data || m.index_missing).then_some(m))
    }
}

/// Writes pack `m` to the target from its blobs, read piece by piece from the local store or
/// else through `blobs` (peers, then the origins), each checked against its id. Returns the
/// bytes written.
///
/// Cancel-safe: the pack appears at the target only whole (an upload dropped half-way is
/// abandoned).
async fn copy_pack(
    m: &Missing,
    blobs: &Blobs,
    store: &std::sync::Arc<dyn shoal_store::ChunkStore>,
    to: &Origin,
    sources: &Sources,
    progress: &Progress,
) -> Result<u64> {
    let mut reads = futures::stream::iter(units(m)?)
        .map(|unit| async move {
            match unit {
                Unit::Raw(piece) => read_piece(piece, blobs, store, sources).await,
                Unit::Zstd(piece, frame, at) => {
                    let raw = read_piece(piece, blobs, store, sources).await?;
                    compress_frame(raw, frame, at, m.id, blobs).await
                }
            }
        })
        .buffered(PIECES_AHEAD);
    if m.pack_len() <= ONE_PUT {
        // One put: on S3 several times faster than a multipart upload of a pack this size.
        let parts: Vec<Bytes> = reads
            .inspect_ok(|p| progress.add(p.len() as u64))
            .try_collect()
            .await?;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        to.put_pack_data(&m.id, parts).await?;
        return Ok(len);
    }
    let mut writer = to.pack_writer(&m.id).await?;
    while let Some(piece) = reads.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        };
        let n = piece.len() as u64;
        if let Err(e) = writer.put(piece).await {
            writer.abort().await;
            return Err(e.into());
        }
        progress.add(n);
    }
    let len = writer.finish().await?;
    if len != m.pack_len() {
        return Err(Error::Corrupt {
            what: format!("pack {} written to origin {}", m.id, to.url()),
            reason: format!("{len} bytes written, its index gives {}", m.pack_len()),
        });
    }
    Ok(len)
}

/// What a copy of a pack writes, in order: pieces of blobs stored as they are, and
/// compressed frames (their blobs, the frame, and where it starts in the pack object).
enum Unit {
    Raw(crate::verify::Piece),
    Zstd(crate::verify::Piece, Frame, u64),
}

/// The units of pack `m`: pieces of about 16 MiB of raw blobs, and each compressed frame.
fn units(m: &Missing) -> Result<Vec<Unit>> {
    let layout = m.layout()?;
    let frames = match &m.index {
        AnyIndex::Packed(idx) if !idx.frames.is_plain() => idx.frames.frames().to_vec(),
        _ => {
            return Ok(crate::verify::pieces(layout)
                .into_iter()
                .map(Unit::Raw)
                .collect())
        }
    };
    let mut out = Vec::new();
    let mut blobs = layout.into_iter().peekable();
    let (mut raw_at, mut stored_at) = (0u64, 0u64);
    for f in frames {
        let end = raw_at + f.raw_len;
        let mut piece = Vec::new();
        while let Some(b) = blobs.next_if(|b| b.1 < end) {
            piece.push(b);
        }
        match f.codec {
            Codec::Raw => out.extend(crate::verify::pieces(piece).into_iter().map(Unit::Raw)),
            Codec::Zstd => out.push(Unit::Zstd(piece, f, stored_at)),
        }
        raw_at = end;
        stored_at += f.stored_len;
    }
    Ok(out)
}

/// A compressed frame of pack `pack` (at `at` in the pack object) from its verified raw
/// bytes: compressed again as it was published, or, where this build's zstd compresses them
/// to another size than the index records, the origin's stored frame, checked by
/// decompressing it back to `raw`.
///
/// Cancel-safe: it only reads.
async fn compress_frame(
    raw: Bytes,
    frame: Frame,
    at: u64,
    pack: Hash,
    blobs: &Blobs,
) -> Result<Bytes> {
    let again = {
        let raw = raw.clone();
        tokio::task::spawn_blocking(move || zstd::bulk::compress(&raw, ZSTD_LEVEL))
            .await
            .expect("compression task panicked")
    };
    if let Ok(out) = again {
        if out.len() as u64 == frame.stored_len {
            return Ok(out.into());
        }
    }
    let stored = blobs.read_stored(&pack, at..at + frame.stored_len).await?;
    let check = stored.clone();
    let same = tokio::task::spawn_blocking(move || {
        zstd::bulk::decompress(&check, frame.raw_len as usize).is_ok_and(|d| d == raw)
    })
    .await
    .expect("decompression task panicked");
    if !same {
        return Err(Error::Corrupt {
            what: format!("pack {pack}: compressed frame at {at}"),
            reason: "it does not decompress to its blobs; the origin's copy is damaged".into(),
        });
    }
    Ok(stored)
}

/// The bytes of a piece of blobs laid back to back: those the local store has, the rest
/// fetched (verified) through `blobs`.
///
/// Cancel-safe: it only reads (blobs fetched may stay in the store's cache).
async fn read_piece(
    piece: crate::verify::Piece,
    blobs: &Blobs,
    store: &std::sync::Arc<dyn shoal_store::ChunkStore>,
    sources: &Sources,
) -> Result<Bytes> {
    let ids: Vec<Hash> = piece.iter().map(|b| b.0).collect();
    let store = store.clone();
    let mut got: HashMap<Hash, Bytes> = tokio::task::spawn_blocking(move || {
        let mut got = HashMap::new();
        for id in ids {
            if let Ok(Some(b)) = store.get(&id) {
                got.insert(id, Bytes::from(b));
            }
        }
        got
    })
    .await
    .expect("store task panicked");
    let local: u64 = got.values().map(|b| b.len() as u64).sum();
    sources.local.fetch_add(local, Ordering::Relaxed);
    let rest: Vec<Hash> = piece
        .iter()
        .map(|b| b.0)
        .filter(|id| !got.contains_key(id))
        .collect();
    if !rest.is_empty() {
        let fetched = blobs.fetch_bytes(rest).await?;
        sources.fetched.fetch_add(
            fetched.values().map(|b| b.len() as u64).sum(),
            Ordering::Relaxed,
        );
        got.extend(fetched);
    }
    let len: u64 = piece.iter().map(|b| b.2 as u64).sum();
    let mut out = BytesMut::with_capacity(len as usize);
    for (id, _, _) in &piece {
        let b = got.get(id).ok_or_else(|| {
            Error::NotFound(format!("blob {id} was returned by no peer and no origin"))
        })?;
        out.extend_from_slice(b);
    }
    Ok(out.freeze())
}
