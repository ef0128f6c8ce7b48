//! Pulling a version into a local directory.
//!
//! Chunks are fetched into the local store first (verified, durable), then files are written
//! from the store. A killed pull loses nothing it had stored: the next run finds those chunks
//! local and fetches only the rest. Files appear under their final names only once complete
//! (written to a temporary name, then renamed).

use crate::error::{io, Error, Result};
use crate::fetch::Fetched;
use crate::progress::Progress;
use crate::select::Selection;
use crate::swarm::{HaveMap, Holding, Swarm};
use crate::walk::{walk, WalkFile};
use crate::Node;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_registry::DatasetRef;
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// What `pull` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullReport {
    #[serde(rename = "ref")]
    pub reference: String,
    pub version: String,
    pub root: String,
    pub destination: Option<String>,
    /// Files pulled (of a partial pull, those selected), of the version's `files_in_version`.
    pub files: u64,
    #[serde(default)]
    pub files_in_version: u64,
    /// Only the files `--include` / `--exclude` selected.
    #[serde(default)]
    pub partial: bool,
    pub bytes: u64,
    pub chunks: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub bytes_already_local: u64,
    pub seconds: f64,
    /// Origin readers this pull passed over for showing no sign of life, and of those, how
    /// many within about a second of the others showing theirs (`reader_lag`) rather than
    /// after a quiet spell.
    #[serde(default)]
    pub readers_passed_over: u64,
    #[serde(default)]
    pub readers_passed_over_by_lag: u64,
    /// Pack bytes each origin sent (every origin configured, in order), then each source
    /// store of an in-place version.
    #[serde(default)]
    pub origins: Vec<OriginBytes>,
}

/// What one origin sent for a pull.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginBytes {
    pub origin: String,
    pub bytes: u64,
}

/// While a pull runs: counted as active; if it fails, peers are told it stopped.
struct PullGuard<'a> {
    swarm: Option<&'a Arc<Swarm>>,
    root: shoal_registry::Hash,
}

impl<'a> PullGuard<'a> {
    fn new(swarm: Option<&'a Arc<Swarm>>, root: shoal_registry::Hash, name: &str) -> Self {
        if let Some(sw) = swarm {
            sw.counters.active_pulls.fetch_add(1, Ordering::Relaxed);
            if sw.holding(&root) != Some(Holding::Complete) {
                sw.hold(root, name, Holding::Pulling, None);
            }
        }
        PullGuard { swarm, root }
    }
}

impl Drop for PullGuard<'_> {
    fn drop(&mut self) {
        if let Some(sw) = self.swarm {
            sw.counters.active_pulls.fetch_sub(1, Ordering::Relaxed);
            sw.release(&self.root);
        }
    }
}

/// Creates `dir` (and parents inside `root`) as real directories, refusing to go through a
/// symlink or replace a non-directory.
fn make_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Unsafe {
            path: path.to_path_buf(),
            reason: "it exists and is not a directory".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(path).map_err(io("creating directory", path))
        }
        Err(e) => Err(io("checking", path)(e)),
    }
}

/// Prefix of the directory a pull writes files into before renaming each into place.
const STAGING_PREFIX: &str = ".shoal-staging.";

/// Makes the staging directory of a pull into `dest`: a name no entry at the top of the tree
/// has (so no file of the dataset can collide with a file being written), after removing
/// what killed pulls left behind.
fn staging_dir(dest: &Path, top: &HashSet<&str>) -> Result<PathBuf> {
    if let Ok(rd) = std::fs::read_dir(dest) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = name.strip_prefix(STAGING_PREFIX).is_some_and(|rest| {
                rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit())
            });
            if stale && !top.contains(name) && e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    loop {
        let name = format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>());
        if top.contains(name.as_str()) {
            continue;
        }
        let path = dest.join(&name);
        match std::fs::create_dir(&path) {
            Ok(()) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(io("setting mode of", &path))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("creating directory", &path)(e)),
        }
    }
}

/// Writes file number `index` of the tree into the staging directory, then renames it into
/// place: a file appears under its name only whole.
fn write_file(
    node_store: &dyn crate::store::ChunkStore,
    dest: &Path,
    staging: &Path,
    index: usize,
    f: &WalkFile,
) -> Result<()> {
    let path = dest.join(&*f.path);
    let tmp = staging.join(index.to_string());
    let result = (|| -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        // A buffer the file's size, up to 1 MiB: a 1 MiB buffer for every small file cost a
        // fresh mapping each, and 6,729 Django files took 4.2 s to write (cp: 0.9 s).
        let mut w =
            std::io::BufWriter::with_capacity((f.size as usize).clamp(4 << 10, 1 << 20), file);
        for c in &f.chunks {
            let bytes = node_store.get(&c.id)?.ok_or_else(|| {
                Error::NotFound(format!(
                    "chunk {} of '{}' is missing from the local store",
                    c.id, f.path
                ))
            })?;
            w.write_all(&bytes).map_err(io("writing", &path))?;
        }
        let file = w
            .into_inner()
            .map_err(|e| io("writing", &path)(e.into_error()))?;
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))
            .map_err(io("setting mode of", &path))?;
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.is_dir() {
                return Err(Error::Unsafe {
                    path: path.clone(),
                    reason: "a directory is in the way of a file".into(),
                });
            }
        }
        std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates the symlink at `path` (replacing a file or link there, never a directory).
fn place_symlink(path: &Path, target: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(Error::Unsafe {
                path: path.to_path_buf(),
                reason: "a directory is in the way of a symlink".into(),
            })
        }
        Ok(_) => std::fs::remove_file(path).map_err(io("replacing", path))?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, path).map_err(io("creating symlink", path))
}

impl Node {
    /// Pulls `reference` into the local store and, with `dest`, writes its files there.
    ///
    /// Cancel-safe: chunks are stored only once verified and a rerun resumes from them; files
    /// are written in a staging directory and renamed into place, and a staging directory left
    /// behind is removed by the next pull into `dest`.
    pub async fn pull(
        &self,
        reference: &DatasetRef,
        dest: Option<&Path>,
        progress: &Progress,
    ) -> Result<PullReport> {
        self.pull_select(reference, dest, &Selection::default(), progress)
            .await
    }

    /// [`Self::pull`] of the files `select` takes (a partial pull: see [`crate::select`]).
    /// A partial pull reads from peers holding the whole version and from the origins, and
    /// does not tell peers it holds the version (it does not, whole).
    ///
    /// Cancel-safe, as [`Self::pull`].
    #[tracing::instrument(name = "pull", skip_all, fields(reference = %reference, partial = !select.is_all()))]
    pub async fn pull_select(
        &self,
        reference: &DatasetRef,
        dest: Option<&Path>,
        select: &Selection,
        progress: &Progress,
    ) -> Result<PullReport> {
        let started = Instant::now();
        let matcher = select.matcher()?;
        let partial = !select.is_all();
        progress.phase("resolving", 0);
        if self.swarm().is_none() {
            // Without a daemon, the cache's TTL is applied by the commands that use the store.
            self.expire_quietly().await;
        }
        let (version, signed) = self.open_version(reference).await?;
        let store = self.store()?;
        let root = signed.body.root;
        let name = format!("{}@{}", reference.dataset, version);
        let _in_use = self.using(root, &name);
        // Tell peers right away that this node is pulling, so that nodes starting together
        // split the origin reads between them.
        let swarm = if partial { None } else { self.swarm() };
        let _guard = PullGuard::new(swarm, root, &name);
        let blobs = self.blobs(&signed).await?;
        if self.swarm().is_none() && self.cache.disk_capacity().is_none() {
            // Origin reads only, into a store that keeps everything: a batch of files at a
            // time, in memory bounded whatever the version's size.
            let name = format!("{}@{}", reference.dataset, version);
            return self
                .pull_streaming(reference, &name, &signed, &blobs, dest, select, progress)
                .await
                .map(|r| PullReport {
                    seconds: started.elapsed().as_secs_f64(),
                    ..r
                });
        }
        progress.phase("reading tree", 0);
        let mut tree = walk(&blobs, root).await?;
        let files_in_version = tree.files.len() as u64;
        if partial {
            tree = matcher.select(tree);
            if tree.files.is_empty() && tree.symlinks.is_empty() {
                return Err(Error::NotFound(format!(
                    "no file of {name} matches {}",
                    select.describe()
                )));
            }
        }

        // Unique chunks in walk order (the index space of have-maps), and which are here.
        let mut seen = HashSet::new();
        let order: Vec<(shoal_registry::Hash, u32)> = tree
            .files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .filter(|c| seen.insert(c.id))
            .map(|c| (c.id, c.len))
            .collect();
        // Not kept through the fetch: it is as large as the order itself.
        drop(seen);
        let order = std::sync::Arc::new(order);
        let store2 = store.clone();
        let order2 = order.clone();
        let (missing, have, local_bytes) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut missing = Vec::new();
            let mut have = HaveMap::new(order2.len());
            let mut local = 0u64;
            for (i, (id, len)) in order2.iter().enumerate() {
                if store2.contains(id)? {
                    local += *len as u64;
                    have.set(i);
                } else {
                    missing.push(i);
                }
            }
            Ok((missing, have, local))
        })
        .await
        .expect("store task panicked")?;

        let need: u64 = missing.iter().map(|&i| order[i].1 as u64).sum();
        if let Some(cap) = self.cache.disk_capacity() {
            let version_bytes = need + local_bytes;
            if version_bytes > cap / 4 * 3 {
                return Err(Error::Unsafe {
                    path: self.home.store_dir(),
                    reason: format!(
                        "{reference} needs {version_bytes} bytes in the local store, more than its disk tiers' capacity of {cap} bytes allows \
                         (3/4 of it for live data); raise [cache] capacity or SHOAL_CACHE_CAPACITY, or use `shoal mount`"
                    ),
                });
            }
        }
        progress.phase("fetching", need);
        tracing::info!(
            version = %name,
            chunks = order.len(),
            missing = missing.len(),
            ms = started.elapsed().as_millis() as u64,
            "version resolved and its tree read"
        );
        let fetch_result = match swarm {
            Some(sw) => {
                sw.hold(root, &name, Holding::Pulling, Some(have));
                crate::fetch::fetch(sw, &blobs, root, &order, missing, progress).await
            }
            None if partial && self.swarm().is_some() => {
                // Peers holding the whole version, then the origins.
                let ids = missing.iter().map(|&i| order[i].0).collect();
                let before: u64 = blobs.bytes_per_origin().iter().map(|o| o.1).sum();
                blobs.fetch(ids, Some(progress)).await.map(|()| {
                    let from_origin =
                        blobs.bytes_per_origin().iter().map(|o| o.1).sum::<u64>() - before;
                    Fetched {
                        from_origin,
                        from_peers: need.saturating_sub(from_origin),
                        ..Fetched::default()
                    }
                })
            }
            None => {
                let ids = missing.iter().map(|&i| order[i].0).collect();
                blobs
                    .fetch_origin(ids, Some(progress))
                    .await
                    .map(|()| Fetched {
                        from_origin: need,
                        ..Fetched::default()
                    })
            }
        };
        // Make what was stored durable even when the fetch failed part-way, so a retry resumes.
        store.flush()?;
        let fetched = fetch_result?;
        if !partial {
            self.home.record_held(&root, &name)?;
            if let Some(sw) = self.swarm() {
                sw.hold(root, &name, Holding::Complete, None);
            }
        }

        let total: u64 = tree.files.iter().map(|f| f.size).sum();
        if let Some(dest) = dest {
            progress.phase("writing files", total);
            let dest = dest.to_path_buf();
            let store = store.clone();
            tokio::task::block_in_place(|| -> Result<()> {
                std::fs::create_dir_all(&dest).map_err(io("creating directory", &dest))?;
                for (d, _) in &tree.dirs {
                    make_dir(&dest.join(d))?;
                }
                let top: HashSet<&str> = tree
                    .dirs
                    .iter()
                    .map(|(p, _)| p.as_str())
                    .chain(tree.files.iter().map(|f| &*f.path))
                    .chain(tree.symlinks.iter().map(|(p, _)| p.as_str()))
                    .filter(|p| !p.contains('/'))
                    .collect();
                let staging = staging_dir(&dest, &top)?;
                let written = tree.files.par_iter().enumerate().try_for_each(|(i, f)| {
                    write_file(store.as_ref(), &dest, &staging, i, f)?;
                    progress.add(f.size);
                    Ok::<_, Error>(())
                });
                let _ = std::fs::remove_dir_all(&staging);
                written?;
                for (p, target) in &tree.symlinks {
                    place_symlink(&dest.join(p), target)?;
                }
                // Modes last, deepest first, so a read-only directory does not block its own
                // contents.
                for (d, mode) in tree.dirs.iter().rev() {
                    let path = dest.join(d);
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                        .map_err(io("setting mode of", &path))?;
                }
                Ok(())
            })?;
        }
        Ok(PullReport {
            reference: reference.to_string(),
            version: format!("{}@{}", reference.dataset, version),
            root: format!("b3:{}", signed.body.root),
            destination: dest.map(|d| PathBuf::from(d).display().to_string()),
            files: tree.files.len() as u64,
            files_in_version,
            partial,
            bytes: total,
            chunks: order.len() as u64,
            bytes_from_origin: blobs.bytes_from_origin(),
            bytes_from_peers: fetched.from_peers,
            bytes_already_local: local_bytes,
            seconds: started.elapsed().as_secs_f64(),
            readers_passed_over: fetched.readers_passed_over as u64,
            readers_passed_over_by_lag: fetched.readers_passed_over_by_lag as u64,
            origins: blobs
                .bytes_per_origin()
                .into_iter()
                .map(|(origin, bytes)| OriginBytes { origin, bytes })
                .collect(),
        })
    }
}

/// Files a streaming pull reads from the tree at a time.
const STREAM_FILES: usize = 32_768;
/// Chunks it fetches (then writes the files of) at a time.
const STREAM_CHUNKS: usize = 131_072;

/// The chunks a streaming pull met, on disk, so that each counts once in the report however
/// many batches name it: each group's chunks (deduplicated within the group) are appended to an
/// unnamed temporary file as a run sorted by id, 12 bytes a chunk (the id's first 8 bytes, its
/// length, whether it was already stored), and the runs are merged once at the end, the first
/// meeting of a chunk deciding whether it counts as already local. Memory holds one read buffer
/// a run while merging; a set in memory (8 bytes a chunk) was 135 MB of a 10M-chunk pull's heap.
/// (Two chunks sharing their first 8 bytes, about 1 in 10^5 among ten million, would only make
/// the counts one short.)
struct Tally {
    out: std::io::BufWriter<std::fs::File>,
    /// Each run's first entry and length, in entries.
    runs: Vec<(u64, u64)>,
    written: u64,
}

/// One entry of a [`Tally`] run: the id's prefix, then the length with [`TALLY_LOCAL`].
const TALLY_ENTRY: usize = 12;
const TALLY_LOCAL: u32 = 1 << 31;
/// A run's read buffer while merging, in entries (a 100M-chunk pull has ~400 runs).
const TALLY_BUF: usize = 1365;

impl Tally {
    fn new(dir: &Path) -> Result<Tally> {
        let file = tempfile::tempfile_in(dir).map_err(io("creating a temporary file in", dir))?;
        Ok(Tally {
            out: std::io::BufWriter::with_capacity(1 << 16, file),
            runs: Vec::new(),
            written: 0,
        })
    }

    /// Appends a run: `ids` sorted by id, distinct, with their lengths and whether each was
    /// stored already.
    fn add(&mut self, ids: &[(shoal_registry::Hash, u32)], local: &[bool]) -> std::io::Result<()> {
        let mut last = None;
        let mut n = 0;
        for ((id, len), &local) in ids.iter().zip(local) {
            let p = shoal_store::sorted::prefix(id);
            if last == Some(p) {
                continue;
            }
            last = Some(p);
            self.out.write_all(&p.to_le_bytes())?;
            let len = (*len & !TALLY_LOCAL) | if local { TALLY_LOCAL } else { 0 };
            self.out.write_all(&len.to_le_bytes())?;
            n += 1;
        }
        self.runs.push((self.written, n));
        self.written += n;
        Ok(())
    }

    /// (distinct chunks, bytes of those that were stored already when first met).
    fn count(mut self) -> std::io::Result<(u64, u64)> {
        use std::cmp::Reverse;
        use std::os::unix::fs::FileExt;
        self.out.flush()?;
        let file = self.out.get_ref();
        struct Cursor {
            next: u64,
            end: u64,
            buf: Vec<u8>,
            at: usize,
        }
        let read = |c: &mut Cursor| -> std::io::Result<Option<(u64, u32)>> {
            if c.at == c.buf.len() {
                let n = (c.end - c.next).min(TALLY_BUF as u64);
                if n == 0 {
                    return Ok(None);
                }
                c.buf.resize(n as usize * TALLY_ENTRY, 0);
                file.read_exact_at(&mut c.buf, c.next * TALLY_ENTRY as u64)?;
                c.next += n;
                c.at = 0;
            }
            let e = &c.buf[c.at..c.at + TALLY_ENTRY];
            c.at += TALLY_ENTRY;
            Ok(Some((
                u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                u32::from_le_bytes(e[8..].try_into().expect("4 bytes")),
            )))
        };
        let mut cursors: Vec<Cursor> = self
            .runs
            .iter()
            .map(|&(start, n)| Cursor {
                next: start,
                end: start + n,
                buf: Vec::new(),
                at: 0,
            })
            .collect();
        // Ordered by prefix, then run: of equal prefixes, the earliest meeting comes first.
        let mut heap = std::collections::BinaryHeap::new();
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some((p, len)) = read(c)? {
                heap.push(Reverse((p, i, len)));
            }
        }
        let (mut chunks, mut local, mut last) = (0u64, 0u64, None);
        while let Some(Reverse((p, i, len))) = heap.pop() {
            if last != Some(p) {
                last = Some(p);
                chunks += 1;
                if len & TALLY_LOCAL != 0 {
                    local += u64::from(len & !TALLY_LOCAL);
                }
            }
            if let Some((p, len)) = read(&mut cursors[i])? {
                heap.push(Reverse((p, i, len)));
            }
        }
        Ok((chunks, local))
    }
}

impl Node {
    /// [`Node::pull_select`] from the origins into a store without a capacity, in bounded
    /// memory: the tree is read a batch of files at a time, and each batch's missing chunks
    /// fetched (a group of at most [`STREAM_CHUNKS`] at a time); once every chunk is stored and
    /// every symlink checked, the tree is read again (from the store now) and the files
    /// written a batch at a time. Only directories, symlinks and 8 bytes a chunk are kept for
    /// the whole version; as with every pull, nothing is written unless all of it verified.
    ///
    /// Cancel-safe, as [`Node::pull`].
    #[allow(clippy::too_many_arguments)]
    async fn pull_streaming(
        &self,
        reference: &DatasetRef,
        name: &str,
        signed: &shoal_registry::SignedVersion,
        blobs: &crate::blobs::Blobs,
        dest: Option<&Path>,
        select: &Selection,
        progress: &Progress,
    ) -> Result<PullReport> {
        let store = self.store()?;
        let root = signed.body.root;
        let matcher = &select.matcher()?;
        let partial = !select.is_all();
        progress.phase(
            "fetching",
            if partial { 0 } else { signed.body.stats.bytes },
        );
        let (walked, fetched) = self.stream_fetch(blobs, root, matcher, progress).await;
        // Make what was stored durable even when the fetch failed part-way, so a retry resumes.
        store.flush()?;
        let (tree, counts) = fetched?;
        if partial && counts.files == 0 && counts.symlinks == 0 {
            return Err(Error::NotFound(format!(
                "no file of {name} matches {}",
                select.describe()
            )));
        }
        if !partial {
            self.home.record_held(&root, name)?;
        }
        if let Some(dest) = dest {
            progress.phase("writing files", counts.bytes);
            self.stream_write(blobs, root, &tree, dest, matcher, progress)
                .await?;
        }
        Ok(PullReport {
            reference: reference.to_string(),
            version: name.to_string(),
            root: format!("b3:{root}"),
            destination: dest.map(|d| PathBuf::from(d).display().to_string()),
            files: counts.files,
            files_in_version: walked,
            partial,
            bytes: counts.bytes,
            chunks: counts.chunks,
            bytes_from_origin: blobs.bytes_from_origin(),
            bytes_from_peers: 0,
            bytes_already_local: counts.local_bytes,
            seconds: 0.0,
            readers_passed_over: 0,
            readers_passed_over_by_lag: 0,
            origins: blobs
                .bytes_per_origin()
                .into_iter()
                .map(|(origin, bytes)| OriginBytes { origin, bytes })
                .collect(),
        })
    }

    /// The fetching pass of [`Node::pull_streaming`]: files in the version (so far), the
    /// tree's directories and symlinks (checked), and what the selection took.
    ///
    /// Cancel-safe, as [`Node::pull_streaming`].
    async fn stream_fetch(
        &self,
        blobs: &crate::blobs::Blobs,
        root: shoal_registry::Hash,
        matcher: &crate::select::Matcher,
        progress: &Progress,
    ) -> (u64, Result<(crate::walk::Walked, StreamCounts)>) {
        let mut walker = crate::walk::Walker::new(blobs, root);
        let mut counts = StreamCounts::default();
        let fetched = async {
            let store = self.store()?;
            let tmp = self.home.store_dir();
            let mut tally = Tally::new(&tmp)?;
            while let Some(mut files) = walker.next_files(STREAM_FILES).await? {
                if !matcher.takes_all() {
                    files.retain(|f| matcher.takes(&f.path));
                }
                counts.files += files.len() as u64;
                counts.bytes += files.iter().map(|f| f.size).sum::<u64>();
                for group in groups(&files) {
                    let mut ids: Vec<(shoal_registry::Hash, u32)> = group
                        .iter()
                        .flat_map(|f| f.chunks.iter().map(|c| (c.id, c.len)))
                        .collect();
                    ids.sort_unstable_by_key(|a| a.0);
                    ids.dedup_by(|a, b| a.0 == b.0);
                    let store2 = store.clone();
                    let (ids, stored) = tokio::task::spawn_blocking(move || -> Result<_> {
                        let stored = ids
                            .iter()
                            .map(|(id, _)| store2.contains(id))
                            .collect::<std::result::Result<Vec<bool>, _>>()?;
                        Ok((ids, stored))
                    })
                    .await
                    .expect("store task panicked")?;
                    // Chunks stored already, by an earlier group of this pull too: progress
                    // counts what each group finds done.
                    progress.add(
                        ids.iter()
                            .zip(&stored)
                            .filter(|(_, s)| **s)
                            .map(|((_, len), _)| u64::from(*len))
                            .sum(),
                    );
                    tally
                        .add(&ids, &stored)
                        .map_err(io("writing a temporary file in", &tmp))?;
                    let missing: Vec<_> = ids
                        .iter()
                        .zip(&stored)
                        .filter(|(_, s)| !**s)
                        .map(|((id, _), _)| *id)
                        .collect();
                    blobs.fetch_origin(missing, Some(progress)).await?;
                    trim_after(group.len());
                }
            }
            (counts.chunks, counts.local_bytes) =
                tokio::task::spawn_blocking(move || tally.count())
                    .await
                    .expect("tally task panicked")
                    .map_err(io("reading a temporary file in", &tmp))?;
            Ok::<_, Error>(())
        }
        .await;
        let walked = walker.files;
        let tree = fetched.and_then(|()| walker.finish()).map(|t| {
            counts.symlinks = t.symlinks.iter().filter(|(p, _)| matcher.takes(p)).count() as u64;
            (t, counts)
        });
        (walked, tree)
    }

    /// The writing pass of [`Node::pull_streaming`]: the tree read again (every node and
    /// chunk is local now), its files written a batch at a time through a staging directory,
    /// then the directories the selection takes themselves, the symlinks, and the modes.
    ///
    /// Cancel-safe, as [`Node::pull_streaming`].
    async fn stream_write(
        &self,
        blobs: &crate::blobs::Blobs,
        root: shoal_registry::Hash,
        tree: &crate::walk::Walked,
        dest: &Path,
        matcher: &crate::select::Matcher,
        progress: &Progress,
    ) -> Result<()> {
        let store = self.store()?;
        let top = crate::walk::load_dir(blobs, &root, "").await?;
        let top: HashSet<&str> = top.entries.iter().map(|e| e.name.as_str()).collect();
        std::fs::create_dir_all(dest).map_err(io("creating directory", dest))?;
        let staging = staging_dir(dest, &top)?;
        let mut made: HashSet<String> = HashSet::new();
        let written = async {
            let mut walker = crate::walk::Walker::new(blobs, root);
            let mut index = 0usize;
            while let Some(mut files) = walker.next_files(STREAM_FILES).await? {
                if !matcher.takes_all() {
                    files.retain(|f| matcher.takes(&f.path));
                }
                tokio::task::block_in_place(|| -> Result<()> {
                    for f in &files {
                        make_parents(dest, &f.path, &mut made)?;
                    }
                    files.par_iter().enumerate().try_for_each(|(i, f)| {
                        write_file(store.as_ref(), dest, &staging, index + i, f)?;
                        progress.add(f.size);
                        Ok(())
                    })
                })?;
                index += files.len();
                trim_after(files.len());
            }
            Ok::<_, Error>(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&staging);
        written?;
        tokio::task::block_in_place(|| -> Result<()> {
            // Directories the selection takes themselves (empty ones too), then links.
            for (d, _) in &tree.dirs {
                if matcher.takes(d) && !made.contains(d.as_str()) {
                    make_parents(dest, d, &mut made)?;
                    make_dir(&dest.join(d))?;
                    made.insert(d.clone());
                }
            }
            for (p, target) in tree.symlinks.iter().filter(|(p, _)| matcher.takes(p)) {
                make_parents(dest, p, &mut made)?;
                place_symlink(&dest.join(p), target)?;
            }
            // Modes last, deepest first, so a read-only directory does not block its own
            // contents.
            for (d, mode) in tree.dirs.iter().rev() {
                if made.contains(d.as_str()) {
                    let path = dest.join(d);
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                        .map_err(io("setting mode of", &path))?;
                }
            }
            Ok(())
        })
    }
}

/// Gives the allocator's free memory back after a batch of many files (not after a few
/// large ones, whose buffers the next batch reuses). A batch's lists (ids, places, store
/// records: a few MB each, allocated and freed batch after batch among longer-lived blocks)
/// left holes in glibc's heaps that it kept: a 10M-entry pull peaked at 211 MB RSS for a heap
/// of ~150 MB.
fn trim_after(files: usize) {
    if files >= 4096 {
        shoal_fuse::trim_allocator();
    }
}

/// `files` cut into groups of at most [`STREAM_CHUNKS`] chunks (a file with more is a group
/// of its own).
fn groups(files: &[WalkFile]) -> impl Iterator<Item = &[WalkFile]> {
    let mut rest = files;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut chunks) = (0, 0);
        while n < rest.len() && (n == 0 || chunks + rest[n].chunks.len() <= STREAM_CHUNKS) {
            chunks += rest[n].chunks.len();
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

/// What a streaming pull took.
#[derive(Default)]
struct StreamCounts {
    files: u64,
    symlinks: u64,
    bytes: u64,
    chunks: u64,
    local_bytes: u64,
}

/// Makes the directories above `path` (relative to `dest`) that `made` does not list yet.
fn make_parents(dest: &Path, path: &str, made: &mut HashSet<String>) -> Result<()> {
    for (i, _) in path.match_indices('/') {
        let d = &path[..i];
        if !made.contains(d) {
            make_dir(&dest.join(d))?;
            made.insert(d.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::tree::ChunkRef;

    fn id(i: u64) -> shoal_registry::Hash {
        shoal_chunker::hash(&i.to_le_bytes())
    }

    #[test]
    fn chunks_met_in_several_batches_count_once_and_as_first_met() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tally::new(dir.path()).unwrap();
        let run = |r: std::ops::Range<u64>| {
            let mut v: Vec<_> = r.map(|i| (id(i), i as u32 + 1)).collect();
            v.sort_unstable_by_key(|a| a.0);
            v
        };
        // 0..1000 fetched, then 500..1500 with 500..1000 found stored (fetched earlier), then
        // 2000..2100 stored before the pull, met twice.
        let a = run(0..1000);
        t.add(&a, &vec![false; a.len()]).unwrap();
        let b = run(500..1500);
        let local: Vec<bool> = b
            .iter()
            .map(|(h, _)| (0..1000).any(|i| id(i) == *h))
            .collect();
        t.add(&b, &local).unwrap();
        let c = run(2000..2100);
        t.add(&c, &vec![true; c.len()]).unwrap();
        t.add(&c, &vec![true; c.len()]).unwrap();
        t.add(&[], &[]).unwrap();
        let (chunks, local) = t.count().unwrap();
        assert_eq!(chunks, 1600);
        assert_eq!(local, (2000..2100).map(|i| i + 1).sum::<u64>());
    }

    #[test]
    fn groups_hold_at_most_their_chunks_and_every_file_once() {
        let file = |n: usize| WalkFile {
            path: format!("f{n}").into_boxed_str(),
            mode: 0o644,
            size: 0,
            chunks: (0..n as u64)
                .map(|i| ChunkRef { id: id(i), len: 1 })
                .collect(),
        };
        let files: Vec<WalkFile> = [1, STREAM_CHUNKS - 1, 1, 1, STREAM_CHUNKS + 5, 0, 3]
            .into_iter()
            .map(file)
            .collect();
        let g: Vec<Vec<usize>> = groups(&files)
            .map(|g| g.iter().map(|f| f.chunks.len()).collect())
            .collect();
        assert_eq!(
            g,
            vec![
                vec![1, STREAM_CHUNKS - 1],
                vec![1, 1],
                vec![STREAM_CHUNKS + 5],
                vec![0, 3]
            ]
        );
        assert_eq!(groups(&[]).count(), 0);
    }
}
