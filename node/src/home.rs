//! The state directory (`SHOAL_HOME`): publisher key, trusted keys, local store, caches.

use crate::error::{io, Error, Result};
use shoal_registry::{PublicKey, SecretKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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

    /// The embedded default origin: a local directory.
    pub fn default_origin(&self) -> PathBuf {
        self.root.join("origin")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn pack_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("packs")
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
                std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
                let key = SecretKey::generate().map_err(|e| Error::Io {
                    op: "generating a key for",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io("writing", &tmp))?;
                writeln!(f, "{}", hex::encode(key.to_bytes()))
                    .and_then(|_| f.sync_all())
                    .map_err(io("writing", &tmp))?;
                // hard_link fails if another process created the key first: use theirs.
                match std::fs::hard_link(&tmp, &path) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&tmp);
                        Ok(key)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let _ = std::fs::remove_file(&tmp);
                        self.secret_key()
                    }
                    Err(e) => Err(io("writing", &path)(e)),
                }
            }
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    /// Keys added with `shoal trust`.
    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>> {
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
                l.parse()
                    .map_err(|e: shoal_registry::version::KeyParseError| Error::Corrupt {
                        what: format!("trusted key file {}", path.display()),
                        reason: e.to_string(),
                    })
            })
            .collect()
    }

    /// Adds a key to the trusted set; returns false if it was already there.
    pub fn trust(&self, key: PublicKey) -> Result<bool> {
        if self.trusted_keys()?.contains(&key) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
        let path = self.trusted_path();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("writing", &path))?;
        writeln!(f, "{key}").map_err(io("writing", &path))?;
        Ok(true)
    }
}
