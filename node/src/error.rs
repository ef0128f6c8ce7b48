use shoal_registry::version::VerifyError;
use shoal_registry::{NameError, OriginError};
use std::path::PathBuf;

use crate::store::StoreError;

/// A node operation that failed. Each message names the object and the reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Name(#[from] NameError),
    /// A problem with the directory being published.
    #[error("cannot publish {path}: {reason}")]
    Source { path: PathBuf, reason: String },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Data from an origin or the local store that fails verification or validation.
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    /// A path inside a version that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The node daemon, its peers or its local socket.
    #[error("{0}")]
    Net(String),
    /// A mount point that could not be unmounted (busy, or not a mount).
    #[error("cannot unmount {path}: {reason}")]
    Unmount { path: PathBuf, reason: String },
    /// A tag that is unsigned, rolled back or stale.
    #[error("{0}")]
    TagRefused(String),
    /// Refusing to write somewhere that is not safe.
    #[error("refusing to write {path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
