//! Versions, tags and dataset settings: the small mutable-looking objects of an origin.
//!
//! A version is immutable and signed: the publisher's ed25519 key signs the encoded body,
//! which names the dataset, the version, the root tree id and the packs holding its blobs.

use crate::format::{self, DecodeError, Kind};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use shoal_chunker::{Hash, Params};
use std::fmt;
use std::str::FromStr;

/// A publisher's public key, written `ed25519:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Not a public key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid public key {0:?}: expected ed25519:<64 hex digits>")]
pub struct KeyParseError(pub String);

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.trim().strip_prefix("ed25519:").unwrap_or(s.trim());
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut out).map_err(|_| KeyParseError(s.to_string()))?;
        VerifyingKey::from_bytes(&out).map_err(|_| KeyParseError(s.to_string()))?;
        Ok(PublicKey(out))
    }
}

/// A key trusted to sign versions and tags, of every dataset or of those whose names match
/// one of its patterns (`org/*`; `*` matches any run of characters, `/` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    /// Empty: every dataset.
    pub datasets: Vec<String>,
}

impl From<PublicKey> for TrustedKey {
    fn from(key: PublicKey) -> TrustedKey {
        TrustedKey {
            key,
            datasets: Vec::new(),
        }
    }
}

impl TrustedKey {
    /// Whether this key may sign for `dataset`.
    pub fn covers(&self, dataset: &str) -> bool {
        self.datasets.is_empty() || self.datasets.iter().any(|p| glob_match(p, dataset))
    }

    /// `KEY` or `KEY PATTERN[,PATTERN...]`, as in the trusted keys file.
    pub fn parse_line(line: &str) -> Result<TrustedKey, KeyParseError> {
        let mut parts = line.split_whitespace();
        let key: PublicKey = parts.next().unwrap_or("").parse()?;
        let datasets: Vec<String> = parts
            .flat_map(|p| p.split(','))
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Ok(TrustedKey { key, datasets })
    }
}

impl fmt::Display for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)?;
        if !self.datasets.is_empty() {
            write!(f, " {}", self.datasets.join(","))?;
        }
        Ok(())
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name))
}

/// Which trusted key (if any) may sign for `dataset`: Ok, or why not.
fn check_trust(
    what: &str,
    dataset: &str,
    publisher: PublicKey,
    trusted: &[TrustedKey],
) -> Result<(), VerifyError> {
    let mine: Vec<&TrustedKey> = trusted.iter().filter(|t| t.key == publisher).collect();
    if mine.is_empty() {
        return Err(VerifyError::Untrusted(what.to_string(), publisher));
    }
    if mine.iter().any(|t| t.covers(dataset)) {
        return Ok(());
    }
    let scope: Vec<String> = mine.iter().flat_map(|t| t.datasets.clone()).collect();
    Err(VerifyError::OutOfScope {
        what: what.to_string(),
        key: publisher,
        dataset: dataset.to_string(),
        scope: scope.join(","),
    })
}

/// A publisher's secret key.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Result<SecretKey, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_bytes(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }
}

/// Totals recorded with a version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
}

/// What a publisher signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionBody {
    pub dataset: String,
    pub version: String,
    pub root: Hash,
    /// Every pack holding a blob of this version.
    pub packs: Vec<Hash>,
    pub chunking: Params,
    pub created_unix: u64,
    pub stats: Stats,
    pub publisher: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    signature: Vec<u8>,
}

/// A body a publisher signs: how it is framed, and where its publisher key sits.
pub trait SignedBody: Serialize + serde::de::DeserializeOwned {
    /// The kind of the body's own encoding.
    const BODY: Kind;
    /// The kind and format version of the envelope (body bytes and signature).
    const ENVELOPE: (Kind, u8);
    fn publisher_mut(&mut self) -> &mut [u8; 32];
    fn publisher_key(&self) -> PublicKey;
    /// Checks beyond the encoding (e.g. chunking parameters in range).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A signed object as stored in an origin: the body, its exact encoded bytes (what was
/// signed) and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<B> {
    pub body: B,
    body_bytes: Vec<u8>,
    signature: Vec<u8>,
}

/// A version as stored in an origin.
pub type SignedVersion = Signed<VersionBody>;
/// A signed tag as stored in an origin (`Kind::Tag`, format version 2).
pub type SignedTag = Signed<TagBody>;
/// A signed removal record as stored in an origin (`datasets/<name>/_removed/<version>`).
pub type SignedRemoval = Signed<RemovalBody>;

impl SignedBody for VersionBody {
    const BODY: Kind = Kind::VersionBody;
    const ENVELOPE: (Kind, u8) = (Kind::Version, format::V1);
    fn publisher_mut(&mut self) -> &mut [u8; 32] {
        &mut self.publisher
    }
    fn publisher_key(&self) -> PublicKey {
        PublicKey(self.publisher)
    }
    fn validate(&self) -> Result<(), String> {
        self.chunking
            .validate()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl SignedBody for TagBody {
    const BODY: Kind = Kind::TagBody;
    const ENVELOPE: (Kind, u8) = (Kind::Tag, format::V2);
    fn publisher_mut(&mut self) -> &mut [u8; 32] {
        &mut self.publisher
    }
    fn publisher_key(&self) -> PublicKey {
        PublicKey(self.publisher)
    }
}

impl SignedBody for RemovalBody {
    const BODY: Kind = Kind::RemovalBody;
    const ENVELOPE: (Kind, u8) = (Kind::Removal, format::V1);
    fn publisher_mut(&mut self) -> &mut [u8; 32] {
        &mut self.publisher
    }
    fn publisher_key(&self) -> PublicKey {
        PublicKey(self.publisher)
    }
}

impl<B: SignedBody> Signed<B> {
    /// Signs `body` with `key` (which becomes its publisher).
    pub fn sign(mut body: B, key: &SecretKey) -> Signed<B> {
        *body.publisher_mut() = key.public().0;
        let body_bytes = format::encode(B::BODY, &body);
        let signature = key.0.sign(&body_bytes).to_bytes().to_vec();
        Signed {
            body,
            body_bytes,
            signature,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (kind, version) = B::ENVELOPE;
        format::encode_v(
            kind,
            version,
            &Envelope {
                body: self.body_bytes.clone(),
                signature: self.signature.clone(),
            },
        )
    }

    /// Decodes the object; the signature is checked separately (`verify`).
    pub fn decode(bytes: &[u8]) -> Result<Signed<B>, DecodeError> {
        let (kind, version) = B::ENVELOPE;
        let env: Envelope = format::decode_v(kind, version, bytes)?;
        let body: B = format::decode(B::BODY, &env.body)?;
        body.validate()
            .map_err(|e| DecodeError::Invalid(B::BODY, e))?;
        Ok(Signed {
            body,
            body_bytes: env.body,
            signature: env.signature,
        })
    }

    pub fn publisher(&self) -> PublicKey {
        self.body.publisher_key()
    }

    /// Checks the signature, and that the publisher is trusted for `dataset`.
    fn check(&self, what: &str, dataset: &str, trusted: &[TrustedKey]) -> Result<(), VerifyError> {
        let publisher = self.publisher();
        let ok = VerifyingKey::from_bytes(&publisher.0)
            .ok()
            .zip(Signature::from_slice(&self.signature).ok());
        match ok {
            Some((key, sig)) if key.verify(&self.body_bytes, &sig).is_ok() => {}
            _ => return Err(VerifyError::BadSignature(what.to_string(), publisher)),
        }
        check_trust(what, dataset, publisher, trusted)
    }

    /// Checks that the object is the `asked` one (dataset, name) it `found`s itself to be
    /// (its `what`: "tag ", ...), then its signature and trust.
    fn check_at(
        &self,
        what: &str,
        found: (&str, &str),
        asked: (&str, &str),
        trusted: &[TrustedKey],
    ) -> Result<(), VerifyError> {
        let name = format!("{what}{}@{}", found.0, found.1);
        if found != asked {
            return Err(VerifyError::Misplaced {
                path: format!("{}@{}", asked.0, asked.1),
                found: name,
            });
        }
        self.check(&name, asked.0, trusted)
    }

    /// For tests that need a forged object: replaces the signature bytes.
    #[doc(hidden)]
    pub fn with_signature(mut self, signature: Vec<u8>) -> Signed<B> {
        self.signature = signature;
        self
    }
}

/// A version that fails verification.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} is signed by {1}, which is not a trusted key; run `shoal trust {1}` if you trust this publisher")]
    Untrusted(String, PublicKey),
    #[error(
        "{0} has an invalid signature (claimed publisher {1}); the origin may be tampered with"
    )]
    BadSignature(String, PublicKey),
    #[error(
        "version object at {path} describes {found}; refusing a version stored under another name"
    )]
    Misplaced { path: String, found: String },
    #[error("{what} is signed by {key}, which is trusted only for datasets {scope}, not {dataset}; widen it with `shoal trust {key} --datasets PATTERN` if this publisher may sign {dataset}")]
    OutOfScope {
        what: String,
        key: PublicKey,
        dataset: String,
        scope: String,
    },
}

impl SignedVersion {
    /// Checks that the signature is valid, made by a trusted key, and that the version is the
    /// one that was asked for (`dataset@version`).
    pub fn verify(
        &self,
        dataset: &str,
        version: &str,
        trusted: &[TrustedKey],
    ) -> Result<(), VerifyError> {
        let found = (self.body.dataset.as_str(), self.body.version.as_str());
        self.check_at("version ", found, (dataset, version), trusted)
    }
}

/// A tag as written before tags were signed: a bare pointer, no signature, no sequence.
/// Still decoded, so that it can be reported and replaced; never followed (see [`AnyTag`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub version: String,
    pub updated_unix: u64,
}

impl Tag {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::Tag, self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Tag, DecodeError> {
        format::decode(Kind::Tag, bytes)
    }
}

/// What a publisher signs to point a tag at a version. The sequence number grows by one at
/// each move, so a node that saw sequence `n` refuses anything older (a rollback); the time
/// lets a node refuse a tag nobody re-signed for too long (a frozen origin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagBody {
    pub dataset: String,
    pub tag: String,
    pub version: String,
    pub seq: u64,
    pub updated_unix: u64,
    pub publisher: [u8; 32],
}

/// A tag object of either format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyTag {
    Signed(SignedTag),
    /// Written by a shoal from before signed tags: refused until re-pointed (`shoal tag`).
    Unsigned(Tag),
}

impl AnyTag {
    pub fn decode(bytes: &[u8]) -> Result<AnyTag, DecodeError> {
        match format::version_of(Kind::Tag, bytes)? {
            format::V1 => Tag::decode(bytes).map(AnyTag::Unsigned),
            _ => SignedTag::decode(bytes).map(AnyTag::Signed),
        }
    }

    /// The version it points at.
    pub fn version(&self) -> &str {
        match self {
            AnyTag::Signed(t) => &t.body.version,
            AnyTag::Unsigned(t) => &t.version,
        }
    }

    /// Its sequence number (0 for an unsigned tag).
    pub fn seq(&self) -> u64 {
        match self {
            AnyTag::Signed(t) => t.body.seq,
            AnyTag::Unsigned(_) => 0,
        }
    }
}

impl SignedTag {
    /// Checks that the tag is `dataset@tag`, signed validly by a key trusted for the dataset.
    pub fn verify(
        &self,
        dataset: &str,
        tag: &str,
        trusted: &[TrustedKey],
    ) -> Result<(), VerifyError> {
        let found = (self.body.dataset.as_str(), self.body.tag.as_str());
        self.check_at("tag ", found, (dataset, tag), trusted)
    }
}

/// What `shoal rm` signs: that `dataset@version` (of root `root`) was removed, when, by whom
/// and why, with the packs the version named. Written before the version object is deleted
/// and kept: nodes and replicas learn of the removal from it (a removed version is refused by
/// name, never re-published under the same name), and the origin's gc keeps the packs it lists
/// for a grace period after the removal (a publish that started before it may lean on them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovalBody {
    pub dataset: String,
    pub version: String,
    pub root: Hash,
    pub packs: Vec<Hash>,
    pub removed_unix: u64,
    /// Free text from `shoal rm --reason` (at most 1,000 bytes).
    pub reason: String,
    pub publisher: [u8; 32],
}

impl SignedRemoval {
    /// Checks that the record is about `dataset@version`, signed validly by a key trusted for
    /// the dataset.
    pub fn verify(
        &self,
        dataset: &str,
        version: &str,
        trusted: &[TrustedKey],
    ) -> Result<(), VerifyError> {
        let found = (self.body.dataset.as_str(), self.body.version.as_str());
        self.check_at("removal of ", found, (dataset, version), trusted)
    }
}

/// The origin's garbage-collection settings (`_gc/settings`), shared by `shoal origin gc` and
/// every publisher: gc deletes nothing unreferenced younger than the grace period, and a
/// publisher refuses to write its version once a grace period has passed since it listed what
/// it deduplicates against (docs/lifecycle.md explains why that makes gc safe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSettings {
    pub grace_s: u64,
    /// The grace before the last change, and when it changed: a shorter grace applies only
    /// once the longer one has passed (publishes started before the change were promised it).
    pub previous_grace_s: u64,
    pub changed_unix: u64,
}

impl GcSettings {
    /// When an origin has no settings object: a day.
    pub const DEFAULT_GRACE_S: u64 = 24 * 3600;

    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::GcSettings, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<GcSettings, DecodeError> {
        format::decode(Kind::GcSettings, bytes)
    }

    /// The grace in force at `now_unix`: the longer of the two while a shortening is recent.
    pub fn effective_grace_s(&self, now_unix: u64) -> u64 {
        if now_unix < self.changed_unix.saturating_add(self.previous_grace_s) {
            self.grace_s.max(self.previous_grace_s)
        } else {
            self.grace_s
        }
    }
}

impl Default for GcSettings {
    fn default() -> GcSettings {
        GcSettings {
            grace_s: Self::DEFAULT_GRACE_S,
            previous_grace_s: Self::DEFAULT_GRACE_S,
            changed_unix: 0,
        }
    }
}

/// Which versions of a dataset `shoal origin gc` keeps (`datasets/<name>/_retention`). A
/// version is kept when any rule keeps it; the others are removed as by `shoal rm` (a signed
/// removal record each). A dataset without rules keeps everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Retention {
    /// Keep the newest N versions (by the time they were published).
    pub keep_last: Option<u32>,
    /// Keep every version a tag points at (and never delete a tag).
    pub keep_tagged: bool,
    /// Keep versions published less than this many seconds ago.
    pub keep_younger_than_s: Option<u64>,
}

impl Retention {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::Retention, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Retention, DecodeError> {
        format::decode(Kind::Retention, bytes)
    }

    /// Which of `versions` (name, publish time, whether a tag points at it) the rules do
    /// not keep at `now_unix`. Pure.
    pub fn expired<'a>(&self, versions: &'a [(String, u64, bool)], now_unix: u64) -> Vec<&'a str> {
        let mut newest_first: Vec<&(String, u64, bool)> = versions.iter().collect();
        newest_first.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        newest_first
            .iter()
            .enumerate()
            .filter(|(rank, (_, created, tagged))| {
                let kept = self.keep_last.is_some_and(|n| (*rank as u64) < n as u64)
                    || (self.keep_tagged && *tagged)
                    || self
                        .keep_younger_than_s
                        .is_some_and(|t| now_unix.saturating_sub(*created) < t);
                !kept
            })
            .map(|(_, (name, _, _))| name.as_str())
            .collect()
    }
}

/// Where the blobs of a dataset's versions that lay in a repacked pack are now
/// (`datasets/<name>/_repacked/<pack>`, written by `shoal origin repack`). Not signed: it only
/// says where to look, and every blob found there is checked against its id as always; a
/// reader that cannot find a pack a version names reads this record and looks in `into`.
/// `shoal origin gc` deletes the pack itself only once the record is older than the grace
/// period and every version reaching the pack is in `covers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub pack: Hash,
    /// The packs now holding every blob of `pack` that a version in `covers` reads.
    pub into: Vec<Hash>,
    /// The dataset's versions (names) whose blobs in `pack` are all in `into`.
    pub covers: Vec<String>,
    pub repacked_unix: u64,
}

impl Forward {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::Forward, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Forward, DecodeError> {
        let f: Forward = format::decode(Kind::Forward, bytes)?;
        if f.into.contains(&f.pack) {
            return Err(DecodeError::Invalid(
                Kind::Forward,
                "a pack forwarded to itself".into(),
            ));
        }
        Ok(f)
    }
}

/// Settings fixed when a dataset is first published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetConfig {
    /// How files are cut (files below `small.below` excepted).
    pub chunking: Params,
    pub created_unix: u64,
    /// Smaller chunks for small files, where the dataset has them (format v2 settings).
    pub small: Option<SmallFiles>,
}

/// Chunking of a dataset's small files: files of fewer than `below` bytes are cut with
/// `params`. Small edited files (source trees, text) then share all but the few KiB around
/// each edit with their previous version, as rsync's per-file deltas do; see
/// `docs/chunking.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmallFiles {
    pub below: u64,
    pub params: Params,
}

impl SmallFiles {
    /// Files under 1 MiB in chunks of 1 / 4 / 16 KiB: two Django releases 20 patch releases
    /// apart upload 1.38x what rsync sends as literal data (default chunking: 2.62x;
    /// 512 B / 2 / 8 KiB: 1.22x, with twice the chunks).
    pub const DEFAULT: SmallFiles = SmallFiles {
        below: 1 << 20,
        params: Params {
            min: 1 << 10,
            avg: 4 << 10,
            max: 16 << 10,
        },
    };

    /// Files under 1 MiB one chunk each (their size is under the minimum chunk): for media
    /// and compressed files, which are replaced whole from version to version, so that
    /// smaller chunks buy no dedup and cost a lookup, a verification and an index entry each
    /// (images_v1: 3.4 chunks a 110 KB file with the default chunking). A reader verifies
    /// such a file with one hash; see `docs/chunking.md`.
    pub const WHOLE: SmallFiles = SmallFiles {
        below: 1 << 20,
        params: Params {
            min: 1 << 20,
            avg: 2 << 20,
            max: 4 << 20,
        },
    };

    /// The parameters for a file of `size` bytes.
    pub fn params_for(small: Option<&SmallFiles>, size: u64, default: Params) -> Params {
        match small {
            Some(s) if size < s.below => s.params,
            _ => default,
        }
    }
}

/// The v1 settings body (frozen).
#[derive(Serialize, Deserialize)]
struct ConfigV1 {
    chunking: Params,
    created_unix: u64,
}

/// The v2 settings body (frozen): v1 and a small-file class.
#[derive(Serialize, Deserialize)]
struct ConfigV2 {
    chunking: Params,
    created_unix: u64,
    small: SmallFiles,
}

impl DatasetConfig {
    /// v1 when there is no small-file class (what earlier releases read), else v2.
    pub fn encode(&self) -> Vec<u8> {
        match self.small {
            None => format::encode(
                Kind::DatasetConfig,
                &ConfigV1 {
                    chunking: self.chunking,
                    created_unix: self.created_unix,
                },
            ),
            Some(small) => format::encode_v(
                Kind::DatasetConfig,
                format::V2,
                &ConfigV2 {
                    chunking: self.chunking,
                    created_unix: self.created_unix,
                    small,
                },
            ),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<DatasetConfig, DecodeError> {
        let c = match format::version_of(Kind::DatasetConfig, bytes)? {
            format::V2 => {
                let c: ConfigV2 = format::decode_v(Kind::DatasetConfig, format::V2, bytes)?;
                DatasetConfig {
                    chunking: c.chunking,
                    created_unix: c.created_unix,
                    small: Some(c.small),
                }
            }
            _ => {
                let c: ConfigV1 = format::decode(Kind::DatasetConfig, bytes)?;
                DatasetConfig {
                    chunking: c.chunking,
                    created_unix: c.created_unix,
                    small: None,
                }
            }
        };
        let bad = |e: String| DecodeError::Invalid(Kind::DatasetConfig, e);
        c.chunking.validate().map_err(|e| bad(e.to_string()))?;
        if let Some(s) = &c.small {
            s.params.validate().map_err(|e| bad(e.to_string()))?;
            if s.below == 0 || s.below > 1 << 30 {
                return Err(bad(format!(
                    "small files below {} bytes: not in 1 B..1 GiB",
                    s.below
                )));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_what_any_rule_keeps() {
        let v = |n: &str, t: u64, tagged: bool| (n.to_string(), t, tagged);
        let versions = vec![
            v("a", 100, true),
            v("b", 200, false),
            v("c", 300, false),
            v("d", 400, false),
            v("e", 400, false),
        ];
        let r = Retention {
            keep_last: Some(2),
            keep_tagged: true,
            keep_younger_than_s: None,
        };
        // Newest first: e and d (a tie in time, by name), then a is tagged.
        assert_eq!(r.expired(&versions, 1000), ["c", "b"]);
        let r = Retention {
            keep_last: None,
            keep_tagged: false,
            keep_younger_than_s: Some(250),
        };
        assert_eq!(r.expired(&versions, 500), ["b", "a"]);
        let decoded = Retention::decode(&r.encode()).unwrap();
        assert_eq!(decoded, r);
        assert!(Retention::default().expired(&versions, 0).len() == 5);
    }

    fn body() -> VersionBody {
        VersionBody {
            dataset: "imagenet".into(),
            version: "v1".into(),
            root: Hash([3; 32]),
            packs: vec![Hash([4; 32])],
            chunking: Params::default(),
            created_unix: 1,
            stats: Stats {
                files: 1,
                bytes: 2,
                chunks: 3,
            },
            publisher: [0; 32],
        }
    }

    #[test]
    fn sign_verify_and_refusals() {
        let key = SecretKey::from_bytes([1; 32]);
        let other = SecretKey::from_bytes([2; 32]);
        let v = SignedVersion::sign(body(), &key);
        let v = SignedVersion::decode(&v.encode()).unwrap();
        v.verify("imagenet", "v1", &[key.public().into()]).unwrap();
        let err = v
            .verify("imagenet", "v1", &[other.public().into()])
            .unwrap_err();
        assert!(err.to_string().contains(&key.public().to_string()), "{err}");
        assert!(matches!(
            v.verify("imagenet", "v2", &[key.public().into()]),
            Err(VerifyError::Misplaced { .. })
        ));
        let forged = v.clone().with_signature(vec![0; 64]);
        assert!(matches!(
            forged.verify("imagenet", "v1", &[key.public().into()]),
            Err(VerifyError::BadSignature(..))
        ));
        let unsigned = v.with_signature(vec![]);
        assert!(matches!(
            unsigned.verify("imagenet", "v1", &[key.public().into()]),
            Err(VerifyError::BadSignature(..))
        ));
    }

    #[test]
    fn golden_version_and_tag_encodings() {
        // Pinned: signed objects must never change their bytes silently (ed25519 signing is
        // deterministic, so the whole object is).
        let key = SecretKey::from_bytes([1; 32]);
        let v = SignedVersion::sign(body(), &key).encode();
        assert_eq!(&v[..5], b"SHLV\x01");
        let t = SignedTag::sign(
            TagBody {
                dataset: "imagenet".into(),
                tag: "latest".into(),
                version: "v1".into(),
                seq: 1,
                updated_unix: 2,
                publisher: [0; 32],
            },
            &key,
        )
        .encode();
        assert_eq!(
            (
                shoal_chunker::hash(&v).to_hex(),
                shoal_chunker::hash(&t).to_hex()
            ),
            (GOLDEN_VERSION.to_string(), GOLDEN_TAG.to_string())
        );
    }
    const GOLDEN_VERSION: &str = "f5529c3def3244773841335325f6e2da3b2aa7dc1bde7fa86ce9e8988f48f303";
    const GOLDEN_TAG: &str = "4449697c8153177ac10e524367393616c93d13d3a240eaafb45911f66bd541af";

    #[test]
    fn scoped_keys_sign_only_their_datasets() {
        let key = SecretKey::from_bytes([1; 32]);
        let v = SignedVersion::sign(body(), &key);
        let line = format!("{} org/*,imagenet-?", key.public());
        let scoped = TrustedKey::parse_line(&line).unwrap();
        assert_eq!(scoped.to_string(), line);
        assert!(scoped.covers("org/laion") && scoped.covers("org/a/b"));
        assert!(!scoped.covers("imagenet") && !scoped.covers("other/org"));
        let err = v
            .verify("imagenet", "v1", std::slice::from_ref(&scoped))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, VerifyError::OutOfScope { .. })
                && msg.contains("imagenet")
                && msg.contains(&key.public().to_string())
                && msg.contains("org/*"),
            "{msg}"
        );
        // The same key trusted twice, once for everything: the wider grant wins.
        v.verify("imagenet", "v1", &[scoped, key.public().into()])
            .unwrap();
    }

    #[test]
    fn signed_tags_verify_and_old_ones_decode() {
        let key = SecretKey::from_bytes([1; 32]);
        let body = TagBody {
            dataset: "imagenet".into(),
            tag: "latest".into(),
            version: "v3".into(),
            seq: 7,
            updated_unix: 1_700_000_000,
            publisher: [0; 32],
        };
        let t = SignedTag::sign(body, &key);
        let bytes = t.encode();
        assert_eq!(&bytes[..5], b"SHLT\x02");
        let AnyTag::Signed(back) = AnyTag::decode(&bytes).unwrap() else {
            panic!("a signed tag decodes as signed")
        };
        assert_eq!(back, t);
        back.verify("imagenet", "latest", &[key.public().into()])
            .unwrap();
        assert!(matches!(
            back.verify("imagenet", "stable", &[key.public().into()]),
            Err(VerifyError::Misplaced { .. })
        ));
        assert!(matches!(
            back.verify("other", "latest", &[key.public().into()]),
            Err(VerifyError::Misplaced { .. })
        ));
        let other = SecretKey::from_bytes([2; 32]);
        assert!(matches!(
            back.verify("imagenet", "latest", &[other.public().into()]),
            Err(VerifyError::Untrusted(..))
        ));
        let forged = back.with_signature(vec![0; 64]);
        assert!(matches!(
            forged.verify("imagenet", "latest", &[key.public().into()]),
            Err(VerifyError::BadSignature(..))
        ));
        let old = Tag {
            version: "v1".into(),
            updated_unix: 5,
        };
        let any = AnyTag::decode(&old.encode()).unwrap();
        assert_eq!((any.version(), any.seq()), ("v1", 0));
        assert!(matches!(any, AnyTag::Unsigned(_)));
    }

    #[test]
    fn public_key_text_form() {
        let k = SecretKey::from_bytes([1; 32]).public();
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        assert_eq!(
            k.to_string()["ed25519:".len()..]
                .parse::<PublicKey>()
                .unwrap(),
            k
        );
        assert!("ed25519:zz".parse::<PublicKey>().is_err());
    }

    #[test]
    fn dataset_settings_keep_v1_without_a_small_file_class_and_check_v2() {
        let v1 = DatasetConfig {
            chunking: Params::default(),
            created_unix: 7,
            small: None,
        };
        let bytes = v1.encode();
        assert_eq!(bytes[4], format::V1);
        assert_eq!(DatasetConfig::decode(&bytes).unwrap(), v1);
        let v2 = DatasetConfig {
            small: Some(SmallFiles::DEFAULT),
            ..v1.clone()
        };
        let bytes = v2.encode();
        assert_eq!(bytes[4], format::V2);
        assert_eq!(DatasetConfig::decode(&bytes).unwrap(), v2);
        for below in [0, (1 << 30) + 1] {
            let bad = DatasetConfig {
                small: Some(SmallFiles {
                    below,
                    ..SmallFiles::DEFAULT
                }),
                ..v1.clone()
            };
            assert!(DatasetConfig::decode(&bad.encode()).is_err());
        }
        let p = Params::default();
        assert_eq!(
            SmallFiles::params_for(Some(&SmallFiles::DEFAULT), 5_000, p).avg,
            4 << 10
        );
        assert_eq!(
            SmallFiles::params_for(Some(&SmallFiles::DEFAULT), 1 << 20, p),
            p
        );
        assert_eq!(SmallFiles::params_for(None, 5, p), p);
    }
}
