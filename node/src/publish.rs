//! Publishing a directory, or every object under an object store prefix, as a new version.
//!
//! Order of writes, which is what makes a crash harmless: packs (each pack before its index),
//! then the version object with a create-only put, then tags. Until the version object exists
//! nothing is visible; a retry re-uploads what no version references yet.

use crate::blobs::pack_index;
use crate::error::{io, Error, Result};
use crate::known::{self, FileStat, Known};
use crate::progress::Progress;
use crate::Node;
use bytes::Bytes;
use rayon::prelude::*;
use serde::Serialize;
use shoal_chunker::{ChunkError, Chunker};
use shoal_registry::dirs::{self, DirBuilder};
use shoal_registry::pack::{
    AnyIndex, ExternalEntry, ExternalIndex, PackBuilder, SealedPack, SourceObject,
};
use shoal_registry::tree::{self, ChunkRef, Entry, EntryKind};
use shoal_registry::{
    DatasetConfig, Hash, Label, Origin, Params, SignedVersion, SmallFiles, Stats, VersionBody,
    VersionRef,
};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What `publish` did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    #[serde(rename = "ref")]
    pub reference: String,
    pub root: String,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_bytes_uploaded: u64,
    pub packs_uploaded: u64,
    /// Files taken unread from the last publish of this directory (same size, mtime, ctime
    /// and inode; every chunk still in the origin).
    pub files_unchanged: u64,
    pub tags: Vec<String>,
    pub publisher: String,
    pub seconds: f64,
}

enum ScanKind {
    File { index: usize },
    Dir(Vec<ScanEntry>),
    Symlink(String),
}

struct ScanEntry {
    name: String,
    mode: u32,
    kind: ScanKind,
}

fn source_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Walks the source directory, validating every name and type. Files are appended to
/// `files` (path, size); entries come back sorted by name.
fn scan(dir: &Path, depth: usize, files: &mut Vec<(SrcFile, u64)>) -> Result<Vec<ScanEntry>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| source_err(dir, format!("cannot read directory: {e}")))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| source_err(dir, format!("cannot read directory: {e}")))?;
        let path = entry.path();
        let name = entry.file_name().into_string().map_err(|_| {
            source_err(
                &path,
                "name is not valid UTF-8; shoal stores names as UTF-8, rename the file",
            )
        })?;
        tree::check_name(&name).map_err(|r| source_err(&path, r))?;
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| source_err(&path, e.to_string()))?;
        let ft = meta.file_type();
        let mode = meta.permissions().mode() & 0o777;
        let kind = if ft.is_file() {
            let stat = FileStat::of(&meta);
            files.push((
                SrcFile::Local {
                    path: path.clone(),
                    stat,
                },
                meta.len(),
            ));
            ScanKind::File {
                index: files.len() - 1,
            }
        } else if ft.is_dir() {
            ScanKind::Dir(scan(&path, depth + 1, files)?)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| source_err(&path, e.to_string()))?;
            let target = target
                .into_os_string()
                .into_string()
                .map_err(|_| source_err(&path, "symlink target is not valid UTF-8"))?;
            tree::check_symlink(depth, &target).map_err(|r| {
                source_err(&path, format!("{r} ({target:?}); only relative symlinks that stay inside the dataset can be published"))
            })?;
            ScanKind::Symlink(target)
        } else {
            let what = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device"
            } else {
                "a special file"
            };
            return Err(source_err(
                &path,
                format!("is {what}; only regular files, directories and symlinks can be published"),
            ));
        };
        out.push(ScanEntry { name, mode, kind });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Where a publish reads its files from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishSource {
    /// A local directory: modes and symlinks are kept.
    Dir(PathBuf),
    /// Every object under an object store URL (`s3://bucket/prefix`, `gs://`, `az://`, any URL
    /// an origin may have), its keys' `/` read as directories; files get mode 0644.
    Store(String),
}

impl PublishSource {
    /// A URL with a scheme other than `file://` is an object store; anything else a directory.
    pub fn parse(s: &str) -> PublishSource {
        match url::Url::parse(s) {
            Ok(u) if u.scheme() == "file" => match u.to_file_path() {
                Ok(p) => PublishSource::Dir(p),
                Err(()) => PublishSource::Dir(PathBuf::from(s)),
            },
            Ok(u) if u.scheme().len() > 1 => PublishSource::Store(s.to_string()),
            _ => PublishSource::Dir(PathBuf::from(s)),
        }
    }
}

impl std::fmt::Display for PublishSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishSource::Dir(p) => write!(f, "{}", p.display()),
            PublishSource::Store(u) => f.write_str(u),
        }
    }
}

/// Most objects a publish from an object store lists (each costs about a kilobyte while the
/// tree is built).
pub const MAX_SOURCE_OBJECTS: usize = 10_000_000;

/// One file to chunk: a local path, or an object of the source store.
#[derive(Debug, Clone)]
enum SrcFile {
    /// A file of a local directory, and its state when the scan saw it.
    Local {
        path: PathBuf,
        stat: FileStat,
    },
    Object {
        key: String,
        e_tag: Option<String>,
    },
}

/// The directory tree over a store's keys: files in `files`, entries sorted by name. A key
/// ending in `/` (a console's "folder" marker) is skipped; a key that is both a file and a
/// prefix of others, or has a name the tree refuses, is an error naming it.
fn scan_objects(
    url: &str,
    objects: Vec<shoal_registry::ObjectEntry>,
    files: &mut Vec<(SrcFile, u64)>,
) -> Result<Vec<ScanEntry>> {
    enum Node {
        File(usize),
        Dir(std::collections::BTreeMap<String, Node>),
    }
    let at = |key: &str| PathBuf::from(format!("{}/{key}", url.trim_end_matches('/')));
    let mut root: std::collections::BTreeMap<String, Node> = Default::default();
    // Every key's directories: an empty object named like one is a console's "folder" marker
    // (the store may list `b/` as `b`), not a file.
    let mut dirs: HashSet<&str> = HashSet::new();
    for o in &objects {
        let mut at = 0;
        while let Some(i) = o.key[at..].find('/') {
            dirs.insert(&o.key[..at + i]);
            at += i + 1;
        }
    }
    let markers: HashSet<String> = objects
        .iter()
        .filter(|o| o.size == 0 && dirs.contains(o.key.trim_end_matches('/')))
        .map(|o| o.key.clone())
        .collect();
    for o in objects {
        if o.key.ends_with('/') || o.key.is_empty() || markers.contains(&o.key) {
            continue;
        }
        let parts: Vec<&str> = o.key.split('/').collect();
        for p in &parts {
            tree::check_name(p).map_err(|r| source_err(&at(&o.key), r))?;
        }
        let mut dir = &mut root;
        for p in &parts[..parts.len() - 1] {
            let node = dir
                .entry(p.to_string())
                .or_insert_with(|| Node::Dir(Default::default()));
            dir = match node {
                Node::Dir(d) => d,
                Node::File(_) => {
                    return Err(source_err(
                        &at(&o.key),
                        format!("{p:?} is an object and also a prefix of this key; a file cannot also be a directory"),
                    ))
                }
            };
        }
        let name = parts[parts.len() - 1].to_string();
        if dir.contains_key(&name) {
            return Err(source_err(
                &at(&o.key),
                "is an object and also a prefix of other keys; a file cannot also be a directory",
            ));
        }
        files.push((
            SrcFile::Object {
                key: o.key.clone(),
                e_tag: o.e_tag.clone(),
            },
            o.size,
        ));
        dir.insert(name, Node::File(files.len() - 1));
    }
    fn entries(dir: std::collections::BTreeMap<String, Node>) -> Vec<ScanEntry> {
        dir.into_iter()
            .map(|(name, node)| match node {
                Node::File(index) => ScanEntry {
                    name,
                    mode: 0o644,
                    kind: ScanKind::File { index },
                },
                Node::Dir(d) => ScanEntry {
                    name,
                    mode: 0o755,
                    kind: ScanKind::Dir(entries(d)),
                },
            })
            .collect()
    }
    Ok(entries(root))
}

/// Bytes of one ranged read of a source object, and how many run ahead of the chunker.
const OBJECT_PIECE: u64 = 8 << 20;
const OBJECT_AHEAD: usize = 4;
/// Longest wait for one piece of a source object.
const OBJECT_WAIT: Duration = Duration::from_secs(300);

/// A source object read as a byte stream by the chunker (on a blocking thread): ranged reads
/// of [`OBJECT_PIECE`] on the runtime, [`OBJECT_AHEAD`] ahead, each checked against the ETag
/// the listing gave, so an object replaced mid-publish fails it rather than mixing versions.
struct ObjectReader {
    origin: Origin,
    key: String,
    e_tag: Option<String>,
    size: u64,
    handle: tokio::runtime::Handle,
    next: u64,
    pending: std::collections::VecDeque<(
        u64,
        std::sync::mpsc::Receiver<Result<Bytes, shoal_registry::OriginError>>,
    )>,
    cur: Bytes,
}

impl ObjectReader {
    fn fill(&mut self) {
        while self.pending.len() < OBJECT_AHEAD && self.next < self.size {
            let range = self.next..(self.next + OBJECT_PIECE).min(self.size);
            self.next = range.end;
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (origin, key, e_tag) = (self.origin.clone(), self.key.clone(), self.e_tag.clone());
            let want = range.end - range.start;
            self.handle.spawn(async move {
                let r = origin.read_object(&key, range, e_tag.as_deref()).await;
                let _ = tx.send(r);
            });
            self.pending.push_back((want, rx));
        }
    }
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            self.fill();
            let Some((want, rx)) = self.pending.pop_front() else {
                return Ok(0);
            };
            let got = rx
                .recv_timeout(OBJECT_WAIT)
                .map_err(|_| {
                    std::io::Error::other(format!(
                        "no answer for {} within {} s",
                        self.key,
                        OBJECT_WAIT.as_secs()
                    ))
                })?
                .map_err(std::io::Error::other)?;
            if got.len() as u64 != want {
                return Err(std::io::Error::other(format!(
                    "a ranged read returned {} bytes, not {want}; the object changed or the store is broken",
                    got.len()
                )));
            }
            self.cur = got;
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Blobs per external index (about 60 bytes each encoded: a few MiB per index).
const EXTERNAL_ENTRIES: usize = 100_000;

/// For an in-place publish: the source's URL (a local directory as its absolute path), the
/// store it is read through, and each file's object as it is before it is read.
///
/// Cancel-safe: it only reads.
async fn in_place_source(
    source: &PublishSource,
    files: &[(SrcFile, u64)],
) -> Result<(String, Origin, Vec<shoal_registry::ObjectEntry>)> {
    let url = match source {
        PublishSource::Dir(dir) => std::fs::canonicalize(dir)
            .map_err(|e| source_err(dir, e.to_string()))?
            .display()
            .to_string(),
        PublishSource::Store(url) => url.clone(),
    };
    let store = Origin::open(&url, false)?;
    let states = object_states(&store, source, files).await?;
    Ok((url, store, states))
}

/// Each file's object under `store` as the store describes it now (key, size, ETag).
///
/// Cancel-safe: it only reads.
async fn object_states(
    store: &Origin,
    source: &PublishSource,
    files: &[(SrcFile, u64)],
) -> Result<Vec<shoal_registry::ObjectEntry>> {
    use futures::{StreamExt, TryStreamExt};
    // Local files are named as the scan found them: under the directory as it was given.
    let base = match source {
        PublishSource::Dir(dir) => dir.clone(),
        PublishSource::Store(url) => PathBuf::from(url),
    };
    futures::stream::iter(files.iter())
        .map(|(f, size)| {
            let base = &base;
            async move {
                let key = match f {
                    SrcFile::Local { path, .. } => path
                        .strip_prefix(base)
                        .map_err(|_| source_err(path, "not under the directory being published"))?
                        .to_str()
                        .ok_or_else(|| source_err(path, "name is not valid UTF-8"))?
                        .to_string(),
                    SrcFile::Object { key, e_tag } => {
                        // Listed, and read against this ETag: that is its state.
                        return Ok(shoal_registry::ObjectEntry {
                            key: key.clone(),
                            size: *size,
                            e_tag: e_tag.clone(),
                            version: None,
                        });
                    }
                };
                store.head_object(&key).await?.ok_or_else(|| {
                    source_err(&base.join(&key), "disappeared while it was being published")
                })
            }
        })
        .buffered(32)
        .try_collect()
        .await
}

/// The external indexes of an in-place version: each non-empty file as one source object,
/// its chunks back to back; at most [`EXTERNAL_ENTRIES`] blobs per index.
fn external_indexes(
    url: &str,
    objects: &[shoal_registry::ObjectEntry],
    chunks: &[Vec<ChunkRef>],
) -> Vec<ExternalIndex> {
    let mut out = Vec::new();
    let mut cur = ExternalIndex {
        source: url.to_string(),
        ..Default::default()
    };
    for (o, refs) in objects.iter().zip(chunks) {
        if refs.is_empty() {
            continue;
        }
        if !cur.entries.is_empty() && cur.entries.len() + refs.len() > EXTERNAL_ENTRIES {
            out.push(std::mem::replace(
                &mut cur,
                ExternalIndex {
                    source: url.to_string(),
                    ..Default::default()
                },
            ));
        }
        let object = cur.objects.len() as u32;
        cur.objects.push(SourceObject {
            key: o.key.clone(),
            size: o.size,
            e_tag: o.e_tag.clone(),
            version: o.version.clone(),
        });
        let mut offset = 0u64;
        for c in refs {
            cur.entries.push(ExternalEntry {
                id: c.id,
                object,
                offset,
                len: c.len,
            });
            offset += c.len as u64;
        }
    }
    if !cur.entries.is_empty() {
        out.push(cur);
    }
    out
}

/// Refuses a source whose symlinks, followed through one another, lead outside it (each was
/// checked alone while scanning).
fn check_links(root: &Path, entries: &[ScanEntry]) -> Result<()> {
    fn collect<'a>(
        prefix: &str,
        entries: &'a [ScanEntry],
        kinds: &mut HashMap<String, tree::PathKind>,
        links: &mut Vec<(String, &'a str)>,
    ) {
        for e in entries {
            let p = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            match &e.kind {
                ScanKind::Dir(children) => {
                    collect(&p, children, kinds, links);
                    kinds.insert(p, tree::PathKind::Dir);
                }
                ScanKind::Symlink(t) => {
                    kinds.insert(p.clone(), tree::PathKind::Symlink(t.clone()));
                    links.push((p, t));
                }
                ScanKind::File { .. } => {}
            }
        }
    }
    let (mut kinds, mut links) = (HashMap::new(), Vec::new());
    collect("", entries, &mut kinds, &mut links);
    for (p, target) in links {
        let parts: Vec<&str> = p.split('/').collect();
        let verdict = tree::resolve_symlink(&parts, target, |q| {
            Ok::<_, std::convert::Infallible>(
                kinds
                    .get(&q.join("/"))
                    .cloned()
                    .unwrap_or(tree::PathKind::Missing),
            )
        });
        if let Ok(Err(reason)) = verdict {
            return Err(source_err(
                &root.join(&p),
                format!("symlink to {target:?} {reason}; only symlinks that stay inside the dataset can be published"),
            ));
        }
    }
    Ok(())
}

/// Decides which blobs are new and routes them into packs.
struct Dedup {
    existing: HashMap<Hash, Hash>,
    claimed: Mutex<HashSet<Hash>>,
    new_chunks: AtomicU64,
}

impl Dedup {
    /// True if this caller must upload the blob (it is neither in the origin nor claimed).
    fn claim(&self, id: &Hash) -> bool {
        !self.existing.contains_key(id) && self.claimed.lock().expect("dedup poisoned").insert(*id)
    }
}

/// New blobs on their way to the packer, in groups that go into a pack together (an empty group
/// ends the open frame).
pub(crate) type BlobTx = std::sync::mpsc::SyncSender<Vec<(Hash, Bytes)>>;

/// Bytes of one file's new chunks handed to the packer together, so that they lie next to
/// each other in a pack although files are chunked in parallel (chunk by chunk, two files
/// chunked at once alternated in the packs, and a mount reading one file asked the origin
/// for one chunk per ranged read). The size of a mount's run
/// ([`shoal_sched::owners::MOUNT_RUN`]), which a mount reads with one ranged read.
const FILE_GROUP: u64 = shoal_sched::owners::MOUNT_RUN;
/// Groups waiting for the packer (with one being built per chunking thread, this bounds the
/// blobs publish holds in memory besides the pack being built).
const GROUPS_QUEUED: usize = 4;

/// Sent when the uploader has failed and stopped taking blobs.
struct UploadStopped;

struct TreeBuild<'a> {
    chunks: &'a [Vec<ChunkRef>],
    dedup: &'a Dedup,
    tx: &'a BlobTx,
    referenced: Vec<Hash>,
}

impl TreeBuild<'_> {
    fn emit(&mut self, id: Hash, bytes: Vec<u8>) -> Result<(), UploadStopped> {
        self.referenced.push(id);
        if self.dedup.claim(&id) {
            self.tx
                .send(vec![(id, bytes.into())])
                .map_err(|_| UploadStopped)?;
        }
        Ok(())
    }

    /// Builds the directory's nodes (format v2) for `entries`; returns (id, files, bytes).
    fn dir(&mut self, entries: &[ScanEntry]) -> Result<(Hash, u64, u64), UploadStopped> {
        let mut dir = DirBuilder::new();
        let (mut files, mut bytes) = (0, 0);
        for e in entries {
            let kind = match &e.kind {
                ScanKind::File { index } => {
                    let chunks = self.chunks[*index].clone();
                    let size: u64 = chunks.iter().map(|c| c.len as u64).sum();
                    let (content, lists) = tree::file_content_inline(chunks, dirs::INLINE_CHUNKS);
                    for (id, b) in lists {
                        self.emit(id, b)?;
                    }
                    files += 1;
                    bytes += size;
                    EntryKind::File { size, content }
                }
                ScanKind::Dir(children) => {
                    let (id, f, b) = self.dir(children)?;
                    files += f;
                    bytes += b;
                    EntryKind::Dir {
                        id,
                        files: f,
                        bytes: b,
                    }
                }
                ScanKind::Symlink(target) => EntryKind::Symlink {
                    target: target.clone(),
                },
            };
            let entry = Entry {
                name: e.name.clone(),
                mode: e.mode,
                kind,
            };
            dir.push(entry, &mut |id, b| self.emit(id, b))
                .map_err(Self::stopped)?;
        }
        let top = dir
            .finish(&mut |id, b| self.emit(id, b))
            .map_err(Self::stopped)?;
        Ok((top.id, files, bytes))
    }

    /// Scanned entries come sorted and unique, so building only stops when uploading did.
    fn stopped(e: dirs::BuildError<UploadStopped>) -> UploadStopped {
        match e {
            dirs::BuildError::Emit(stop) => stop,
            dirs::BuildError::Unsorted(name) => {
                unreachable!("scanned entries are sorted and unique, {name:?} was not")
            }
        }
    }
}

/// The chunked files and the tree built over them.
struct Built {
    root: Hash,
    files: u64,
    bytes: u64,
    chunks: Vec<Vec<ChunkRef>>,
    tree_ids: Vec<Hash>,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a new dataset cuts its small files in small chunks ([`SmallFiles`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SmallChoice {
    /// When its small files look like text or code (compressible): see [`text_like`].
    #[default]
    Auto,
    On,
    Off,
}

/// Files sampled, and bytes read from each, to decide [`SmallChoice::Auto`].
const PROBE_FILES: usize = 64;
const PROBE_BYTES: usize = 16 << 10;

/// Whether the small files of a new dataset look like text or code: the start of up to 64 of
/// them (spread over the tree) compresses to under 60% with zstd. Those are the files edited
/// in place from version to version, where small chunks pay (Django releases: 2.62x rsync's
/// literal data with the default chunks, 1.38x with small ones); media and compressed files
/// are replaced whole, and small chunks would only multiply their chunks. Only local files
/// are probed (an object store source gets the default chunking unless asked).
fn text_like(sample_files: &[PathBuf]) -> bool {
    use std::io::Read;
    let mut sample = Vec::new();
    for path in sample_files {
        if let Ok(f) = std::fs::File::open(path) {
            let _ = f.take(PROBE_BYTES as u64).read_to_end(&mut sample);
        }
    }
    if sample.len() < 4096 {
        return false;
    }
    zstd::bulk::compress(&sample, 1).is_ok_and(|c| c.len() * 10 < sample.len() * 6)
}

/// Up to [`PROBE_FILES`] local small files spread over `files`, for [`text_like`].
fn probe_sample(files: &[(SrcFile, u64)]) -> Vec<PathBuf> {
    let small = || {
        files
            .iter()
            .filter(|(_, size)| *size > 0 && *size < SmallFiles::DEFAULT.below)
            .filter_map(|(f, _)| match f {
                SrcFile::Local { path, .. } => Some(path),
                SrcFile::Object { .. } => None,
            })
    };
    let step = small().count().div_ceil(PROBE_FILES).max(1);
    small().step_by(step).cloned().collect()
}

/// Options for [`Node::publish`].
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Tags to point at the new version once it exists.
    pub tags: Vec<Label>,
    /// Chunking parameters for a dataset's first version (later versions reuse the recorded
    /// ones).
    pub params: Option<Params>,
    /// Leave file bytes where they are: record each file as ranges of its source object
    /// (external packs) instead of copying it into packs.
    pub in_place: bool,
    /// Read every file, even those the last publish of the directory saw in the same state.
    pub rehash: bool,
    /// Store every blob raw (v1 packs only), not compressed where it pays.
    pub uncompressed: bool,
    /// For a dataset's first version: whether small files get small chunks.
    pub small: SmallChoice,
}

/// A pack the uploader stored: its id, the blobs in it and its size with the index.
pub(crate) struct Uploaded {
    pub pack: Hash,
    pub ids: Vec<Hash>,
    pub bytes: u64,
}

/// Seals packs (compressing their frames on the rayon pool: about 126 MB/s of text a core)
/// and uploads them, at most two at a time; returns what it stored.
pub(crate) fn spawn_uploader(
    origin: Origin,
) -> (
    tokio::sync::mpsc::Sender<PackBuilder>,
    tokio::task::JoinHandle<Result<Vec<Uploaded>>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PackBuilder>(1);
    let task = tokio::spawn(async move {
        let mut uploaded = Vec::new();
        let mut running = tokio::task::JoinSet::new();
        while let Some(pack) = rx.recv().await {
            while running.len() >= 2 {
                uploaded.push(
                    running
                        .join_next()
                        .await
                        .expect("non-empty")
                        .expect("upload task panicked")?,
                );
            }
            let o = origin.clone();
            running.spawn(async move {
                let pack: SealedPack = tokio::task::spawn_blocking(move || pack.seal())
                    .await
                    .expect("sealing task panicked");
                let ids: Vec<Hash> = pack.index.entries.iter().map(|e| e.id).collect();
                let bytes = pack.len() + pack.index_bytes.len() as u64;
                o.put_pack(&pack.id, pack.parts, pack.index_bytes.into())
                    .await?;
                Ok::<_, Error>(Uploaded {
                    pack: pack.id,
                    ids,
                    bytes,
                })
            });
        }
        while let Some(r) = running.join_next().await {
            uploaded.push(r.expect("upload task panicked")?);
        }
        Ok(uploaded)
    });
    (tx, task)
}

/// Groups new blobs into packs of about [`shoal_registry::pack::PACK_TARGET`] bytes (or
/// [`shoal_registry::pack::PACK_MAX_BLOBS`] blobs); the last pack is sealed when
/// every sender is gone.
pub(crate) fn spawn_packer(
    packs: tokio::sync::mpsc::Sender<PackBuilder>,
    compress: bool,
) -> (BlobTx, std::thread::JoinHandle<()>) {
    let new = move || {
        if compress {
            PackBuilder::default()
        } else {
            PackBuilder::plain()
        }
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Hash, Bytes)>>(GROUPS_QUEUED);
    let thread = std::thread::spawn(move || {
        let mut builder = new();
        for group in rx {
            if group.is_empty() {
                // The tree starts: its nodes go in packs of their own.
                if !builder.is_empty()
                    && packs
                        .blocking_send(std::mem::replace(&mut builder, new()))
                        .is_err()
                {
                    return;
                }
                continue;
            }
            for (id, bytes) in group {
                builder.push(id, bytes);
                if builder.full()
                    && packs
                        .blocking_send(std::mem::replace(&mut builder, new()))
                        .is_err()
                {
                    return;
                }
            }
        }
        if !builder.is_empty() {
            let _ = packs.blocking_send(builder);
        }
    });
    (tx, thread)
}

/// The new blobs of one chunking worker, sent to the packer in groups of consecutive files
/// of about [`FILE_GROUP`] bytes, so that a pack holds runs of files in the order they were
/// read although several workers chunk at once: a file's chunks lie together (one ranged read
/// for a mount), and so do small neighbouring files, which compress together in a frame
/// (a publish of a source tree whose workers alternated file by file in the packs compressed
/// to 1.20x its `tar | zstd -3` size, in runs of files 1.15x: Django 4.2.20, zstd level 3).
struct Lane {
    tx: BlobTx,
    group: Vec<(Hash, Bytes)>,
    grouped: u64,
}

impl Lane {
    fn new(tx: BlobTx) -> Lane {
        Lane {
            tx,
            group: Vec::new(),
            grouped: 0,
        }
    }

    fn push(&mut self, id: Hash, bytes: Bytes) -> Result<(), UploadStopped> {
        self.grouped += bytes.len() as u64;
        self.group.push((id, bytes));
        if self.grouped >= FILE_GROUP {
            self.grouped = 0;
            self.tx
                .send(std::mem::take(&mut self.group))
                .map_err(|_| UploadStopped)?;
        }
        Ok(())
    }
}

impl Drop for Lane {
    /// The worker is done: its last group goes (if the packer is gone, the publish failed
    /// and says so elsewhere).
    fn drop(&mut self) {
        if !self.group.is_empty() {
            let _ = self.tx.send(std::mem::take(&mut self.group));
        }
    }
}

/// Files a publish may take as they were without reading them, and how many it did.
struct Unchanged {
    known: Known,
    taken: AtomicU64,
}

impl Unchanged {
    /// The chunks of `path` if it is in the state a previous publish recorded and the origin
    /// holds every one of them (else it must be read: its new chunks go into packs).
    fn take(&self, path: &Path, stat: &FileStat, dedup: &Dedup) -> Option<Vec<ChunkRef>> {
        let chunks = self.known.get(path.to_str()?, stat)?;
        if !chunks.iter().all(|c| dedup.existing.contains_key(&c.id)) {
            return None;
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        Some(chunks.to_vec())
    }
}

/// Chunks every file on all cores, sending new chunks to the packer; a local file in the
/// state `unchanged` knows is taken from there unread. `Ok(None)` means the uploader stopped
/// (its own error says why).
#[allow(clippy::too_many_arguments)]
fn chunk_files(
    files: &[(SrcFile, u64)],
    store: Option<&Origin>,
    in_place: bool,
    params: Params,
    small: Option<SmallFiles>,
    dedup: &Dedup,
    unchanged: &Unchanged,
    tx: &BlobTx,
    progress: &Progress,
) -> Result<Option<Vec<Vec<ChunkRef>>>> {
    let handle = tokio::runtime::Handle::current();
    let chunked: Vec<Result<Vec<ChunkRef>, Option<Error>>> = files
        .par_iter()
        .map_init(
            || {
                let small_chunker = small.map(|s| Chunker::new(s.params));
                (Chunker::new(params), small_chunker, Lane::new(tx.clone()))
            },
            |(large, small_chunker, lane), (file, size)| {
                let chunker = match (small_chunker, small) {
                    (Some(c), Some(s)) if *size < s.below => c,
                    _ => large,
                };
                if let (SrcFile::Local { path, stat }, false) = (file, in_place) {
                    if let Some(chunks) = unchanged.take(path, stat, dedup) {
                        progress.add(*size);
                        return Ok(chunks);
                    }
                }
                let (f, path): (Box<dyn std::io::Read>, PathBuf) = match (file, store) {
                    (SrcFile::Local { path, .. }, _) => (
                        Box::new(
                            std::fs::File::open(path).map_err(|e| Some(io("reading", path)(e)))?,
                        ),
                        path.clone(),
                    ),
                    (SrcFile::Object { key, e_tag }, Some(origin)) => (
                        Box::new(ObjectReader {
                            origin: origin.clone(),
                            key: key.clone(),
                            e_tag: e_tag.clone(),
                            size: *size,
                            handle: handle.clone(),
                            next: 0,
                            pending: Default::default(),
                            cur: Bytes::new(),
                        }),
                        PathBuf::from(format!("{}/{key}", origin.url().trim_end_matches('/'))),
                    ),
                    (SrcFile::Object { key, .. }, None) => {
                        return Err(Some(source_err(
                            Path::new(key),
                            "an object without its store",
                        )))
                    }
                };
                let path = &path;
                let mut refs = Vec::new();
                chunker
                    .chunk(f, |c, bytes| {
                        refs.push(ChunkRef {
                            id: c.id,
                            len: c.len,
                        });
                        progress.add(c.len as u64);
                        if !in_place && dedup.claim(&c.id) {
                            dedup.new_chunks.fetch_add(1, Ordering::Relaxed);
                            lane.push(c.id, Bytes::copy_from_slice(bytes))?;
                        }
                        Ok(())
                    })
                    .map_err(|e| match e {
                        ChunkError::Read(e) => Some(io("reading", path)(e)),
                        ChunkError::Callback(UploadStopped) => None,
                    })?;
                Ok(refs)
            },
        )
        .collect();
    let mut chunks = Vec::with_capacity(chunked.len());
    for r in chunked {
        match r {
            Ok(c) => chunks.push(c),
            Err(Some(e)) => return Err(e),
            Err(None) => return Ok(None),
        }
    }
    Ok(Some(chunks))
}

impl Node {
    /// Blob id -> pack id for everything the origin holds of this dataset: the packs of its
    /// versions signed by trusted keys (anything else is not deduplicated against).
    ///
    /// Cancel-safe: it only reads.
    async fn existing_blobs(
        &self,
        name: &shoal_registry::DatasetName,
    ) -> Result<HashMap<Hash, Hash>> {
        let origin = self.origin();
        let trusted = self.trusted_keys()?;
        let mut existing = HashMap::new();
        let mut packs_seen = HashSet::new();
        // Removed versions are not leaned on: gc keeps their packs only for a grace period.
        let removed: HashSet<String> = origin.list_removals(name).await?.into_iter().collect();
        // Repacked packs are not leaned on, the packs their blobs went to are: gc deletes a
        // repacked pack once every version it knew of reads elsewhere (see docs/lifecycle.md).
        let forwards = origin.forwards(name).await?;
        for v in origin.list_versions(name).await? {
            if removed.contains(&v) {
                continue;
            }
            let Some(sv) = origin.version(name, &v).await? else {
                continue;
            };
            if sv.verify(name.as_str(), &v, &trusted).is_err() {
                continue;
            }
            let reached = crate::lifecycle::reach_through(&sv.body.packs, &forwards);
            for p in reached {
                if !forwards.contains_key(&p) && packs_seen.insert(p) {
                    // Only packed blobs: a new version never leans on another's source objects.
                    if let AnyIndex::Packed(idx) =
                        pack_index(origin, &self.home.pack_cache_dir(), &p).await?.0
                    {
                        for e in idx.entries {
                            existing.insert(e.id, p);
                        }
                    }
                }
            }
        }
        Ok(existing)
    }

    /// Publishes `dir` as `target`. See the module docs for the write order.
    ///
    /// Cancel-safe as a publish: the version object is written last, so a cancelled publish
    /// leaves no version, only packs no version names (collected by gc at the origin).
    pub async fn publish(
        &self,
        dir: &Path,
        target: &VersionRef,
        opts: &PublishOptions,
        progress: &Progress,
    ) -> Result<PublishReport> {
        self.publish_from(
            &PublishSource::Dir(dir.to_path_buf()),
            target,
            opts,
            progress,
        )
        .await
    }

    /// Publishes a directory or every object under an object store URL as `target`. See the
    /// module docs for the write order.
    ///
    /// Cancel-safe as [`Self::publish`].
    #[tracing::instrument(name = "publish", skip_all, fields(target = %target))]
    pub async fn publish_from(
        &self,
        source: &PublishSource,
        target: &VersionRef,
        opts: &PublishOptions,
        progress: &Progress,
    ) -> Result<PublishReport> {
        let started = Instant::now();
        let origin = self.origin();
        if !origin.writable() {
            return Err(shoal_registry::OriginError::BadUrl {
                url: origin.url().to_string(),
                reason: "an http(s) origin is read-only; publish to a path, s3://, gs:// or az:// (the first origin configured), and serve that over HTTP".into(),
            }
            .into());
        }
        let name = &target.dataset;
        let version = target.version.as_str();
        if origin.version_exists(name, version).await? {
            return Err(shoal_registry::OriginError::AlreadyExists {
                origin: origin.url().to_string(),
                what: format!("version {target}"),
            }
            .into());
        }
        if let Some(r) = origin.removal(name, version).await? {
            return Err(shoal_registry::OriginError::AlreadyExists {
                origin: origin.url().to_string(),
                what: format!(
                    "version {target} (removed at {}; versions are never reused: publish under another name)",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(r.body.removed_unix)
                    )
                ),
            }
            .into());
        }
        // The origin's gc deletes nothing unreferenced younger than its grace period; this
        // publish must name what it wrote and what it deduplicated against within it (from
        // before it lists the versions it leans on: docs/lifecycle.md).
        let leaning_since = Instant::now();
        let grace = Duration::from_secs(origin.gc_settings().await?.effective_grace_s(now_unix()));
        let key = self.home.secret_key()?;
        progress.phase("scanning", 0);
        let scanned_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let (entries, files, store) = match source {
            PublishSource::Dir(dir) => {
                let meta = std::fs::metadata(dir).map_err(|e| source_err(dir, e.to_string()))?;
                if !meta.is_dir() {
                    return Err(source_err(dir, "not a directory"));
                }
                let root_dir = dir.to_path_buf();
                let (entries, files) = tokio::task::spawn_blocking(move || {
                    let mut files = Vec::new();
                    let entries = scan(&root_dir, 0, &mut files)?;
                    check_links(&root_dir, &entries)?;
                    Ok::<_, Error>((entries, files))
                })
                .await
                .expect("scan task panicked")?;
                (entries, files, None)
            }
            PublishSource::Store(url) => {
                let store = Origin::open(url, false)?;
                let objects = store.list_objects(MAX_SOURCE_OBJECTS).await?;
                if objects.is_empty() {
                    return Err(source_err(
                        Path::new(url),
                        "no objects under this URL (check the bucket and prefix)",
                    ));
                }
                let mut files = Vec::new();
                let entries = scan_objects(url, objects, &mut files)?;
                (entries, files, Some(store))
            }
        };

        // In place: where the bytes stay, and each file's object as it is before it is read.
        let in_place = if opts.in_place {
            Some(in_place_source(source, &files).await?)
        } else {
            None
        };
        let cfg = match origin.dataset_config(name).await? {
            Some(c) => c,
            None => {
                let small = match opts.small {
                    SmallChoice::Off => None,
                    SmallChoice::On => Some(SmallFiles::DEFAULT),
                    SmallChoice::Auto => {
                        let sample = probe_sample(&files);
                        tokio::task::spawn_blocking(move || {
                            text_like(&sample).then_some(SmallFiles::DEFAULT)
                        })
                        .await
                        .expect("probe task panicked")
                    }
                };
                let cfg = DatasetConfig {
                    chunking: opts.params.unwrap_or_default(),
                    created_unix: now_unix(),
                    small,
                };
                origin.create_dataset_config(name, cfg).await?
            }
        };
        let (params, small) = (cfg.chunking, cfg.small);
        progress.phase("loading dataset index", 0);
        let dedup = Dedup {
            existing: self.existing_blobs(name).await?,
            claimed: Mutex::default(),
            new_chunks: Default::default(),
        };
        // What the last publish of this directory saw of its files.
        let state = match (source, opts.in_place) {
            (PublishSource::Dir(dir), false) => std::fs::canonicalize(dir)
                .ok()
                .and_then(|d| d.to_str().map(str::to_string))
                .map(|d| (known::state_path(self.home.root(), name.as_str()), d, dir)),
            _ => None,
        };
        let unchanged = Unchanged {
            known: match &state {
                Some((path, dir, _)) if !opts.rehash => {
                    tokio::task::block_in_place(|| Known::load(path, dir, params))
                }
                _ => Known::default(),
            },
            taken: AtomicU64::new(0),
        };

        let (pack_tx, uploader) = spawn_uploader(origin.clone());
        let (blob_tx, packer) = spawn_packer(pack_tx, !opts.uncompressed);
        progress.phase("chunking", files.iter().map(|f| f.1).sum());
        let built = tokio::task::block_in_place(|| -> Result<Option<Built>> {
            let Some(chunks) = chunk_files(
                &files,
                store.as_ref(),
                opts.in_place,
                params,
                small,
                &dedup,
                &unchanged,
                &blob_tx,
                progress,
            )?
            else {
                return Ok(None);
            };
            // Tree nodes go in packs of their own (an empty group seals the open pack): a
            // node reading files' chunks from the origin then reads no tree bytes, the one
            // reading the tree for the others no file bytes, and a mount's first lookups
            // open the small packs of the tree only (the version lists them last).
            if blob_tx.send(Vec::new()).is_err() {
                return Ok(None);
            }
            let mut tb = TreeBuild {
                chunks: &chunks,
                dedup: &dedup,
                tx: &blob_tx,
                referenced: Vec::new(),
            };
            let Ok((root, files, bytes)) = tb.dir(&entries) else {
                return Ok(None);
            };
            let tree_ids = tb.referenced;
            Ok(Some(Built {
                root,
                files,
                bytes,
                chunks,
                tree_ids,
            }))
        });
        // The last sender goes: the packer seals the last pack and the uploader drains.
        drop(blob_tx);
        let _ = packer.join();
        progress.phase("uploading", 0);
        let uploaded = uploader.await.expect("uploader panicked")?;
        let Some(built) = built? else {
            return Err(Error::Corrupt {
                what: "publish".into(),
                reason: "uploader stopped without an error".into(),
            });
        };

        // In place: the files' chunks as ranges of their source objects, in external packs,
        // once each object is seen unchanged by the read.
        let mut external_bytes = 0u64;
        let mut external_packs = Vec::new();
        if let Some((url, src, before)) = &in_place {
            progress.phase("recording sources", 0);
            let after = object_states(src, source, &files).await?;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if b != a {
                    return Err(source_err(
                        &PathBuf::from(format!("{}/{}", url.trim_end_matches('/'), a.key)),
                        "changed while it was being published; publish again",
                    ));
                }
                debug_assert_eq!(files[i].1, a.size);
            }
            for x in external_indexes(url, &after, &built.chunks) {
                let bytes = x.encode();
                let id = shoal_chunker::hash(&bytes);
                external_bytes += bytes.len() as u64;
                origin.put_pack_index(&id, bytes.into()).await?;
                external_packs.push((id, x));
            }
        }
        // The version names every pack that holds one of its blobs.
        let new_pack_of: HashMap<Hash, Hash> = uploaded
            .iter()
            .flat_map(|u| u.ids.iter().map(|id| (*id, u.pack)))
            .chain(
                external_packs
                    .iter()
                    .flat_map(|(p, x)| x.entries.iter().map(|e| (e.id, *p))),
            )
            .collect();
        let chunk_count = built.chunks.iter().map(|c| c.len() as u64).sum();
        let pack_of = |id: &Hash| {
            dedup
                .existing
                .get(id)
                .or_else(|| new_pack_of.get(id))
                .copied()
                .ok_or_else(|| Error::Corrupt {
                    what: "publish".into(),
                    reason: format!("blob {id} was neither in the origin nor uploaded"),
                })
        };
        let mut packs = HashSet::new();
        for id in built.chunks.iter().flatten().map(|c| &c.id) {
            packs.insert(pack_of(id)?);
        }
        let mut tree_packs = HashSet::new();
        for id in &built.tree_ids {
            tree_packs.insert(pack_of(id)?);
        }
        packs.extend(tree_packs.iter().copied());
        // The packs of the tree last, the root's at the very end: a reader looking up blobs
        // from the last pack back (a mount's first lookups, `node/src/locator.rs`) finds the
        // tree without opening the files' packs.
        let root_pack = pack_of(&built.root)?;
        let mut packs: Vec<Hash> = packs.into_iter().collect();
        packs.sort_by_key(|p| (*p == root_pack, tree_packs.contains(p), *p));

        let body = VersionBody {
            dataset: name.to_string(),
            version: version.to_string(),
            root: built.root,
            packs,
            chunking: params,
            created_unix: now_unix(),
            stats: Stats {
                files: built.files,
                bytes: built.bytes,
                chunks: chunk_count,
            },
            publisher: [0; 32],
        };
        let signed = SignedVersion::sign(body, &key);
        // A tenth of the grace as margin for the clocks' rates and gc's own listing.
        if leaning_since.elapsed() > grace - grace / 10 {
            return Err(Error::Usage(format!(
                "this publish took {} (from listing the dataset's versions), too close to the origin's gc grace period ({}): what it wrote or leans on may have been collected, so it writes no version; publish again (unchanged files are not read again), or lengthen the grace (`shoal origin gc --grace`)",
                humantime::format_duration(Duration::from_secs(leaning_since.elapsed().as_secs())),
                humantime::format_duration(grace),
            )));
        }
        origin.create_version(name, &signed).await?;
        let unchanged_taken = unchanged.taken.load(Ordering::Relaxed);
        drop(unchanged);
        if let Some((path, dir, given)) = &state {
            // Files are recorded under the directory as canonicalised, as the next publish
            // looks them up: the scan named them under the directory as it was given.
            let records: Vec<(String, &FileStat, &[ChunkRef])> = files
                .iter()
                .zip(&built.chunks)
                .filter_map(|((f, _), chunks)| match f {
                    SrcFile::Local { path, stat } => {
                        let rel = path.strip_prefix(given).ok()?;
                        let full = Path::new(dir).join(rel);
                        Some((full.to_str()?.to_string(), stat, chunks.as_slice()))
                    }
                    SrcFile::Object { .. } => None,
                })
                .collect();
            let saved = tokio::task::block_in_place(|| {
                Known::save(
                    path,
                    dir,
                    params,
                    scanned_ns,
                    records.iter().map(|(p, s, c)| (p.as_str(), *s, *c)),
                )
            });
            if let Err(e) = saved {
                tracing::warn!(
                    "recording the files published in {}: {e}; the next publish reads every file",
                    path.display()
                );
            }
        }

        let mut tags = Vec::new();
        for t in &opts.tags {
            let seq = origin
                .set_tag(name, t.as_str(), version, now_unix(), &key)
                .await?;
            let _ = self.home.accept_tag(name.as_str(), t.as_str(), seq)?;
            tags.push(t.to_string());
        }
        Ok(PublishReport {
            reference: target.to_string(),
            root: format!("b3:{}", built.root),
            files: built.files,
            bytes: built.bytes,
            chunks: chunk_count,
            new_chunks: dedup.new_chunks.load(Ordering::Relaxed),
            new_bytes_uploaded: uploaded.iter().map(|u| u.bytes).sum::<u64>()
                + external_bytes
                + signed.encode().len() as u64,
            packs_uploaded: uploaded.len() as u64,
            files_unchanged: unchanged_taken,
            tags,
            publisher: key.public().to_string(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
