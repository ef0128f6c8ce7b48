//! The inode table of a mounted version. Directories are loaded on first use, so mounting a
//! version with millions of files reads only the directories someone looks at. Inode numbers
//! are handed out on first sight of a path and stay the same for the life of the mount.

use bytes::Bytes;
use shoal_registry::tree::{resolve_symlink, ChunkRef, Dir, EntryKind, FileContent, PathKind};
use shoal_registry::Hash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a source could not produce what was asked: reported to the reader as EIO and logged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where the mount gets its (verified) data. Calls may block up to the source's own deadline.
pub trait Source: Send + Sync + 'static {
    /// A directory node.
    fn dir(&self, id: &Hash) -> Result<Arc<Dir>, SourceError>;
    /// A file's full chunk list (loads chunk-list nodes when the file has them).
    fn chunks(&self, content: &FileContent) -> Result<Arc<Vec<ChunkRef>>, SourceError>;
    /// The bytes of chunks, in order.
    fn read(&self, chunks: &[ChunkRef]) -> Result<Vec<Bytes>, SourceError>;
    /// Starts fetching chunks in the background; never blocks.
    fn prefetch(&self, chunks: Vec<ChunkRef>);
    /// Whether every one of these chunks can be read without fetching; never blocks.
    fn is_local(&self, _chunks: &[ChunkRef]) -> bool {
        false
    }
    /// A file at `path` (relative to the root) was opened: a reader's position, for fetching
    /// ahead of it in a known read order.
    fn opened(&self, _path: &str) {}
    /// A local file holding exactly the bytes of `chunks` (`size` in all), if one is kept, for
    /// the kernel to read directly (passthrough); never blocks for long.
    fn whole_file(&self, _chunks: &[ChunkRef], _size: u64) -> Option<std::fs::File> {
        None
    }
    /// `chunks` are all local: keep a whole file of them for later opens; never blocks.
    fn keep_whole_file(&self, _chunks: Arc<Vec<ChunkRef>>, _size: u64) {}
}

/// A directory's entries in name order: (name, inode).
pub type Children = Arc<Vec<(String, u64)>>;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir { id: Hash },
    File { size: u64, content: FileContent },
    Symlink { target: String },
}

#[derive(Debug)]
struct Inode {
    parent: u64,
    name: String,
    mode: u32,
    kind: Kind,
    /// Children in name order, once the directory was loaded.
    children: Option<Children>,
    subdirs: u32,
}

/// Attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub kind: Kind,
}

/// The root directory's inode number (FUSE's convention).
pub const ROOT: u64 = 1;

/// The inode table: inode numbers, parent links and loaded directories.
pub struct Inodes<S> {
    source: S,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    inodes: Vec<Inode>,
    by_name: HashMap<(u64, String), u64>,
}

impl State {
    fn get(&self, ino: u64) -> Option<&Inode> {
        ino.checked_sub(1).and_then(|i| self.inodes.get(i as usize))
    }
}

impl<S: Source> Inodes<S> {
    /// A table whose root is the directory node `root` (with mode `root_mode`).
    pub fn new(source: S, root: Hash, root_mode: u32) -> Inodes<S> {
        let root = Inode {
            parent: ROOT,
            name: String::new(),
            mode: root_mode,
            kind: Kind::Dir { id: root },
            children: None,
            subdirs: 0,
        };
        Inodes {
            source,
            state: Mutex::new(State {
                inodes: vec![root],
                by_name: HashMap::new(),
            }),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("inode table poisoned")
    }

    /// Loads a directory's entries (once) and returns its children.
    pub fn children(&self, ino: u64) -> Result<Children, Errno> {
        let id = {
            let st = self.lock();
            let node = st.get(ino).ok_or(Errno::NotFound)?;
            if let Some(c) = &node.children {
                return Ok(c.clone());
            }
            match node.kind {
                Kind::Dir { id } => id,
                _ => return Err(Errno::NotDir),
            }
        };
        // Load outside the lock: it may wait on the network.
        let dir = self.source.dir(&id).map_err(Errno::Io)?;
        let mut st = self.lock();
        if let Some(c) = &st.get(ino).expect("inode exists").children {
            return Ok(c.clone());
        }
        let mut children = Vec::with_capacity(dir.entries.len());
        let mut subdirs = 0;
        for e in &dir.entries {
            let kind = match &e.kind {
                EntryKind::Dir { id, .. } => {
                    subdirs += 1;
                    Kind::Dir { id: *id }
                }
                EntryKind::File { size, content } => Kind::File {
                    size: *size,
                    content: content.clone(),
                },
                EntryKind::Symlink { target } => Kind::Symlink {
                    target: target.clone(),
                },
            };
            let key = (ino, e.name.clone());
            let child = match st.by_name.get(&key) {
                Some(c) => *c,
                None => {
                    st.inodes.push(Inode {
                        parent: ino,
                        name: e.name.clone(),
                        mode: e.mode,
                        kind,
                        children: None,
                        subdirs: 0,
                    });
                    let c = st.inodes.len() as u64;
                    st.by_name.insert(key, c);
                    c
                }
            };
            children.push((e.name.clone(), child));
        }
        let children = Arc::new(children);
        let node = &mut st.inodes[(ino - 1) as usize];
        node.children = Some(children.clone());
        node.subdirs = subdirs;
        Ok(children)
    }

    /// The child of `parent` called `name`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<u64, Errno> {
        let children = self.children(parent)?;
        children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .map(|i| children[i].1)
            .map_err(|_| Errno::NotFound)
    }

    /// Attributes; a directory is loaded so that its link count (2 + subdirectories) is right.
    pub fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        if matches!(self.kind(ino)?, Kind::Dir { .. }) {
            self.children(ino)?;
        }
        Ok(self.attr_known(ino)?.0)
    }

    /// Attributes without loading anything, and whether they are complete: a directory whose
    /// entries have not been loaded yet has an unknown link count (2 is given).
    pub fn attr_known(&self, ino: u64) -> Result<(Attr, bool), Errno> {
        let st = self.lock();
        let n = st.get(ino).ok_or(Errno::NotFound)?;
        let (size, nlink) = match &n.kind {
            Kind::Dir { .. } => (4096, 2 + n.subdirs),
            Kind::File { size, .. } => (*size, 1),
            Kind::Symlink { target } => (target.len() as u64, 1),
        };
        let complete = !matches!(n.kind, Kind::Dir { .. }) || n.children.is_some();
        Ok((
            Attr {
                ino,
                size,
                mode: n.mode,
                nlink,
                kind: n.kind.clone(),
            },
            complete,
        ))
    }

    pub fn kind(&self, ino: u64) -> Result<Kind, Errno> {
        self.lock()
            .get(ino)
            .map(|n| n.kind.clone())
            .ok_or(Errno::NotFound)
    }

    /// The path of an inode relative to the root (`a/b/c.txt`; empty for the root).
    pub fn path(&self, ino: u64) -> Result<String, Errno> {
        let st = self.lock();
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let n = st.get(at).ok_or(Errno::NotFound)?;
            parts.push(n.name.clone());
            at = n.parent;
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// The directory holding `ino`, the index of `ino` among its entries, and the entries.
    pub fn position(&self, ino: u64) -> Result<(u64, usize, Children), Errno> {
        let (parent, name) = {
            let st = self.lock();
            let n = st.get(ino).ok_or(Errno::NotFound)?;
            (n.parent, n.name.clone())
        };
        let children = self.children(parent)?;
        let i = children
            .binary_search_by(|(n, _)| n.as_str().cmp(&name))
            .map_err(|_| Errno::NotFound)?;
        Ok((parent, i, children))
    }

    /// A symlink's target, once its whole chain (through the version's other links) is known
    /// to stay inside the version: the kernel follows what this returns, so a chain that
    /// escapes (`a/b -> ..`, `x -> a/b/a/b/../../../etc`) is refused here, with its path.
    pub fn readlink(&self, ino: u64) -> Result<String, Errno> {
        let Kind::Symlink { target } = self.kind(ino)? else {
            return Err(Errno::NotLink);
        };
        let path = self.path(ino)?;
        let parts: Vec<&str> = path.split('/').collect();
        let verdict = resolve_symlink(&parts, &target, |q| {
            let mut at = ROOT;
            for name in q {
                at = match self.lookup(at, name) {
                    Ok(c) => c,
                    Err(Errno::NotFound | Errno::NotDir) => return Ok(PathKind::Missing),
                    Err(e) => return Err(e),
                };
            }
            Ok(match self.kind(at)? {
                Kind::Dir { .. } => PathKind::Dir,
                Kind::File { .. } => PathKind::File,
                Kind::Symlink { target } => PathKind::Symlink(target),
            })
        })?;
        match verdict {
            Ok(()) => Ok(target),
            Err(reason) => Err(Errno::Io(SourceError(format!(
                "symlink '/{path}' -> {target:?} refused: {reason}"
            )))),
        }
    }

    pub fn parent(&self, ino: u64) -> Result<u64, Errno> {
        self.lock()
            .get(ino)
            .map(|n| n.parent)
            .ok_or(Errno::NotFound)
    }

    /// Number of inodes handed out so far (for tests and stats).
    pub fn len(&self) -> usize {
        self.lock().inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Errors of the model, mapped to errno by the adapter.
#[derive(Debug, Clone)]
pub enum Errno {
    NotFound,
    NotDir,
    IsDir,
    /// Not a symlink (readlink of anything else).
    NotLink,
    Io(SourceError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::tree::Entry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory source that counts directory loads.
    #[derive(Default)]
    struct Mem {
        dirs: HashMap<Hash, Arc<Dir>>,
        loads: AtomicUsize,
    }

    impl Source for Arc<Mem> {
        fn dir(&self, id: &Hash) -> Result<Arc<Dir>, SourceError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.dirs
                .get(id)
                .cloned()
                .ok_or_else(|| SourceError(format!("no dir {id}")))
        }
        fn chunks(&self, content: &FileContent) -> Result<Arc<Vec<ChunkRef>>, SourceError> {
            match content {
                FileContent::Chunks(c) => Ok(Arc::new(c.clone())),
                FileContent::Lists(_) => Err(SourceError("lists not in this test".into())),
            }
        }
        fn read(&self, _: &[ChunkRef]) -> Result<Vec<Bytes>, SourceError> {
            Ok(Vec::new())
        }
        fn prefetch(&self, _: Vec<ChunkRef>) {}
    }

    fn dir_entry(name: &str, id: Hash) -> Entry {
        Entry {
            name: name.into(),
            mode: 0o755,
            kind: EntryKind::Dir {
                id,
                files: 0,
                bytes: 0,
            },
        }
    }

    fn file_entry(name: &str, size: u64) -> Entry {
        let content = FileContent::Chunks(vec![ChunkRef {
            id: Hash([7; 32]),
            len: size as u32,
        }]);
        Entry {
            name: name.into(),
            mode: 0o644,
            kind: EntryKind::File { size, content },
        }
    }

    fn tree() -> (Arc<Mem>, Hash) {
        let (a, b, root) = (Hash([1; 32]), Hash([2; 32]), Hash([3; 32]));
        let mut m = Mem::default();
        m.dirs.insert(
            a,
            Arc::new(Dir {
                entries: vec![file_entry("x", 5)],
            }),
        );
        m.dirs.insert(b, Arc::new(Dir::default()));
        m.dirs.insert(
            root,
            Arc::new(Dir {
                entries: vec![dir_entry("a", a), dir_entry("b", b), file_entry("f", 10)],
            }),
        );
        (Arc::new(m), root)
    }

    #[test]
    fn lazy_loading_and_stable_inodes() {
        let (mem, root) = tree();
        let t = Inodes::new(mem.clone(), root, 0o755);
        assert_eq!(
            mem.loads.load(Ordering::SeqCst),
            0,
            "nothing is read at mount"
        );
        let a = t.lookup(ROOT, "a").unwrap();
        assert_eq!(
            mem.loads.load(Ordering::SeqCst),
            1,
            "only the root was read"
        );
        let x = t.lookup(a, "x").unwrap();
        assert_eq!(t.lookup(a, "x").unwrap(), x, "same path, same inode");
        assert_eq!(t.lookup(ROOT, "a").unwrap(), a);
        assert_eq!(
            mem.loads.load(Ordering::SeqCst),
            2,
            "directories are loaded once"
        );
        assert_eq!(t.parent(x).unwrap(), a);
        assert_eq!(t.path(x).unwrap(), "a/x");
        assert_eq!(t.path(ROOT).unwrap(), "");
        assert!(matches!(t.lookup(ROOT, "nope"), Err(Errno::NotFound)));
        assert!(matches!(t.lookup(x, "y"), Err(Errno::NotDir)));
    }

    #[test]
    fn readlink_follows_the_chain_through_other_links() {
        let link = |name: &str, target: &str| Entry {
            name: name.into(),
            mode: 0o777,
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        };
        let (a, root) = (Hash([1; 32]), Hash([3; 32]));
        let mut m = Mem::default();
        m.dirs.insert(
            a,
            Arc::new(Dir {
                entries: vec![link("b", "..")],
            }),
        );
        m.dirs.insert(
            root,
            Arc::new(Dir {
                entries: vec![
                    dir_entry("a", a),
                    file_entry("f", 1),
                    link("ok", "a/b/f"),
                    link("x", "a/b/a/b/a/b/../../../../../../etc/passwd"),
                ],
            }),
        );
        let t = Inodes::new(Arc::new(m), root, 0o755);
        let ok = t.lookup(ROOT, "ok").unwrap();
        assert_eq!(t.readlink(ok).unwrap(), "a/b/f");
        let b = t.lookup(t.lookup(ROOT, "a").unwrap(), "b").unwrap();
        assert_eq!(t.readlink(b).unwrap(), "..");
        let x = t.lookup(ROOT, "x").unwrap();
        match t.readlink(x) {
            Err(Errno::Io(e)) => assert!(
                e.0.contains("'/x'") && e.0.contains("outside the dataset"),
                "{e}"
            ),
            other => panic!("escaping chain served: {other:?}"),
        }
        assert!(matches!(t.readlink(ROOT), Err(Errno::NotLink)));
    }

    #[test]
    fn attributes_and_link_counts() {
        let (mem, root) = tree();
        let t = Inodes::new(mem, root, 0o700);
        let r = t.attr(ROOT).unwrap();
        assert_eq!(
            (r.nlink, r.mode),
            (4, 0o700),
            "root: 2 + two subdirectories"
        );
        let f = t.attr(t.lookup(ROOT, "f").unwrap()).unwrap();
        assert_eq!((f.size, f.nlink, f.mode), (10, 1, 0o644));
        let b = t.attr(t.lookup(ROOT, "b").unwrap()).unwrap();
        assert_eq!(b.nlink, 2);
    }
}
