//! Read-only views of versions: listing versions, `ls` inside a version, `diff` of two.

use crate::blobs::Blobs;
use crate::error::{Error, Result};
use crate::walk::{join, load_dir, load_dir_pair};
use crate::Node;
use serde::{Deserialize, Serialize};
use shoal_registry::tree::{ChunkList, Dir, Entry, EntryKind, FileContent};
use shoal_registry::{DatasetName, DatasetRef, Hash};
use std::collections::HashSet;

/// One version as listed by `versions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub root: String,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub created_unix: u64,
    pub publisher: String,
    pub trusted: bool,
    pub tags: Vec<String>,
}

/// One entry as shown by `ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsEntry {
    pub name: String,
    pub kind: std::borrow::Cow<'static, str>,
    pub size: u64,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
}

/// One changed path in a diff.
#[derive(Debug, Clone, Serialize)]
pub struct DiffEntry {
    pub path: String,
    pub change: &'static str,
    pub kind: &'static str,
    /// Files under this path (1 for a file).
    pub files: u64,
    pub old_bytes: u64,
    pub new_bytes: u64,
    /// Bytes of chunks in the new file that the old one did not have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_bytes: Option<u64>,
}

/// What `diff` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    pub added_files: u64,
    pub removed_files: u64,
    pub changed_files: u64,
    pub added_bytes: u64,
    pub removed_bytes: u64,
    pub changed_bytes: u64,
    /// Tree nodes read: proportional to what changed, not to the size of the versions.
    pub nodes_read: u64,
    pub entries: Vec<DiffEntry>,
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::File { .. } => "file",
        EntryKind::Dir { .. } => "dir",
        EntryKind::Symlink { .. } => "symlink",
    }
}

fn files_of(e: &Entry) -> u64 {
    match &e.kind {
        EntryKind::File { .. } => 1,
        EntryKind::Dir { files, .. } => *files,
        EntryKind::Symlink { .. } => 0,
    }
}

/// The chunk ids of a file (its chunk list, read through `blobs`). Cancel-safe: it only reads.
async fn chunk_ids(
    blobs: &Blobs,
    content: &FileContent,
    path: &str,
    nodes: &mut u64,
) -> Result<Vec<(Hash, u32)>> {
    Ok(match content {
        FileContent::Chunks(c) => c.iter().map(|c| (c.id, c.len)).collect(),
        FileContent::Lists(lists) => {
            let mut out = Vec::new();
            for r in lists {
                *nodes += 1;
                let bytes = blobs.get(&r.id).await?;
                let list = ChunkList::decode(&bytes, r).map_err(|e| Error::Corrupt {
                    what: format!("chunk list {} of '/{path}'", r.id),
                    reason: e.to_string(),
                })?;
                out.extend(list.chunks.iter().map(|c| (c.id, c.len)));
            }
            out
        }
    })
}

impl Node {
    /// Versions of a dataset with their tags.
    ///
    /// Cancel-safe: it only reads.
    pub async fn versions(&self, name: &DatasetName) -> Result<Vec<VersionInfo>> {
        let trusted = self.trusted_keys()?;
        let mut tags: Vec<(String, String)> = Vec::new();
        let origins = self.origins();
        // Only tags that verify are shown (an unsigned or forged one points nowhere); with
        // several origins, each tag's newest valid one.
        for t in origins.list_union(|o| o.list_tags(name)).await? {
            let (found, errors) = origins.tags_named(name, &t).await;
            for e in errors {
                tracing::warn!("{e}; tag not listed from there");
            }
            let valid = found.into_iter().find_map(|(_, tag)| match tag {
                shoal_registry::AnyTag::Signed(tag)
                    if tag.verify(name.as_str(), &t, &trusted).is_ok() =>
                {
                    Some(tag)
                }
                _ => None,
            });
            if let Some(tag) = valid {
                tags.push((t, tag.body.version));
            }
        }
        let mut out = Vec::new();
        for v in origins.list_union(|o| o.list_versions(name)).await? {
            let (found, errors) = origins.versions_named(name, &v).await;
            if found.is_empty() {
                if let Some(e) = errors.into_iter().next() {
                    return Err(e.into());
                }
            }
            // The one that verifies, if any does; else the first, shown as untrusted.
            let Some(sv) = found
                .iter()
                .find(|(_, sv)| sv.verify(name.as_str(), &v, &trusted).is_ok())
                .or(found.first())
                .map(|(_, sv)| sv.clone())
            else {
                continue;
            };
            out.push(VersionInfo {
                root: format!("b3:{}", sv.body.root),
                files: sv.body.stats.files,
                bytes: sv.body.stats.bytes,
                chunks: sv.body.stats.chunks,
                created_unix: sv.body.created_unix,
                publisher: sv.publisher().to_string(),
                trusted: sv.verify(name.as_str(), &v, &trusted).is_ok(),
                tags: tags
                    .iter()
                    .filter(|(_, tv)| *tv == v)
                    .map(|(t, _)| t.clone())
                    .collect(),
                version: v,
            });
        }
        out.sort_by_key(|v| (v.created_unix, v.version.clone()));
        Ok(out)
    }

    /// Opens and verifies `reference` and loads its pack indexes. Cancel-safe: it only reads
    /// (and caches verified indexes).
    async fn blobs_for(&self, reference: &DatasetRef) -> Result<(String, Blobs, Hash)> {
        let (version, signed) = self.open_version(reference).await?;
        let blobs = self.blobs(&signed).await?;
        Ok((version, blobs, signed.body.root))
    }

    /// Entries of the directory at `path` inside a version (or the one entry, for a file).
    ///
    /// Cancel-safe: it only reads.
    pub async fn ls(&self, reference: &DatasetRef, path: &str) -> Result<Vec<LsEntry>> {
        let (_, blobs, root) = self.blobs_for(reference).await?;
        let mut dir: Dir = load_dir(&blobs, &root, "").await?;
        let mut at = String::new();
        let parts: Vec<&str> = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let entry = dir.get(part).cloned().ok_or_else(|| {
                Error::NotFound(format!("no '/{}' in {reference}", join(&at, part)))
            })?;
            at = join(&at, part);
            match entry.kind {
                EntryKind::Dir { id, .. } => dir = load_dir(&blobs, &id, &at).await?,
                _ if i + 1 == parts.len() => return Ok(vec![Self::ls_entry(&entry)]),
                _ => {
                    return Err(Error::NotFound(format!(
                        "'/{at}' in {reference} is not a directory"
                    )))
                }
            }
        }
        Ok(dir.entries.iter().map(Self::ls_entry).collect())
    }

    fn ls_entry(e: &Entry) -> LsEntry {
        let (files, target, chunks) = match &e.kind {
            EntryKind::Dir { files, .. } => (Some(*files), None, None),
            EntryKind::Symlink { target } => (None, Some(target.clone()), None),
            EntryKind::File { content, .. } => (
                None,
                None,
                Some(match content {
                    FileContent::Chunks(c) => c.len() as u64,
                    FileContent::Lists(l) => l.iter().map(|l| l.chunks as u64).sum(),
                }),
            ),
        };
        LsEntry {
            name: e.name.clone(),
            kind: kind_name(&e.kind).into(),
            size: e.bytes(),
            mode: format!("{:o}", e.mode),
            files,
            target,
            chunks,
        }
    }

    /// Differences between two versions of the same dataset (or of two datasets in the same
    /// origin). Descends only into subtrees whose ids differ.
    ///
    /// Cancel-safe: it only reads.
    pub async fn diff(&self, a: &DatasetRef, b: &DatasetRef) -> Result<DiffReport> {
        let (va, blobs_a, root_a) = self.blobs_for(a).await?;
        let (vb, blobs_b, root_b) = self.blobs_for(b).await?;
        let mut report = DiffReport {
            from: format!("{}@{va}", a.dataset),
            to: format!("{}@{vb}", b.dataset),
            ..Default::default()
        };
        let mut stack = vec![(String::new(), root_a, root_b)];
        while let Some((path, ida, idb)) = stack.pop() {
            if ida == idb {
                continue;
            }
            let (da, db, read) = load_dir_pair((&blobs_a, ida), (&blobs_b, idb), &path).await?;
            report.nodes_read += read;
            let (mut i, mut j) = (0, 0);
            while i < da.entries.len() || j < db.entries.len() {
                let ea = da.entries.get(i);
                let eb = db.entries.get(j);
                let order = match (ea, eb) {
                    (Some(x), Some(y)) => x.name.cmp(&y.name),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    _ => std::cmp::Ordering::Greater,
                };
                match order {
                    std::cmp::Ordering::Less => {
                        let e = ea.expect("left entry");
                        Self::record(&mut report, join(&path, &e.name), "removed", e);
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        let e = eb.expect("right entry");
                        Self::record(&mut report, join(&path, &e.name), "added", e);
                        j += 1;
                    }
                    std::cmp::Ordering::Equal => {
                        let (x, y) = (ea.expect("left"), eb.expect("right"));
                        let p = join(&path, &x.name);
                        match (&x.kind, &y.kind) {
                            (EntryKind::Dir { id: xa, .. }, EntryKind::Dir { id: yb, .. }) => {
                                stack.push((p, *xa, *yb))
                            }
                            (
                                EntryKind::File {
                                    size: sa,
                                    content: ca,
                                },
                                EntryKind::File {
                                    size: sb,
                                    content: cb,
                                },
                            ) => {
                                // Equal contents may be written differently (inline
                                // or in chunk lists, by format version).
                                let (la, lb) = if ca != cb {
                                    (
                                        chunk_ids(&blobs_a, ca, &p, &mut report.nodes_read).await?,
                                        chunk_ids(&blobs_b, cb, &p, &mut report.nodes_read).await?,
                                    )
                                } else {
                                    Default::default()
                                };
                                if la != lb || x.mode != y.mode {
                                    let old: HashSet<Hash> = la.iter().map(|c| c.0).collect();
                                    let changed: u64 = lb
                                        .iter()
                                        .filter(|c| !old.contains(&c.0))
                                        .map(|c| c.1 as u64)
                                        .sum();
                                    report.changed_files += 1;
                                    report.changed_bytes += changed;
                                    report.entries.push(DiffEntry {
                                        path: p,
                                        change: "changed",
                                        kind: "file",
                                        files: 1,
                                        old_bytes: *sa,
                                        new_bytes: *sb,
                                        changed_bytes: Some(changed),
                                    });
                                }
                            }
                            _ if x == y => {}
                            _ => {
                                Self::record(&mut report, p.clone(), "removed", x);
                                Self::record(&mut report, p, "added", y);
                            }
                        }
                        i += 1;
                        j += 1;
                    }
                }
            }
        }
        report.entries.sort_by(|x, y| x.path.cmp(&y.path));
        Ok(report)
    }

    fn record(report: &mut DiffReport, path: String, change: &'static str, e: &Entry) {
        let files = files_of(e);
        let bytes = e.bytes();
        let (old_bytes, new_bytes) = if change == "added" {
            report.added_files += files;
            report.added_bytes += bytes;
            (0, bytes)
        } else {
            report.removed_files += files;
            report.removed_bytes += bytes;
            (bytes, 0)
        };
        report.entries.push(DiffEntry {
            path,
            change,
            kind: kind_name(&e.kind),
            files,
            old_bytes,
            new_bytes,
            changed_bytes: None,
        });
    }
}
