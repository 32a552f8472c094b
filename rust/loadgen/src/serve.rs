//! The `serve` mode: a plain TCP upstream for the benchmarks, fast enough
//! that the proxy under test, not the upstream, is what a run measures.
//!
//! The first line of each connection says what the connection is for:
//!
//! - `SINK <n>`: the next n bytes must be the fixed pattern of `bulk`;
//!   once all have arrived the reply is `OK <n>` and a newline. A wrong
//!   byte, or the end of the stream before n, closes without a reply, so
//!   the client's read of the reply comes up short.
//! - `SOURCE <n>`: n bytes of the pattern are sent, then the end of the
//!   stream.
//! - `ECHO`: everything after the line is sent back until the end of the
//!   stream.
//! - any other line: the reply is `OK ` followed by the line (newline
//!   included), then the end of the stream.
//!
//! After its reply the server shuts its sending side and reads until the
//! peer closes, so bytes still unread never turn the close into a reset.
//! Every read and write must make progress within `--timeout`; the server
//! stops accepting and writes its report after `--max-seconds`, or at
//! SIGTERM or SIGINT.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::timeout;

use crate::args::ServeOptions;
use crate::bulk::{mismatch, pattern, PATTERN_LEN};
use crate::tally::round;

/// The longest first line; a longer one is a bad request.
const MAX_LINE: usize = 4096;

/// Room for one read, and the most handed to one write.
const CHUNK: usize = 64 * 1024;

/// What the connections did, shared by their tasks.
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    line: AtomicU64,
    sink: AtomicU64,
    source: AtomicU64,
    echo: AtomicU64,
    /// Closed before a whole first line arrived.
    empty: AtomicU64,
    bad_request: AtomicU64,
    sink_mismatch: AtomicU64,
    sink_short: AtomicU64,
    timeout: AtomicU64,
    io_error: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Why a connection ended early.
enum Trouble {
    Timeout,
    Io,
    /// Counted already, under its own name.
    Counted,
}

impl From<io::Error> for Trouble {
    fn from(_: io::Error) -> Self {
        Self::Io
    }
}

/// One connection with its limit per step and what all connections share.
struct Conn {
    tcp: TcpStream,
    step: Duration,
    counts: Arc<Counts>,
    pattern: Arc<[u8]>,
}

/// Binds, says where on stderr, serves until the deadline or a signal,
/// and returns the report.
pub async fn serve(options: &ServeOptions) -> Result<Map<String, Value>, String> {
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", options.listen))?;
    let bound = listener
        .local_addr()
        .map_err(|err| format!("cannot read the bound address: {err}"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|err| format!("SIGTERM handler: {err}"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|err| format!("SIGINT handler: {err}"))?;

    // The benchmark reads this line to learn the port.
    let _ = writeln!(io::stderr(), "serve: listening on {bound}");

    let counts = Arc::new(Counts::default());
    let pattern: Arc<[u8]> = pattern().into();
    let started = Instant::now();
    let deadline = tokio::time::sleep(options.max_seconds);
    tokio::pin!(deadline);

    let stopped_by = loop {
        tokio::select! {
            () = &mut deadline => break "deadline",
            _ = terminate.recv() => break "signal",
            _ = interrupt.recv() => break "signal",
            accepted = listener.accept() => {
                // Out of descriptors or a connection reset while queued:
                // that one is lost, the server goes on.
                let Ok((tcp, _)) = accepted else { continue };
                bump(&counts.accepted, 1);
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handle(Conn {
                    tcp,
                    step: options.timeout,
                    counts: Arc::clone(&counts),
                    pattern: Arc::clone(&pattern),
                }));
            }
        }
    };

    Ok(report(bound, &counts, started.elapsed(), stopped_by))
}

async fn handle(mut conn: Conn) {
    match serve_one(&mut conn).await {
        Ok(()) | Err(Trouble::Counted) => {}
        Err(Trouble::Timeout) => bump(&conn.counts.timeout, 1),
        Err(Trouble::Io) => bump(&conn.counts.io_error, 1),
    }
}

async fn serve_one(conn: &mut Conn) -> Result<(), Trouble> {
    let mut buffer = vec![0; CHUNK];
    let Some((line, body)) = first_line(conn, &mut buffer).await? else {
        return Ok(());
    };
    let word = String::from_utf8_lossy(&buffer[..line]);
    let word = word.trim_end();
    let body = line + 1..line + 1 + body;

    if let Some(n) = word.strip_prefix("SINK ") {
        let n = size(conn, n)?;
        bump(&conn.counts.sink, 1);
        sink(conn, &mut buffer, body, n).await?;
        let reply = format!("OK {n}\n");
        write(conn, reply.as_bytes()).await?;
    } else if let Some(n) = word.strip_prefix("SOURCE ") {
        let n = size(conn, n)?;
        bump(&conn.counts.source, 1);
        source(conn, n).await?;
    } else if word == "ECHO" {
        bump(&conn.counts.echo, 1);
        let early = buffer[body].to_vec();
        write(conn, &early).await?;
        echo(conn, &mut buffer).await?;
    } else {
        bump(&conn.counts.line, 1);
        let mut reply = b"OK ".to_vec();
        reply.extend_from_slice(&buffer[..=line]);
        write(conn, &reply).await?;
    }
    finish(conn, &mut buffer).await
}

/// Reads until the first newline. Returns where it is and how many bytes
/// after it were read with it; `None` when the stream ended first.
async fn first_line(conn: &mut Conn, buffer: &mut [u8]) -> Result<Option<(usize, usize)>, Trouble> {
    let mut filled = 0;
    loop {
        let n = read(conn, &mut buffer[filled..MAX_LINE]).await?;
        if n == 0 {
            bump(&conn.counts.empty, 1);
            return Ok(None);
        }
        let start = filled;
        filled += n;
        if let Some(at) = buffer[start..filled].iter().position(|&b| b == b'\n') {
            let line = start + at;
            return Ok(Some((line, filled - line - 1)));
        }
        if filled == MAX_LINE {
            bump(&conn.counts.bad_request, 1);
            return Err(Trouble::Counted);
        }
    }
}

fn size(conn: &Conn, text: &str) -> Result<u64, Trouble> {
    text.trim().parse().map_err(|_| {
        bump(&conn.counts.bad_request, 1);
        Trouble::Counted
    })
}

/// Reads `total` bytes, the first of them already in `buffer[early]`,
/// and checks each against the pattern.
async fn sink(
    conn: &mut Conn,
    buffer: &mut [u8],
    early: std::ops::Range<usize>,
    total: u64,
) -> Result<(), Trouble> {
    let mut received = 0u64;
    let mut chunk = early;
    loop {
        let len = chunk.len() as u64;
        if received + len > total || mismatch(&conn.pattern, received, &buffer[chunk]).is_some() {
            bump(&conn.counts.sink_mismatch, 1);
            return Err(Trouble::Counted);
        }
        received += len;
        if received == total {
            return Ok(());
        }
        let room = CHUNK.min(usize::try_from(total - received).unwrap_or(CHUNK));
        let n = read(conn, &mut buffer[..room]).await?;
        if n == 0 {
            bump(&conn.counts.sink_short, 1);
            return Err(Trouble::Counted);
        }
        chunk = 0..n;
    }
}

/// Sends `total` bytes of the pattern.
async fn source(conn: &mut Conn, total: u64) -> Result<(), Trouble> {
    let mut sent = 0u64;
    while sent < total {
        let at = (sent % PATTERN_LEN as u64) as usize;
        let left = usize::try_from(total - sent).unwrap_or(usize::MAX);
        let end = conn.pattern.len().min(at + CHUNK.min(left));
        let n = timeout(conn.step, conn.tcp.write(&conn.pattern[at..end]))
            .await
            .map_err(|_| Trouble::Timeout)??;
        if n == 0 {
            return Err(Trouble::Io);
        }
        bump(&conn.counts.sent, n as u64);
        sent += n as u64;
    }
    Ok(())
}

/// Sends back what arrives until the end of the stream. One read is
/// written before the next, so a fast client cannot make this hold more.
async fn echo(conn: &mut Conn, buffer: &mut [u8]) -> Result<(), Trouble> {
    loop {
        let n = read(conn, buffer).await?;
        if n == 0 {
            return Ok(());
        }
        let data = buffer[..n].to_vec();
        write(conn, &data).await?;
    }
}

/// Ends the stream, then reads to the peer's end before dropping: closing
/// with unread bytes would send a reset instead of a FIN.
async fn finish(conn: &mut Conn, buffer: &mut [u8]) -> Result<(), Trouble> {
    timeout(conn.step, conn.tcp.shutdown())
        .await
        .map_err(|_| Trouble::Timeout)??;
    while read(conn, buffer).await? > 0 {}
    Ok(())
}

async fn read(conn: &mut Conn, buffer: &mut [u8]) -> Result<usize, Trouble> {
    let n = timeout(conn.step, conn.tcp.read(buffer))
        .await
        .map_err(|_| Trouble::Timeout)??;
    bump(&conn.counts.received, n as u64);
    Ok(n)
}

async fn write(conn: &mut Conn, data: &[u8]) -> Result<(), Trouble> {
    timeout(conn.step, conn.tcp.write_all(data))
        .await
        .map_err(|_| Trouble::Timeout)??;
    bump(&conn.counts.sent, data.len() as u64);
    Ok(())
}

fn report(
    bound: SocketAddr,
    counts: &Counts,
    elapsed: Duration,
    stopped_by: &str,
) -> Map<String, Value> {
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let mut out = Map::new();
    out.insert("mode".into(), json!("serve"));
    out.insert("listen".into(), json!(bound.to_string()));
    out.insert("stopped_by".into(), json!(stopped_by));
    out.insert(
        "elapsed_seconds".into(),
        json!(round(elapsed.as_secs_f64(), 6)),
    );
    out.insert(
        "connections".into(),
        json!({
            "accepted": get(&counts.accepted),
            "line": get(&counts.line),
            "sink": get(&counts.sink),
            "source": get(&counts.source),
            "echo": get(&counts.echo),
            "empty": get(&counts.empty),
        }),
    );
    out.insert(
        "failures".into(),
        json!({
            "bad_request": get(&counts.bad_request),
            "sink_mismatch": get(&counts.sink_mismatch),
            "sink_short": get(&counts.sink_short),
            "timeout": get(&counts.timeout),
            "io_error": get(&counts.io_error),
        }),
    );
    out.insert(
        "bytes".into(),
        json!({"received": get(&counts.received), "sent": get(&counts.sent)}),
    );
    out
}
