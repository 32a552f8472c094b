//! One TLS connection, step by step: TCP connect, handshake, request,
//! reply, close. Every step has its own time limit, and every way a
//! connection can go wrong has a name ([`Failure`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{CipherSuite, HandshakeKind, NamedGroup, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub type Stream = TlsStream<TcpStream>;

/// Where every connection of a run goes, and the limit of each step.
pub struct Target {
    pub addr: SocketAddr,
    pub name: ServerName<'static>,
    pub step_timeout: Duration,
}

/// The step of a connection that ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Connect,
    Handshake,
    Write,
    Read,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Handshake => "handshake",
            Self::Write => "write",
            Self::Read => "read",
        }
    }
}

/// Why a connection counts as failed.
#[derive(Debug)]
pub enum Failure {
    /// Nothing listens on the target.
    ConnectRefused,
    /// Any other error of the TCP connect (no ports left, descriptors).
    Connect(io::Error),
    /// The TLS handshake failed; rustls' or the socket's error.
    Handshake(io::Error),
    /// A step took longer than `--timeout`.
    Timeout(Step),
    Write(io::Error),
    Read(io::Error),
    /// The peer closed TCP without a TLS close_notify alert.
    Truncated,
    /// The stream ended before the expected reply was complete.
    ShortRead {
        got: u64,
        wanted: u64,
    },
    /// The reply differs from what was expected.
    WrongReply(String),
    /// `connect` and `idle` turn resumption off, yet it resumed.
    Resumed,
    /// `resume` made a full handshake where one must resume.
    NotResumed,
    /// An idle connection the server closed while it was held.
    Closed,
    /// A bulk transfer still going when `--max-seconds` ran out.
    Deadline,
}

impl Failure {
    /// A stable name for the kind of failure, a key of the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::Connect(_) => "connect_error",
            Self::Handshake(_) => "handshake_error",
            Self::Timeout(_) => "timeout",
            Self::Write(_) => "write_error",
            Self::Read(_) => "read_error",
            Self::Truncated => "truncated",
            Self::ShortRead { .. } => "short_read",
            Self::WrongReply(_) => "wrong_reply",
            Self::Resumed => "resumed_when_it_must_not",
            Self::NotResumed => "full_when_it_must_resume",
            Self::Closed => "closed_while_idle",
            Self::Deadline => "deadline",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        match self {
            Self::Connect(err) | Self::Handshake(err) | Self::Write(err) | Self::Read(err) => {
                write!(f, ": {err}")
            }
            Self::Timeout(step) => write!(f, ": {}", step.name()),
            Self::ShortRead { got, wanted } => write!(f, ": {got} of {wanted} bytes"),
            Self::WrongReply(what) => write!(f, ": {what}"),
            Self::Truncated => f.write_str(": stream ended without close_notify"),
            _ => Ok(()),
        }
    }
}

/// What a finished handshake negotiated.
pub struct Handshake {
    pub kind: Option<HandshakeKind>,
    pub version: Option<ProtocolVersion>,
    pub suite: Option<CipherSuite>,
    pub group: Option<NamedGroup>,
    /// From the start of the TCP connect to the end of the handshake.
    pub elapsed: Duration,
}

/// Connects and completes the handshake.
pub async fn open(
    target: &Target,
    connector: &TlsConnector,
) -> Result<(Stream, Handshake), Failure> {
    let started = Instant::now();
    let tcp = timeout(target.step_timeout, TcpStream::connect(target.addr))
        .await
        .map_err(|_| Failure::Timeout(Step::Connect))?
        .map_err(|err| match err.kind() {
            io::ErrorKind::ConnectionRefused => Failure::ConnectRefused,
            _ => Failure::Connect(err),
        })?;
    // Requests and replies are small; waiting to coalesce them only adds
    // latency. A failure here changes timing, not correctness.
    let _ = tcp.set_nodelay(true);

    let handshake = connector.connect(target.name.clone(), tcp);
    let stream = timeout(target.step_timeout, handshake)
        .await
        .map_err(|_| Failure::Timeout(Step::Handshake))?
        .map_err(Failure::Handshake)?;

    let (_, tls) = stream.get_ref();
    let negotiated = Handshake {
        kind: tls.handshake_kind(),
        version: tls.protocol_version(),
        suite: tls.negotiated_cipher_suite().map(|suite| suite.suite()),
        group: tls
            .negotiated_key_exchange_group()
            .map(|group| group.name()),
        elapsed: started.elapsed(),
    };
    Ok((stream, negotiated))
}

/// What the reply to a request must look like.
pub struct Expect<'a> {
    /// Read exactly this many bytes, then stop; otherwise read to the end
    /// of the stream, which must bring at least one byte.
    pub bytes: Option<u64>,
    /// The reply must start with these bytes.
    pub prefix: Option<&'a [u8]>,
}

/// Bytes moved by one request and its reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    pub sent: u64,
    pub received: u64,
}

/// Sends `request`, reads the reply as `expect` says and closes.
pub async fn exchange(
    stream: &mut Stream,
    request: &[u8],
    expect: &Expect<'_>,
    step_timeout: Duration,
    buffer: &mut [u8],
) -> Result<Moved, Failure> {
    send(stream, request, step_timeout).await?;
    let sent = request.len() as u64;

    let (received, peer_closed) = timeout(step_timeout, read_reply(stream, expect, buffer))
        .await
        .map_err(|_| Failure::Timeout(Step::Read))??;

    // After the peer's close_notify and FIN there is nothing to say: an
    // alert written now would only meet a closed socket. When we stop
    // reading first, we close properly.
    if !peer_closed {
        close(stream, step_timeout).await;
    }
    Ok(Moved { sent, received })
}

/// Writes all of `data` and flushes it to the socket.
pub async fn send(stream: &mut Stream, data: &[u8], step_timeout: Duration) -> Result<(), Failure> {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    timeout(step_timeout, write)
        .await
        .map_err(|_| Failure::Timeout(Step::Write))?
        .map_err(Failure::Write)
}

/// Sends close_notify and shuts the socket's sending side. Best effort:
/// the connection's work is done, and a peer that already left is fine.
pub async fn close(stream: &mut Stream, step_timeout: Duration) {
    let _ = timeout(step_timeout, stream.shutdown()).await;
}

/// Returns the bytes read and whether the peer closed the stream.
async fn read_reply(
    stream: &mut Stream,
    expect: &Expect<'_>,
    buffer: &mut [u8],
) -> Result<(u64, bool), Failure> {
    let prefix = expect.prefix.unwrap_or_default();
    let mut head = Vec::with_capacity(prefix.len());
    let mut received = 0u64;
    let mut peer_closed = false;

    loop {
        let room = match expect.bytes {
            Some(wanted) if received >= wanted => break,
            Some(wanted) => buffer
                .len()
                .min(usize::try_from(wanted - received).unwrap_or(usize::MAX)),
            None => buffer.len(),
        };
        let n = match stream.read(&mut buffer[..room]).await {
            Ok(0) => {
                peer_closed = true;
                break;
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Failure::Truncated)
            }
            Err(err) => return Err(Failure::Read(err)),
        };
        let keep = n.min(prefix.len() - head.len());
        head.extend_from_slice(&buffer[..keep]);
        received += n as u64;
    }

    let wanted = expect.bytes.unwrap_or(1).max(prefix.len() as u64);
    if !prefix.starts_with(&head) {
        return Err(Failure::WrongReply(format!(
            "starts with \"{}\", not \"{}\"",
            head.escape_ascii(),
            prefix.escape_ascii()
        )));
    }
    if received < wanted {
        return Err(Failure::ShortRead {
            got: received,
            wanted,
        });
    }
    Ok((received, peer_closed))
}
