//! Versions of N tiny files written straight into an origin, for measuring Shoal at 1M, 10M
//! and 100M entries without an N-file directory on disk: the tree is built as the files are
//! made up (format v2 directories, one node per level in memory), blobs go into packs
//! uploaded as they fill, and the version is signed last, as publish does.
//!
//! Layout: file `i` is `pKKKK/lJJJJ/fIIII` with `width` files per leaf directory and `width`
//! leaf directories per parent; its content is `"{i}\n"` (every file a distinct chunk).

use anyhow::{Context, Result};
use bytes::Bytes;
use shoal_registry::dirs::{BuildError, DirBuilder};
use shoal_registry::pack::PackBuilder;
use shoal_registry::tree::{ChunkRef, Entry, EntryKind, FileContent};
use shoal_registry::{
    DatasetConfig, DatasetName, Hash, Origin, Params, SecretKey, SignedVersion, Stats, VersionBody,
};
use std::time::{SystemTime, UNIX_EPOCH};

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    pub root: Hash,
    pub files: u64,
    pub packs: usize,
    /// The path of the last file (the deepest name in sort order), for a first `stat`.
    pub last_path: String,
}

/// The path of file `i` in a version of `entries` files, `width` per directory.
pub fn path_of(i: u64, width: u64) -> String {
    let digits = (width.saturating_sub(1)).to_string().len().max(1);
    format!(
        "p{:0d$}/l{:0d$}/f{:0d$}",
        i / (width * width),
        (i / width) % width,
        i % width,
        d = digits
    )
}

/// The content of file `i`.
pub fn content_of(i: u64) -> Vec<u8> {
    format!("{i}\n").into_bytes()
}

/// Files' chunks and tree nodes go into packs of their own, the tree's last in the version's
/// list, as publish does (see `node/src/publish.rs`).
struct Packer<'a> {
    origin: &'a Origin,
    rt: &'a tokio::runtime::Runtime,
    pack: PackBuilder,
    packs: Vec<Hash>,
    tree: PackBuilder,
    tree_packs: Vec<Hash>,
}

impl Packer<'_> {
    fn push(&mut self, id: Hash, bytes: Vec<u8>) -> Result<()> {
        self.pack.push(id, Bytes::from(bytes));
        if self.pack.full() {
            self.flush(false)?;
        }
        Ok(())
    }

    fn push_tree(&mut self, id: Hash, bytes: Vec<u8>) -> Result<()> {
        self.tree.push(id, Bytes::from(bytes));
        if self.tree.full() {
            self.flush(true)?;
        }
        Ok(())
    }

    fn flush(&mut self, tree: bool) -> Result<()> {
        let (pack, packs) = match tree {
            false => (&mut self.pack, &mut self.packs),
            true => (&mut self.tree, &mut self.tree_packs),
        };
        if pack.is_empty() {
            return Ok(());
        }
        let sealed = std::mem::take(pack).seal();
        self.rt
            .block_on(
                self.origin
                    .put_pack(&sealed.id, sealed.parts, sealed.index_bytes.into()),
            )
            .context("writing a pack")?;
        packs.push(sealed.id);
        Ok(())
    }
}

fn built<E: std::fmt::Debug>(e: BuildError<E>) -> anyhow::Error {
    anyhow::anyhow!("building a directory: {e:?}")
}

/// Writes `dataset@version` of `entries` tiny files into the origin at `origin` (a path or
/// URL), signed by `key`.
pub fn generate(
    origin: &str,
    key: &SecretKey,
    dataset: &str,
    version: &str,
    entries: u64,
    width: u64,
) -> Result<Generated> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let origin = Origin::open(origin, true).context("opening the origin")?;
    let name: DatasetName = dataset.parse().context("dataset name")?;
    let width = width.max(2);
    let mut packer = Packer {
        origin: &origin,
        rt: &rt,
        pack: PackBuilder::default(),
        packs: Vec::new(),
        tree: PackBuilder::default(),
        tree_packs: Vec::new(),
    };
    let mut root = DirBuilder::new();
    let per_parent = width * width;
    let parents = entries.div_ceil(per_parent);
    let (mut bytes_total, mut last_path) = (0u64, String::new());
    let dir_entry = |name: String, id: Hash, files: u64, bytes: u64| Entry {
        name,
        mode: 0o755,
        kind: EntryKind::Dir { id, files, bytes },
    };
    for p in 0..parents {
        let mut parent = DirBuilder::new();
        let (mut parent_files, mut parent_bytes) = (0u64, 0u64);
        let first = p * per_parent;
        let leaves = (entries - first).div_ceil(width).min(width);
        let mut leaf_name = String::new();
        for l in 0..leaves {
            let mut leaf = DirBuilder::new();
            let (mut files, mut bytes) = (0u64, 0u64);
            let start = first + l * width;
            for i in start..(start + width).min(entries) {
                let content = content_of(i);
                let id = shoal_chunker::hash(&content);
                let len = content.len() as u32;
                packer.push(id, content)?;
                let path = path_of(i, width);
                let mut parts = path.rsplit('/');
                let fname = parts.next().expect("a file name").to_string();
                leaf_name = parts.next().expect("a leaf name").to_string();
                leaf.push(
                    Entry {
                        name: fname,
                        mode: 0o644,
                        kind: EntryKind::File {
                            size: len as u64,
                            content: FileContent::Chunks(vec![ChunkRef { id, len }]),
                        },
                    },
                    &mut |id, b| packer.push_tree(id, b),
                )
                .map_err(built)?;
                files += 1;
                bytes += len as u64;
                last_path = path;
            }
            let top = leaf
                .finish(&mut |id, b| packer.push_tree(id, b))
                .map_err(built)?;
            parent
                .push(
                    dir_entry(leaf_name.clone(), top.id, files, bytes),
                    &mut |id, b| packer.push_tree(id, b),
                )
                .map_err(built)?;
            parent_files += files;
            parent_bytes += bytes;
        }
        let top = parent
            .finish(&mut |id, b| packer.push_tree(id, b))
            .map_err(built)?;
        let pname = last_path.split('/').next().unwrap_or_default().to_string();
        root.push(
            dir_entry(pname, top.id, parent_files, parent_bytes),
            &mut |id, b| packer.push_tree(id, b),
        )
        .map_err(built)?;
        bytes_total += parent_bytes;
    }
    let top = root
        .finish(&mut |id, b| packer.push_tree(id, b))
        .map_err(built)?;
    packer.flush(false)?;
    packer.flush(true)?;
    packer.packs.append(&mut packer.tree_packs);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let chunking = Params::default();
    rt.block_on(origin.create_dataset_config(
        &name,
        DatasetConfig {
            chunking,
            created_unix: now,
            small: None,
        },
    ))?;
    let body = VersionBody {
        dataset: dataset.to_string(),
        version: version.to_string(),
        root: top.id,
        packs: packer.packs.clone(),
        chunking,
        created_unix: now,
        stats: Stats {
            files: entries,
            bytes: bytes_total,
            chunks: entries,
        },
        publisher: [0; 32],
    };
    rt.block_on(origin.create_version(&name, &SignedVersion::sign(body, key)))?;
    Ok(Generated {
        root: top.id,
        files: entries,
        packs: packer.packs.len(),
        last_path,
    })
}
