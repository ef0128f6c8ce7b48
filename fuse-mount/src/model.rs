//! The inode table of a mounted version. Directories are loaded on first use, so mounting a
//! version with millions of files reads only the directories someone looks at. An inode is
//! made on first sight of a path and lives while the kernel holds it (its lookups not yet
//! forgotten) or while something below it lives; then it is freed, with its directory's
//! listing, and the path gets a new number if it is seen again (FUSE allows this once the
//! kernel forgot the old one). So a mount's memory follows what the kernel keeps cached, not
//! everything that was ever read.

use bytes::Bytes;
use shoal_registry::tree::{
    resolve_symlink, ChunkRef, Dir, Entry, EntryKind, FileContent, PathKind,
};
use shoal_registry::Hash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a source could not produce what was asked: reported to the reader as EIO and logged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where the mount gets its (verified) data. Calls may block up to the source's own deadline.
pub trait Source: Send + Sync + 'static {
    /// A directory's entries, whole (all of its nodes read).
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

/// A directory's entries in name order, as its inode keeps them once loaded.
pub type Listing = Arc<Dir>;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir { id: Hash },
    File { size: u64, content: FileContent },
    Symlink { target: String },
}

impl Kind {
    /// What the entry `e` is.
    pub fn of(e: &Entry) -> Kind {
        match &e.kind {
            EntryKind::Dir { id, .. } => Kind::Dir { id: *id },
            EntryKind::File { size, content } => Kind::File {
                size: *size,
                content: content.clone(),
            },
            EntryKind::Symlink { target } => Kind::Symlink {
                target: target.clone(),
            },
        }
    }
}

#[derive(Debug)]
struct Inode {
    parent: u64,
    /// Where the inode's entry is: its parent's listing and its index there (None for the
    /// root).
    at: Option<(Listing, u32)>,
    /// The directory's entries, once loaded.
    listing: Option<Listing>,
    subdirs: u32,
    /// Lookups the kernel holds (lookup and readdirplus replies, less forgets).
    lookups: u64,
    /// Inodes alive below this one: a directory is not freed before them.
    below: u32,
}

impl Inode {
    fn entry(&self) -> Option<&Entry> {
        self.at.as_ref().map(|(l, i)| &l.entries[*i as usize])
    }
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
    root: (Hash, u32),
    state: Mutex<State>,
}

struct State {
    inodes: HashMap<u64, Inode>,
    /// (parent, index of the entry in its listing) -> inode.
    by_entry: HashMap<(u64, u32), u64>,
    next: u64,
}

impl State {
    fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    /// Frees `ino` if nothing holds it (no kernel lookup, nothing alive below), and then its
    /// parent if that was all that held it. Returns how many were freed.
    fn release(&mut self, mut ino: u64) -> usize {
        let mut freed = 0;
        while ino != ROOT {
            let Some(n) = self.inodes.get(&ino) else {
                return freed;
            };
            if n.lookups > 0 || n.below > 0 {
                return freed;
            }
            freed += 1;
            let n = self.inodes.remove(&ino).expect("present");
            if let Some((_, i)) = n.at {
                self.by_entry.remove(&(n.parent, i));
            }
            let Some(p) = self.inodes.get_mut(&n.parent) else {
                return freed;
            };
            p.below -= 1;
            ino = n.parent;
        }
        if freed > 0 {
            self.shrink();
        }
        freed
    }

    /// Gives back the maps' room once they hold under a quarter of it: a hash map keeps its
    /// capacity when entries go, so a `find` over a million entries left ~190 MB of empty
    /// buckets after the kernel forgot every inode (1M-entry scale bench: 252 MB of
    /// anonymous memory after the forget). Amortised: a shrink to twice the length needs the
    /// table to lose half of that again before the next.
    fn shrink(&mut self) {
        const ROOM: usize = 1 << 12;
        if self.inodes.capacity() > ROOM && self.inodes.len() * 4 < self.inodes.capacity() {
            self.inodes.shrink_to(self.inodes.len() * 2);
        }
        if self.by_entry.capacity() > ROOM && self.by_entry.len() * 4 < self.by_entry.capacity() {
            self.by_entry.shrink_to(self.by_entry.len() * 2);
        }
    }
}

impl<S: Source> Inodes<S> {
    /// A table whose root is the directory node `root` (with mode `root_mode`).
    pub fn new(source: S, root: Hash, root_mode: u32) -> Inodes<S> {
        let node = Inode {
            parent: ROOT,
            at: None,
            listing: None,
            subdirs: 0,
            lookups: 0,
            below: 0,
        };
        Inodes {
            source,
            root: (root, root_mode),
            state: Mutex::new(State {
                inodes: HashMap::from([(ROOT, node)]),
                by_entry: HashMap::new(),
                next: ROOT + 1,
            }),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("inode table poisoned")
    }

    /// Loads a directory's entries (once, while its inode lives) and returns them.
    pub fn listing(&self, ino: u64) -> Result<Listing, Errno> {
        let id = {
            let st = self.lock();
            let node = st.get(ino).ok_or(Errno::NotFound)?;
            if let Some(l) = &node.listing {
                return Ok(l.clone());
            }
            match node.entry().map(|e| &e.kind) {
                None => self.root.0,
                Some(EntryKind::Dir { id, .. }) => *id,
                Some(_) => return Err(Errno::NotDir),
            }
        };
        // Load outside the lock: it may wait on the network.
        let dir = self.source.dir(&id).map_err(Errno::Io)?;
        let subdirs = dir
            .entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Dir { .. }))
            .count() as u32;
        let mut st = self.lock();
        let node = st.inodes.get_mut(&ino).ok_or(Errno::NotFound)?;
        if node.listing.is_none() {
            node.subdirs = subdirs;
            node.listing = Some(dir);
        }
        Ok(node.listing.clone().expect("just set"))
    }

    /// The inode of entry `index` of directory `parent`'s listing (made if need be).
    pub fn child(&self, parent: u64, index: usize) -> Result<u64, Errno> {
        let listing = self.listing(parent)?;
        if index >= listing.entries.len() {
            return Err(Errno::NotFound);
        }
        let key = (parent, index as u32);
        let mut st = self.lock();
        if let Some(c) = st.by_entry.get(&key) {
            return Ok(*c);
        }
        let p = st.inodes.get_mut(&parent).ok_or(Errno::NotFound)?;
        p.below += 1;
        let ino = st.next;
        st.next += 1;
        st.inodes.insert(
            ino,
            Inode {
                parent,
                at: Some((listing, index as u32)),
                listing: None,
                subdirs: 0,
                lookups: 0,
                below: 0,
            },
        );
        st.by_entry.insert(key, ino);
        Ok(ino)
    }

    /// The child of `parent` called `name`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<u64, Errno> {
        let listing = self.listing(parent)?;
        let i = listing
            .entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .map_err(|_| Errno::NotFound)?;
        self.child(parent, i)
    }

    /// The kernel was handed `ino` (a lookup or readdirplus reply): it lives until forgotten.
    pub fn remember(&self, ino: u64) {
        if let Some(n) = self.lock().inodes.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    /// The kernel dropped `n` of its lookups of `ino`: at none (and nothing alive below),
    /// the inode is freed. Returns how many inodes were freed.
    pub fn forget(&self, ino: u64, n: u64) -> usize {
        let mut st = self.lock();
        let Some(node) = st.inodes.get_mut(&ino) else {
            return 0;
        };
        node.lookups = node.lookups.saturating_sub(n);
        st.release(ino)
    }

    /// Frees `ino` if nothing holds it (made for a reader outside the kernel, which never
    /// forgets it), and its parents that only it held.
    pub fn release(&self, ino: u64) {
        self.lock().release(ino);
    }

    /// Frees every inode the kernel does not hold (for readers outside the kernel: the
    /// daemon's file protocol trims its table when it grows).
    pub fn trim(&self) {
        let mut st = self.lock();
        let idle: Vec<u64> = st
            .inodes
            .iter()
            .filter(|(i, n)| **i != ROOT && n.lookups == 0 && n.below == 0)
            .map(|(i, _)| *i)
            .collect();
        for ino in idle {
            st.release(ino);
        }
    }

    /// Attributes; a directory is loaded so that its link count (2 + subdirectories) is right.
    pub fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        if matches!(self.kind(ino)?, Kind::Dir { .. }) {
            self.listing(ino)?;
        }
        Ok(self.attr_known(ino)?.0)
    }

    /// Attributes without loading anything, and whether they are complete: a directory whose
    /// entries have not been loaded yet has an unknown link count (2 is given).
    pub fn attr_known(&self, ino: u64) -> Result<(Attr, bool), Errno> {
        let st = self.lock();
        let n = st.get(ino).ok_or(Errno::NotFound)?;
        let (mode, kind) = match n.entry() {
            Some(e) => (e.mode, Kind::of(e)),
            None => (self.root.1, Kind::Dir { id: self.root.0 }),
        };
        let (size, nlink) = match &kind {
            Kind::Dir { .. } => (4096, 2 + n.subdirs),
            Kind::File { size, .. } => (*size, 1),
            Kind::Symlink { target } => (target.len() as u64, 1),
        };
        let complete = !matches!(kind, Kind::Dir { .. }) || n.listing.is_some();
        Ok((
            Attr {
                ino,
                size,
                mode,
                nlink,
                kind,
            },
            complete,
        ))
    }

    pub fn kind(&self, ino: u64) -> Result<Kind, Errno> {
        let st = self.lock();
        let n = st.get(ino).ok_or(Errno::NotFound)?;
        Ok(match n.entry() {
            Some(e) => Kind::of(e),
            None => Kind::Dir { id: self.root.0 },
        })
    }

    /// The path of an inode relative to the root (`a/b/c.txt`; empty for the root).
    pub fn path(&self, ino: u64) -> Result<String, Errno> {
        let st = self.lock();
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let n = st.get(at).ok_or(Errno::NotFound)?;
            parts.push(n.entry().map(|e| e.name.as_str()).unwrap_or_default());
            at = n.parent;
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// The directory holding `ino`, the index of `ino` among its entries, and the entries.
    pub fn position(&self, ino: u64) -> Result<(u64, usize, Listing), Errno> {
        let st = self.lock();
        let n = st.get(ino).ok_or(Errno::NotFound)?;
        match &n.at {
            Some((listing, i)) => Ok((n.parent, *i as usize, listing.clone())),
            None => Err(Errno::NotFound),
        }
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
            // Walked by name through the directories, making no inodes.
            let mut kind = Kind::Dir { id: self.root.0 };
            for name in q {
                let Kind::Dir { id } = kind else {
                    return Ok(PathKind::Missing);
                };
                let listing = if id == self.root.0 {
                    self.listing(ROOT)?
                } else {
                    self.source.dir(&id).map_err(Errno::Io)?
                };
                let Ok(i) = listing
                    .entries
                    .binary_search_by(|e| e.name.as_str().cmp(name))
                else {
                    return Ok(PathKind::Missing);
                };
                kind = Kind::of(&listing.entries[i]);
            }
            Ok(match kind {
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

    /// Inodes alive now (for tests and stats).
    pub fn len(&self) -> usize {
        self.lock().inodes.len()
    }

    /// Room the inode maps hold (entries they could take without growing).
    pub fn capacity(&self) -> usize {
        let st = self.lock();
        st.inodes.capacity() + st.by_entry.capacity()
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
    fn inodes_live_while_the_kernel_holds_them() {
        let (mem, root) = tree();
        let t = Inodes::new(mem.clone(), root, 0o755);
        let a = t.lookup(ROOT, "a").unwrap();
        let x = t.lookup(a, "x").unwrap();
        t.remember(a);
        t.remember(x);
        t.remember(x);
        assert_eq!(t.len(), 3);
        // The directory is forgotten first: it stays while its child lives.
        t.forget(a, 1);
        assert_eq!(t.len(), 3);
        assert_eq!(t.path(x).unwrap(), "a/x");
        t.forget(x, 1);
        assert_eq!(t.len(), 3, "one lookup of x left");
        t.forget(x, 1);
        assert_eq!(t.len(), 1, "x, then a, freed: only the root is left");
        assert!(matches!(t.kind(x), Err(Errno::NotFound)));
        // Seen again: new numbers, the directory loaded again.
        let loads = mem.loads.load(Ordering::SeqCst);
        let a2 = t.lookup(ROOT, "a").unwrap();
        let x2 = t.lookup(a2, "x").unwrap();
        assert!(a2 != a && x2 != x);
        assert_eq!(mem.loads.load(Ordering::SeqCst), loads + 1);
        assert_eq!(t.path(x2).unwrap(), "a/x");
        // Forgetting what the kernel never held, or twice, changes nothing.
        t.forget(12345, 1);
        t.remember(a2);
        t.forget(a2, 5);
        assert_eq!(t.len(), 3, "x2 (never handed to the kernel) holds a2");
        t.release(x2);
        assert_eq!(t.len(), 1);
        let b = t.lookup(ROOT, "b").unwrap();
        t.lookup(ROOT, "f").unwrap();
        let x3 = t.lookup(t.lookup(ROOT, "a").unwrap(), "x").unwrap();
        t.remember(x3);
        t.trim();
        assert_eq!(t.len(), 3, "root, a and the x the kernel holds");
        assert!(matches!(t.kind(b), Err(Errno::NotFound)));
        // The root is never freed.
        t.remember(ROOT);
        t.forget(ROOT, 1);
        assert_eq!(t.attr(ROOT).unwrap().mode, 0o755);
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
    fn forgotten_inodes_give_their_room_back() {
        let root = Hash([9; 32]);
        let mut m = Mem::default();
        m.dirs.insert(
            root,
            Arc::new(Dir {
                entries: (0..100_000)
                    .map(|i| file_entry(&format!("f{i:06}"), 1))
                    .collect(),
            }),
        );
        let t = Inodes::new(Arc::new(m), root, 0o755);
        let inos: Vec<u64> = (0..100_000)
            .map(|i| {
                let ino = t.child(ROOT, i).unwrap();
                t.remember(ino);
                ino
            })
            .collect();
        let grown = t.capacity();
        assert!(grown >= 200_000, "{grown}");
        for ino in inos {
            t.forget(ino, 1);
        }
        assert_eq!(t.len(), 1, "only the root lives");
        assert!(t.capacity() < 1 << 14, "{} of {grown} kept", t.capacity());
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
