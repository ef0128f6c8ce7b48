//! What a swarm operation that failed reports; each message names the peer, address or file.

use std::path::PathBuf;

/// A swarm operation that failed. The node maps each kind onto its own error of that kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A peer, a listener or the network.
    #[error("{0}")]
    Net(String),
    /// A key or identity file that fails to decode.
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
