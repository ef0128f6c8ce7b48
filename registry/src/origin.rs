//! An origin: the object store that holds a dataset's packs, versions and tags.
//!
//! Layout under the origin's root:
//! - `packs/<id>.pack`, `packs/<id>.idx`: blobs and their index (the index is written after
//!   the pack, so an index never names a pack that is not there);
//! - `datasets/<name>/_dataset`: chunking parameters, created once;
//! - `datasets/<name>/_versions/<version>`: signed version objects, created once (create-only
//!   put), written after everything they reference;
//! - `datasets/<name>/_tags/<tag>`: tags, moved with a conditional put where the store has one.

use crate::names::{DatasetName, DatasetRef, Label, Rev};
use crate::pack::AnyIndex;
use crate::version::{
    AnyTag, DatasetConfig, Forward, GcSettings, Retention, SecretKey, SignedRemoval, SignedTag,
    SignedVersion, TagBody,
};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use shoal_chunker::Hash;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// An origin operation that failed; every variant names the origin and the object.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("invalid origin {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("origin {origin}: {op} {key} failed: {source}")]
    Store {
        origin: String,
        op: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error("origin {origin}: {key} is corrupt: {reason}")]
    Corrupt {
        origin: String,
        key: String,
        reason: String,
    },
    #[error("{what} not found in origin {origin}")]
    NotFound { origin: String, what: String },
    #[error("{what} already exists in origin {origin}")]
    AlreadyExists { origin: String, what: String },
    #[error("origin {origin}: {key} changed while it was being read (its ETag moved); run again")]
    Changed { origin: String, key: String },
    #[error("origin {origin}: {what} got no answer within {secs:.1} s")]
    Timeout {
        origin: String,
        what: String,
        secs: f64,
    },
    #[error("origin {origin}: {key} is larger than a {kind} may be ({limit} bytes); refusing to read it")]
    TooLarge {
        origin: String,
        key: String,
        kind: &'static str,
        limit: u64,
    },
}

impl OriginError {
    /// Whether the object asked for is not there (as opposed to an origin that failed).
    pub fn is_not_found(&self) -> bool {
        matches!(self, OriginError::NotFound { .. })
            || matches!(self, OriginError::Store { source, .. } if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

/// Largest version object read (a body naming hundreds of thousands of packs fits).
pub const MAX_VERSION_OBJECT: u64 = 16 << 20;
/// Largest tag or dataset settings object read.
pub const MAX_SMALL_OBJECT: u64 = 64 << 10;
/// Largest pack index read: what a peer may send as one blob.
pub const MAX_PACK_INDEX: u64 = 64 << 20;

/// A reference resolved at the origin: the version's name, its (unverified) object, and the
/// (unverified) tag that led to it, if a tag did.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub version: String,
    pub signed: SignedVersion,
    pub tag: Option<(String, AnyTag)>,
}

/// An object listed under an origin's root (see [`Origin::list_objects`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Its key, relative to the root.
    pub key: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// An object as an origin's listing gives it, with the time the store last wrote it (by the
/// store's own clock). See [`Origin::list_stored`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its key, relative to the root.
    pub key: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub modified_unix: i64,
}

/// A dataset's objects as one listing shows them (see [`Origin::list_datasets`]), names
/// sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetObjects {
    pub versions: Vec<String>,
    /// Removed versions, with the store's time of writing each record.
    pub removals: Vec<(String, i64)>,
    pub tags: Vec<String>,
    pub retention: bool,
    /// Repacked packs (`_repacked/<pack>`), with the store's time of writing each record.
    pub forwards: Vec<(String, i64)>,
    /// Objects listed under the dataset.
    pub objects: usize,
}

/// A handle on one origin. Cheap to clone.
#[derive(Clone)]
pub struct Origin {
    store: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
    /// The directory of a local origin (its staging files are not listed by the store).
    local_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({})", self.url)
    }
}

fn retry() -> object_store::RetryConfig {
    // Fail an unreachable origin in seconds rather than the default three minutes.
    object_store::RetryConfig {
        backoff: Default::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

fn client() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

impl Origin {
    /// Opens an origin from a URL (`file://`, `s3://bucket/prefix`, `gs://`, `az://`,
    /// `http(s)://`, read-only) or a bare local path. S3 takes its endpoint, region and
    /// credentials from the usual `AWS_*` environment variables. A local origin directory is
    /// created when `create` is set (publishing), and must exist otherwise.
    pub fn open(spec: &str, create: bool) -> Result<Origin, OriginError> {
        let bad = |reason: String| OriginError::BadUrl {
            url: spec.to_string(),
            reason,
        };
        let parsed = url::Url::parse(spec).ok().filter(|u| u.scheme().len() > 1);
        let mut local_dir = None;
        let (store, root, url): (Arc<dyn ObjectStore>, Path, String) = match parsed {
            None => {
                local_dir = Some(std::path::PathBuf::from(spec));
                Self::local(std::path::Path::new(spec), create, spec)?
            }
            Some(u) if u.scheme() == "file" => {
                let p = u
                    .to_file_path()
                    .map_err(|_| bad("not a local file URL".into()))?;
                local_dir = Some(p.clone());
                Self::local(&p, create, spec)?
            }
            Some(u) => {
                let scheme = u.scheme().to_string();
                let prefix = Path::from(u.path().trim_matches('/'));
                let store: Arc<dyn ObjectStore> = match scheme.as_str() {
                    "s3" | "s3a" => {
                        let mut b = object_store::aws::AmazonS3Builder::from_env()
                            .with_url(spec)
                            .with_retry(retry())
                            .with_client_options(client())
                            .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
                        let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
                        if endpoint.is_ok_and(|e| e.starts_with("http://")) {
                            b = b.with_allow_http(true);
                        }
                        Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
                    }
                    "gs" => Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env()
                            .with_url(spec)
                            .with_retry(retry())
                            .with_client_options(client())
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    "az" | "abfs" | "abfss" | "azure" => Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env()
                            .with_url(spec)
                            .with_retry(retry())
                            .with_client_options(client())
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    "http" | "https" => {
                        let store = object_store::http::HttpBuilder::new()
                            .with_url(spec)
                            .with_retry(retry())
                            .with_client_options(client().with_allow_http(true))
                            .build()
                            .map_err(|e| bad(e.to_string()))?;
                        return Ok(Origin { store: Arc::new(store), root: Path::default(), url: spec.to_string(), local_dir: None });
                    }
                    other => return Err(bad(format!("unsupported scheme {other:?} (use a path, file://, s3://, gs://, az:// or http(s)://)"))),
                };
                (store, prefix, spec.to_string())
            }
        };
        Ok(Origin {
            store,
            root,
            url,
            local_dir,
        })
    }

    fn local(
        path: &std::path::Path,
        create: bool,
        spec: &str,
    ) -> Result<(Arc<dyn ObjectStore>, Path, String), OriginError> {
        if create {
            std::fs::create_dir_all(path).map_err(|e| OriginError::BadUrl {
                url: spec.to_string(),
                reason: format!("cannot create directory {}: {e}", path.display()),
            })?;
        } else if !path.exists() {
            return Err(OriginError::BadUrl {
                url: spec.to_string(),
                reason: format!("directory {} does not exist (nothing was published there yet; pass --origin or set SHOAL_ORIGIN)", path.display()),
            });
        } else if !path.is_dir() {
            return Err(OriginError::BadUrl {
                url: spec.to_string(),
                reason: format!("{} is not a directory", path.display()),
            });
        }
        let store = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| {
            OriginError::BadUrl {
                url: spec.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok((Arc::new(store), Path::default(), spec.to_string()))
    }

    /// The URL or path this origin was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A listed object's key relative to the root.
    fn rel_key<'a>(&self, full: &'a str) -> &'a str {
        let root = self.root.as_ref();
        if root.is_empty() {
            return full;
        }
        full.strip_prefix(root)
            .map(|k| k.trim_start_matches('/'))
            .unwrap_or(full)
    }

    /// Puts `bytes` at `key` only if nothing is there: [`OriginError::AlreadyExists`] naming
    /// `what` otherwise, even when two writers race.
    async fn create(&self, key: &Path, bytes: Bytes, what: String) -> Result<(), OriginError> {
        self.put(key, bytes, PutMode::Create)
            .await
            .map_err(|e| match e {
                OriginError::AlreadyExists { origin, .. } => {
                    OriginError::AlreadyExists { origin, what }
                }
                e => e,
            })
    }

    fn key(&self, rel: &str) -> Path {
        let mut p = self.root.clone();
        for part in rel.split('/') {
            p = p.child(part);
        }
        p
    }

    fn store_err(&self, op: &'static str, key: &Path, source: object_store::Error) -> OriginError {
        match source {
            object_store::Error::AlreadyExists { .. } => OriginError::AlreadyExists {
                origin: self.url.clone(),
                what: key.to_string(),
            },
            source => OriginError::Store {
                origin: self.url.clone(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            },
        }
    }

    fn corrupt(&self, key: &Path, e: impl ToString) -> OriginError {
        OriginError::Corrupt {
            origin: self.url.clone(),
            key: key.to_string(),
            reason: e.to_string(),
        }
    }

    /// Reads a whole object of at most `limit` bytes (a `kind` of object, for the error);
    /// `None` if it does not exist. The size the store reports is checked before any byte is
    /// read, and the bytes as they stream in, so a huge object costs nothing.
    async fn get_opt(
        &self,
        key: &Path,
        kind: &'static str,
        limit: u64,
    ) -> Result<Option<(Bytes, UpdateVersion)>, OriginError> {
        use futures::StreamExt;
        let too_large = || OriginError::TooLarge {
            origin: self.url.clone(),
            key: key.to_string(),
            kind,
            limit,
        };
        match self.store.get(key).await {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                if r.meta.size > limit {
                    return Err(too_large());
                }
                let mut out = bytes::BytesMut::with_capacity(r.meta.size as usize);
                let mut stream = r.into_stream();
                while let Some(part) = stream.next().await {
                    let part = part.map_err(|e| self.store_err("reading", key, e))?;
                    if (out.len() + part.len()) as u64 > limit {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&part);
                }
                Ok(Some((out.freeze(), version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("reading", key, e)),
        }
    }

    async fn put(&self, key: &Path, bytes: Bytes, mode: PutMode) -> Result<(), OriginError> {
        self.store
            .put_opts(key, PutPayload::from_bytes(bytes), PutOptions::from(mode))
            .await
            .map(|_| ())
            .map_err(|e| self.store_err("writing", key, e))
    }

    async fn list_names(&self, rel: &str) -> Result<Vec<String>, OriginError> {
        let prefix = self.key(rel);
        let list = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.store_err("listing", &prefix, e))?;
        let mut names: Vec<String> = list
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn dataset_key(name: &DatasetName, rest: &str) -> String {
        format!("datasets/{name}/{rest}")
    }

    /// The dataset's settings, if it has been published before.
    pub async fn dataset_config(
        &self,
        name: &DatasetName,
    ) -> Result<Option<DatasetConfig>, OriginError> {
        let key = self.key(&Self::dataset_key(name, "_dataset"));
        match self
            .get_opt(&key, "dataset settings object", MAX_SMALL_OBJECT)
            .await?
        {
            Some((b, _)) => Ok(Some(
                DatasetConfig::decode(&b).map_err(|e| self.corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Records a new dataset's settings; if another publisher got there first, returns theirs.
    pub async fn create_dataset_config(
        &self,
        name: &DatasetName,
        cfg: DatasetConfig,
    ) -> Result<DatasetConfig, OriginError> {
        let key = self.key(&Self::dataset_key(name, "_dataset"));
        match self.put(&key, cfg.encode().into(), PutMode::Create).await {
            Ok(()) => Ok(cfg),
            Err(OriginError::AlreadyExists { .. }) => {
                self.dataset_config(name)
                    .await?
                    .ok_or_else(|| OriginError::NotFound {
                        origin: self.url.clone(),
                        what: key.to_string(),
                    })
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a version object (signature not yet checked: see [`SignedVersion::verify`]).
    pub async fn version(
        &self,
        name: &DatasetName,
        version: &str,
    ) -> Result<Option<SignedVersion>, OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_versions/{version}")));
        match self
            .get_opt(&key, "version object", MAX_VERSION_OBJECT)
            .await?
        {
            Some((b, _)) => Ok(Some(
                SignedVersion::decode(&b).map_err(|e| self.corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Whether `name@version` exists.
    pub async fn version_exists(
        &self,
        name: &DatasetName,
        version: &str,
    ) -> Result<bool, OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_versions/{version}")));
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_err("checking", &key, e)),
        }
    }

    /// Creates a version object; fails with [`OriginError::AlreadyExists`] if the name is
    /// taken, even when two publishers race.
    pub async fn create_version(
        &self,
        name: &DatasetName,
        v: &SignedVersion,
    ) -> Result<(), OriginError> {
        let key = self.key(&Self::dataset_key(
            name,
            &format!("_versions/{}", v.body.version),
        ));
        let what = format!("version {name}@{}", v.body.version);
        self.create(&key, v.encode().into(), what).await
    }

    /// Version names of a dataset, sorted.
    pub async fn list_versions(&self, name: &DatasetName) -> Result<Vec<String>, OriginError> {
        self.list_names(&Self::dataset_key(name, "_versions")).await
    }

    /// Tag names of a dataset, sorted.
    pub async fn list_tags(&self, name: &DatasetName) -> Result<Vec<String>, OriginError> {
        self.list_names(&Self::dataset_key(name, "_tags")).await
    }

    /// A tag object (its signature not yet checked: see [`SignedTag::verify`]).
    pub async fn tag(&self, name: &DatasetName, tag: &str) -> Result<Option<AnyTag>, OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_tags/{tag}")));
        match self.get_opt(&key, "tag object", MAX_SMALL_OBJECT).await? {
            Some((b, _)) => Ok(Some(AnyTag::decode(&b).map_err(|e| self.corrupt(&key, e))?)),
            None => Ok(None),
        }
    }

    /// Points `tag` at `version`, signed with `key`, with a sequence number past the tag it
    /// replaces (whatever that one's signature: the sequence only has to grow) and no lower
    /// than `now`. The write is a
    /// compare-and-swap against the tag as it was read, retried on conflict, so concurrent
    /// movers serialise and each gets its own number. A store without conditional update (a
    /// local directory) falls back to its atomic overwrite. Returns the sequence written.
    pub async fn set_tag(
        &self,
        name: &DatasetName,
        tag: &str,
        version: &str,
        now: u64,
        key: &SecretKey,
    ) -> Result<u64, OriginError> {
        self.swap_tag(name, tag, "moving tag", |current| {
            // At least the signing time in seconds: a tag an attacker deleted or replaced
            // (with an unsigned or undecodable object) still moves forward when re-signed,
            // past any sequence a node saw before.
            let seq = (current.map_or(0, AnyTag::seq) + 1).max(now);
            let body = SignedTag::sign(
                TagBody {
                    dataset: name.to_string(),
                    tag: tag.to_string(),
                    version: version.to_string(),
                    seq,
                    updated_unix: now,
                    publisher: [0; 32],
                },
                key,
            )
            .encode();
            Ok((body.into(), seq))
        })
        .await
    }

    /// The compare-and-swap every tag write goes through: reads the tag, asks `next` what to
    /// write over it (`Err(t)`: nothing, return `t`), and puts it on the condition that the
    /// tag is still as read, again on conflict, at most 10 times. A store without conditional
    /// update (a local directory) falls back to its atomic overwrite.
    async fn swap_tag<T>(
        &self,
        name: &DatasetName,
        tag: &str,
        op: &'static str,
        mut next: impl FnMut(Option<&AnyTag>) -> Result<(Bytes, T), T>,
    ) -> Result<T, OriginError> {
        let path = self.key(&Self::dataset_key(name, &format!("_tags/{tag}")));
        for _ in 0..10 {
            let current = self.get_opt(&path, "tag object", MAX_SMALL_OBJECT).await?;
            let decoded = current.as_ref().and_then(|(b, _)| AnyTag::decode(b).ok());
            let (body, out) = match next(decoded.as_ref()) {
                Ok(write) => write,
                Err(out) => return Ok(out),
            };
            let mode = match current {
                None => PutMode::Create,
                Some((_, v)) => PutMode::Update(v),
            };
            match self
                .store
                .put_opts(
                    &path,
                    PutPayload::from_bytes(body.clone()),
                    PutOptions::from(mode),
                )
                .await
            {
                Ok(_) => return Ok(out),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => continue,
                Err(object_store::Error::NotImplemented) => {
                    return self
                        .put(&path, body, PutMode::Overwrite)
                        .await
                        .map(|()| out);
                }
                Err(e) => return Err(self.store_err("writing", &path, e)),
            }
        }
        Err(OriginError::Store {
            origin: self.url.clone(),
            op,
            key: path.to_string(),
            source: Box::new(object_store::Error::Generic {
                store: "shoal",
                source: "tag kept changing under us after 10 attempts".into(),
            }),
        })
    }

    /// Resolves a reference to a version name and its (unverified) version object, with the
    /// (unverified) tag that named it, if a tag did.
    pub async fn resolve(&self, r: &DatasetRef) -> Result<Resolved, OriginError> {
        let name = &r.dataset;
        match &r.rev {
            Rev::Label(label) => {
                if let Some(v) = self.version(name, label.as_str()).await? {
                    return Ok(Resolved {
                        version: label.to_string(),
                        signed: v,
                        tag: None,
                    });
                }
                if let Some(tag) = self.tag(name, label.as_str()).await? {
                    let target: Label = tag.version().parse().map_err(|e| {
                        self.corrupt(
                            &self.key(&Self::dataset_key(name, &format!("_tags/{label}"))),
                            e,
                        )
                    })?;
                    if let Some(v) = self.version(name, target.as_str()).await? {
                        return Ok(Resolved {
                            version: target.to_string(),
                            signed: v,
                            tag: Some((label.to_string(), tag)),
                        });
                    }
                    return Err(OriginError::NotFound {
                        origin: self.url.clone(),
                        what: format!("version {name}@{target} (tag {label} points to it)"),
                    });
                }
                Err(OriginError::NotFound {
                    origin: self.url.clone(),
                    what: format!("version or tag {name}@{label}"),
                })
            }
            Rev::Root(root) => {
                for version in self.list_versions(name).await? {
                    if let Some(v) = self.version(name, &version).await? {
                        if v.body.root == *root {
                            return Ok(Resolved {
                                version,
                                signed: v,
                                tag: None,
                            });
                        }
                    }
                }
                Err(OriginError::NotFound {
                    origin: self.url.clone(),
                    what: format!("a version of {name} with root b3:{root}"),
                })
            }
        }
    }

    /// The signed record of `name@version`'s removal (signature not yet checked), if any.
    pub async fn removal(
        &self,
        name: &DatasetName,
        version: &str,
    ) -> Result<Option<SignedRemoval>, OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_removed/{version}")));
        match self
            .get_opt(&key, "removal record", MAX_VERSION_OBJECT)
            .await?
        {
            Some((b, _)) => Ok(Some(
                SignedRemoval::decode(&b).map_err(|e| self.corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Writes a removal record, create-only: [`OriginError::AlreadyExists`] if the version
    /// was removed before.
    pub async fn create_removal(
        &self,
        name: &DatasetName,
        r: &SignedRemoval,
    ) -> Result<(), OriginError> {
        let key = self.key(&Self::dataset_key(
            name,
            &format!("_removed/{}", r.body.version),
        ));
        let what = format!("the removal of {name}@{}", r.body.version);
        self.create(&key, r.encode().into(), what).await
    }

    /// Names of the removed versions of a dataset, sorted.
    pub async fn list_removals(&self, name: &DatasetName) -> Result<Vec<String>, OriginError> {
        self.list_names(&Self::dataset_key(name, "_removed")).await
    }

    /// Deletes `name@version`'s version object (absent already is not an error).
    pub async fn delete_version(
        &self,
        name: &DatasetName,
        version: &str,
    ) -> Result<(), OriginError> {
        self.delete_rel(&Self::dataset_key(name, &format!("_versions/{version}")))
            .await
    }

    /// Deletes a tag object (absent already is not an error).
    pub async fn delete_tag(&self, name: &DatasetName, tag: &str) -> Result<(), OriginError> {
        self.delete_rel(&Self::dataset_key(name, &format!("_tags/{tag}")))
            .await
    }

    /// Deletes the object at `rel` (relative to the root); absent already is not an error.
    pub async fn delete_rel(&self, rel: &str) -> Result<(), OriginError> {
        let key = self.key(rel);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err("deleting", &key, e)),
        }
    }

    /// Every dataset's objects in this origin, from one listing of `datasets/`: its version
    /// names, removal records (with the store's time of writing each), tag names, and whether
    /// it has retention rules.
    pub async fn list_datasets(
        &self,
    ) -> Result<BTreeMap<DatasetName, DatasetObjects>, OriginError> {
        let mut out: BTreeMap<DatasetName, DatasetObjects> = BTreeMap::new();
        for o in self.list_stored("datasets").await? {
            // Names never have a segment starting with '_': the first "/_" ends the name.
            let Some((name, rest)) = o
                .key
                .strip_prefix("datasets/")
                .and_then(|k| k.split_once("/_"))
            else {
                continue;
            };
            let Ok(name) = name.parse::<DatasetName>() else {
                continue;
            };
            let d = out.entry(name).or_default();
            match rest.split_once('/') {
                Some(("versions", v)) => d.versions.push(v.to_string()),
                Some(("removed", v)) => d.removals.push((v.to_string(), o.modified_unix)),
                Some(("tags", t)) => d.tags.push(t.to_string()),
                Some(("repacked", p)) => d.forwards.push((p.to_string(), o.modified_unix)),
                None if rest == "retention" => d.retention = true,
                _ => {}
            }
            d.objects += 1;
        }
        Ok(out)
    }

    /// Every object under `rel` (relative to the root; recursively), with its size and the
    /// store's time of writing it, sorted by key.
    pub async fn list_stored(&self, rel: &str) -> Result<Vec<StoredObject>, OriginError> {
        use futures::StreamExt;
        let prefix = self.key(rel);
        let mut stream = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.store_err("listing", &prefix, e))?;
            let key = self.rel_key(meta.location.as_ref());
            out.push(StoredObject {
                key: key.to_string(),
                size: meta.size,
                modified_unix: meta.last_modified.timestamp(),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A local origin's staging files under `rel` (`<key>#<n>`: a put or a multipart upload
    /// cut short by a kill), which the store's listing does not show; none for other stores
    /// (their unfinished multipart uploads are for the bucket's lifecycle rules to abort).
    pub fn staging_leftovers(&self, rel: &str) -> Result<Vec<StoredObject>, OriginError> {
        let Some(dir) = &self.local_dir else {
            return Ok(Vec::new());
        };
        let rd = match std::fs::read_dir(dir.join(rel)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(OriginError::BadUrl {
                    url: self.url.clone(),
                    reason: format!("listing {}: {e}", dir.join(rel).display()),
                })
            }
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let staging = name
                .rsplit_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            let Ok(meta) = e.metadata() else { continue };
            if !staging || !meta.is_file() {
                continue;
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            out.push(StoredObject {
                key: format!("{rel}/{name}"),
                size: meta.len(),
                modified_unix: modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes a staging file [`Self::staging_leftovers`] listed.
    pub fn delete_staging(&self, key: &str) -> Result<(), OriginError> {
        let Some(dir) = &self.local_dir else {
            return Ok(());
        };
        match std::fs::remove_file(dir.join(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OriginError::BadUrl {
                url: self.url.clone(),
                reason: format!("deleting {}: {e}", dir.join(key).display()),
            }),
        }
    }

    /// The store's clock now, in seconds since the Unix epoch: the time it gives an object it
    /// writes (`_gc/clock`). Object ages are measured against it, never against this
    /// machine's clock, which may be off.
    pub async fn store_now(&self) -> Result<i64, OriginError> {
        let key = self.key("_gc/clock");
        self.put(
            &key,
            Bytes::from_static(b"shoal gc clock\n"),
            PutMode::Overwrite,
        )
        .await?;
        match self.store.head(&key).await {
            Ok(meta) => Ok(meta.last_modified.timestamp()),
            Err(e) => Err(self.store_err("checking", &key, e)),
        }
    }

    /// Where the blobs of `name`'s versions in repacked pack `pack` went, if it was repacked.
    pub async fn forward(
        &self,
        name: &DatasetName,
        pack: &Hash,
    ) -> Result<Option<Forward>, OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_repacked/{pack}")));
        match self
            .get_opt(&key, "repack record", MAX_VERSION_OBJECT)
            .await?
        {
            Some((b, _)) => {
                let f = Forward::decode(&b).map_err(|e| self.corrupt(&key, e))?;
                if f.pack != *pack {
                    return Err(self.corrupt(&key, format!("it is the record of pack {}", f.pack)));
                }
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// Writes (or replaces) the record of a repacked pack of `name`.
    pub async fn put_forward(&self, name: &DatasetName, f: &Forward) -> Result<(), OriginError> {
        let key = self.key(&Self::dataset_key(name, &format!("_repacked/{}", f.pack)));
        self.put(&key, f.encode().into(), PutMode::Overwrite).await
    }

    /// Every record of `name`'s repacked packs, by pack (read a few at a time).
    pub async fn forwards(
        &self,
        name: &DatasetName,
    ) -> Result<std::collections::HashMap<Hash, Forward>, OriginError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(self.list_forwards(name).await?)
            .map(|p| async move { Ok::<_, OriginError>(self.forward(name, &p).await?.map(|f| (p, f))) })
            .buffer_unordered(16)
            .try_filter_map(|f| async move { Ok(f) })
            .try_collect()
            .await
    }

    /// The packs of `name` that were repacked (ids of their records), sorted.
    pub async fn list_forwards(&self, name: &DatasetName) -> Result<Vec<Hash>, OriginError> {
        Ok(self
            .list_names(&Self::dataset_key(name, "_repacked"))
            .await?
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .collect())
    }

    /// A dataset's retention rules, if it has any.
    pub async fn retention(&self, name: &DatasetName) -> Result<Option<Retention>, OriginError> {
        let key = self.key(&Self::dataset_key(name, "_retention"));
        match self
            .get_opt(&key, "retention rules", MAX_SMALL_OBJECT)
            .await?
        {
            Some((b, _)) => Ok(Some(
                Retention::decode(&b).map_err(|e| self.corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Sets (or, with None, clears) a dataset's retention rules.
    pub async fn set_retention(
        &self,
        name: &DatasetName,
        rules: Option<&Retention>,
    ) -> Result<(), OriginError> {
        match rules {
            Some(r) => {
                let key = self.key(&Self::dataset_key(name, "_retention"));
                self.put(&key, r.encode().into(), PutMode::Overwrite).await
            }
            None => {
                self.delete_rel(&Self::dataset_key(name, "_retention"))
                    .await
            }
        }
    }

    /// The origin's gc settings (defaults when it has none).
    pub async fn gc_settings(&self) -> Result<GcSettings, OriginError> {
        let key = self.key("_gc/settings");
        match self.get_opt(&key, "gc settings", MAX_SMALL_OBJECT).await? {
            Some((b, _)) => GcSettings::decode(&b).map_err(|e| self.corrupt(&key, e)),
            None => Ok(GcSettings::default()),
        }
    }

    /// Writes the origin's gc settings.
    pub async fn set_gc_settings(&self, s: &GcSettings) -> Result<(), OriginError> {
        let key = self.key("_gc/settings");
        self.put(&key, s.encode().into(), PutMode::Overwrite).await
    }

    fn pack_key(id: &Hash, ext: &str) -> String {
        format!("packs/{id}.{ext}")
    }

    /// The size of an object, or None if there is none.
    async fn size_of(&self, key: &Path) -> Result<Option<u64>, OriginError> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("checking", key, e)),
        }
    }

    /// Whether a pack's index is here: it is written after its pack, so the pack is whole.
    pub async fn has_pack(&self, id: &Hash) -> Result<bool, OriginError> {
        Ok(self
            .size_of(&self.key(&Self::pack_key(id, "idx")))
            .await?
            .is_some())
    }

    /// The size of a pack object without its index (a copy cut short after the pack was
    /// written), or None. A put is atomic on every store (a local directory writes a staging
    /// file and renames it), so a pack of the size its index gives is whole.
    pub async fn pack_size(&self, id: &Hash) -> Result<Option<u64>, OriginError> {
        self.size_of(&self.key(&Self::pack_key(id, "pack"))).await
    }

    /// Writes a pack's bytes (without its index: see [`Self::put_pack_index`]).
    pub async fn put_pack_data(&self, id: &Hash, parts: Vec<Bytes>) -> Result<(), OriginError> {
        let key = self.key(&Self::pack_key(id, "pack"));
        self.store
            .put_opts(
                &key,
                PutPayload::from_iter(parts),
                PutOptions::from(PutMode::Overwrite),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.store_err("writing", &key, e))
    }

    /// Starts writing a pack too large to hold in memory (a copy of an in-place version's
    /// source objects): its parts are uploaded as they come (a multipart upload; on a local
    /// directory, a staging file), and the pack appears whole, or not at all, at
    /// [`PackWriter::finish`].
    pub async fn pack_writer(&self, id: &Hash) -> Result<PackWriter, OriginError> {
        let key = self.key(&Self::pack_key(id, "pack"));
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| self.store_err("writing", &key, e))?;
        Ok(PackWriter {
            origin: self.clone(),
            key,
            upload: Some(object_store::WriteMultipart::new_with_chunk_size(
                upload,
                PACK_WRITER_PART,
            )),
            written: 0,
        })
    }

    /// Writes a pack's index, once its pack is whole.
    pub async fn put_pack_index(&self, id: &Hash, index: Bytes) -> Result<(), OriginError> {
        self.put(
            &self.key(&Self::pack_key(id, "idx")),
            index,
            PutMode::Overwrite,
        )
        .await
    }

    /// Puts a signed tag made elsewhere (another origin's) unless this origin's copy is as
    /// new or newer (by sequence), with the same compare-and-swap as [`Self::set_tag`]. Returns
    /// whether it was written, and the sequence this origin's tag has now.
    pub async fn copy_tag(
        &self,
        name: &DatasetName,
        tag: &SignedTag,
    ) -> Result<(bool, u64), OriginError> {
        let body: Bytes = tag.encode().into();
        let seq = tag.body.seq;
        self.swap_tag(name, &tag.body.tag, "copying tag", |current| match current
            .map(AnyTag::seq)
            .filter(|s| *s >= seq)
        {
            Some(theirs) => Err((false, theirs)),
            None => Ok((body.clone(), (true, seq))),
        })
        .await
    }

    /// Every object under this origin's root, as a source to publish from (not a Shoal
    /// origin's own layout): keys relative to the root, sorted. Refused past `limit` objects.
    pub async fn list_objects(&self, limit: usize) -> Result<Vec<ObjectEntry>, OriginError> {
        use futures::StreamExt;
        let root = if self.root.as_ref().is_empty() {
            None
        } else {
            Some(&self.root)
        };
        let mut stream = self.store.list(root);
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.store_err("listing", &self.root, e))?;
            let key = self.rel_key(meta.location.as_ref());
            if out.len() >= limit {
                return Err(OriginError::TooLarge {
                    origin: self.url.clone(),
                    key: self.root.to_string(),
                    kind: "listing to publish",
                    limit: limit as u64,
                });
            }
            out.push(ObjectEntry {
                key: key.to_string(),
                size: meta.size,
                e_tag: meta.e_tag,
                version: meta.version,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Reads `range` of the object at `key` (relative to the root), refusing it if the object
    /// no longer has the ETag given (it changed since it was listed).
    pub async fn read_object(
        &self,
        key: &str,
        range: Range<u64>,
        e_tag: Option<&str>,
    ) -> Result<Bytes, OriginError> {
        let path = self.key(key);
        let opts = object_store::GetOptions {
            range: Some(range.into()),
            if_match: e_tag.map(str::to_string),
            ..Default::default()
        };
        let r = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| match e {
                object_store::Error::Precondition { .. } => OriginError::Changed {
                    origin: self.url.clone(),
                    key: path.to_string(),
                },
                e => self.store_err("reading", &path, e),
            })?;
        r.bytes()
            .await
            .map_err(|e| self.store_err("reading", &path, e))
    }

    /// Whether this origin takes writes: plain HTTP(S) origins are read-only.
    pub fn writable(&self) -> bool {
        !(self.url.starts_with("http://") || self.url.starts_with("https://"))
    }

    /// Uploads a pack and then its index.
    pub async fn put_pack(
        &self,
        id: &Hash,
        parts: Vec<Bytes>,
        index: Bytes,
    ) -> Result<(), OriginError> {
        self.put_pack_data(id, parts).await?;
        self.put_pack_index(id, index).await
    }

    /// Reads a pack's index (of a packed or an external pack) and checks it against the pack's
    /// id. Returns the raw bytes too, for caching.
    pub async fn pack_index(&self, id: &Hash) -> Result<(AnyIndex, Bytes), OriginError> {
        let key = self.key(&Self::pack_key(id, "idx"));
        let (bytes, _) = self
            .get_opt(&key, "pack index", MAX_PACK_INDEX)
            .await?
            .ok_or_else(|| OriginError::NotFound {
                origin: self.url.clone(),
                what: format!("pack index {key}"),
            })?;
        // Hashing and decoding megabytes of index: off the async threads.
        let (id, b) = (*id, bytes.clone());
        let checked = tokio::task::spawn_blocking(move || {
            if shoal_chunker::hash(&b) != id {
                return Err(None);
            }
            AnyIndex::decode(&b).map_err(Some)
        })
        .await
        .expect("pack index task panicked");
        match checked {
            Ok(idx) => Ok((idx, bytes)),
            Err(None) => Err(self.corrupt(&key, "content does not match its id")),
            Err(Some(e)) => Err(self.corrupt(&key, e)),
        }
    }

    /// What the store says of the object at `key` (relative to the root) now: None if it is
    /// gone.
    pub async fn head_object(&self, key: &str) -> Result<Option<ObjectEntry>, OriginError> {
        let path = self.key(key);
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(ObjectEntry {
                key: key.to_string(),
                size: meta.size,
                e_tag: meta.e_tag,
                version: meta.version,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("checking", &path, e)),
        }
    }

    /// Reads one byte range of a pack.
    pub async fn read_pack(&self, id: &Hash, range: Range<u64>) -> Result<Bytes, OriginError> {
        let key = self.key(&Self::pack_key(id, "pack"));
        self.store
            .get_range(&key, range)
            .await
            .map_err(|e| self.store_err("reading", &key, e))
    }

    /// Key of a pack object, for error messages.
    pub fn pack_path(&self, id: &Hash) -> String {
        self.key(&Self::pack_key(id, "pack")).to_string()
    }
}

/// Parts of a [`PackWriter`]'s upload (S3 takes 5 MiB and up, except the last).
const PACK_WRITER_PART: usize = 8 << 20;

/// Parts of a [`PackWriter`] uploading at once (with one part being filled, the writer holds
/// at most this many plus one in memory).
const PACK_WRITER_PARTS_AT_ONCE: usize = 4;

/// A pack being written part by part (see [`Origin::pack_writer`]). Dropped without
/// [`Self::finish`], the upload is abandoned and nothing appears at the pack's key (a store
/// may keep the parts until its own expiry; a local directory, a staging file).
pub struct PackWriter {
    origin: Origin,
    key: Path,
    upload: Option<object_store::WriteMultipart>,
    written: u64,
}

impl PackWriter {
    /// Appends bytes, waiting while too many parts are in flight.
    ///
    /// Not cancel-safe: a writer whose `put` was dropped half-way must be abandoned.
    pub async fn put(&mut self, bytes: Bytes) -> Result<(), OriginError> {
        let upload = self.upload.as_mut().expect("used after finish");
        if let Err(e) = upload.wait_for_capacity(PACK_WRITER_PARTS_AT_ONCE).await {
            return Err(self.origin.store_err("writing", &self.key, e));
        }
        self.written += bytes.len() as u64;
        upload.put(bytes);
        Ok(())
    }

    /// Completes the upload: the pack is visible, whole, from here on. Returns its size.
    pub async fn finish(mut self) -> Result<u64, OriginError> {
        let upload = self.upload.take().expect("finished twice");
        match upload.finish().await {
            Ok(_) => Ok(self.written),
            Err(e) => Err(self.origin.store_err("writing", &self.key, e)),
        }
    }

    /// Abandons the upload (its parts are deleted where the store allows).
    pub async fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            if let Err(e) = upload.abort().await {
                tracing::warn!(
                    "abandoning the upload of {} in origin {}: {e}",
                    self.key,
                    self.origin.url()
                );
            }
        }
    }
}
