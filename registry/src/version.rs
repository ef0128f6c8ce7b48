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

/// A version as stored in an origin: the body, its exact encoded bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedVersion {
    pub body: VersionBody,
    body_bytes: Vec<u8>,
    signature: Vec<u8>,
}

/// A version that fails verification.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("version {0} is signed by {1}, which is not a trusted key; run `shoal trust {1}` if you trust this publisher")]
    Untrusted(String, PublicKey),
    #[error("version {0} has an invalid signature (claimed publisher {1}); the origin may be tampered with")]
    BadSignature(String, PublicKey),
    #[error(
        "version object at {path} describes {found}; refusing a version stored under another name"
    )]
    Misplaced { path: String, found: String },
}

impl SignedVersion {
    pub fn sign(body: VersionBody, key: &SecretKey) -> SignedVersion {
        let mut body = body;
        body.publisher = key.public().0;
        let body_bytes = format::encode(Kind::VersionBody, &body);
        let signature = key.0.sign(&body_bytes).to_bytes().to_vec();
        SignedVersion {
            body,
            body_bytes,
            signature,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        format::encode(
            Kind::Version,
            &Envelope {
                body: self.body_bytes.clone(),
                signature: self.signature.clone(),
            },
        )
    }

    /// Decodes a version object; the signature is checked separately by [`Self::verify`].
    pub fn decode(bytes: &[u8]) -> Result<SignedVersion, DecodeError> {
        let env: Envelope = format::decode(Kind::Version, bytes)?;
        let body: VersionBody = format::decode(Kind::VersionBody, &env.body)?;
        body.chunking
            .validate()
            .map_err(|e| DecodeError::Invalid(Kind::VersionBody, e.to_string()))?;
        Ok(SignedVersion {
            body,
            body_bytes: env.body,
            signature: env.signature,
        })
    }

    pub fn publisher(&self) -> PublicKey {
        PublicKey(self.body.publisher)
    }

    /// Checks that the signature is valid, made by a trusted key, and that the version is the
    /// one that was asked for (`dataset@version`).
    pub fn verify(
        &self,
        dataset: &str,
        version: &str,
        trusted: &[PublicKey],
    ) -> Result<(), VerifyError> {
        let name = format!("{}@{}", self.body.dataset, self.body.version);
        if self.body.dataset != dataset || self.body.version != version {
            return Err(VerifyError::Misplaced {
                path: format!("{dataset}@{version}"),
                found: name,
            });
        }
        let publisher = self.publisher();
        let ok = VerifyingKey::from_bytes(&self.body.publisher)
            .ok()
            .zip(Signature::from_slice(&self.signature).ok());
        match ok {
            Some((key, sig)) if key.verify(&self.body_bytes, &sig).is_ok() => {}
            _ => return Err(VerifyError::BadSignature(name, publisher)),
        }
        if !trusted.contains(&publisher) {
            return Err(VerifyError::Untrusted(name, publisher));
        }
        Ok(())
    }

    /// For tests that need a forged object: replaces the signature bytes.
    #[doc(hidden)]
    pub fn with_signature(mut self, signature: Vec<u8>) -> SignedVersion {
        self.signature = signature;
        self
    }
}

/// A tag: a mutable pointer to a version name.
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

/// Settings fixed when a dataset is first published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetConfig {
    pub chunking: Params,
    pub created_unix: u64,
}

impl DatasetConfig {
    pub fn encode(&self) -> Vec<u8> {
        format::encode(Kind::DatasetConfig, self)
    }
    pub fn decode(bytes: &[u8]) -> Result<DatasetConfig, DecodeError> {
        let c: DatasetConfig = format::decode(Kind::DatasetConfig, bytes)?;
        c.chunking
            .validate()
            .map_err(|e| DecodeError::Invalid(Kind::DatasetConfig, e.to_string()))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        v.verify("imagenet", "v1", &[key.public()]).unwrap();
        let err = v.verify("imagenet", "v1", &[other.public()]).unwrap_err();
        assert!(err.to_string().contains(&key.public().to_string()), "{err}");
        assert!(matches!(
            v.verify("imagenet", "v2", &[key.public()]),
            Err(VerifyError::Misplaced { .. })
        ));
        let forged = v.clone().with_signature(vec![0; 64]);
        assert!(matches!(
            forged.verify("imagenet", "v1", &[key.public()]),
            Err(VerifyError::BadSignature(..))
        ));
        let unsigned = v.with_signature(vec![]);
        assert!(matches!(
            unsigned.verify("imagenet", "v1", &[key.public()]),
            Err(VerifyError::BadSignature(..))
        ));
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
}
