//! Reading a version's tree: breadth-first, one batched fetch per level, every node
//! validated (names, symlink containment, sizes) before anything uses it.

use crate::blobs::Blobs;
use crate::error::{Error, Result};
use shoal_registry::dirs::{DirLoad, DirNode, Span};
use shoal_registry::tree::{self, ChunkList, ChunkRef, Dir, EntryKind, FileContent};
use shoal_registry::Hash;

/// A file of the version, with its full chunk list. (A pull holds one per file of the
/// version: its path is boxed to its length, and a file of one chunk, the common small
/// file, keeps it inline rather than in an allocation of its own.)
#[derive(Debug, Clone)]
pub struct WalkFile {
    pub path: Box<str>,
    pub mode: u32,
    pub size: u64,
    pub chunks: smallvec::SmallVec<[ChunkRef; 1]>,
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

/// Reads and validates the whole directory whose top node is `id`, found at `path`: its
/// nodes a level at a time, each level fetched in one batch.
///
/// Cancel-safe: it only reads (and stores verified tree nodes).
pub async fn load_dir(blobs: &Blobs, id: &Hash, path: &str) -> Result<Dir> {
    let mut load = DirLoad::new(*id);
    while !load.done() {
        fill_level(blobs, &mut load, path).await?;
    }
    Ok(load.finish())
}

/// Reads the nodes `load` needs next, in one batch; returns how many.
///
/// Cancel-safe: it only reads (and stores verified tree nodes).
async fn fill_level(blobs: &Blobs, load: &mut DirLoad, path: &str) -> Result<usize> {
    let ids = load.pending();
    ensure_local(blobs, ids.clone()).await?;
    let mut nodes = Vec::with_capacity(ids.len());
    for id in &ids {
        nodes.push(blobs.get(id).await?);
    }
    load.fill(nodes).map_err(|(node, e)| Error::Corrupt {
        what: format!("directory node {node} for '/{path}'"),
        reason: e.to_string(),
    })?;
    Ok(ids.len())
}

/// Two versions of the directory at `path` (top nodes `a` and `b`), read side by side
/// without the nodes they share: the entries of each that are not in a shared node (so every
/// difference is among them), and how many nodes were read.
///
/// Cancel-safe: it only reads (and stores verified tree nodes).
pub async fn load_dir_pair(
    (blobs_a, a): (&Blobs, Hash),
    (blobs_b, b): (&Blobs, Hash),
    path: &str,
) -> Result<(Dir, Dir, u64)> {
    let (mut la, mut lb) = (DirLoad::new(a), DirLoad::new(b));
    let mut read = 0;
    loop {
        la.skip_shared(&mut lb);
        let level = la.next_level().max(lb.next_level());
        if level.is_none() {
            break;
        }
        if la.next_level() == level {
            read += fill_level(blobs_a, &mut la, path).await? as u64;
        }
        if lb.next_level() == level {
            read += fill_level(blobs_b, &mut lb, path).await? as u64;
        }
    }
    Ok((la.finish(), lb.finish(), read))
}

/// Ensures every blob in `ids` is in the local store, fetching the missing ones in one batch.
///
/// Cancel-safe: a blob is stored only once verified.
async fn ensure_local(blobs: &Blobs, ids: Vec<Hash>) -> Result<()> {
    ensure(blobs, ids, false).await
}

/// [`ensure_local`] for a walk of the whole tree: every blob of the packed spans read is
/// kept (the rest of the tree's nodes, which the walk reads next; see [`Blobs::fetch_tree`]).
///
/// Cancel-safe: a blob is stored only once verified.
async fn ensure_tree(blobs: &Blobs, ids: Vec<Hash>) -> Result<()> {
    ensure(blobs, ids, true).await
}

/// Cancel-safe: a blob is stored only once verified.
async fn ensure(blobs: &Blobs, ids: Vec<Hash>, whole: bool) -> Result<()> {
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
    match (missing.is_empty(), whole) {
        (true, _) => {}
        (false, true) => blobs.fetch_tree(missing).await?,
        (false, false) => blobs.fetch(missing, None).await?,
    }
    Ok(())
}

/// Walks the whole tree under `root`.
///
/// Cancel-safe: it only reads (and stores verified tree nodes).
pub async fn walk(blobs: &Blobs, root: Hash) -> Result<Walked> {
    let mut walker = Walker::new(blobs, root);
    let mut files = Vec::new();
    while let Some(batch) = walker.next_files(usize::MAX).await? {
        files.extend(batch);
    }
    let mut out = walker.finish()?;
    out.files = files;
    Ok(out)
}

/// A node still to read: (path, node, depth, what its parent node said of it: None for a
/// directory's top node).
type Pending = (String, Hash, usize, Option<Span>);

/// The tree under a root, read a level at a time (each level's nodes fetched in one batch)
/// and handed out a batch of files at a time, so that a caller can act on a version's files
/// without holding them all: directories, symlinks and tree nodes (far fewer) are kept.
pub struct Walker<'a> {
    blobs: &'a Blobs,
    /// What is left of the level being read (its nodes are local).
    level: std::vec::IntoIter<Pending>,
    next: Vec<Pending>,
    /// Directories, parents before children.
    pub dirs: Vec<(String, u32)>,
    pub symlinks: Vec<(String, String)>,
    /// Every tree node read (directories and chunk lists) with its size.
    pub nodes: Vec<(Hash, u32)>,
    /// Files handed out so far.
    pub files: u64,
}

impl<'a> Walker<'a> {
    pub fn new(blobs: &'a Blobs, root: Hash) -> Walker<'a> {
        Walker {
            blobs,
            level: Vec::new().into_iter(),
            next: vec![(String::new(), root, 0, None)],
            dirs: Vec::new(),
            symlinks: Vec::new(),
            nodes: Vec::new(),
            files: 0,
        }
    }

    /// The next files (about `max` at most: every file of a node read is included), with
    /// their full chunk lists; `None` when every file was handed out.
    ///
    /// Cancel-safe: it only reads (and stores verified tree nodes); a walker cancelled
    /// mid-call must not be used again.
    #[tracing::instrument(name = "read tree", skip_all)]
    pub async fn next_files(&mut self, max: usize) -> Result<Option<Vec<WalkFile>>> {
        let mut files: Vec<WalkFile> = Vec::new();
        let mut lists: Vec<(usize, Vec<tree::ListRef>)> = Vec::new();
        while files.len() < max {
            let Some((path, id, depth, span)) = self.level.next() else {
                if self.next.is_empty() {
                    break;
                }
                let level = std::mem::take(&mut self.next);
                ensure_tree(self.blobs, level.iter().map(|l| l.1).collect()).await?;
                if level.len() >= 1024 {
                    // The level's ranged reads are stored and gone (up to the 64 MiB
                    // budget): give their room back before the files' fetches start.
                    shoal_fuse::trim_allocator();
                }
                self.level = level.into_iter();
                continue;
            };
            let bytes = self.blobs.get(&id).await?;
            self.nodes.push((id, bytes.len() as u32));
            let node = DirNode::decode(&bytes, span.as_ref()).map_err(|e| Error::Corrupt {
                what: format!("directory node {id} for '/{path}'"),
                reason: e.to_string(),
            })?;
            let entries = match node {
                DirNode::Leaf(entries) => entries,
                inner => {
                    // More of the same directory, one level down.
                    for (child, span) in inner.spans(span.as_ref()) {
                        self.next.push((path.clone(), child, depth, Some(span)));
                    }
                    continue;
                }
            };
            for e in entries {
                let p = join(&path, &e.name);
                match e.kind {
                    EntryKind::Dir { id, .. } => {
                        self.dirs.push((p.clone(), e.mode));
                        self.next.push((p, id, depth + 1, None));
                    }
                    EntryKind::File { size, content } => {
                        let chunks = match content {
                            FileContent::Chunks(c) => c.into_iter().collect(),
                            FileContent::Lists(l) => {
                                lists.push((files.len(), l));
                                smallvec::SmallVec::new()
                            }
                        };
                        files.push(WalkFile {
                            path: p.into_boxed_str(),
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
                        self.symlinks.push((p, target));
                    }
                }
            }
        }
        if !lists.is_empty() {
            ensure_tree(
                self.blobs,
                lists
                    .iter()
                    .flat_map(|(_, l)| l.iter().map(|r| r.id))
                    .collect(),
            )
            .await?;
            for (file, refs) in lists {
                for r in refs {
                    let bytes = self.blobs.get(&r.id).await?;
                    self.nodes.push((r.id, bytes.len() as u32));
                    let list = ChunkList::decode(&bytes, &r).map_err(|e| Error::Corrupt {
                        what: format!("chunk list {} of '/{}'", r.id, files[file].path),
                        reason: e.to_string(),
                    })?;
                    files[file].chunks.extend(list.chunks);
                }
            }
        }
        if files.is_empty() && self.next.is_empty() && self.level.len() == 0 {
            return Ok(None);
        }
        self.files += files.len() as u64;
        Ok(Some(files))
    }

    /// The directories, symlinks and nodes of the tree (its files were handed out), once
    /// every symlink's chain is checked; call after [`Walker::next_files`] returned `None`.
    pub fn finish(self) -> Result<Walked> {
        let out = Walked {
            dirs: self.dirs,
            files: Vec::new(),
            symlinks: self.symlinks,
            nodes: self.nodes,
        };
        check_links(&out)?;
        Ok(out)
    }
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

/// What [`visit_locally`] found of a tree node in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Here,
    Missing,
    /// Its bytes did not match its id (the store dropped it), or it did not decode: why.
    Corrupt(String),
}

/// One blob of a version reached from the store alone (see [`visit_locally`]).
#[derive(Debug)]
pub enum Local<'a> {
    /// A tree node (directory node or chunk list) of the directory or file at `path`
    /// (relative to the root, `""` for the root), read from the store; below one not `Here`
    /// nothing is visited.
    Node {
        id: Hash,
        path: &'a str,
        found: Found,
    },
    /// A chunk of the file at `path` (not read: the visitor decides).
    Chunk { id: Hash, len: u32, path: &'a str },
}

/// Visits every blob of the version under `root` that its tree nodes in `store` lead to,
/// reading the store alone: each tree node as it is read (a directory level at a time), each
/// chunk of each file. `f` returns whether to go on; the result says whether the walk went
/// to the end. A store error other than a corrupt blob stops it.
pub fn visit_locally(
    store: &dyn crate::store::ChunkStore,
    root: Hash,
    mut f: impl FnMut(Local<'_>) -> Result<bool>,
) -> Result<bool> {
    use crate::store::StoreError;
    let read = |id: &Hash| -> Result<std::result::Result<Vec<u8>, Found>> {
        match store.get(id) {
            Ok(Some(b)) => Ok(Ok(b)),
            Ok(None) => Ok(Err(Found::Missing)),
            Err(e @ StoreError::Corrupt { .. }) => Ok(Err(Found::Corrupt(e.to_string()))),
            Err(e) => Err(e.into()),
        }
    };
    let mut level: Vec<(Hash, Option<Span>, String)> = vec![(root, None, String::new())];
    while !level.is_empty() {
        let mut next = Vec::new();
        for (id, span, path) in level {
            let node = match read(&id)? {
                Ok(bytes) => DirNode::decode(&bytes, span.as_ref())
                    .map_err(|e| Found::Corrupt(format!("directory node {id}: {e}"))),
                Err(found) => Err(found),
            };
            let node = match node {
                Ok(n) => n,
                Err(found) => {
                    if !f(Local::Node {
                        id,
                        path: &path,
                        found,
                    })? {
                        return Ok(false);
                    }
                    continue;
                }
            };
            if !f(Local::Node {
                id,
                path: &path,
                found: Found::Here,
            })? {
                return Ok(false);
            }
            let entries = match node {
                DirNode::Leaf(entries) => entries,
                inner => {
                    next.extend(
                        inner
                            .spans(span.as_ref())
                            .into_iter()
                            .map(|(id, s)| (id, Some(s), path.clone())),
                    );
                    continue;
                }
            };
            for e in entries {
                let p = join(&path, &e.name);
                match e.kind {
                    EntryKind::Dir { id, .. } => next.push((id, None, p)),
                    EntryKind::File { content, .. } => {
                        // Its chunks: inline, or in chunk-list nodes (each visited first).
                        let groups = match content {
                            FileContent::Chunks(c) => vec![(None, c)],
                            FileContent::Lists(lists) => {
                                let mut groups = Vec::with_capacity(lists.len());
                                for r in lists {
                                    let list = match read(&r.id)? {
                                        Ok(b) => ChunkList::decode(&b, &r).map_err(|e| {
                                            Found::Corrupt(format!("chunk list {}: {e}", r.id))
                                        }),
                                        Err(found) => Err(found),
                                    };
                                    groups.push(match list {
                                        Ok(l) => (Some((r.id, Found::Here)), l.chunks),
                                        Err(found) => (Some((r.id, found)), Vec::new()),
                                    });
                                }
                                groups
                            }
                        };
                        for (node, chunks) in groups {
                            if let Some((id, found)) = node {
                                if !f(Local::Node {
                                    id,
                                    path: &p,
                                    found,
                                })? {
                                    return Ok(false);
                                }
                            }
                            for c in chunks {
                                if !f(Local::Chunk {
                                    id: c.id,
                                    len: c.len,
                                    path: &p,
                                })? {
                                    return Ok(false);
                                }
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

/// Whether every blob of the version under `root` (tree nodes and chunks) is in `store` now,
/// read from the store alone. A node announces a version as complete only while this holds.
pub fn complete_locally(store: &dyn crate::store::ChunkStore, root: Hash) -> Result<bool> {
    visit_locally(store, root, |b| match b {
        Local::Node { found, .. } => Ok(found == Found::Here),
        Local::Chunk { id, .. } => Ok(store.contains(&id)?),
    })
}
