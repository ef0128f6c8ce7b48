//! The `fuser::Filesystem` adapter: translates kernel requests into [`Inodes`] lookups and
//! [`Source`] reads, and nothing else. The mount is read-only (the kernel answers writes with
//! EROFS) and its content immutable, so entries, attributes and pages are cached for long.

use crate::layout::FileLayout;
use crate::model::{Attr, Errno as ModelErrno, Inodes, Kind, Listing, Source, ROOT};
use crate::push::{Job, Pusher};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use shoal_registry::tree::{ChunkRef, FileContent};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A small file's chunks and size (see [`ShoalFs::small_file_chunks`]).
pub type SmallFile = (Arc<Vec<ChunkRef>>, u64);

/// Knobs of the mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// How long the kernel may cache entries and attributes (the version never changes).
    pub ttl: Duration,
    /// Bytes fetched ahead of a sequential reader.
    pub readahead: u64,
    /// Files up to this size are fetched whole when opened.
    pub small_file: u64,
    /// Fetch ahead of sequential readers at all.
    pub sequential_prefetch: bool,
    /// Bypass the kernel page cache (every read reaches the daemon); off by default, see
    /// `docs/benchmarks.md` for the measurement.
    pub direct_io: bool,
    /// Take part in opens, and open files larger than `small_file` whose whole copy is local
    /// (see [`Source::whole_file`]) in passthrough mode: the kernel then reads the copy itself
    /// and no read of them reaches the mount. Needs root and a kernel with FUSE passthrough
    /// (6.9 on); otherwise those files are served by the mount as usual.
    pub passthrough: bool,
    /// Owner shown for every file.
    pub uid: u32,
    pub gid: u32,
    /// Modification time shown for every file (the version's creation time).
    pub mtime: SystemTime,
    /// Told of every read the mount answers: how long it took, and whether it failed.
    pub observe_reads: Option<ReadObserver>,
}

/// Called with each read's duration and whether it failed (for a latency histogram).
#[derive(Clone)]
pub struct ReadObserver(pub Arc<dyn Fn(Duration, bool) + Send + Sync>);

impl std::fmt::Debug for ReadObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadObserver")
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            ttl: Duration::from_secs(24 * 3600),
            readahead: 32 << 20,
            small_file: 4 << 20,
            sequential_prefetch: true,
            direct_io: false,
            passthrough: false,
            uid: 0,
            gid: 0,
            mtime: SystemTime::UNIX_EPOCH,
            observe_reads: None,
        }
    }
}

/// How many readers of one file are followed apart (a read continuing none of them starts a
/// new one, replacing the least recently used).
const STREAMS_PER_FILE: usize = 4;
/// How many files' read state is kept; the least recently read are forgotten (the kernel never
/// says when a file is closed: the mount does not take part in open and release).
const FILES_TRACKED: usize = 1024;

/// One reader's position in a file.
struct Stream {
    id: u64,
    /// Where a sequential reader's next read would start.
    next: u64,
    /// Chunks before this index have been handed to prefetch.
    prefetched: usize,
    /// The last chunk served (index, bytes): a sequential reader's next request usually starts
    /// inside it, and it need not be read and verified again.
    last: Option<(usize, bytes::Bytes)>,
}

/// What the mount knows about a file being read.
struct FileState {
    chunks: Arc<Vec<ChunkRef>>,
    layout: FileLayout,
    /// Fetched whole when first read.
    small: bool,
    /// Most recently used last.
    streams: Vec<Stream>,
}

/// File handles: what an open of a file was answered with.
const FH_PLAIN: u64 = 0;
/// A large file read through the mount (whose opens are counted, see [`Opens`]).
const FH_CACHED: u64 = 1;
/// A large file the kernel reads from its whole copy.
const FH_PASSTHROUGH: u64 = 2;

/// The open handles of a large file. The kernel wants all opens of a file in passthrough mode
/// while one is (with the same backing file), and none while an open through its page cache
/// lasts, so the mode changes only when nobody has the file open.
#[derive(Default)]
struct Opens {
    backing: Option<fuser::BackingId>,
    passthrough: u32,
    cached: u32,
    /// The file's chunks and size, to ask for a whole copy when a reader through the mount
    /// closes it.
    content: Option<(Arc<Vec<ChunkRef>>, u64)>,
}

/// Counters of what the mount did.
#[derive(Debug, Default)]
pub struct MountStats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Reads that failed, and opens that failed for want of a file's chunk list.
    pub read_errors: AtomicU64,
    /// Reads that started a file at its first byte (files opened and read, as far as the
    /// mount can tell: the kernel serves opens itself, and re-reads from its page cache).
    pub files_read: AtomicU64,
    /// Bytes put into the kernel's page cache ahead of readers (see [`crate::push`]).
    pub bytes_pushed: Arc<AtomicU64>,
    /// Opens the kernel serves from a whole-file copy (passthrough), no read reaching the mount.
    pub passthrough_opens: AtomicU64,
}

/// A mounted version.
pub struct ShoalFs<S> {
    inodes: Arc<Inodes<S>>,
    pusher: Pusher,
    opts: MountOptions,
    files: Mutex<hashlink::LruCache<u64, FileState>>,
    next_stream: AtomicU64,
    stats: Arc<MountStats>,
    /// Open handles of large files, by inode (only with `passthrough`).
    opens: Mutex<std::collections::HashMap<u64, Opens>>,
    /// The kernel accepted passthrough (and this process may use it).
    passthrough: std::sync::atomic::AtomicBool,
    /// Readers outside the kernel holding inode numbers (see [`ShoalFs::hold`]).
    external: std::sync::RwLock<()>,
    /// Inodes freed since the allocator was last trimmed.
    freed: AtomicU64,
}

/// Asks the C allocator to return its free memory to the system: after a large structure
/// was freed (glibc keeps freed memory in the middle of its heap otherwise; a process that
/// freed hundreds of MB kept its peak RSS). Walks the heap: for occasional use.
#[allow(unsafe_code)]
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Inodes freed between two trims of the C allocator.
const TRIM_AFTER: u64 = 64 << 10;

fn errno(e: ModelErrno) -> Errno {
    match e {
        ModelErrno::NotFound => Errno::ENOENT,
        ModelErrno::NotDir => Errno::ENOTDIR,
        ModelErrno::IsDir => Errno::EISDIR,
        ModelErrno::NotLink => Errno::EINVAL,
        ModelErrno::Io(err) => {
            tracing::warn!(error = %err, "read failed; returning EIO");
            Errno::EIO
        }
    }
}

impl<S: Source> ShoalFs<S> {
    pub fn new(inodes: Inodes<S>, opts: MountOptions) -> ShoalFs<S> {
        let stats = Arc::<MountStats>::default();
        ShoalFs {
            inodes: Arc::new(inodes),
            pusher: Pusher::new(stats.bytes_pushed.clone()),
            opts,
            files: Mutex::new(hashlink::LruCache::new(FILES_TRACKED)),
            next_stream: AtomicU64::new(1),
            stats,
            external: Default::default(),
            freed: AtomicU64::new(0),
            opens: Mutex::default(),
            passthrough: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Shared counters, readable while mounted.
    pub fn stats(&self) -> Arc<MountStats> {
        self.stats.clone()
    }

    /// The inode at `path` ("a/b/c", relative to the root; "" is the root), following no
    /// symlinks. For readers that do not go through the kernel (the daemon's file protocol).
    pub fn resolve(&self, path: &str) -> Result<u64, ModelErrno> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err(ModelErrno::NotFound);
            }
            ino = self.inodes.lookup(ino, part)?;
        }
        Ok(ino)
    }

    /// Counts freed inodes; past [`TRIM_AFTER`] of them the C allocator is asked to return
    /// its free memory to the system (glibc keeps it otherwise, and a mount whose million
    /// inodes were forgotten kept its peak RSS).
    fn freed_since_trim(&self, n: u64) {
        let total = self.freed.fetch_add(n, Ordering::Relaxed) + n;
        if total >= TRIM_AFTER && self.freed.swap(0, Ordering::Relaxed) >= TRIM_AFTER {
            trim_allocator();
        }
    }

    /// Inodes alive, and [`Inodes::trim`]: for readers outside the kernel, whose inodes
    /// are never forgotten.
    pub fn inodes_alive(&self) -> usize {
        self.inodes.len()
    }

    /// Held by a reader outside the kernel while it uses inode numbers it resolved.
    pub fn hold(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.external.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Frees the inodes the kernel does not hold, unless a reader outside it holds some now
    /// (then later: this never waits).
    pub fn trim_inodes(&self) {
        if let Ok(_none_held) = self.external.try_write() {
            let before = self.inodes.len();
            self.inodes.trim();
            self.freed_since_trim(before.saturating_sub(self.inodes.len()) as u64);
        }
    }

    /// What `stat` shows for `ino`.
    pub fn attr(&self, ino: u64) -> Result<Attr, ModelErrno> {
        self.inodes.attr(ino)
    }

    /// A directory's entries with their attributes, in name order.
    pub fn list(&self, ino: u64) -> Result<Vec<(String, Attr)>, ModelErrno> {
        let listing = self.inodes.listing(ino)?;
        listing
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok((
                    e.name.clone(),
                    self.inodes.attr(self.inodes.child(ino, i)?)?,
                ))
            })
            .collect()
    }

    /// A local file holding exactly the bytes of file `ino`, if one is kept (files larger
    /// than `small_file`: see [`Source::whole_file`]); what passthrough hands the kernel, for
    /// readers outside the kernel. A file whose chunks are all local and has no copy yet gets
    /// one made in the background.
    pub fn whole_copy(&self, ino: u64) -> Result<Option<(std::fs::File, u64)>, ModelErrno> {
        let (size, content) = self.file(ino)?;
        if size <= self.opts.small_file {
            return Ok(None);
        }
        let source = self.inodes.source();
        let chunks = source.chunks(&content).map_err(ModelErrno::Io)?;
        if let Some(f) = source.whole_file(&chunks, size) {
            return Ok(Some((f, size)));
        }
        if source.is_local(&chunks) {
            // Made in the background, as after a mount's read: later asks get it.
            source.keep_whole_file(chunks, size);
        }
        Ok(None)
    }

    /// The chunks of file `ino` when it is a small file (at most `small_file` bytes, which
    /// readers outside the kernel may read chunk by chunk from the store's files), with its
    /// size; None for a larger file.
    pub fn small_file_chunks(&self, ino: u64) -> Result<Option<SmallFile>, ModelErrno> {
        let (size, content) = self.file(ino)?;
        if size > self.opts.small_file {
            return Ok(None);
        }
        let chunks = self
            .inodes
            .source()
            .chunks(&content)
            .map_err(ModelErrno::Io)?;
        Ok(Some((chunks, size)))
    }

    /// A file's size and content; for a directory or symlink the error a read of it gets.
    fn file(&self, ino: u64) -> Result<(u64, FileContent), ModelErrno> {
        match self.inodes.kind(ino)? {
            Kind::File { size, content } => Ok((size, content)),
            Kind::Dir { .. } => Err(ModelErrno::IsDir),
            Kind::Symlink { .. } => Err(ModelErrno::NotFound),
        }
    }

    /// Tells the source that a reader outside the kernel read the file at `path` whole by
    /// itself (its place in a read order, the counters); false if there is no such file.
    pub fn read_elsewhere(&self, path: &str) -> bool {
        let Ok((ino, (size, _))) = self
            .resolve(path)
            .and_then(|ino| Ok((ino, self.file(ino)?)))
        else {
            return false;
        };
        self.stats.files_read.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(size, Ordering::Relaxed);
        if let Ok(path) = self.inodes.path(ino) {
            self.inodes.source().opened(&path);
        }
        true
    }

    /// Up to `size` bytes of file `ino` from `offset`, counted and observed: what a kernel
    /// read gets, and what readers outside the kernel get; blocks until they are fetched.
    pub fn read_file(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, ModelErrno> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = self.read_at(ino, offset, size);
        match &r {
            Ok(data) => {
                self.stats
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(o) = &self.opts.observe_reads {
            (o.0)(started.elapsed(), r.is_err());
        }
        r
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        let kind = match a.kind {
            Kind::Dir { .. } => FileType::Directory,
            Kind::File { .. } => FileType::RegularFile,
            Kind::Symlink { .. } => FileType::Symlink,
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: self.opts.mtime,
            mtime: self.opts.mtime,
            ctime: self.opts.mtime,
            crtime: self.opts.mtime,
            kind,
            perm: a.mode as u16,
            nlink: a.nlink,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    fn kind_of(k: &Kind) -> FileType {
        match k {
            Kind::Dir { .. } => FileType::Directory,
            Kind::File { .. } => FileType::RegularFile,
            Kind::Symlink { .. } => FileType::Symlink,
        }
    }

    /// A directory's entries (loaded if need be) and its parent.
    fn listing(&self, ino: u64) -> Result<(Listing, u64), ModelErrno> {
        let children = self.inodes.listing(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            self.inodes.parent(ino).unwrap_or(ROOT)
        };
        Ok((children, parent))
    }

    /// A new read state for file `ino` (its first read, which fetches a small file whole);
    /// built without the `files` lock held (loading a chunk list may fetch).
    fn new_file_state(&self, ino: u64) -> Result<FileState, ModelErrno> {
        let (size, content) = match self.inodes.kind(ino)? {
            Kind::File { size, content } => (size, content),
            Kind::Dir { .. } => return Err(ModelErrno::IsDir),
            Kind::Symlink { .. } => return Err(ModelErrno::NotFound),
        };
        let chunks = self
            .inodes
            .source()
            .chunks(&content)
            .map_err(ModelErrno::Io)?;
        let small = size <= self.opts.small_file && !chunks.is_empty();
        if small {
            // Small files are read whole, nearly always: fetch them in one go.
            self.inodes.source().prefetch(chunks.to_vec());
        }
        Ok(FileState {
            layout: FileLayout::new(chunks.iter().map(|c| c.len)),
            chunks,
            small,
            streams: Vec::new(),
        })
    }

    /// Reads `size` bytes at `offset` of file `ino`, prefetching ahead of sequential readers.
    fn read_at(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, ModelErrno> {
        if offset == 0 {
            self.stats.files_read.fetch_add(1, Ordering::Relaxed);
            if let Ok(path) = self.inodes.path(ino) {
                self.inodes.source().opened(&path);
            }
        }
        let mut built = None;
        let (stream, pieces, wanted, cached, prefetch, rest) = loop {
            let mut files = self.files.lock().expect("files poisoned");
            if let Some(b) = built.take() {
                if !files.contains_key(&ino) {
                    files.insert(ino, b);
                }
            }
            let Some(f) = files.get_mut(&ino) else {
                // First read (or forgotten meanwhile): build the state outside the lock.
                drop(files);
                built = Some(self.new_file_state(ino)?);
                continue;
            };
            let pieces = f.layout.pieces(offset, size as u64);
            // The stream this read continues, or a new one (sequential only from the start).
            let i = match f.streams.iter().position(|s| s.next == offset) {
                Some(i) => i,
                None => {
                    if f.streams.len() >= STREAMS_PER_FILE {
                        f.streams.remove(0);
                    }
                    f.streams.push(Stream {
                        id: self.next_stream.fetch_add(1, Ordering::Relaxed),
                        next: 0,
                        prefetched: if f.small { f.chunks.len() } else { 0 },
                        last: None,
                    });
                    f.streams.len() - 1
                }
            };
            let mut s = f.streams.remove(i);
            let mut prefetch = Vec::new();
            if self.opts.sequential_prefetch && offset == s.next && !pieces.is_empty() {
                // Sequential: keep up to `readahead` bytes ahead of the reader in flight, topped
                // up in large batches (once less than half is left) rather than chunk by chunk.
                let last = pieces.last().expect("non-empty").index;
                let end = offset + size as u64;
                let ahead = if s.prefetched > last + 1 {
                    f.layout.start(s.prefetched).saturating_sub(end)
                } else {
                    0
                };
                if ahead < self.opts.readahead / 2 {
                    let mut i = s.prefetched.max(last + 1);
                    let limit = end + self.opts.readahead;
                    while i < f.chunks.len() && f.layout.start(i) < limit {
                        prefetch.push(f.chunks[i]);
                        i += 1;
                    }
                    s.prefetched = i;
                }
            }
            let cached = s
                .last
                .clone()
                .filter(|(i, _)| pieces.iter().any(|p| p.index == *i));
            let wanted: Vec<ChunkRef> = pieces
                .iter()
                .filter(|p| cached.as_ref().is_none_or(|(i, _)| *i != p.index))
                .map(|p| f.chunks[p.index])
                .collect();
            s.next = offset + pieces.iter().map(|p| p.range.len() as u64).sum::<u64>();
            // A small file's first read: the rest of it goes into the page cache right after
            // (from the next page on: the kernel reads whole pages).
            let rest_start = s.next.next_multiple_of(4096);
            let rest = (offset == 0 && f.small && rest_start < f.layout.size()).then(|| Job {
                ino,
                start: rest_start,
                size: f.layout.size(),
                chunks: f.chunks.clone(),
                at: None,
            });
            let id = s.id;
            f.streams.push(s);
            break (id, pieces, wanted, cached, prefetch, rest);
        };
        if !self.opts.direct_io && offset == 0 {
            if let Some(job) = rest {
                self.pusher.push(job);
            }
            if let Ok((dir, index, listing)) = self.inodes.position(ino) {
                let ahead = self.pusher.started(
                    &self.inodes,
                    dir,
                    index,
                    &listing,
                    self.opts.small_file,
                    self.opts.sequential_prefetch,
                );
                if !ahead.is_empty() {
                    self.inodes.source().prefetch(ahead);
                }
            }
        }
        if !prefetch.is_empty() {
            self.inodes.source().prefetch(prefetch);
        }
        let mut fetched = self
            .inodes
            .source()
            .read(&wanted)
            .map_err(ModelErrno::Io)?
            .into_iter();
        let mut out = Vec::with_capacity(size as usize);
        let mut last = None;
        for p in &pieces {
            let bytes = match &cached {
                Some((i, b)) if *i == p.index => b.clone(),
                _ => fetched.next().ok_or_else(|| {
                    ModelErrno::Io(crate::model::SourceError(
                        "source returned too few chunks".into(),
                    ))
                })?,
            };
            out.extend_from_slice(&bytes[p.range.clone()]);
            last = Some((p.index, bytes));
        }
        if let Some(f) = self.files.lock().expect("files poisoned").get_mut(&ino) {
            if let Some(s) = f.streams.iter_mut().find(|s| s.id == stream) {
                s.last = last;
            }
        }
        Ok(out)
    }
}

impl<S: Source> Filesystem for ShoalFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel read ahead in large requests; our own prefetch runs further ahead.
        let _ = config.set_max_readahead(1 << 20);
        // Let the kernel keep many readahead requests in flight across the worker threads.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Listings carry every entry's attributes, so `tar`, `find` and `ls -l` need no lookup
        // per file afterwards (one request per file less).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        if self.opts.passthrough && !self.opts.direct_io {
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "the kernel has no FUSE passthrough; every read goes through the mount"
                );
            }
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self
            .inodes
            .lookup(parent.0, name)
            .and_then(|ino| self.inodes.attr(ino))
        {
            Ok(a) => {
                self.inodes.remember(a.ino);
                reply.entry(&self.opts.ttl, &self.file_attr(&a), Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// (fuser's `batch_forget` calls this for each inode of a batch.)
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let freed = self.inodes.forget(ino.0, nlookup) as u64;
        if freed > 0 {
            self.freed_since_trim(freed);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inodes.attr(ino.0) {
            Ok(a) => reply.attr(&self.opts.ttl, &self.file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inodes.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.opts.direct_io {
            return reply.opened(FileHandle(FH_PLAIN), FopenFlags::FOPEN_DIRECT_IO);
        }
        if !self.opts.passthrough {
            // Not taking part in opens: the kernel then opens files itself, with their pages
            // kept cached, and sends neither open nor release (two of the five requests a small
            // file took). What open did happens on a file's first read instead.
            return reply.error(Errno::ENOSYS);
        }
        let (size, content) = match self.inodes.kind(ino.0) {
            Ok(Kind::File { size, content }) => (size, content),
            Ok(_) => return reply.opened(FileHandle(FH_PLAIN), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => return reply.error(errno(e)),
        };
        if size <= self.opts.small_file || !self.passthrough.load(Ordering::Relaxed) {
            return reply.opened(FileHandle(FH_PLAIN), FopenFlags::FOPEN_KEEP_CACHE);
        }
        let ino = ino.0;
        let source = self.inodes.source();
        // Known before the lock (loading a chunk list may fetch).
        let known = {
            let opens = self.opens.lock().expect("opens poisoned");
            opens.get(&ino).and_then(|o| o.content.clone())
        };
        let chunks = match known {
            Some((c, _)) => c,
            None => match source.chunks(&content) {
                Ok(c) => c,
                Err(e) => {
                    // The reader meets it as a failed read of the file: counted as one.
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    return reply.error(errno(ModelErrno::Io(e)));
                }
            },
        };
        let copy = source.whole_file(&chunks, size);
        let mut opens = self.opens.lock().expect("opens poisoned");
        let o = opens.entry(ino).or_default();
        o.content.get_or_insert_with(|| (chunks.clone(), size));
        if o.backing.is_none() && o.cached == 0 {
            if let Some(file) = copy {
                match reply.open_backing(&file) {
                    Ok(id) => o.backing = Some(id),
                    Err(e) => {
                        tracing::info!(error = %e, "FUSE passthrough refused; every read goes through the mount");
                        self.passthrough.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some(id) = &o.backing {
            o.passthrough += 1;
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            // Only these flags may go with passthrough (the kernel's FOPEN_PASSTHROUGH_MASK);
            // the copy's own page cache is what keeps it cached.
            return reply.opened_passthrough(
                FileHandle(FH_PASSTHROUGH),
                FopenFlags::FOPEN_NOFLUSH,
                id,
            );
        }
        o.cached += 1;
        drop(opens);
        if source.is_local(&chunks) {
            // Read through the mount this time; later opens read the copy.
            source.keep_whole_file(chunks, size);
        }
        reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        if fh.0 == FH_PLAIN {
            return;
        }
        let mut opens = self.opens.lock().expect("opens poisoned");
        let Some(o) = opens.get_mut(&ino.0) else {
            return;
        };
        let mut keep = None;
        if fh.0 == FH_PASSTHROUGH {
            o.passthrough = o.passthrough.saturating_sub(1);
        } else {
            o.cached = o.cached.saturating_sub(1);
            // This reader may have fetched the rest of the file: a copy for later opens.
            keep = o.content.clone();
        }
        if o.passthrough == 0 && o.cached == 0 {
            opens.remove(&ino.0);
        }
        drop(opens);
        if let Some((chunks, size)) = keep {
            if self.inodes.source().is_local(&chunks) {
                self.inodes.source().keep_whole_file(chunks, size);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush; ENOSYS tells the kernel not to send flush on close again.
        reply.error(Errno::ENOSYS)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_file(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inodes.listing(ino.0) {
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (children, parent) = match self.listing(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        for (off, name, child) in listed(ino.0, parent, &children, offset) {
            let (child, kind) = match child {
                Listed::Dot(i) => (i, FileType::Directory),
                Listed::Entry(i) => match self.inodes.child(ino.0, i) {
                    Ok(c) => (c, Self::kind_of(&Kind::of(&children.entries[i]))),
                    Err(e) => return reply.error(errno(e)),
                },
            };
            if reply.add(INodeNo(child), off, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (children, parent) = match self.listing(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        for (off, name, child) in listed(ino.0, parent, &children, offset) {
            let (child, counted) = match child {
                Listed::Dot(i) => (i, false),
                Listed::Entry(i) => match self.inodes.child(ino.0, i) {
                    Ok(c) => (c, true),
                    Err(e) => return reply.error(errno(e)),
                },
            };
            // A subdirectory not listed yet is not loaded for its link count here (a cold `ls`
            // of a thousand class directories would fetch them all): it is sent with
            // attributes the kernel must not keep, and looked up when used.
            let (attr, ttl) = match self.inodes.attr_known(child) {
                Ok((a, true)) => (a, self.opts.ttl),
                Ok((a, false)) => (a, Duration::ZERO),
                Err(e) => return reply.error(errno(e)),
            };
            if reply.add(
                INodeNo(child),
                off,
                name,
                &ttl,
                &self.file_attr(&attr),
                Generation(0),
            ) {
                break;
            }
            // The kernel holds every entry but "." and ".." a readdirplus reply carries.
            if counted {
                self.inodes.remember(child);
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            0,
            0,
            0,
            self.inodes.len() as u64,
            0,
            128 << 10,
            255,
            128 << 10,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.inodes.kind(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// No ioctls. Answered here rather than by fuser's default, which logs a warning per call:
    /// the kernel does not remember a refused ioctl as it does other requests, and every
    /// `open()` of CPython before 3.14 asks whether the file is a terminal (TCGETS), so a
    /// loader would write a log line per file it opens.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }

    /// No extended attributes: ENOSYS, which the kernel remembers for the whole mount (it
    /// answers EOPNOTSUPP itself afterwards), without fuser's warning.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }
}

/// An item of a listing: "." or ".." (with its inode), or the entry at an index.
enum Listed {
    Dot(u64),
    Entry(usize),
}

/// A listing as readdir serves it, from `offset` on: ".", "..", then the entries, each with the
/// offset at which the next read continues (its index + 1). Resuming at an offset skips to it
/// directly.
fn listed<'a>(
    ino: u64,
    parent: u64,
    listing: &'a Listing,
    offset: u64,
) -> impl Iterator<Item = (u64, &'a str, Listed)> + 'a {
    let dots = [(".", Listed::Dot(ino)), ("..", Listed::Dot(parent))]
        .into_iter()
        .enumerate()
        .skip(offset as usize)
        .map(|(n, (name, l))| (n as u64 + 1, name, l));
    let from = (offset as usize).saturating_sub(2);
    let entries = listing.entries[from.min(listing.entries.len())..]
        .iter()
        .enumerate()
        .map(move |(i, e)| {
            (
                (from + i) as u64 + 3,
                e.name.as_str(),
                Listed::Entry(from + i),
            )
        });
    dots.chain(entries)
}

/// How to attach a [`ShoalFs`] to the kernel.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Shown as the mount's source in `mount` and `/proc/mounts`.
    pub fsname: String,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let other users read the mount (needs root or `user_allow_other`).
    pub allow_other: bool,
}

/// Mounts `fs` read-only at `mountpoint` and serves it from background threads until the
/// returned session is joined after an unmount, or dropped.
pub fn spawn<S: Source>(
    fs: ShoalFs<S>,
    mountpoint: &std::path::Path,
    cfg: &MountConfig,
) -> std::io::Result<fuser::BackgroundSession> {
    use fuser::MountOption;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if cfg.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = cfg.threads > 1;
    let inodes = fs.inodes.clone();
    let runner = (!fs.opts.direct_io).then(|| fs.pusher.runner()).flatten();
    let session = fuser::Session::new(fs, mountpoint, &config)?;
    if let Some(r) = runner {
        r.start(inodes, session.notifier());
    }
    session.spawn()
}

/// Raises the kernel's readahead for the mount's FUSE device (its default is 128 KiB, which
/// caps sequential requests at that size); needs root, and is skipped silently otherwise.
/// Measured: 1 GiB of shards read warm in 0.71 s at 128 KiB, 0.58 s at 4 MiB. The device is
/// found in `/proc/self/mountinfo`, not by `stat`ing the mount point: the process serving a
/// mount never makes requests to it (one killed mid-request could never be answered).
pub fn raise_readahead(mountpoint: &std::path::Path, kib: u32) {
    let Some(found) = find_mount(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", found.dev);
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        tracing::debug!(path, error = %e, "could not raise the mount's readahead");
    }
}

/// A mount as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The device, `major:minor`.
    pub dev: String,
    /// `fuse.shoal` for a mount this crate made (`fuse` on kernels without subtypes).
    pub fstype: String,
    /// The mount's source (`shoal:NAME@VERSION` for ours).
    pub source: String,
}

/// The mount whose mount point is `mountpoint`, the last one mounted there, if any. Read from
/// `/proc/self/mountinfo` without looking at the mount point itself: the process serving a
/// mount may never make requests to it (one killed mid-request could never be answered), and
/// a dead mount answers ENOTCONN.
pub fn find_mount(mountpoint: &std::path::Path) -> Option<MountInfo> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The parent resolved (it is not on the mount; the mount point itself is never looked at).
    let (parent, name) = (mountpoint.parent()?, mountpoint.file_name()?);
    let want = std::fs::canonicalize(parent).ok()?.join(name);
    let want = want.to_string_lossy();
    // Fields: id, parent id, major:minor, root, mount point (spaces escaped as \040),
    // options, optional fields..., "-", fstype, source, super options.
    info.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        if unescape_mountinfo(mp) != want {
            return None;
        }
        let mut rest = f.skip_while(|x| *x != "-").skip(1);
        Some(MountInfo {
            dev: dev.to_string(),
            fstype: rest.next().unwrap_or_default().to_string(),
            source: unescape_mountinfo(rest.next().unwrap_or_default()),
        })
    })
}

/// A mountinfo path field with its octal escapes (`\040` for a space) decoded.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |v, c| v * 8 + (c - b'0') as u32);
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(super::unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(
            super::unescape_mountinfo("/mnt/tab\\011x\\134"),
            "/mnt/tab\tx\\"
        );
        assert_eq!(super::unescape_mountinfo("/plain\\04"), "/plain\\04");
    }
}
