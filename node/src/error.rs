use shoal_registry::version::VerifyError;
use shoal_registry::{NameError, OriginError};
use std::path::PathBuf;

use shoal_store::StoreError;

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
    /// A malformed request (a bad pattern, too many of them).
    #[error("{0}")]
    Usage(String),
    /// An error the node daemon reported, with its kind as the daemon knew it.
    #[error("{message}")]
    Daemon { kind: ErrorKind, message: String },
}

/// What kind of failure an [`Error`] is, kept across the daemon's socket (so a signature
/// failure reaches the user as one, not as a network error) and shown by `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The origin store failed or holds something wrong.
    Origin,
    /// The local store failed.
    Store,
    /// A version or tag failed signature, trust or scope checks.
    Verify,
    /// A malformed name or reference.
    Name,
    /// The directory being published.
    Source,
    /// A local file operation.
    Io,
    /// Data that fails verification or validation.
    Corrupt,
    /// Something that does not exist.
    NotFound,
    /// The daemon, its peers or its socket.
    Net,
    /// A mount point that could not be unmounted.
    Unmount,
    /// A tag refused as unsigned, rolled back or stale.
    TagRefused,
    /// A write refused as unsafe.
    Unsafe,
    /// A malformed request.
    Usage,
}

impl Error {
    /// Whether an origin said the object asked for is not there (as opposed to failing).
    pub fn is_gone(&self) -> bool {
        matches!(self, Error::Origin(e) if e.is_not_found())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Origin(shoal_registry::OriginError::NotFound { .. }) => ErrorKind::NotFound,
            Error::Origin(_) => ErrorKind::Origin,
            Error::Store(_) => ErrorKind::Store,
            Error::Verify(_) => ErrorKind::Verify,
            Error::Name(_) => ErrorKind::Name,
            Error::Source { .. } => ErrorKind::Source,
            Error::Io { .. } => ErrorKind::Io,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Net(_) => ErrorKind::Net,
            Error::Unmount { .. } => ErrorKind::Unmount,
            Error::TagRefused(_) => ErrorKind::TagRefused,
            Error::Unsafe { .. } => ErrorKind::Unsafe,
            Error::Usage(_) => ErrorKind::Usage,
            Error::Daemon { kind, .. } => *kind,
        }
    }
}

impl From<shoal_swarm::Error> for Error {
    fn from(e: shoal_swarm::Error) -> Error {
        match e {
            shoal_swarm::Error::Net(m) => Error::Net(m),
            shoal_swarm::Error::Corrupt { what, reason } => Error::Corrupt { what, reason },
            shoal_swarm::Error::Io { op, path, source } => Error::Io { op, path, source },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
