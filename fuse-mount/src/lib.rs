//! Shoal's read-only FUSE view of a version.
//!
//! - [`layout`]: which chunks of a file cover a byte range (pure);
//! - [`model`]: the inode table, loading directories lazily through a [`Source`] (pure apart
//!   from what the source does);
//! - [`fs`]: the `fuser::Filesystem` adapter, which only translates kernel calls;
//! - [`push`]: filling the kernel's page cache ahead of readers, from a thread of its own.
//!
//! The crate knows nothing of the local store, origins or the network: a [`Source`] hands it
//! directory nodes, chunk lists and chunk bytes, each already verified.

pub mod fs;
pub mod layout;
pub mod model;
pub mod push;

pub use fs::{
    find_mount, raise_readahead, spawn, trim_allocator, MountConfig, MountInfo, MountOptions,
    MountStats, ReadObserver, ShoalFs,
};
pub use fuser::BackgroundSession;
pub use layout::{FileLayout, Piece};
pub use model::{Attr, Inodes, Kind, Source, SourceError};
