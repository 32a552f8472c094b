//! Connecting to an endpoint's upstream over TCP or a Unix socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use crate::config::Upstream;

/// An open connection to the upstream.
pub enum UpstreamStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Opens a connection, trying each address of a TCP upstream in order;
/// each attempt gets `attempt_timeout`, so one address that never answers
/// does not keep the others from being tried.
pub async fn connect(upstream: &Upstream, attempt_timeout: Duration) -> io::Result<UpstreamStream> {
    match upstream {
        Upstream::Unix(path) => {
            let stream = timeout(attempt_timeout, UnixStream::connect(path))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            Ok(UpstreamStream::Unix(stream))
        }
        Upstream::Tcp(addrs) => {
            let mut last_error = None;
            for addr in addrs {
                match timeout(attempt_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        stream.set_nodelay(true)?;
                        return Ok(UpstreamStream::Tcp(stream));
                    }
                    Ok(Err(err)) => last_error = Some(err),
                    Err(_) => last_error = Some(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(last_error.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "upstream has no address")
            }))
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Self::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
