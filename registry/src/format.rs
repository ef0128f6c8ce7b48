//! The framing shared by every object Shoal writes: a 3-byte magic, a kind byte and a format
//! version byte, then a postcard body. The body types are frozen once released: a new layout
//! gets a new format version and new types, and decoders keep reading the old ones.

use serde::de::DeserializeOwned;
use serde::Serialize;

const MAGIC: &[u8; 3] = b"SHL";

/// The kinds of encoded object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Dir = b'D',
    ChunkList = b'L',
    PackIndex = b'I',
    /// The index of a pack whose bytes stay in their source objects (an in-place version).
    ExternalIndex = b'X',
    VersionBody = b'B',
    Version = b'V',
    Tag = b'T',
    TagBody = b't',
    DatasetConfig = b'C',
    /// A signed record that a version was removed (`shoal rm`).
    Removal = b'R',
    RemovalBody = b'r',
    /// The origin's gc settings (`_gc/settings`).
    GcSettings = b'G',
    /// A dataset's retention rules (`datasets/<name>/_retention`).
    Retention = b'K',
    /// Where the live blobs of a repacked pack went (`datasets/<name>/_repacked/<pack>`).
    Forward = b'F',
}

/// The format version of every kind but signed tags.
pub const V1: u8 = 1;
/// Tags signed by their publisher, with a sequence number (`Kind::Tag` only).
pub const V2: u8 = 2;

/// Why bytes could not be decoded as the expected object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a shoal {0:?} object (bad magic or kind)")]
    BadHeader(Kind),
    #[error("{0:?} object has unsupported format version {1}; upgrade shoal")]
    UnsupportedVersion(Kind, u8),
    #[error("malformed {0:?} object: {1}")]
    Malformed(Kind, String),
    #[error("invalid {0:?} object: {1}")]
    Invalid(Kind, String),
}

pub(crate) fn encode<T: Serialize>(kind: Kind, body: &T) -> Vec<u8> {
    encode_v(kind, V1, body)
}

pub(crate) fn encode_v<T: Serialize>(kind: Kind, version: u8, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(kind as u8);
    out.push(version);
    // Serializing plain data into a Vec cannot fail.
    postcard::to_io(body, &mut out).expect("postcard encoding into a Vec");
    out
}

pub(crate) fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, DecodeError> {
    decode_v(kind, V1, bytes)
}

/// The format version of an object of `kind`.
pub(crate) fn version_of(kind: Kind, bytes: &[u8]) -> Result<u8, DecodeError> {
    if bytes.len() < 5 || &bytes[..3] != MAGIC || bytes[3] != kind as u8 {
        return Err(DecodeError::BadHeader(kind));
    }
    Ok(bytes[4])
}

pub(crate) fn decode_v<T: DeserializeOwned>(
    kind: Kind,
    version: u8,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let found = version_of(kind, bytes)?;
    if found != version {
        return Err(DecodeError::UnsupportedVersion(kind, found));
    }
    let (value, rest) = postcard::take_from_bytes(&bytes[5..])
        .map_err(|e| DecodeError::Malformed(kind, e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(
            kind,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(value)
}
