//! The daemon's file protocol: a version's files read without a mount (the Python package's
//! fsspec filesystem, `python/`), over the daemon's Unix socket.
//!
//! A client opens a session with one request line, `{"op":"files","reference":"ds@v1",
//! "origin":...}`; the daemon answers `{"ok":{"version":..,"root":..}}` and the connection
//! then carries one operation per line, each answered in order:
//!
//! - `{"op":"stat","path":"a/b"}` and `{"op":"ls","path":"a"}`: a JSON line (`{"ok":...}` or
//!   `{"error":..,"errno":"ENOENT"}`);
//! - `{"op":"read","path":"a/b","offset":0,"len":65536}`: `{"ok":{"len":N}}` and N raw bytes;
//! - `{"op":"order","paths":[...]}`: files to fetch in this order ahead of the reader (an
//!   epoch's shuffled order; several lines append), answered `{"ok":N}`;
//! - `{"op":"fd","path":"a/b"}`: `{"ok":{"fd":true,"size":N}}` with a read-only descriptor of
//!   the file's whole local copy attached (SCM_RIGHTS), or `{"ok":{"fd":false}}`;
//! - `{"op":"extents","dir":"a","from":0}`: where the bytes of the directory's small files lie
//!   in the store's segment files, for the client to read from the page cache and verify
//!   itself: `{"ok":{"files":F,"chunks":C,"names":L,"len":N,"segs":[path,...],"next":N|null}}`
//!   with a read-only descriptor of each segment listed attached, in order (SCM_RIGHTS), then
//!   N bytes (little-endian): F file records (size u64, first chunk u32, chunk count u32;
//!   count `u32::MAX` for a file not wholly local or larger than the small-file bound, read
//!   with `read`/`fd`), C chunk records (segment u32 indexing `segs`, length u32, offset u64,
//!   id 32 bytes) and L bytes of the files' names, each ended by a NUL. Binary so that a
//!   client looks up the files it reads without parsing the rest (every loader worker asks
//!   for the directories it reads from). At most [`EXTENT_FILES`] files, [`EXTENT_CHUNKS`]
//!   chunks and [`EXTENT_SEGS`] segments a reply; `next` is where the next page starts. A
//!   page is built once and answered from memory to the version's other sessions for
//!   [`EXTENT_TTL`], while no blob has left the store;
//! - `{"op":"opened","paths":[...]}`: files the client read whole by itself (from extents),
//!   for the read order's position and the counters; answered `{"ok":N}`.
//!
//! Reads go through the same path as a mount's (`shoal_fuse::ShoalFs` without a kernel
//! session): local store, then peers holding the version, then the origins, every chunk
//! verified, small files fetched whole, sequential readers prefetched. Sessions of one version
//! share one reader (its inode table and fetches). Every line and read is bounded, and a
//! session silent for [`IDLE`] is closed.

use crate::error::Result;
use crate::mount::{MountSource, MountSpec};
use crate::Node;
use serde::{Deserialize, Serialize};
use shoal_fuse::model::Errno;
use shoal_fuse::{Kind, ShoalFs};
use shoal_registry::DatasetRef;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most bytes one read may ask for.
pub const MAX_READ: u32 = 64 << 20;
/// Most files, chunks and segment descriptors in one `extents` reply.
pub const EXTENT_FILES: usize = 1024;
/// Inodes a version's reader keeps (paths resolved, directories listed) before it frees them
/// all: no kernel forgets them.
pub const MAX_INODES: usize = 1 << 20;
pub const EXTENT_CHUNKS: usize = 16 * 1024;
pub const EXTENT_SEGS: usize = 32;
/// How long an `extents` page is answered from memory (and the segment files it names kept
/// open), and the bytes of pages a version keeps (a page is at most ~1.3 MB).
pub const EXTENT_TTL: Duration = Duration::from_secs(30);
const EXTENT_BYTES: usize = 32 << 20;
/// A file record's chunk count for a file the client reads through the daemon.
const NOT_LOCAL: u32 = u32::MAX;
/// A session with no request for this long is closed.
const IDLE: Duration = Duration::from_secs(600);
/// Versions kept open for sessions (each a reader with its inode table).
const READERS: usize = 16;
/// How long a read waits for a missing chunk before failing (as a mount's default).
const READ_WAIT: Duration = Duration::from_secs(30);

pub type Reader = ShoalFs<MountSource>;

/// The versions the daemon keeps open for file sessions, by root and origins.
#[derive(Default)]
pub struct Readers {
    open: Mutex<HashMap<String, Opened>>,
    uses: AtomicU64,
}

/// A version open for sessions.
struct Opened {
    reader: Arc<Reader>,
    source: MountSource,
    pages: Arc<Pages>,
    /// When it was last used (a count of opens), to close the least recently used.
    used: u64,
}

/// One operation of a session.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Stat {
        path: String,
    },
    Ls {
        path: String,
    },
    Read {
        path: String,
        offset: u64,
        len: u32,
    },
    Order {
        paths: Vec<String>,
    },
    /// A descriptor of the file's whole local copy, if it has one (large files).
    Fd {
        path: String,
    },
    /// Where the bytes of a directory's small local files lie.
    Extents {
        dir: String,
        #[serde(default)]
        from: usize,
    },
    /// Files the client read whole from extents.
    Opened {
        paths: Vec<String>,
    },
}

/// A file or directory as `stat` and `ls` show it.
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

fn entry(name: String, a: &shoal_fuse::Attr) -> Entry {
    let (kind, target) = match &a.kind {
        Kind::Dir { .. } => ("directory", None),
        Kind::File { .. } => ("file", None),
        Kind::Symlink { target } => ("link", Some(target.clone())),
    };
    Entry {
        name,
        kind,
        size: a.size,
        target,
    }
}

fn errno_reply(e: &Errno, path: &str) -> serde_json::Value {
    let (code, msg) = match e {
        Errno::NotFound => ("ENOENT", format!("{path}: no such file or directory")),
        Errno::NotDir => ("ENOTDIR", format!("{path}: not a directory")),
        Errno::IsDir => ("EISDIR", format!("{path}: is a directory")),
        Errno::NotLink => ("EINVAL", format!("{path}: not a symlink")),
        Errno::Io(err) => ("EIO", format!("{path}: {err}")),
    };
    serde_json::json!({ "error": msg, "errno": code })
}

impl Readers {
    /// A session of `reference` at `node`'s origins: the version resolved and verified each
    /// time (a tag may have moved), its reader opened on first use and shared after (its pack
    /// indexes loaded once).
    ///
    /// Cancel-safe: it only reads; a reader opened is kept.
    pub async fn open(&self, node: &Node, reference: &DatasetRef) -> Result<Session> {
        let (version, signed) = node.open_version(reference).await?;
        let root = signed.body.root;
        let key = format!("{root} {}", node.origins().urls());
        let session = |o: &Opened| Session {
            reader: o.reader.clone(),
            source: o.source.clone(),
            pages: o.pages.clone(),
            version: format!("{}@{version}", reference.dataset),
            root,
        };
        let uses = self.uses.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.open.lock().expect("readers poisoned").get_mut(&key) {
            o.used = uses;
            return Ok(session(o));
        }
        let m = node
            .mountable_version(reference, &version, &signed, READ_WAIT)
            .await?;
        let opts = shoal_fuse::MountOptions {
            mtime: std::time::UNIX_EPOCH + Duration::from_secs(m.created_unix),
            observe_reads: Some(node.metrics().read_observer()),
            ..Default::default()
        };
        let o = Opened {
            source: m.source.clone(),
            reader: Arc::new(ShoalFs::new(
                shoal_fuse::Inodes::new(m.source, m.root, 0o755),
                opts,
            )),
            pages: Arc::default(),
            used: uses,
        };
        let mut open = self.open.lock().expect("readers poisoned");
        if open.len() >= READERS && !open.contains_key(&key) {
            if let Some(oldest) = open.iter().min_by_key(|e| e.1.used).map(|e| e.0.clone()) {
                open.remove(&oldest);
            }
        }
        // Two sessions opening it at once: the first one stored is shared.
        let o = open.entry(key).or_insert(o);
        Ok(session(o))
    }
}

/// A session's version, opened.
pub struct Session {
    reader: Arc<Reader>,
    source: MountSource,
    pages: Arc<Pages>,
    version: String,
    root: shoal_registry::Hash,
}

/// Serves a session on `stream` until the client closes it or is silent for [`IDLE`], on the
/// calling thread (a blocking one: every operation blocks until its bytes are fetched, and no
/// hand-off between threads per operation). `buffered` is what was read past the first line.
pub fn serve_blocking(
    session: Session,
    stream: std::os::unix::net::UnixStream,
    buffered: Vec<u8>,
) -> std::io::Result<()> {
    use std::io::{BufRead, Read, Write};
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE))?;
    let mut r = std::io::BufReader::with_capacity(
        64 << 10,
        std::io::Cursor::new(buffered).chain(stream.try_clone()?),
    );
    let mut w = std::io::BufWriter::with_capacity(256 << 10, stream);
    let put = |w: &mut std::io::BufWriter<_>, v: &serde_json::Value| -> std::io::Result<()> {
        serde_json::to_writer(&mut *w, v)?;
        w.write_all(b"\n")
    };
    put(
        &mut w,
        &serde_json::json!({ "ok": { "version": session.version, "root": format!("b3:{}", session.root) } }),
    )?;
    w.flush()?;
    let rd = &session.reader;
    let mut text = Vec::new();
    loop {
        text.clear();
        let n = (&mut r)
            .take(crate::daemon::MAX_REQUEST_LINE as u64 + 1)
            .read_until(b'\n', &mut text)?;
        if n == 0 {
            return Ok(());
        }
        if text.last() != Some(&b'\n') {
            put(
                &mut w,
                &serde_json::json!({ "error": "bad request: too long or cut short" }),
            )?;
            return w.flush();
        }
        let op: Op = match serde_json::from_slice(&text) {
            Ok(op) => op,
            Err(e) => {
                put(
                    &mut w,
                    &serde_json::json!({ "error": format!("bad request: {e}") }),
                )?;
                w.flush()?;
                continue;
            }
        };
        let held = rd.hold();
        match op {
            Op::Order { paths } => {
                let n = paths.len();
                session.source.spawn_background(
                    session.root,
                    paths,
                    false,
                    MountSpec::DEFAULT_READ_AHEAD,
                );
                put(&mut w, &serde_json::json!({ "ok": n }))?;
            }
            Op::Stat { path } => {
                let name = path.rsplit('/').next().unwrap_or("").to_string();
                let v = match rd.resolve(&path).and_then(|ino| rd.attr(ino)) {
                    Ok(a) => serde_json::json!({ "ok": entry(name, &a) }),
                    Err(e) => errno_reply(&e, &path),
                };
                put(&mut w, &v)?;
            }
            Op::Ls { path } => {
                let v = match rd.resolve(&path).and_then(|ino| rd.list(ino)) {
                    Ok(list) => serde_json::json!({
                        "ok": list.into_iter().map(|(n, a)| entry(n, &a)).collect::<Vec<_>>()
                    }),
                    Err(e) => errno_reply(&e, &path),
                };
                put(&mut w, &v)?;
            }
            Op::Fd { path } => match rd.resolve(&path).and_then(|ino| rd.whole_copy(ino)) {
                Ok(Some((file, size))) => send_with_fds(
                    &mut w,
                    &serde_json::json!({ "ok": { "fd": true, "size": size } }),
                    &[],
                    &[&file],
                )?,
                Ok(None) => put(&mut w, &serde_json::json!({ "ok": { "fd": false } }))?,
                Err(e) => put(&mut w, &errno_reply(&e, &path))?,
            },
            Op::Extents { dir, from } => match session.extents(&dir, from) {
                Ok(page) => {
                    let fds: Vec<&std::fs::File> = page.files.iter().map(|f| &**f).collect();
                    send_with_fds(&mut w, &page.head, &page.body, &fds)?;
                }
                Err(e) => put(&mut w, &errno_reply(&e, &dir))?,
            },
            Op::Opened { paths } => {
                let n = paths.iter().filter(|p| rd.read_elsewhere(p)).count();
                put(&mut w, &serde_json::json!({ "ok": n }))?;
            }
            Op::Read { path, offset, len } => {
                if len > MAX_READ {
                    put(
                        &mut w,
                        &serde_json::json!({ "error": format!("read of {len} bytes: at most {MAX_READ} at once"), "errno": "EINVAL" }),
                    )?;
                } else {
                    match rd
                        .resolve(&path)
                        .and_then(|ino| rd.read_file(ino, offset, len))
                    {
                        Ok(data) => {
                            put(&mut w, &serde_json::json!({ "ok": { "len": data.len() } }))?;
                            w.write_all(&data)?;
                        }
                        Err(e) => put(&mut w, &errno_reply(&e, &path))?,
                    }
                }
            }
        }
        drop(held);
        // No kernel forgets this table's inodes: it is emptied when it grows.
        if rd.inodes_alive() > MAX_INODES {
            rd.trim_inodes();
        }
        // Answers of operations already sent go out together.
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}

/// One page of an `extents` answer: its line, its records, and the segment files it names.
pub struct ExtentPage {
    head: serde_json::Value,
    body: Vec<u8>,
    files: Vec<Arc<std::fs::File>>,
    /// Every file of the page is local (a page that is not is never kept: the files it lacks
    /// may be local by the next ask).
    whole: bool,
}

/// A version's `extents` pages, by directory and first entry, with when they were built and
/// the store's losses then.
#[derive(Default)]
pub struct Pages(Mutex<PageMap>);

#[derive(Default)]
struct PageMap {
    pages: HashMap<(String, usize), (std::time::Instant, u64, Arc<ExtentPage>)>,
    bytes: usize,
}

impl Session {
    /// The `extents` page of directory `dir` from entry `from`: kept from another session of
    /// the version if built less than [`EXTENT_TTL`] ago with no blob gone from the store
    /// since, else built (and kept if every file in it is local).
    fn extents(&self, dir: &str, from: usize) -> std::result::Result<Arc<ExtentPage>, Errno> {
        let losses = self.source.losses();
        let key = (dir.to_string(), from);
        let now = std::time::Instant::now();
        let fresh = |at: std::time::Instant, lost: u64| {
            lost == losses && now.duration_since(at) < EXTENT_TTL
        };
        if let Some((at, lost, page)) = self.pages.0.lock().expect("pages poisoned").pages.get(&key)
        {
            if fresh(*at, *lost) {
                return Ok(page.clone());
            }
        }
        let ino = self.reader.resolve(dir)?;
        let page = Arc::new(extent_page(self, ino, from)?);
        if page.whole {
            let mut kept = self.pages.0.lock().expect("pages poisoned");
            let kept = &mut *kept;
            if kept.bytes + page.body.len() > EXTENT_BYTES {
                kept.pages.retain(|_, (at, lost, _)| fresh(*at, *lost));
                if kept.bytes + page.body.len() > EXTENT_BYTES {
                    kept.pages.clear();
                }
                kept.bytes = kept.pages.values().map(|p| p.2.body.len()).sum();
            }
            kept.bytes += page.body.len();
            if let Some(old) = kept.pages.insert(key, (now, losses, page.clone())) {
                kept.bytes -= old.2.body.len();
            }
        }
        Ok(page)
    }
}

/// Builds one page of an `extents` answer for directory `ino` from entry `from` (see the
/// module's doc for its layout).
fn extent_page(session: &Session, ino: u64, from: usize) -> std::result::Result<ExtentPage, Errno> {
    let rd = &session.reader;
    let list = rd.list(ino)?;
    let mut segs: Vec<std::path::PathBuf> = Vec::new();
    let mut files: Vec<Arc<std::fs::File>> = Vec::new();
    let mut records: Vec<u8> = Vec::new();
    let mut chunk_records: Vec<u8> = Vec::new();
    let mut names: Vec<u8> = Vec::new();
    let (mut listed, mut chunks_listed) = (0usize, 0usize);
    let mut whole = true;
    let mut next = None;
    let mut located = Vec::new();
    let mut new_segs = Vec::new();
    for (i, (name, attr)) in list.iter().enumerate().skip(from) {
        if !matches!(attr.kind, Kind::File { .. }) {
            continue;
        }
        if listed >= EXTENT_FILES {
            next = Some(i);
            break;
        }
        let mut put = |size: u64, first: usize, count: u32| {
            records.extend_from_slice(&size.to_le_bytes());
            records.extend_from_slice(&(first as u32).to_le_bytes());
            records.extend_from_slice(&count.to_le_bytes());
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        };
        let Some((chunks, size)) = rd.small_file_chunks(attr.ino)? else {
            put(attr.size, 0, NOT_LOCAL);
            listed += 1;
            continue;
        };
        if chunks_listed + chunks.len() > EXTENT_CHUNKS && listed > 0 {
            next = Some(i);
            break;
        }
        // Every chunk local, in the primary tier's segments; else the file is read the usual
        // way (which fetches what is missing).
        located.clear();
        new_segs.clear();
        for c in chunks.iter() {
            let Some(at) = session.source.locate(&c.id) else {
                break;
            };
            let seg = match segs.iter().chain(&new_segs).position(|p| *p == at.path) {
                Some(s) => s,
                None => {
                    new_segs.push(at.path.clone());
                    files.push(at.file.clone());
                    segs.len() + new_segs.len() - 1
                }
            };
            located.push((seg as u32, at.len, at.offset, c.id));
        }
        if located.len() < chunks.len() {
            files.truncate(segs.len());
            whole = false;
            put(size, 0, NOT_LOCAL);
            listed += 1;
            continue;
        }
        if segs.len() + new_segs.len() > EXTENT_SEGS {
            files.truncate(segs.len());
            if listed == 0 {
                // Spread over more segments than one reply may carry: read the usual way.
                put(size, 0, NOT_LOCAL);
                listed += 1;
                continue;
            }
            next = Some(i);
            break;
        }
        segs.append(&mut new_segs);
        put(size, chunks_listed, located.len() as u32);
        listed += 1;
        chunks_listed += located.len();
        for (seg, len, offset, id) in &located {
            chunk_records.extend_from_slice(&seg.to_le_bytes());
            chunk_records.extend_from_slice(&len.to_le_bytes());
            chunk_records.extend_from_slice(&offset.to_le_bytes());
            chunk_records.extend_from_slice(id.as_bytes());
        }
    }
    let head = serde_json::json!({ "ok": {
        "files": listed,
        "chunks": chunks_listed,
        "names": names.len(),
        "len": records.len() + chunk_records.len() + names.len(),
        "segs": segs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "next": next,
    }});
    records.append(&mut chunk_records);
    records.append(&mut names);
    Ok(ExtentPage {
        head,
        body: records,
        files,
        whole,
    })
}

/// Writes `reply` as a line followed by `body`, with these descriptors attached, in order
/// (SCM_RIGHTS; at most [`EXTENT_SEGS`]), after the answers queued before it: the client gets
/// its own read-only descriptors and reads from the page cache without the daemon.
fn send_with_fds(
    w: &mut std::io::BufWriter<std::os::unix::net::UnixStream>,
    reply: &serde_json::Value,
    body: &[u8],
    files: &[&std::fs::File],
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::Write;
    use std::os::fd::AsFd;
    w.flush()?;
    let stream = w.get_ref();
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    assert!(
        files.len() <= EXTENT_SEGS,
        "at most EXTENT_SEGS descriptors"
    );
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(EXTENT_SEGS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let n = sendmsg(
        stream,
        &[std::io::IoSlice::new(&line), std::io::IoSlice::new(body)],
        &mut control,
        SendFlags::empty(),
    )?;
    // The descriptors went with the first byte; the rest, if any, follows.
    let mut rest = stream;
    if n < line.len() {
        rest.write_all(&line[n..])?;
        rest.write_all(body)
    } else {
        rest.write_all(&body[n - line.len()..])
    }
}
