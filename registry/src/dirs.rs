//! Directories of format v2: one directory as a tree of bounded nodes.
//!
//! A v1 directory is one node holding every entry, so a directory of a million files is one
//! object of tens of megabytes (more than a peer may send), and changing one file in it
//! rewrites all of it. In v2 a directory's entries, still sorted by name, are cut into leaves
//! where the entries' names say (a leaf ends after an entry whose name hashes to a boundary,
//! about one entry in [`AVG_ENTRIES`]), and the leaves are referenced by inner nodes cut the
//! same way one level up, until one node remains: a prolly tree. Since where a node ends
//! depends only on the names around it, adding, removing or changing a file rewrites its leaf
//! and the nodes above it (O(log n) nodes of a few kilobytes), and consecutive versions share
//! every other node. No node holds more than [`MAX_ENTRIES`] entries or (past a single entry)
//! [`MAX_NODE_BYTES`] bytes, whatever the directory.
//!
//! A directory's id, which its parent's entry names, is the id of its top node: a leaf (every
//! small directory is one leaf) or an inner node. v1 nodes stay readable: [`DirNode::decode`]
//! takes a v1 node as a leaf.
//!
//! [`DirBuilder`] builds a directory from its entries in name order, in memory bounded by the
//! nodes under construction (one per level); [`DirLoad`] reads one back whole, a level of its
//! nodes at a time, with every node checked against what its parent says of it.

use crate::format::{self, DecodeError, Kind, V1, V2};
use crate::tree::{validate_entries, Dir, Entry};
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;

/// A leaf or inner node ends after about one entry (or child) in this many.
pub const AVG_ENTRIES: u64 = 256;
/// Most entries (or children) one node holds.
pub const MAX_ENTRIES: usize = 4096;
/// A leaf is sealed before an entry would take it past this many encoded bytes.
pub const MAX_NODE_BYTES: usize = 1 << 20;
/// Files of up to this many chunks list them in their entry in v2; longer files reference
/// chunk-list nodes, so an entry stays under a kilobyte and a listing stays small.
pub const INLINE_CHUNKS: usize = 16;
/// Deepest inner node accepted (a level at least halves the nodes below it: 2^40 entries).
pub const MAX_LEVEL: u8 = 40;

/// An inner node's reference to a node below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    /// The first name under the child.
    pub first: String,
    pub id: Hash,
    /// Entries under the child.
    pub entries: u64,
}

/// The body of a v2 directory node (frozen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Body {
    Leaf(Vec<Entry>),
    Inner { level: u8, children: Vec<Child> },
}

/// A decoded directory node, of either format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirNode {
    /// Entries in name order: a whole small directory, or a run of a large one.
    Leaf(Vec<Entry>),
    /// Nodes below, in name order; `level` 1 points at leaves.
    Inner { level: u8, children: Vec<Child> },
}

/// What a parent node says of a child: its level, its first name, the name that follows its
/// last one (the next child's first, if any) and how many entries it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub level: u8,
    pub first: String,
    pub next: Option<String>,
    pub entries: u64,
}

impl DirNode {
    /// Encodes a v2 node; its id is the BLAKE3 of these bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            DirNode::Leaf(entries) => encode_leaf(entries),
            DirNode::Inner { level, children } => encode_inner(*level, children),
        }
    }

    /// Decodes and validates a node read from anywhere. `span` is what the parent node said
    /// of it (None for a directory's top node); a node that does not match it is refused.
    pub fn decode(bytes: &[u8], span: Option<&Span>) -> Result<DirNode, DecodeError> {
        let node = match format::version_of(Kind::Dir, bytes)? {
            V1 => DirNode::Leaf(Dir::decode(bytes)?.entries),
            V2 => {
                let body: Body = format::decode_v(Kind::Dir, V2, bytes)?;
                let node = match body {
                    Body::Leaf(entries) => DirNode::Leaf(entries),
                    Body::Inner { level, children } => DirNode::Inner { level, children },
                };
                node.validate()
                    .map_err(|e| DecodeError::Invalid(Kind::Dir, e))?;
                node
            }
            v => return Err(DecodeError::UnsupportedVersion(Kind::Dir, v)),
        };
        if let Some(span) = span {
            node.check_span(span)
                .map_err(|e| DecodeError::Invalid(Kind::Dir, e))?;
        }
        Ok(node)
    }

    /// Entries under this node: a leaf's, or the sum of the children's.
    pub fn entries(&self) -> u64 {
        match self {
            DirNode::Leaf(e) => e.len() as u64,
            DirNode::Inner { children, .. } => children.iter().map(|c| c.entries).sum(),
        }
    }

    /// An inner node's children with what each must hold; `span` is this node's own (None
    /// for a top node). Empty for a leaf.
    pub fn spans(&self, span: Option<&Span>) -> Vec<(Hash, Span)> {
        let DirNode::Inner { level, children } = self else {
            return Vec::new();
        };
        let end = span.and_then(|s| s.next.clone());
        children
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let span = Span {
                    level: level - 1,
                    first: c.first.clone(),
                    next: children.get(i + 1).map(|n| n.first.clone()).or(end.clone()),
                    entries: c.entries,
                };
                (c.id, span)
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            DirNode::Leaf(entries) => {
                if entries.len() > MAX_ENTRIES {
                    return Err(format!("{} entries in one node", entries.len()));
                }
                validate_entries(entries)
            }
            DirNode::Inner { level, children } => {
                if *level == 0 || *level > MAX_LEVEL {
                    return Err(format!("inner node at level {level}"));
                }
                if children.is_empty() || children.len() > MAX_ENTRIES {
                    return Err(format!("inner node with {} children", children.len()));
                }
                for (i, c) in children.iter().enumerate() {
                    crate::tree::check_name(&c.first)
                        .map_err(|r| format!("child {:?}: {r}", c.first))?;
                    if c.entries == 0 {
                        return Err(format!("child {:?} holds no entries", c.first));
                    }
                    if i > 0 && children[i - 1].first >= c.first {
                        return Err(format!("children not sorted and unique at {:?}", c.first));
                    }
                }
                Ok(())
            }
        }
    }

    fn check_span(&self, span: &Span) -> Result<(), String> {
        let (level, first, last) = match self {
            DirNode::Leaf(e) => (0, e.first().map(|e| &e.name), e.last().map(|e| &e.name)),
            DirNode::Inner { level, children } => (
                *level,
                children.first().map(|c| &c.first),
                children.last().map(|c| &c.first),
            ),
        };
        if level != span.level {
            return Err(format!(
                "node at level {level} where its parent says {}",
                span.level
            ));
        }
        if first != Some(&span.first) {
            return Err(format!(
                "node starts at {first:?} where its parent says {:?}",
                span.first
            ));
        }
        if let (Some(last), Some(next)) = (last, &span.next) {
            if last >= next {
                return Err(format!(
                    "node runs to {last:?}, past the next node's {next:?}"
                ));
            }
        }
        if self.entries() != span.entries {
            return Err(format!(
                "node holds {} entries where its parent says {}",
                self.entries(),
                span.entries
            ));
        }
        Ok(())
    }
}

fn encode_leaf(entries: &[Entry]) -> Vec<u8> {
    #[derive(Serialize)]
    enum BodyRef<'a> {
        Leaf(&'a [Entry]),
    }
    format::encode_v(Kind::Dir, V2, &BodyRef::Leaf(entries))
}

fn encode_inner(level: u8, children: &[Child]) -> Vec<u8> {
    #[derive(Serialize)]
    enum BodyRef<'a> {
        #[allow(dead_code)]
        Leaf(()),
        Inner {
            level: u8,
            children: &'a [Child],
        },
    }
    format::encode_v(Kind::Dir, V2, &BodyRef::Inner { level, children })
}

/// Whether a node at `level` ends after the entry (or child) named `name`.
fn is_boundary(level: u8, name: &str) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&[level]);
    h.update(name.as_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    x % AVG_ENTRIES == 0
}

/// Why a directory could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError<E> {
    #[error("entry {0:?} is not after the one before it (names must come sorted and unique)")]
    Unsorted(String),
    /// The caller's `emit` failed.
    #[error("storing a directory node failed")]
    Emit(E),
}

/// A directory's top node and what is under it, as [`DirBuilder::finish`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub id: Hash,
    pub entries: u64,
}

#[derive(Default)]
struct Level {
    children: Vec<Child>,
    sealed: u64,
}

/// Builds one directory's v2 nodes from its entries in name order. Each node is handed to
/// `emit` (id, encoded bytes) as soon as it is complete, children before parents; memory is
/// one node under construction per level.
#[derive(Default)]
pub struct DirBuilder {
    leaf: Vec<Entry>,
    leaf_bytes: usize,
    /// `inner[i]` builds the nodes of level `i + 1`.
    inner: Vec<Level>,
    entries: u64,
    last: Option<String>,
}

impl DirBuilder {
    pub fn new() -> DirBuilder {
        DirBuilder::default()
    }

    /// Adds the next entry (names strictly increasing).
    pub fn push<E>(
        &mut self,
        entry: Entry,
        emit: &mut impl FnMut(Hash, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), BuildError<E>> {
        if self.last.as_ref().is_some_and(|last| *last >= entry.name) {
            return Err(BuildError::Unsorted(entry.name));
        }
        self.last = Some(entry.name.clone());
        let size = postcard::experimental::serialized_size(&entry).unwrap_or(0);
        if !self.leaf.is_empty() && self.leaf_bytes + size > MAX_NODE_BYTES {
            self.seal_leaf(emit)?;
        }
        let boundary = is_boundary(0, &entry.name);
        self.leaf.push(entry);
        self.leaf_bytes += size;
        self.entries += 1;
        if boundary || self.leaf.len() >= MAX_ENTRIES {
            self.seal_leaf(emit)?;
        }
        Ok(())
    }

    fn seal_leaf<E>(
        &mut self,
        emit: &mut impl FnMut(Hash, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), BuildError<E>> {
        let entries = std::mem::take(&mut self.leaf);
        let count = entries.len() as u64;
        self.leaf_bytes = 0;
        let bytes = encode_leaf(&entries);
        let id = shoal_chunker::hash(&bytes);
        emit(id, bytes).map_err(BuildError::Emit)?;
        let child = Child {
            first: entries
                .into_iter()
                .next()
                .map(|e| e.name)
                .unwrap_or_default(),
            id,
            entries: count,
        };
        self.push_child(1, child, emit)
    }

    fn push_child<E>(
        &mut self,
        level: u8,
        child: Child,
        emit: &mut impl FnMut(Hash, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), BuildError<E>> {
        let i = level as usize - 1;
        if self.inner.len() <= i {
            self.inner.push(Level::default());
        }
        let l = &mut self.inner[i];
        let boundary = !l.children.is_empty() && is_boundary(level, &child.first);
        l.children.push(child);
        if boundary || l.children.len() >= MAX_ENTRIES {
            self.seal_inner(level, emit)?;
        }
        Ok(())
    }

    fn seal_inner<E>(
        &mut self,
        level: u8,
        emit: &mut impl FnMut(Hash, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), BuildError<E>> {
        let l = &mut self.inner[level as usize - 1];
        let children = std::mem::take(&mut l.children);
        l.sealed += 1;
        let bytes = encode_inner(level, &children);
        let id = shoal_chunker::hash(&bytes);
        emit(id, bytes).map_err(BuildError::Emit)?;
        let child = Child {
            first: children[0].first.clone(),
            id,
            entries: children.iter().map(|c| c.entries).sum(),
        };
        self.push_child(level + 1, child, emit)
    }

    /// Seals what is left; returns the directory's top node.
    pub fn finish<E>(
        mut self,
        emit: &mut impl FnMut(Hash, Vec<u8>) -> Result<(), E>,
    ) -> Result<Built, BuildError<E>> {
        let entries = self.entries;
        if self.inner.is_empty() {
            // One leaf, possibly empty: the whole directory.
            let bytes = encode_leaf(&self.leaf);
            let id = shoal_chunker::hash(&bytes);
            emit(id, bytes).map_err(BuildError::Emit)?;
            return Ok(Built { id, entries });
        }
        if !self.leaf.is_empty() {
            self.seal_leaf(emit)?;
        }
        let mut level = 1u8;
        loop {
            let i = level as usize - 1;
            let top = i + 1 == self.inner.len();
            let l = &self.inner[i];
            if top && l.sealed == 0 {
                if l.children.len() == 1 {
                    return Ok(Built {
                        id: l.children[0].id,
                        entries,
                    });
                }
                let bytes = encode_inner(level, &l.children);
                let id = shoal_chunker::hash(&bytes);
                emit(id, bytes).map_err(BuildError::Emit)?;
                return Ok(Built { id, entries });
            }
            if !l.children.is_empty() {
                self.seal_inner(level, emit)?;
            }
            level += 1;
        }
    }
}

enum Slot {
    Done(Vec<Entry>),
    Want(Hash, Option<Span>),
}

/// Reads one directory whole, a level of its nodes at a time, without I/O of its own: ask
/// [`DirLoad::pending`] which nodes it needs, hand their bytes to [`DirLoad::fill`] in that
/// order, until [`DirLoad::done`]; then [`DirLoad::finish`].
pub struct DirLoad {
    slots: Vec<Slot>,
}

impl DirLoad {
    /// Starts reading the directory whose top node is `id`.
    pub fn new(id: Hash) -> DirLoad {
        DirLoad {
            slots: vec![Slot::Want(id, None)],
        }
    }

    /// The nodes needed next, in order.
    pub fn pending(&self) -> Vec<Hash> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Want(id, _) => Some(*id),
                Slot::Done(_) => None,
            })
            .collect()
    }

    pub fn done(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Done(_)))
    }

    /// The highest level among the nodes needed next (a top node, whose level is not known
    /// before it is read, counts as the highest); None when done.
    pub fn next_level(&self) -> Option<u8> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Want(_, span) => Some(span.as_ref().map_or(u8::MAX, |s| s.level)),
                Slot::Done(_) => None,
            })
            .max()
    }

    /// Drops the nodes that both this load and `other` still need: a node (by id) holds the
    /// same entries wherever it is, so comparing two directories need not read it. Two
    /// versions of a directory read side by side, a level at a time from the higher one
    /// down (see [`DirLoad::next_level`]), meet their shared nodes at the same level, and a
    /// diff reads only the nodes on the paths to what changed. Returns how many were dropped
    /// from each.
    pub fn skip_shared(&mut self, other: &mut DirLoad) -> usize {
        let mine: std::collections::HashSet<Hash> = self.pending().into_iter().collect();
        let shared: std::collections::HashSet<Hash> = other
            .pending()
            .into_iter()
            .filter(|id| mine.contains(id))
            .collect();
        if shared.is_empty() {
            return 0;
        }
        let keep = |s: &Slot| !matches!(s, Slot::Want(id, _) if shared.contains(id));
        self.slots.retain(keep);
        other.slots.retain(keep);
        shared.len()
    }

    /// Takes the bytes of the nodes [`DirLoad::pending`] named, in its order. On error, the
    /// id of the node that was refused and why.
    pub fn fill<B: AsRef<[u8]>>(&mut self, nodes: Vec<B>) -> Result<(), (Hash, DecodeError)> {
        let mut nodes = nodes.into_iter();
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in std::mem::take(&mut self.slots) {
            match slot {
                Slot::Done(e) => out.push(Slot::Done(e)),
                Slot::Want(id, span) => {
                    let Some(bytes) = nodes.next() else {
                        out.push(Slot::Want(id, span));
                        continue;
                    };
                    let node =
                        DirNode::decode(bytes.as_ref(), span.as_ref()).map_err(|e| (id, e))?;
                    let children = node.spans(span.as_ref());
                    match node {
                        DirNode::Leaf(entries) => out.push(Slot::Done(entries)),
                        DirNode::Inner { .. } => {
                            out.extend(children.into_iter().map(|(id, s)| Slot::Want(id, Some(s))))
                        }
                    }
                }
            }
        }
        self.slots = out;
        Ok(())
    }

    /// The directory's entries in name order (call once [`DirLoad::done`]).
    pub fn finish(self) -> Dir {
        let mut entries = Vec::new();
        for s in self.slots {
            if let Slot::Done(e) = s {
                entries.extend(e);
            }
        }
        Dir { entries }
    }
}

/// Reads a whole directory through `get`, which returns the bytes of the nodes asked for, in
/// order (one call per level of the directory's tree).
pub fn load<B: AsRef<[u8]>, E>(
    id: Hash,
    mut get: impl FnMut(&[Hash]) -> Result<Vec<B>, E>,
) -> Result<Result<Dir, (Hash, DecodeError)>, E> {
    let mut load = DirLoad::new(id);
    while !load.done() {
        let nodes = get(&load.pending())?;
        if let Err(e) = load.fill(nodes) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(load.finish()))
}

/// Encoded nodes by id.
pub type Nodes = std::collections::HashMap<Hash, Vec<u8>>;

/// Builds a directory's nodes from `entries` (in name order) into a map: for tests and tools.
pub fn build_all(
    entries: impl IntoIterator<Item = Entry>,
) -> Result<(Built, Nodes), BuildError<std::convert::Infallible>> {
    let mut nodes = std::collections::HashMap::new();
    let mut emit = |id, bytes| {
        nodes.insert(id, bytes);
        Ok(())
    };
    let mut b = DirBuilder::new();
    for e in entries {
        b.push(e, &mut emit)?;
    }
    let top = b.finish(&mut emit)?;
    Ok((top, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{ChunkRef, EntryKind, FileContent};
    use std::collections::{HashMap, HashSet};

    fn file(name: String, seed: u64) -> Entry {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&seed.to_le_bytes());
        Entry {
            name,
            mode: 0o644,
            kind: EntryKind::File {
                size: 3000,
                content: FileContent::Chunks(vec![ChunkRef {
                    id: Hash(id),
                    len: 3000,
                }]),
            },
        }
    }

    fn files(n: u64) -> Vec<Entry> {
        let mut v: Vec<Entry> = (0..n).map(|i| file(format!("img_{i:08}.jpg"), i)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn read_back(top: Hash, nodes: &HashMap<Hash, Vec<u8>>) -> Dir {
        load(top, |ids| {
            Ok::<_, ()>(ids.iter().map(|id| nodes[id].clone()).collect::<Vec<_>>())
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn directories_of_every_size_round_trip() {
        for n in [0u64, 1, 2, 255, 1000, 30_000] {
            let entries = files(n);
            let (top, nodes) = build_all(entries.clone()).unwrap();
            assert_eq!(top.entries, n);
            assert_eq!(read_back(top.id, &nodes).entries, entries, "{n} entries");
            let (again, _) = build_all(entries.clone()).unwrap();
            assert_eq!(again, top, "deterministic: same entries, same id");
            for bytes in nodes.values() {
                let node = DirNode::decode(bytes, None).unwrap();
                let count = match &node {
                    DirNode::Leaf(e) => e.len(),
                    DirNode::Inner { children, .. } => children.len(),
                };
                assert!(count <= MAX_ENTRIES && bytes.len() <= MAX_NODE_BYTES);
            }
            if n >= 30_000 {
                let leaves = nodes
                    .values()
                    .filter(|b| matches!(DirNode::decode(b, None), Ok(DirNode::Leaf(_))))
                    .count() as u64;
                // About one leaf per AVG_ENTRIES entries.
                assert!(
                    leaves > n / AVG_ENTRIES / 2 && leaves < n / AVG_ENTRIES * 2,
                    "{leaves} leaves for {n} entries"
                );
            }
        }
    }

    #[test]
    fn one_change_rewrites_a_path_not_the_directory() {
        let entries = files(100_000);
        let (top, before) = build_all(entries.clone()).unwrap();
        let total: usize = before.values().map(|b| b.len()).sum();
        let edits: Vec<(&str, Vec<Entry>)> = vec![
            ("changed", {
                let mut e = entries.clone();
                e[50_000] = file(e[50_000].name.clone(), 999_999_999);
                e
            }),
            ("added", {
                let mut e = entries.clone();
                e.insert(50_001, file(format!("{}x", e[50_000].name), 7));
                e
            }),
            ("removed", {
                let mut e = entries.clone();
                e.remove(50_000);
                e
            }),
        ];
        for (what, e) in edits {
            let (top2, after) = build_all(e.clone()).unwrap();
            assert_ne!(top2.id, top.id);
            let new: Vec<usize> = after
                .iter()
                .filter(|(id, _)| !before.contains_key(id))
                .map(|(_, b)| b.len())
                .collect();
            let new_bytes: usize = new.iter().sum();
            assert!(
                new.len() <= 4 && new_bytes * 20 < total,
                "{what}: {} new nodes, {new_bytes} of {total} bytes",
                new.len()
            );
            assert_eq!(read_back(top2.id, &after).entries, e, "{what}");
        }
    }

    #[test]
    fn side_by_side_reads_skip_shared_nodes() {
        let entries = files(100_000);
        let (top, before) = build_all(entries.clone()).unwrap();
        let mut changed = entries.clone();
        changed[70_000] = file(changed[70_000].name.clone(), 5);
        changed.push(file("zzz".into(), 6));
        let (top2, after) = build_all(changed).unwrap();
        let (mut a, mut b) = (DirLoad::new(top.id), DirLoad::new(top2.id));
        let mut read = 0;
        loop {
            a.skip_shared(&mut b);
            let level = a.next_level().max(b.next_level());
            if level.is_none() {
                break;
            }
            for (load, nodes) in [(&mut a, &before), (&mut b, &after)] {
                if load.next_level() == level {
                    let ids = load.pending();
                    read += ids.len();
                    load.fill(ids.iter().map(|id| nodes[id].clone()).collect())
                        .unwrap();
                }
            }
        }
        let (a, b) = (a.finish().entries, b.finish().entries);
        assert!(read <= 8, "{read} nodes read to compare");
        assert!(a.iter().any(|e| e.name == entries[70_000].name));
        assert!(b.iter().any(|e| e.name == "zzz"));
        assert!(
            a.len() < 2_000 && b.len() < 2_000,
            "{} / {}",
            a.len(),
            b.len()
        );
    }

    #[test]
    fn large_entries_split_by_bytes() {
        // Entries near the largest a v2 leaf holds inline: long names, 16 chunks each.
        let entries: Vec<Entry> = (0..6000u32)
            .map(|i| Entry {
                name: format!("{i:06}{}", "n".repeat(240)),
                mode: 0o644,
                kind: EntryKind::File {
                    size: 16 * 100,
                    content: FileContent::Chunks(
                        (0..16)
                            .map(|c| ChunkRef {
                                id: Hash([(c + i) as u8; 32]),
                                len: 100,
                            })
                            .collect(),
                    ),
                },
            })
            .collect();
        let (top, nodes) = build_all(entries.clone()).unwrap();
        assert!(nodes.values().all(|b| b.len() <= MAX_NODE_BYTES));
        assert_eq!(read_back(top.id, &nodes).entries, entries);
    }

    #[test]
    fn unsorted_entries_are_refused() {
        let mut b = DirBuilder::new();
        let mut emit = |_, _| Ok::<_, ()>(());
        b.push(file("b".into(), 1), &mut emit).unwrap();
        for name in ["a", "b"] {
            match b.push(file(name.into(), 2), &mut emit) {
                Err(BuildError::Unsorted(n)) => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn v1_nodes_read_as_leaves() {
        let dir = Dir { entries: files(3) };
        let node = DirNode::decode(&dir.encode(), None).unwrap();
        assert_eq!(node, DirNode::Leaf(dir.entries.clone()));
        let id = shoal_chunker::hash(&dir.encode());
        let nodes = HashMap::from([(id, dir.encode())]);
        assert_eq!(read_back(id, &nodes), dir);
    }

    #[test]
    fn golden_v2_ids() {
        // Pinned: the v2 encoding and where nodes split must never change silently.
        let (top, nodes) = build_all(files(2000)).unwrap();
        assert_eq!(&nodes[&top.id][..5], b"SHLD\x02");
        assert_eq!(top.id.to_hex(), GOLDEN_TOP);
        let (leaf, _) = build_all(files(3)).unwrap();
        assert_eq!(leaf.id.to_hex(), GOLDEN_LEAF);
    }
    const GOLDEN_TOP: &str = "eb9dac4211b41db320773a35134b9d9c4582be6fa39482967686bdb4f07b221f";
    const GOLDEN_LEAF: &str = "fedc852be9ce9b705dc1a15463a2cf87a1dc6ef818c39bc6ec8fca463a534636";

    /// A tree whose inner node lies about a child: each lie is refused while reading.
    #[test]
    fn nodes_that_disagree_with_their_parent_are_refused() {
        let (top, nodes) = build_all(files(3000)).unwrap();
        let DirNode::Inner { level, children } = DirNode::decode(&nodes[&top.id], None).unwrap()
        else {
            panic!("3000 entries make an inner node")
        };
        assert_eq!(level, 1);
        type Lie = Box<dyn Fn(&mut Vec<Child>)>;
        let lies: Vec<(&str, Lie)> = vec![
            ("entries", Box::new(|c| c[1].entries += 1)),
            (
                "starts at",
                Box::new(|c| c[1].first = format!("{}0", c[1].first)),
            ),
            ("not sorted", Box::new(|c| c.swap(1, 2))),
            ("starts at", Box::new(|c| c[2].id = c[1].id)),
        ];
        for (want, lie) in lies {
            let mut c = children.clone();
            lie(&mut c);
            let mut forged = nodes.clone();
            let bytes = DirNode::Inner {
                level: 1,
                children: c,
            }
            .encode();
            let id = shoal_chunker::hash(&bytes);
            forged.insert(id, bytes);
            let got = load(id, |ids| {
                Ok::<_, ()>(ids.iter().map(|id| forged[id].clone()).collect::<Vec<_>>())
            })
            .unwrap();
            match got {
                Err((_, e)) => assert!(e.to_string().contains(want), "{e} lacks {want}"),
                Ok(_) => panic!("a lie about {want} was read"),
            }
        }
        // A leaf that runs into the next one's names.
        let mut long = match DirNode::decode(&nodes[&children[1].id], None).unwrap() {
            DirNode::Leaf(e) => e,
            _ => unreachable!(),
        };
        match DirNode::decode(&nodes[&children[2].id], None).unwrap() {
            DirNode::Leaf(e) => long.push(e[0].clone()),
            _ => unreachable!(),
        }
        let long_bytes = DirNode::Leaf(long.clone()).encode();
        let mut c = children.clone();
        c[1].id = shoal_chunker::hash(&long_bytes);
        c[1].entries = long.len() as u64;
        let top_bytes = DirNode::Inner {
            level: 1,
            children: c,
        }
        .encode();
        let spans = DirNode::decode(&top_bytes, None).unwrap().spans(None);
        let e = DirNode::decode(&long_bytes, Some(&spans[1].1)).unwrap_err();
        assert!(e.to_string().contains("past the next"), "{e}");
        // A leaf where an inner node belongs, and levels out of range.
        let leaf_id = children[0].id;
        let wrong_level = DirNode::Inner {
            level: 2,
            children: children.clone(),
        }
        .encode();
        let e = DirNode::decode(
            &nodes[&leaf_id],
            Some(&Span {
                level: 1,
                first: children[0].first.clone(),
                next: None,
                entries: children[0].entries,
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("level 0"), "{e}");
        let spans = DirNode::decode(&wrong_level, None).unwrap().spans(None);
        assert_eq!(spans[0].1.level, 1);
        let seen: HashSet<Hash> = spans.iter().map(|s| s.0).collect();
        assert_eq!(seen.len(), children.len());
        for level in [0u8, MAX_LEVEL + 1] {
            let bytes = DirNode::Inner {
                level,
                children: children.clone(),
            }
            .encode();
            assert!(DirNode::decode(&bytes, None).is_err(), "level {level}");
        }
    }
}
