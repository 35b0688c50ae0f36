//! An accepted TCP connection read through a buffer, for rustls.
//!
//! rustls asks its transport for 4 KiB per read (a record's worth once it
//! holds part of one). Straight on a socket that is a `recv` system call
//! each: the 600 MB mixed upload made 39 000 of them. Reading through a
//! 64 KiB buffer takes what the socket holds in one call (9 900 calls) and
//! serves rustls's small reads from memory. Writes pass through.
//!
//! It also carries the connection's admission ticket, so the place is given
//! back when the server drops the connection, and its deadline where it has
//! one (connections without a certificate, see `admission.rs`): past it,
//! every read and write fails, and the server drops the connection.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admission::Ticket;

/// Bytes read from the socket at once.
const READ_AHEAD: usize = 64 * 1024;

/// A TCP connection whose reads are buffered (see the module comment).
pub struct BufferedTcp {
    inner: BufReader<TcpStream>,
    ticket: Option<Ticket>,
    /// When the connection is closed, if it has a lifetime of its own.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl BufferedTcp {
    /// Wrap an accepted connection.
    pub fn new(tcp: TcpStream) -> Self {
        BufferedTcp {
            inner: BufReader::with_capacity(READ_AHEAD, tcp),
            ticket: None,
            deadline: None,
        }
    }

    /// Keep `ticket` (this connection's admission) until the connection is dropped.
    pub fn hold(&mut self, ticket: Ticket) {
        self.ticket = Some(ticket);
    }

    /// Fail every read and write from `age` from now on. The server always
    /// has a read pending on a live connection, and that read is woken at
    /// the deadline, so an idle connection is closed then too.
    pub fn close_after(&mut self, age: Duration) {
        self.deadline = Some(Box::pin(tokio::time::sleep(age)));
    }

    /// An error once the deadline has passed (registering the wake-up before).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let d = self.deadline.as_mut()?;
        d.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection lifetime over (connections without a certificate are short-lived)",
            )
        })
    }
}

impl AsyncRead for BufferedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for BufferedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The same connection information as a bare `TcpStream`'s, so that
/// `Request::peer_certs` finds the client certificate behind TLS.
impl Connected for BufferedTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = self.inner.get_ref();
        TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Bytes written by the peer come out whole and in order through small
    /// reads, and writes reach the peer.
    #[tokio::test]
    async fn reads_are_buffered_and_writes_pass_through() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let peer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(&sent).await?;
            let mut back = [0u8; 5];
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        });
        let (tcp, _) = listener.accept().await?;
        let mut conn = BufferedTcp::new(tcp);
        assert_eq!(
            conn.connect_info().remote_addr.map(|a| a.ip()),
            Some(addr.ip())
        );
        let mut got = vec![0u8; data.len()];
        for piece in got.chunks_mut(4096) {
            conn.read_exact(piece).await?;
        }
        assert!(got == data);
        conn.write_all(b"hello").await?;
        conn.flush().await?;
        let back = peer.await.map_err(std::io::Error::other)??;
        assert_eq!(&back, b"hello");
        Ok(())
    }

    /// A connection with a lifetime works until it ends, and then fails a
    /// read that was waiting for the peer (an idle connection is closed).
    #[tokio::test(start_paused = true)]
    async fn a_connection_past_its_lifetime_fails_reads_and_writes() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut peer = TcpStream::connect(addr).await?;
        let (tcp, _) = listener.accept().await?;
        let mut conn = BufferedTcp::new(tcp);
        conn.close_after(Duration::from_secs(30));
        peer.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await?;
        assert_eq!(&got, b"ping");
        conn.write_all(b"pong").await?;
        // Nothing more comes: the pending read ends at the deadline.
        let start = tokio::time::Instant::now();
        let e = conn
            .read(&mut got)
            .await
            .expect_err("a read past the lifetime");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_secs(29));
        let e = conn.write_all(b"late").await.expect_err("a write past it");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        Ok(())
    }
}
