//! Shoal's data model and its encodings.
//!
//! - [`names`]: dataset names and `name@version` references;
//! - [`tree`]: the Merkle manifest (directory and chunk-list nodes);
//! - [`pack`]: packs of blobs and their indexes;
//! - [`version`]: signed versions, tags, dataset settings, publisher keys;
//! - [`origin`]: where all of that is stored, through `object_store`.
//!
//! Every encoded object carries a format tag ([`format`](mod@format)); decoding validates what it reads,
//! since origins and peers are not trusted.

pub mod dirs;
pub mod format;
pub mod names;
pub mod origin;
pub mod pack;
pub mod tree;
pub mod version;

pub use format::DecodeError;
pub use names::{DatasetName, DatasetRef, Label, NameError, Rev, VersionRef};
pub use origin::{DatasetObjects, ObjectEntry, Origin, OriginError, PackWriter, StoredObject};
pub use shoal_chunker::{Hash, Params};
pub use version::{
    AnyTag, DatasetConfig, Forward, GcSettings, PublicKey, RemovalBody, Retention, SecretKey,
    SignedRemoval, SignedTag, SignedVersion, SmallFiles, Stats, Tag, TagBody, TrustedKey,
    VersionBody,
};
