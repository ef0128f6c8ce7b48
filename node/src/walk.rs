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
pub async fn load_dir(blobs: &Blobs, id: &Hash, path: &str) -> Result<Dir> {
    let bytes = blobs.get(id).await?;
    Dir::decode(&bytes).map_err(|e| Error::Corrupt {
        what: format!("directory node {id} for '/{path}'"),
        reason: e.to_string(),
    })
}

/// Ensures every blob in `ids` is in the local store, fetching the missing ones in one batch.
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
    Ok(out)
}
