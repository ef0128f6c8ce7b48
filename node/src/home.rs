//! The state directory (`SHOAL_HOME`): publisher key, trusted keys, local store, caches.

use crate::error::{io, Error, Result};
use shoal_registry::{PublicKey, SecretKey, SignedVersion, TrustedKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Serialises this process's updates of the `held` file.
static HELD_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Paths and small files under one state directory.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the state directory, or makes an existing one private: mode 0700, so that no
    /// other local user can read cached data, keys or the daemon's socket (or reach them
    /// through it).
    pub fn ensure(&self) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::symlink_metadata(&self.root) {
            Ok(m) if m.is_dir() => {
                if m.mode() & 0o077 != 0 {
                    std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                        .map_err(io("making private (0700)", &self.root))?;
                }
                Ok(())
            }
            Ok(_) => Err(Error::Unsafe {
                path: self.root.clone(),
                reason: "the state directory is not a directory".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                }
                match std::fs::DirBuilder::new().mode(0o700).create(&self.root) {
                    Ok(()) => Ok(()),
                    // Another process made it a moment ago: check what it made.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.ensure(),
                    Err(e) => Err(io("creating", &self.root)(e)),
                }
            }
            Err(e) => Err(io("checking", &self.root)(e)),
        }
    }

    /// The embedded default origin: a local directory.
    pub fn default_origin(&self) -> PathBuf {
        self.root.join("origin")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Whole-file copies kept for mounts (see `wholefiles`).
    pub fn whole_files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    pub fn pack_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("packs")
    }

    /// The running daemon's local socket.
    /// Signed versions seen before, so that they open while the origin is unreachable.
    pub fn versions_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("versions")
    }

    /// Keeps a copy of a (verified) signed version; best effort.
    pub fn remember_version(&self, dataset: &str, version: &str, signed: &SignedVersion) {
        let dir = self.versions_cache_dir().join(dataset);
        let path = dir.join(format!("{version}.ver"));
        if path.exists() {
            return;
        }
        if let Err(e) = write_private(&dir, &path, &signed.encode()) {
            tracing::debug!("caching version {dataset}@{version}: {e}");
        }
    }

    /// Drops the cached signed copy of `dataset@version` (the version was removed: it must not
    /// open from the cache when the origins cannot be reached).
    pub fn forget_version(&self, dataset: &str, version: &str) {
        let path = self
            .versions_cache_dir()
            .join(dataset)
            .join(format!("{version}.ver"));
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("forgetting removed version {}: {e}", path.display());
            }
        }
    }

    /// A version of `dataset` seen before: by version name, or by root id. Not verified here.
    pub fn cached_version(
        &self,
        dataset: &str,
        rev: &shoal_registry::Rev,
    ) -> Result<Option<(String, SignedVersion)>> {
        let dir = self.versions_cache_dir().join(dataset);
        let decode = |path: &Path| -> Result<Option<SignedVersion>> {
            match std::fs::read(path) {
                Ok(b) => SignedVersion::decode(&b)
                    .map(Some)
                    .map_err(|e| Error::Corrupt {
                        what: format!("cached version {}", path.display()),
                        reason: e.to_string(),
                    }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io("reading", path)(e)),
            }
        };
        match rev {
            shoal_registry::Rev::Label(l) => {
                Ok(decode(&dir.join(format!("{l}.ver")))?.map(|v| (l.to_string(), v)))
            }
            shoal_registry::Rev::Root(root) => {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    return Ok(None);
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    let Some(version) = name.strip_suffix(".ver") else {
                        continue;
                    };
                    if let Some(v) = decode(&e.path())? {
                        if v.body.root == *root {
                            return Ok(Some((version.to_string(), v)));
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    pub fn socket_path(&self) -> PathBuf {
        self.root.join("node.sock")
    }

    /// Versions this node holds whole (announced to peers by the daemon).
    pub fn held_path(&self) -> PathBuf {
        self.root.join("held")
    }

    fn key_path(&self) -> PathBuf {
        self.root.join("publisher.key")
    }

    fn trusted_path(&self) -> PathBuf {
        self.root.join("trusted_keys")
    }

    /// This machine's publisher key, created (mode 0600) on first use.
    pub fn secret_key(&self) -> Result<SecretKey> {
        let path = self.key_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| Error::Corrupt {
                    what: format!("publisher key {}", path.display()),
                    reason: "expected 64 hex digits".into(),
                })?;
                Ok(SecretKey::from_bytes(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.ensure()?;
                let key = SecretKey::generate().map_err(|e| Error::Io {
                    op: "generating a key for",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let text = format!("{}\n", hex::encode(key.to_bytes()));
                if write_private(&self.root, &path, text.as_bytes())? {
                    Ok(key)
                } else {
                    self.secret_key()
                }
            }
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    /// Records that this node holds `root` (NAME@VERSION) whole.
    pub fn record_held(&self, root: &shoal_registry::Hash, name: &str) -> Result<()> {
        let _g = HELD_LOCK.lock().expect("poisoned");
        let mut held = self.held()?;
        if held.iter().any(|(r, _)| r == root) {
            return Ok(());
        }
        held.push((*root, name.to_string()));
        let text: String = held.iter().map(|(r, n)| format!("{r} {n}\n")).collect();
        let path = self.held_path();
        let tmp = path.with_extension("tmp");
        self.ensure()?;
        std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))
    }

    /// Forgets that this node holds `root` whole.
    pub fn forget_held(&self, root: &shoal_registry::Hash) -> Result<()> {
        let _g = HELD_LOCK.lock().expect("poisoned");
        let mut held = self.held()?;
        let before = held.len();
        held.retain(|(r, _)| r != root);
        if held.len() == before {
            return Ok(());
        }
        let text: String = held.iter().map(|(r, n)| format!("{r} {n}\n")).collect();
        let path = self.held_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))
    }

    /// Versions recorded by [`Self::record_held`]: (root, NAME@VERSION).
    pub fn held(&self) -> Result<Vec<(shoal_registry::Hash, String)>> {
        let path = self.held_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let (r, n) = l.split_once(' ')?;
                Some((r.parse().ok()?, n.to_string()))
            })
            .collect())
    }

    /// Keys added with `shoal trust`, each with the datasets it may sign (one per line:
    /// `KEY` or `KEY PATTERN,...`).
    pub fn trusted_keys(&self) -> Result<Vec<TrustedKey>> {
        let path = self.trusted_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                TrustedKey::parse_line(l).map_err(|e| Error::Corrupt {
                    what: format!("trusted key file {}", path.display()),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Trusts `key` for the datasets matching `datasets` (all when empty), replacing what it
    /// was trusted for before; returns false if that is exactly what it was.
    pub fn trust(&self, key: PublicKey, datasets: Vec<String>) -> Result<bool> {
        let entry = TrustedKey { key, datasets };
        let mut keys = self.trusted_keys()?;
        if keys.contains(&entry) && keys.iter().filter(|k| k.key == key).count() == 1 {
            return Ok(false);
        }
        keys.retain(|k| k.key != key);
        keys.push(entry);
        self.ensure()?;
        let path = self.trusted_path();
        let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("writing", &tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))?;
        Ok(true)
    }

    /// Where the highest sequence number accepted per tag is kept.
    fn tags_path(&self) -> PathBuf {
        self.root.join("tags.seen")
    }

    /// Accepts sequence `seq` of tag `dataset@tag` unless a higher one was accepted before,
    /// in which case that one comes back as the error; remembers the highest. Safe against
    /// other shoal processes of this state directory doing the same (a lock file).
    pub fn accept_tag(&self, dataset: &str, tag: &str, seq: u64) -> Result<Result<(), u64>> {
        self.ensure()?;
        let lock_path = self.root.join("tags.lock");
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io("locking", &lock_path)(e.into()))?;
        let path = self.tags_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let mut seen: Vec<(String, String, u64)> = text
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                Some((
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                    p.next()?.parse().ok()?,
                ))
            })
            .collect();
        match seen.iter_mut().find(|(d, t, _)| d == dataset && t == tag) {
            Some((_, _, s)) if *s > seq => return Ok(Err(*s)),
            Some((_, _, s)) if *s == seq => return Ok(Ok(())),
            Some((_, _, s)) => *s = seq,
            None => seen.push((dataset.to_string(), tag.to_string(), seq)),
        }
        let out: String = seen
            .iter()
            .map(|(d, t, s)| format!("{d} {t} {s}\n"))
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, out).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))?;
        Ok(Ok(()))
    }
}

/// Loads or creates this node's libp2p identity (`node.key`, protobuf-encoded ed25519, 0600).
pub fn node_identity(home: &Home) -> Result<shoal_swarm::Keypair> {
    let path = home.root().join("node.key");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(shoal_swarm::decode_identity(
            &bytes,
            &format!("node key {}", path.display()),
        )?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, bytes) = shoal_swarm::new_identity()?;
            if write_private(home.root(), &path, &bytes)? {
                Ok(key)
            } else {
                node_identity(home)
            }
        }
        Err(e) => Err(io("reading", &path)(e)),
    }
}

/// Creates `path` (mode 0600) with `bytes`, durably. Returns false, leaving it alone, when
/// another process created it first.
pub(crate) fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> Result<bool> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("writing", &tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io("writing", &tmp))?;
    // hard_link fails if another process created the file first: keep theirs.
    let r = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("writing", path)(e)),
    }
}
