//! Reading a version's tree: breadth-first, one batched fetch per level, every node
//! validated (names, symlink containment, sizes) before anything uses it.

use crate::blobs::Blobs;
use crate::error::{Error, Result};
use shoal_registry::tree::{self, ChunkList, ChunkRef, Dir, EntryKind, FileContent};
use shoal_registry::Hash;

/// A file of the version, with its full chunk list.
#[derive(Debug, Clone)]
pub struct WalkFile {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

/// Everything in a version, paths relative to its root, parents before children.
#[derive(Debug, Default)]
pub struct Walked {
    pub dirs: Vec<(String, u32)>,
    pub files: Vec<WalkFile>,
    pub symlinks: Vec<(String, String)>,
    /// Every tree node (directories and chunk lists) with its size, for pinning.
    pub nodes: Vec<(Hash, u32)>,
}

/// `parent/name`, or `name` at the root.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Reads and validates the directory node `id` found at `path`.
///
/// Cancel-safe: it only reads.
pub async fn load_dir(blobs: &Blobs, id: &Hash, path: &str) -> Result<Dir> {
    let bytes = blobs.get(id).await?;
    Dir::decode(&bytes).map_err(|e| Error::Corrupt {
        what: format!("directory node {id} for '/{path}'"),
        reason: e.to_string(),
    })
}

/// Ensures every blob in `ids` is in the local store, fetching the missing ones in one batch.
///
/// Cancel-safe: a blob is stored only once verified.
async fn ensure_local(blobs: &Blobs, ids: Vec<Hash>) -> Result<()> {
    let store = blobs.store().clone();
    let missing = tokio::task::spawn_blocking(move || -> Result<Vec<Hash>> {
        let mut m = Vec::new();
        for id in ids {
            if !store.contains(&id)? {
                m.push(id);
            }
        }
        Ok(m)
    })
    .await
    .expect("store task panicked")?;
    if !missing.is_empty() {
        blobs.fetch(missing, None).await?;
    }
    Ok(())
}

/// Walks the whole tree under `root`.
///
/// Cancel-safe: it only reads (and stores verified tree nodes).
#[tracing::instrument(name = "read tree", skip_all)]
pub async fn walk(blobs: &Blobs, root: Hash) -> Result<Walked> {
    let mut out = Walked::default();
    let mut level: Vec<(String, Hash, usize)> = vec![(String::new(), root, 0)];
    while !level.is_empty() {
        ensure_local(blobs, level.iter().map(|l| l.1).collect()).await?;
        let mut next = Vec::new();
        let mut lists: Vec<(usize, Vec<tree::ListRef>)> = Vec::new();
        for (path, id, depth) in level {
            let bytes = blobs.get(&id).await?;
            out.nodes.push((id, bytes.len() as u32));
            let dir = Dir::decode(&bytes).map_err(|e| Error::Corrupt {
                what: format!("directory node {id} for '/{path}'"),
                reason: e.to_string(),
            })?;
            for e in dir.entries {
                let p = join(&path, &e.name);
                match e.kind {
                    EntryKind::Dir { id, .. } => {
                        out.dirs.push((p.clone(), e.mode));
                        next.push((p, id, depth + 1));
                    }
                    EntryKind::File { size, content } => {
                        let chunks = match content {
                            FileContent::Chunks(c) => c,
                            FileContent::Lists(l) => {
                                lists.push((out.files.len(), l));
                                Vec::new()
                            }
                        };
                        out.files.push(WalkFile {
                            path: p,
                            mode: e.mode,
                            size,
                            chunks,
                        });
                    }
                    EntryKind::Symlink { target } => {
                        tree::check_symlink(depth, &target).map_err(|r| Error::Corrupt {
                            what: format!("directory node {id} for '/{path}'"),
                            reason: format!("symlink {:?} -> {target:?}: {r}", e.name),
                        })?;
                        out.symlinks.push((p, target));
                    }
                }
            }
        }
        if !lists.is_empty() {
            ensure_local(
                blobs,
                lists
                    .iter()
                    .flat_map(|(_, l)| l.iter().map(|r| r.id))
                    .collect(),
            )
            .await?;
            for (file, refs) in lists {
                for r in refs {
                    let bytes = blobs.get(&r.id).await?;
                    out.nodes.push((r.id, bytes.len() as u32));
                    let list = ChunkList::decode(&bytes, &r).map_err(|e| Error::Corrupt {
                        what: format!("chunk list {} of '/{}'", r.id, out.files[file].path),
                        reason: e.to_string(),
                    })?;
                    out.files[file].chunks.extend(list.chunks);
                }
            }
        }
        level = next;
    }
    check_links(&out)?;
    Ok(out)
}

/// Refuses a tree with a symlink whose chain (through the tree's other links) leads outside
/// it: each link was checked alone as its node was read, chains only now.
fn check_links(tree: &Walked) -> Result<()> {
    if tree.symlinks.is_empty() {
        return Ok(());
    }
    // Files count as plain path components, like paths the tree does not have.
    let mut kinds: std::collections::HashMap<&str, tree::PathKind> = tree
        .dirs
        .iter()
        .map(|(p, _)| (p.as_str(), tree::PathKind::Dir))
        .collect();
    for (p, t) in &tree.symlinks {
        kinds.insert(p.as_str(), tree::PathKind::Symlink(t.clone()));
    }
    for (p, target) in &tree.symlinks {
        let parts: Vec<&str> = p.split('/').collect();
        let verdict = tree::resolve_symlink(&parts, target, |q| {
            Ok::<_, std::convert::Infallible>(
                kinds
                    .get(q.join("/").as_str())
                    .cloned()
                    .unwrap_or(tree::PathKind::Missing),
            )
        });
        let Ok(Err(reason)) = verdict else { continue };
        return Err(Error::Corrupt {
            what: format!("symlink '/{p}' -> {target:?}"),
            reason: reason.to_string(),
        });
    }
    Ok(())
}

/// Whether every blob of the version under `root` (tree nodes and chunks) is in `store` now,
/// read from the store alone. A node announces a version as complete only while this holds.
pub fn complete_locally(store: &dyn crate::store::ChunkStore, root: Hash) -> Result<bool> {
    let mut level = vec![root];
    while !level.is_empty() {
        let mut next = Vec::new();
        for id in level {
            let Some(bytes) = store.get(&id)? else {
                return Ok(false);
            };
            let Ok(dir) = Dir::decode(&bytes) else {
                return Ok(false);
            };
            for e in dir.entries {
                match e.kind {
                    EntryKind::Dir { id, .. } => next.push(id),
                    EntryKind::File { content, .. } => {
                        let chunks = match content {
                            FileContent::Chunks(c) => c,
                            FileContent::Lists(lists) => {
                                let mut all = Vec::new();
                                for r in lists {
                                    let Some(b) = store.get(&r.id)? else {
                                        return Ok(false);
                                    };
                                    let Ok(list) = ChunkList::decode(&b, &r) else {
                                        return Ok(false);
                                    };
                                    all.extend(list.chunks);
                                }
                                all
                            }
                        };
                        for c in chunks {
                            if !store.contains(&c.id)? {
                                return Ok(false);
                            }
                        }
                    }
                    EntryKind::Symlink { .. } => {}
                }
            }
        }
        level = next;
    }
    Ok(true)
}
