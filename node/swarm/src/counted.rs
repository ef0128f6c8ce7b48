//! The control protocols' codec, counting what it reads and writes: a node's control traffic
//! (hellos, have-maps and deltas, rosters, admission proofs) as operators and benchmarks see
//! it (`shoal status`, `/metrics`), beside the chunk bytes the bulk channel counts.

use async_trait::async_trait;
use futures::io::{AsyncRead, AsyncWrite};
use libp2p::request_response::Codec;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Control bytes this node sent and received (request and response bodies with their framing;
/// not libp2p's own TLS, yamux and multistream overhead).
#[derive(Debug, Default)]
pub struct ControlBytes {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// A codec that counts the bytes `inner` reads and writes into `bytes`.
#[derive(Debug, Clone)]
pub struct Counted<C> {
    pub inner: C,
    pub bytes: Arc<ControlBytes>,
}

/// `io`, counting into `n`.
struct Io<'a, T> {
    io: &'a mut T,
    n: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(k)) = r {
            this.n.fetch_add(k as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut *this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(k)) = r {
            this.n.fetch_add(k as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_close(cx)
    }
}

#[async_trait]
impl<C> Codec for Counted<C>
where
    C: Codec + Send,
    C::Protocol: Sync,
{
    type Protocol = C::Protocol;
    type Request = C::Request;
    type Response = C::Response;

    /// Counts what the inner codec moves. Cancel-safety is the inner codec's: libp2p drops
    /// a stream whose read or write was cancelled, so a partial message is never reused.
    async fn read_request<T>(
        &mut self,
        protocol: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = self.bytes.clone();
        let mut io = Io {
            io,
            n: &bytes.received,
        };
        self.inner.read_request(protocol, &mut io).await
    }

    /// Counts what the inner codec moves. Cancel-safety is the inner codec's: libp2p drops
    /// a stream whose read or write was cancelled, so a partial message is never reused.
    async fn read_response<T>(
        &mut self,
        protocol: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = self.bytes.clone();
        let mut io = Io {
            io,
            n: &bytes.received,
        };
        self.inner.read_response(protocol, &mut io).await
    }

    /// Counts what the inner codec moves. Cancel-safety is the inner codec's: libp2p drops
    /// a stream whose read or write was cancelled, so a partial message is never reused.
    async fn write_request<T>(
        &mut self,
        protocol: &Self::Protocol,
        io: &mut T,
        req: Self::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = self.bytes.clone();
        let mut io = Io { io, n: &bytes.sent };
        self.inner.write_request(protocol, &mut io, req).await
    }

    /// Counts what the inner codec moves. Cancel-safety is the inner codec's: libp2p drops
    /// a stream whose read or write was cancelled, so a partial message is never reused.
    async fn write_response<T>(
        &mut self,
        protocol: &Self::Protocol,
        io: &mut T,
        res: Self::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = self.bytes.clone();
        let mut io = Io { io, n: &bytes.sent };
        self.inner.write_response(protocol, &mut io, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::cbor;
    use libp2p::StreamProtocol;

    /// What goes through the codec is counted, once, on the side that moved it.
    #[test]
    fn counts_what_it_reads_and_writes() {
        futures::executor::block_on(async {
            let bytes = Arc::new(ControlBytes::default());
            let mut c = Counted {
                inner: cbor::codec::Codec::<Vec<u32>, String>::default(),
                bytes: bytes.clone(),
            };
            let proto = StreamProtocol::new("/test/1");
            let mut w = futures::io::Cursor::new(Vec::new());
            c.write_request(&proto, &mut w, vec![1, 2, 3])
                .await
                .unwrap();
            let wrote = w.get_ref().len() as u64;
            assert!(wrote > 0);
            assert_eq!(bytes.sent.load(Ordering::Relaxed), wrote);
            let mut r = futures::io::Cursor::new(w.into_inner());
            assert_eq!(c.read_request(&proto, &mut r).await.unwrap(), vec![1, 2, 3]);
            assert_eq!(bytes.received.load(Ordering::Relaxed), wrote);
            assert_eq!(bytes.sent.load(Ordering::Relaxed), wrote);
        });
    }
}
