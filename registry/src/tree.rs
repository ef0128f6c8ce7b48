//! The manifest: a Merkle tree of directory nodes, like git's trees.
//!
//! A directory node lists its entries sorted by name; a subdirectory is referenced by the id
//! of its own node, so consecutive versions share every unchanged subtree and a diff only
//! descends where ids differ. A file lists its chunks inline, or, when it has more than
//! [`INLINE_CHUNKS`] chunks, references chunk-list nodes of at most [`LIST_CHUNKS`] each, so
//! that a reader at an offset loads one list and not the whole file's.

use crate::format::{self, DecodeError, Kind};
use serde::{Deserialize, Serialize};
use shoal_chunker::Hash;

/// Files with more chunks than this store their chunk list in separate nodes.
pub const INLINE_CHUNKS: usize = 256;
/// Chunks per chunk-list node.
pub const LIST_CHUNKS: usize = 1024;
/// Longest accepted entry name, as on Linux.
pub const MAX_NAME: usize = 255;
/// Largest chunk a tree may reference (FastCDC's upper bound).
pub const MAX_CHUNK: u32 = 16 << 20;

/// A chunk of a file: its id and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: Hash,
    pub len: u32,
}

/// A reference to a chunk-list node holding `chunks` chunks totalling `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRef {
    pub id: Hash,
    pub chunks: u32,
    pub bytes: u64,
}

/// Where a file's chunk list lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileContent {
    Chunks(Vec<ChunkRef>),
    Lists(Vec<ListRef>),
}

/// What a directory entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File {
        size: u64,
        content: FileContent,
    },
    /// A subdirectory: its node id and the files and bytes below it.
    Dir {
        id: Hash,
        files: u64,
        bytes: u64,
    },
    /// A relative symlink whose target stays inside the tree.
    Symlink {
        target: String,
    },
}

/// One named entry of a directory. `mode` holds the permission bits (0o777) only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub kind: EntryKind,
}

/// A directory node: entries sorted by name, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dir {
    pub entries: Vec<Entry>,
}

/// A chunk-list node of a large file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    pub chunks: Vec<ChunkRef>,
}

/// Why a name cannot be an entry name.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not entry names");
    }
    if name.len() > MAX_NAME {
        return Err("name longer than 255 bytes");
    }
    if name.contains('/') {
        return Err("name contains '/'");
    }
    if name.contains('\0') {
        return Err("name contains NUL");
    }
    Ok(())
}

/// Whether a symlink at `depth` directories below the root, pointing at `target`, stays
/// inside the tree (lexically: the target is relative and never climbs above the root).
pub fn check_symlink(depth: usize, target: &str) -> Result<(), &'static str> {
    if target.is_empty() || target.len() > 4096 {
        return Err("symlink target empty or longer than 4096 bytes");
    }
    if target.contains('\0') {
        return Err("symlink target contains NUL");
    }
    if target.starts_with('/') {
        return Err("symlink target is absolute");
    }
    let mut level = depth as isize;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => level -= 1,
            _ => level += 1,
        }
        if level < 0 {
            return Err("symlink target points outside the dataset");
        }
    }
    Ok(())
}

/// What a path of a tree is, as [`resolve_symlink`] asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    Dir,
    File,
    Symlink(String),
    /// Nothing in the tree has this path.
    Missing,
}

/// Symlinks followed at most while resolving one (Linux's limit).
pub const MAX_LINK_FOLLOWS: usize = 40;

/// Why a symlink is refused once its whole chain is followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Target(&'static str),
    #[error("resolves outside the dataset (through {through})")]
    Escapes { through: String },
    #[error("more than {MAX_LINK_FOLLOWS} symlinks in its chain (a loop?)")]
    Loop,
}

/// Follows the symlink at `link` (path components from the root) to where it leads, through
/// every symlink of the tree on the way, and fails if any step climbs above the root or the
/// chain does not end. `lookup` says what a path of the tree is. Components the tree does not
/// have, or that are files, are taken as plain directories: a pull may write into a
/// directory holding more than the tree, so only the lexical path counts there.
///
/// Each link alone may stay inside (`a/b -> ..`) while a chain through it escapes
/// (`x -> a/b/a/b/../../../etc`): checking one link at a time is not enough.
pub fn resolve_symlink<E>(
    link: &[&str],
    target: &str,
    mut lookup: impl FnMut(&[String]) -> Result<PathKind, E>,
) -> Result<Result<(), LinkError>, E> {
    let Some((_, parent)) = link.split_last() else {
        return Ok(Err(LinkError::Target("a symlink cannot be the root")));
    };
    let mut cur: Vec<String> = parent.iter().map(|s| s.to_string()).collect();
    if let Err(r) = check_symlink(cur.len(), target) {
        return Ok(Err(LinkError::Target(r)));
    }
    let mut pending: std::collections::VecDeque<String> =
        target.split('/').map(str::to_string).collect();
    let mut follows = 0;
    let mut through = link.join("/");
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "" | "." => {}
            ".." => {
                if cur.pop().is_none() {
                    return Ok(Err(LinkError::Escapes { through }));
                }
            }
            name => {
                cur.push(name.to_string());
                if let PathKind::Symlink(t) = lookup(&cur)? {
                    follows += 1;
                    if follows > MAX_LINK_FOLLOWS {
                        return Ok(Err(LinkError::Loop));
                    }
                    if t.starts_with('/') {
                        return Ok(Err(LinkError::Escapes {
                            through: cur.join("/"),
                        }));
                    }
                    through = cur.join("/");
                    cur.pop();
                    for p in t.split('/').rev() {
                        pending.push_front(p.to_string());
                    }
                }
            }
        }
    }
    Ok(Ok(()))
}

impl Entry {
    /// Bytes of file content under this entry (a file's size, a directory's total).
    pub fn bytes(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            EntryKind::Dir { bytes, .. } => *bytes,
            EntryKind::Symlink { .. } => 0,
        }
    }
}

impl Dir {
    /// Encodes the node; its id is the BLAKE3 of these bytes.
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::Dir, self)
    }

    /// Decodes and validates a node read from anywhere (an origin, a peer, the local store).
    pub fn decode(bytes: &[u8]) -> Result<Dir, DecodeError> {
        let dir: Dir = format::decode(Kind::Dir, bytes)?;
        dir.validate()
            .map_err(|e| DecodeError::Invalid(Kind::Dir, e))?;
        Ok(dir)
    }

    /// Looks an entry up by name.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    fn validate(&self) -> Result<(), String> {
        validate_entries(&self.entries)
    }
}

/// Checks a run of directory entries: valid unique names in order, modes, sizes that match
/// the chunks.
pub(crate) fn validate_entries(entries: &[Entry]) -> Result<(), String> {
    for (i, e) in entries.iter().enumerate() {
        check_name(&e.name).map_err(|r| format!("entry {:?}: {r}", e.name))?;
        if i > 0 && entries[i - 1].name >= e.name {
            return Err(format!("entries not sorted and unique at {:?}", e.name));
        }
        if e.mode & !0o777 != 0 {
            return Err(format!(
                "entry {:?}: mode {:o} has bits beyond 0o777",
                e.name, e.mode
            ));
        }
        if let EntryKind::File { size, content } = &e.kind {
            let sum: u64 = match content {
                FileContent::Chunks(c) => {
                    if let Some(bad) = c.iter().find(|c| c.len == 0 || c.len > MAX_CHUNK) {
                        return Err(format!("entry {:?}: chunk of {} bytes", e.name, bad.len));
                    }
                    c.iter().map(|c| c.len as u64).sum()
                }
                FileContent::Lists(l) => l.iter().map(|l| l.bytes).sum(),
            };
            if sum != *size {
                return Err(format!(
                    "entry {:?}: size {size} but chunks add up to {sum}",
                    e.name
                ));
            }
        }
    }
    Ok(())
}

impl ChunkList {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::ChunkList, self)
    }

    /// Decodes a chunk list and checks it against the reference that led to it.
    pub fn decode(bytes: &[u8], expect: &ListRef) -> Result<ChunkList, DecodeError> {
        let list: ChunkList = format::decode(Kind::ChunkList, bytes)?;
        let bytes: u64 = list.chunks.iter().map(|c| c.len as u64).sum();
        if list.chunks.len() != expect.chunks as usize || bytes != expect.bytes {
            return Err(DecodeError::Invalid(
                Kind::ChunkList,
                format!(
                    "holds {} chunks / {bytes} bytes, reference says {} / {}",
                    list.chunks.len(),
                    expect.chunks,
                    expect.bytes
                ),
            ));
        }
        if list.chunks.iter().any(|c| c.len == 0 || c.len > MAX_CHUNK) {
            return Err(DecodeError::Invalid(
                Kind::ChunkList,
                "chunk length out of range".into(),
            ));
        }
        Ok(list)
    }
}

/// Builds a file's content from its chunks, splitting long lists into chunk-list nodes.
/// Returns the content and the list nodes to store (id, encoded bytes).
pub fn file_content(chunks: Vec<ChunkRef>) -> (FileContent, Vec<(Hash, Vec<u8>)>) {
    file_content_inline(chunks, INLINE_CHUNKS)
}

/// [`file_content`] with files of up to `inline` chunks listed inline (v2 directories:
/// [`crate::dirs::INLINE_CHUNKS`]).
pub fn file_content_inline(
    chunks: Vec<ChunkRef>,
    inline: usize,
) -> (FileContent, Vec<(Hash, Vec<u8>)>) {
    if chunks.len() <= inline {
        return (FileContent::Chunks(chunks), Vec::new());
    }
    let mut refs = Vec::new();
    let mut nodes = Vec::new();
    for part in chunks.chunks(LIST_CHUNKS) {
        let node = ChunkList {
            chunks: part.to_vec(),
        };
        let bytes = node.encode();
        let id = shoal_chunker::hash(&bytes);
        refs.push(ListRef {
            id,
            chunks: part.len() as u32,
            bytes: part.iter().map(|c| c.len as u64).sum(),
        });
        nodes.push((id, bytes));
    }
    (FileContent::Lists(refs), nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(i: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: Hash([i; 32]),
            len,
        }
    }

    fn sample() -> Dir {
        Dir {
            entries: vec![
                Entry {
                    name: "a.bin".into(),
                    mode: 0o644,
                    kind: EntryKind::File {
                        size: 10,
                        content: FileContent::Chunks(vec![chunk(1, 4), chunk(2, 6)]),
                    },
                },
                Entry {
                    name: "link".into(),
                    mode: 0o777,
                    kind: EntryKind::Symlink {
                        target: "a.bin".into(),
                    },
                },
                Entry {
                    name: "sub".into(),
                    mode: 0o755,
                    kind: EntryKind::Dir {
                        id: Hash([9; 32]),
                        files: 3,
                        bytes: 99,
                    },
                },
            ],
        }
    }

    #[test]
    fn golden_dir_id() {
        // Pinned: the encoding of a tree node must never change silently.
        let bytes = sample().encode();
        assert_eq!(&bytes[..5], b"SHLD\x01");
        assert_eq!(shoal_chunker::hash(&bytes).to_hex(), GOLDEN_DIR_ID);
    }
    const GOLDEN_DIR_ID: &str = "734d39a2ab2b8c59ec054add5b60a01e903468bc64a202ad0aa2e14987a10287";

    #[test]
    fn rejects_hostile_nodes() {
        let check = |mutate: &dyn Fn(&mut Dir), want: &str| {
            let mut d = sample();
            mutate(&mut d);
            let err = Dir::decode(&d.encode()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        };
        check(&|d| d.entries[0].name = "..".into(), "'.' and '..'");
        check(&|d| d.entries[0].name = "../x".into(), "contains '/'");
        check(&|d| d.entries[0].name = "a\0".into(), "NUL");
        check(&|d| d.entries[0].name = "".into(), "empty name");
        check(&|d| d.entries.swap(0, 2), "not sorted");
        check(&|d| d.entries[0].mode = 0o4755, "beyond 0o777");
        check(
            &|d| {
                d.entries[0].kind = EntryKind::File {
                    size: 11,
                    content: FileContent::Chunks(vec![chunk(1, 4), chunk(2, 6)]),
                }
            },
            "add up to 10",
        );
        let mut bytes = sample().encode();
        bytes[4] = 9;
        assert!(matches!(
            Dir::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(..))
        ));
        assert!(Dir::decode(b"SHLD\x01\xff\xff").is_err());
        assert!(Dir::decode(&bytes[..3]).is_err());
    }

    #[test]
    fn symlink_containment() {
        assert!(check_symlink(0, "a/b").is_ok());
        assert!(check_symlink(1, "../a").is_ok());
        assert!(check_symlink(0, "../a").is_err());
        assert!(check_symlink(1, "x/../../..").is_err());
        assert!(check_symlink(3, "/etc/passwd").is_err());
    }

    /// One tree of paths and link targets, then each link and whether it escapes.
    fn check_links(tree: &[(&str, Option<&str>)], cases: &[(&str, Result<(), &str>)]) {
        let kinds: std::collections::HashMap<String, PathKind> = tree
            .iter()
            .map(|(p, t)| {
                let k = match t {
                    Some("/") => PathKind::Dir,
                    Some(t) => PathKind::Symlink(t.to_string()),
                    None => PathKind::File,
                };
                (p.to_string(), k)
            })
            .collect();
        for (link, want) in cases {
            let Some(PathKind::Symlink(target)) = kinds.get(*link) else {
                panic!("{link} is not a link of the tree")
            };
            let parts: Vec<&str> = link.split('/').collect();
            let got = resolve_symlink(&parts, target, |p| {
                Ok::<_, ()>(
                    kinds
                        .get(&p.join("/"))
                        .cloned()
                        .unwrap_or(PathKind::Missing),
                )
            })
            .unwrap();
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{link}: {e} lacks {w}"),
                (got, want) => panic!("{link}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn symlink_chains_are_followed() {
        check_links(
            &[
                ("a", Some("/")),
                ("a/b", Some("..")),
                ("x", Some("a/b/a/b/a/b/../../../../../../etc/passwd")),
                ("y", Some("a/b/a/b/f")),
                ("f", None),
                ("d", Some("/")),
                ("d/up", Some("../..")),
                ("d/ok", Some("../f")),
                ("loop1", Some("loop2")),
                ("loop2", Some("loop1")),
                ("via", Some("d/up/x")),
                ("abs", Some("/etc")),
                ("ghost", Some("nothing/../f")),
                ("ghost2", Some("nothing/../../f")),
            ],
            &[
                ("a/b", Ok(())),
                ("x", Err("outside the dataset (through a/b)")),
                ("y", Ok(())),
                ("d/up", Err("outside the dataset")),
                ("d/ok", Ok(())),
                ("loop1", Err("more than 40 symlinks")),
                ("via", Err("outside the dataset (through d/up)")),
                ("abs", Err("absolute")),
                ("ghost", Ok(())),
                ("ghost2", Err("outside the dataset")),
            ],
        );
    }

    #[test]
    fn large_files_use_list_nodes() {
        let chunks: Vec<ChunkRef> = (0..10_000u32)
            .map(|i| chunk((i % 251) as u8, 100))
            .collect();
        let (content, nodes) = file_content(chunks.clone());
        let FileContent::Lists(refs) = content else {
            panic!("expected lists")
        };
        assert_eq!(refs.len(), 10);
        let mut back = Vec::new();
        for (r, (id, bytes)) in refs.iter().zip(&nodes) {
            assert_eq!(r.id, *id);
            back.extend(ChunkList::decode(bytes, r).unwrap().chunks);
        }
        assert_eq!(back, chunks);
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let name = "[a-zA-Z0-9._ -]{1,20}".prop_filter("valid", |n| check_name(n).is_ok());
        let chunk =
            (any::<[u8; 32]>(), 1u32..1000).prop_map(|(h, len)| ChunkRef { id: Hash(h), len });
        let kind = prop_oneof![
            proptest::collection::vec(chunk, 0..20).prop_map(|c| {
                let size = c.iter().map(|c| c.len as u64).sum();
                EntryKind::File {
                    size,
                    content: FileContent::Chunks(c),
                }
            }),
            (any::<[u8; 32]>(), any::<u64>(), any::<u64>()).prop_map(|(h, files, bytes)| {
                EntryKind::Dir {
                    id: Hash(h),
                    files,
                    bytes,
                }
            }),
            "[a-z/]{1,30}".prop_map(|target| EntryKind::Symlink { target }),
        ];
        (name, 0u32..0o777, kind).prop_map(|(name, mode, kind)| Entry { name, mode, kind })
    }

    proptest! {
        #[test]
        fn dir_round_trips(mut entries in proptest::collection::vec(arb_entry(), 0..30)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let dir = Dir { entries };
            let bytes = dir.encode();
            prop_assert_eq!(Dir::decode(&bytes).unwrap(), dir.clone());
            // Deterministic: same tree, same bytes, same id.
            prop_assert_eq!(dir.encode(), bytes);
        }
    }
}
