//! Content-defined chunking for Shoal.
//!
//! A file is cut into chunks with FastCDC (the 2020 variant) and every chunk is named by the
//! BLAKE3-256 hash of its bytes. Cut points depend only on content, so inserting bytes in the
//! middle of a file changes only the chunks around the edit; everything else keeps its id and
//! is deduplicated against earlier versions.
//!
//! This crate is synchronous and deterministic: bytes in, boundaries and ids out. It knows
//! nothing of files on disk beyond [`std::io::Read`], of the network, or of any database.
//!
//! ```
//! use shoal_chunker::{Params, chunk_reader};
//! let data = vec![7u8; 300_000];
//! let mut ids = Vec::new();
//! chunk_reader(&data[..], Params::default(), |chunk, bytes| {
//!     assert_eq!(chunk.len as usize, bytes.len());
//!     ids.push(chunk.id);
//!     Ok::<_, std::io::Error>(())
//! })
//! .unwrap();
//! assert!(!ids.is_empty());
//! ```

mod hash;
mod params;

pub use hash::{Hash, ParseHashError};
pub use params::{Params, ParamsError};

use std::io::{self, Read};

/// One content-defined chunk of a stream: where it starts, how long it is and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Byte offset of the chunk in the stream.
    pub offset: u64,
    /// Length in bytes (at most [`Params::max`]).
    pub len: u32,
    /// BLAKE3-256 of the chunk's bytes.
    pub id: Hash,
}

/// Errors from [`chunk_reader`]: either reading failed or the callback refused a chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError<E> {
    /// Reading the input failed.
    #[error("read failed: {0}")]
    Read(io::Error),
    /// The callback returned an error; chunking stopped there.
    #[error(transparent)]
    Callback(E),
}

/// Hashes bytes into a chunk id.
pub fn hash(bytes: &[u8]) -> Hash {
    Hash(*blake3::hash(bytes).as_bytes())
}

/// Cuts a whole in-memory buffer into chunks.
pub fn chunk_bytes(data: &[u8], params: Params) -> Vec<Chunk> {
    let mut out = Vec::new();
    for c in fastcdc::v2020::FastCDC::new(data, params.min, params.avg, params.max) {
        out.push(Chunk {
            offset: c.offset as u64,
            len: c.length as u32,
            id: hash(&data[c.offset..c.offset + c.length]),
        });
    }
    out
}

/// Size of the read buffer used by [`chunk_reader`]; a multiple of the largest chunk so that
/// only a small tail is carried over between reads.
const BUFFER: usize = 8 << 20;

/// A reusable chunker: holds its read buffer so that chunking many small files does not
/// allocate a buffer per file.
#[derive(Debug)]
pub struct Chunker {
    params: Params,
    buf: Vec<u8>,
}

impl Chunker {
    pub fn new(params: Params) -> Chunker {
        Chunker {
            params,
            buf: Vec::new(),
        }
    }

    pub fn params(&self) -> Params {
        self.params
    }

    /// Streams `reader` through the chunker, calling `f` with each chunk and its bytes in
    /// order; returns the number of bytes read.
    ///
    /// Uses a fixed buffer (a few MiB), so memory does not grow with the input. The result is
    /// identical to [`chunk_bytes`] on the whole input: a cut point depends only on the bytes
    /// from the chunk's start up to `max` bytes later, so a chunk is emitted only once that
    /// much data (or the end of input) is in the buffer.
    pub fn chunk<R, F, E>(&mut self, mut reader: R, mut f: F) -> Result<u64, ChunkError<E>>
    where
        R: Read,
        F: FnMut(&Chunk, &[u8]) -> Result<(), E>,
    {
        let params = self.params;
        let cap = BUFFER.max(4 * params.max as usize);
        if self.buf.len() < cap {
            self.buf.resize(cap, 0);
        }
        let buf = &mut self.buf[..cap];
        let mut filled = 0usize;
        let mut base = 0u64; // stream offset of buf[0]
        let mut eof = false;
        loop {
            while !eof && filled < cap {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => eof = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ChunkError::Read(e)),
                }
            }
            let mut consumed = 0usize;
            for c in
                fastcdc::v2020::FastCDC::new(&buf[..filled], params.min, params.avg, params.max)
            {
                if !eof && c.offset + params.max as usize > filled {
                    break;
                }
                let bytes = &buf[c.offset..c.offset + c.length];
                let chunk = Chunk {
                    offset: base + c.offset as u64,
                    len: c.length as u32,
                    id: hash(bytes),
                };
                f(&chunk, bytes).map_err(ChunkError::Callback)?;
                consumed = c.offset + c.length;
            }
            if eof {
                return Ok(base + consumed as u64);
            }
            buf.copy_within(consumed..filled, 0);
            filled -= consumed;
            base += consumed as u64;
        }
    }
}

/// Streams `reader` through a fresh [`Chunker`]; see [`Chunker::chunk`].
pub fn chunk_reader<R, F, E>(reader: R, params: Params, f: F) -> Result<u64, ChunkError<E>>
where
    R: Read,
    F: FnMut(&Chunk, &[u8]) -> Result<(), E>,
{
    Chunker::new(params).chunk(reader, f)
}

#[cfg(test)]
mod tests;
