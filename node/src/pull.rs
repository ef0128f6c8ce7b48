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
        let (version, signed) = self.open_version(reference).await?;
        let store = self.store()?;
        let root = signed.body.root;
        let name = format!("{}@{}", reference.dataset, version);
        // Tell peers right away that this node is pulling, so that nodes starting together
        // split the origin reads between them.
        let swarm = if partial { None } else { self.swarm() };
        let _guard = PullGuard::new(swarm, root, &name);
        let blobs = self.blobs(&signed).await?;
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
                    let path = dest.join(p);
                    match std::fs::symlink_metadata(&path) {
                        Ok(m) if m.is_dir() => {
                            return Err(Error::Unsafe {
                                path,
                                reason: "a directory is in the way of a symlink".into(),
                            })
                        }
                        Ok(_) => std::fs::remove_file(&path).map_err(io("replacing", &path))?,
                        Err(_) => {}
                    }
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(io("creating symlink", &path))?;
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
