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
//!   epoch's shuffled order; several lines append), answered `{"ok":N}`.
//!
//! Reads go through the same path as a mount's (`shoal_fuse::ShoalFs` without a kernel
//! session): local store, then peers holding the version, then the origins, every chunk
//! verified, small files fetched whole, sequential readers prefetched. Sessions of one version
//! share one reader (its inode table and fetches). Every line and read is bounded, and a
//! session silent for [`IDLE`] is closed.

use crate::error::{Error, Result};
use crate::mount::{MountSource, MountSpec};
use crate::Node;
use serde::{Deserialize, Serialize};
use shoal_fuse::model::Errno;
use shoal_fuse::{Kind, ShoalFs};
use shoal_registry::DatasetRef;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};

/// Most bytes one read may ask for.
pub const MAX_READ: u32 = 64 << 20;
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
    uses: std::sync::atomic::AtomicU64,
}

/// A version open for sessions.
#[derive(Clone)]
struct Opened {
    reader: Arc<Reader>,
    source: MountSource,
    /// When it was last used (a count of opens), to close the least recently used.
    used: u64,
}

/// One operation of a session.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Stat { path: String },
    Ls { path: String },
    Read { path: String, offset: u64, len: u32 },
    Order { paths: Vec<String> },
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
    /// The reader of `reference` at `node`'s origins, opened on first use.
    ///
    /// Cancel-safe: it only reads; a reader opened is kept.
    async fn open(&self, node: &Node, reference: &DatasetRef) -> Result<(Opened, String, String)> {
        let m = node.mountable(reference, READ_WAIT).await?;
        let key = format!("{} {}", m.root, node.origins().urls());
        let uses = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut open = self.open.lock().expect("readers poisoned");
        if let Some(o) = open.get_mut(&key) {
            o.used = uses;
            return Ok((o.clone(), m.version, format!("b3:{}", m.root)));
        }
        if open.len() >= READERS {
            if let Some(oldest) = open.iter().min_by_key(|e| e.1.used).map(|e| e.0.clone()) {
                open.remove(&oldest);
            }
        }
        let opts = shoal_fuse::MountOptions {
            mtime: std::time::UNIX_EPOCH + Duration::from_secs(m.created_unix),
            observe_reads: Some(node.metrics().read_observer()),
            ..Default::default()
        };
        let source = m.source.clone();
        let reader = Arc::new(ShoalFs::new(
            shoal_fuse::Inodes::new(m.source, m.root, 0o755),
            opts,
        ));
        let o = Opened {
            reader,
            source,
            used: uses,
        };
        open.insert(key, o.clone());
        Ok((o, m.version, format!("b3:{}", m.root)))
    }
}

/// Serves one file session on a connection whose first line asked for `reference`.
///
/// Cancel-safe: dropping it closes the session; reads under way finish on their threads.
pub async fn serve(
    readers: &Readers,
    node: &Node,
    reference: &DatasetRef,
    r: &mut (impl AsyncBufRead + Unpin),
    w: &mut (impl AsyncWrite + Unpin),
) -> Result<()> {
    let io = |e: std::io::Error| Error::Net(format!("file session: {e}"));
    let (Opened { reader, source, .. }, version, root) = match readers.open(node, reference).await {
        Ok(x) => x,
        Err(e) => {
            line(w, &serde_json::json!({ "error": e.to_string() }))
                .await
                .map_err(io)?;
            return Ok(());
        }
    };
    line(
        w,
        &serde_json::json!({ "ok": { "version": version, "root": root } }),
    )
    .await
    .map_err(io)?;
    let root_hash: shoal_registry::Hash = root
        .trim_start_matches("b3:")
        .parse()
        .map_err(|_| Error::Net("file session: bad root".into()))?;
    loop {
        let text = match tokio::time::timeout(IDLE, crate::daemon::read_line(r)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(t))) => t,
            Ok(Err(e)) => {
                let _ = line(
                    w,
                    &serde_json::json!({ "error": format!("bad request: {e}") }),
                )
                .await;
                return Ok(());
            }
        };
        let op: Op = match serde_json::from_str(&text) {
            Ok(op) => op,
            Err(e) => {
                line(
                    w,
                    &serde_json::json!({ "error": format!("bad request: {e}") }),
                )
                .await
                .map_err(io)?;
                continue;
            }
        };
        match op {
            Op::Order { paths } => {
                let n = paths.len();
                source.spawn_background(root_hash, paths, false, MountSpec::DEFAULT_READ_AHEAD);
                line(w, &serde_json::json!({ "ok": n })).await.map_err(io)?;
            }
            Op::Stat { path } => {
                let rd = reader.clone();
                let p = path.clone();
                let got = tokio::task::spawn_blocking(move || {
                    let ino = rd.resolve(&p)?;
                    rd.attr(ino)
                })
                .await
                .map_err(|e| Error::Net(format!("file session: {e}")))?;
                let name = path.rsplit('/').next().unwrap_or("").to_string();
                let v = match got {
                    Ok(a) => serde_json::json!({ "ok": entry(name, &a) }),
                    Err(e) => errno_reply(&e, &path),
                };
                line(w, &v).await.map_err(io)?;
            }
            Op::Ls { path } => {
                let rd = reader.clone();
                let p = path.clone();
                let got = tokio::task::spawn_blocking(move || {
                    let ino = rd.resolve(&p)?;
                    rd.list(ino)
                })
                .await
                .map_err(|e| Error::Net(format!("file session: {e}")))?;
                let v = match got {
                    Ok(list) => serde_json::json!({
                        "ok": list.into_iter().map(|(n, a)| entry(n, &a)).collect::<Vec<_>>()
                    }),
                    Err(e) => errno_reply(&e, &path),
                };
                line(w, &v).await.map_err(io)?;
            }
            Op::Read { path, offset, len } => {
                if len > MAX_READ {
                    line(
                        w,
                        &serde_json::json!({ "error": format!("read of {len} bytes: at most {MAX_READ} at once"), "errno": "EINVAL" }),
                    )
                    .await
                    .map_err(io)?;
                    continue;
                }
                let rd = reader.clone();
                let p = path.clone();
                let got = tokio::task::spawn_blocking(move || {
                    let ino = rd.resolve(&p)?;
                    rd.read_file(ino, offset, len)
                })
                .await
                .map_err(|e| Error::Net(format!("file session: {e}")))?;
                match got {
                    Ok(data) => {
                        line(w, &serde_json::json!({ "ok": { "len": data.len() } }))
                            .await
                            .map_err(io)?;
                        w.write_all(&data).await.map_err(io)?;
                    }
                    Err(e) => line(w, &errno_reply(&e, &path)).await.map_err(io)?,
                }
            }
        }
        w.flush().await.map_err(io)?;
    }
}

/// Writes one JSON line.
///
/// Not cancel-safe: a cancelled write leaves part of the line; the session is then closed.
async fn line(w: &mut (impl AsyncWrite + Unpin), v: &serde_json::Value) -> std::io::Result<()> {
    let mut l = serde_json::to_vec(v).expect("serializes");
    l.push(b'\n');
    w.write_all(&l).await
}
