//! The server side of a TLS connection, written for a relay.
//!
//! Unlike a general-purpose TLS stream, this one writes records to the
//! socket only when it is flushed (or its buffer is full). The relay
//! flushes when its source has nothing more to give, so what becomes
//! ready together leaves together: a reply and the close_notify after it,
//! or several upstream reads in one segment. Every segment saved is a
//! trip through the TCP stack.
//!
//! The session ticket is not held back for the first reply, although it
//! could ride with it: a client using Nagle's algorithm (the socket
//! default) sends its request only once its Finished is acknowledged, and
//! without a segment to carry that acknowledgement the delayed ACK costs
//! it 40 ms.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Accepted, Acceptor};
use rustls::{ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plaintext bytes buffered before `poll_write` starts writing on its own
/// (a bulk transfer still streams; a reply waits for the flush).
const WRITE_THROUGH: usize = 32 * 1024;

/// Reads the ClientHello, and nothing more: no crypto has run yet when
/// this returns, so callers may decide what a handshake may cost.
pub async fn read_client_hello(tcp: &TcpStream) -> io::Result<Accepted> {
    let mut acceptor = Acceptor::default();
    loop {
        tcp.readable().await?;
        match acceptor.read_tls(&mut SocketReader(tcp)) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted),
            Ok(None) => {}
            Err((error, mut alert)) => {
                // Best effort: the peer is told why, if its socket takes it.
                let _ = alert.write(&mut SocketWriter(tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
        }
    }
}

/// A TLS connection over TCP; see the module documentation.
pub struct TlsConn {
    tcp: TcpStream,
    session: ServerConnection,
    /// The socket reached end of stream.
    tcp_eof: bool,
    /// Plaintext handed to rustls since the socket last took everything.
    unflushed: usize,
}

impl TlsConn {
    /// Completes the handshake that `accepted` began, under `config`.
    pub async fn handshake(
        tcp: TcpStream,
        accepted: Accepted,
        config: Arc<ServerConfig>,
    ) -> io::Result<Self> {
        let session = match accepted.into_connection(config) {
            Ok(session) => session,
            Err((error, mut alert)) => {
                let _ = alert.write(&mut SocketWriter(&tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
        };
        let mut conn = Self {
            tcp,
            session,
            tcp_eof: false,
            unflushed: 0,
        };
        std::future::poll_fn(|cx| conn.poll_handshake(cx)).await?;
        Ok(conn)
    }

    /// The rustls session, for what the handshake established.
    pub fn session(&self) -> &ServerConnection {
        &self.session
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.session.is_handshaking() {
                if self.session.wants_write() {
                    ready!(self.poll_write_tls(cx))?;
                    continue;
                }
            } else {
                // TLS 1.2 ends with the server's Finished; TLS 1.3 with the
                // session ticket (see the module documentation).
                ready!(self.poll_write_tls(cx))?;
                return Poll::Ready(Ok(()));
            }
            if self.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the handshake",
                )));
            }
            ready!(self.poll_read_tls(cx))?;
        }
    }

    /// Reads from the socket into rustls and processes what arrived.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.session.read_tls(&mut SocketReader(&self.tcp)) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => break,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        if let Err(error) = self.session.process_new_packets() {
            // rustls queued an alert saying why; send it if the socket
            // takes it now, then give up on the connection.
            let _ = self.session.write_tls(&mut SocketWriter(&self.tcp));
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
        }
        Poll::Ready(Ok(()))
    }

    /// Writes buffered records to the socket until rustls has none left.
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.session.write_tls(&mut SocketWriter(&self.tcp)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        self.unflushed = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.session.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    // n == 0 is a clean close_notify.
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // End of TCP stream without close_notify (UnexpectedEof).
                Err(err) => return Poll::Ready(Err(err)),
            }
            if this.tcp_eof {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            ready!(this.poll_read_tls(cx))?;
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let written = this.session.writer().write(buf)?;
            if written > 0 {
                this.unflushed += written;
                // Past a threshold, start writing without waiting for the
                // flush, so a bulk transfer streams; a short reply waits.
                if this.unflushed >= WRITE_THROUGH {
                    if let Poll::Ready(Err(err)) = this.poll_write_tls(cx) {
                        return Poll::Ready(Err(err));
                    }
                }
                return Poll::Ready(Ok(written));
            }
            // rustls' buffer is full: the socket must take some first.
            ready!(this.poll_write_tls(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_tls(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.session.send_close_notify();
        ready!(this.poll_write_tls(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// `io::Read` over a non-blocking tokio socket (WouldBlock when empty).
struct SocketReader<'a>(&'a TcpStream);

impl Read for SocketReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// `io::Write` over a non-blocking tokio socket (WouldBlock when full).
struct SocketWriter<'a>(&'a TcpStream);

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
