//! The `bulk` mode: one connection moving many bytes, to measure what
//! the server spends per byte encrypted and decrypted.
//!
//! Sending and receiving run at once on the two halves of the stream, so
//! an echoing upstream never waits on a full socket buffer. Each read or
//! write must make progress within `--timeout`; the whole transfer must
//! end by `--max-seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{timeout, timeout_at};
use tokio_rustls::TlsConnector;

use crate::conn::{self, Failure, Step, Stream};
use crate::tally::{round, Tally};
use crate::Run;

/// The length of the repeating pattern that is sent. A prime, so that
/// neither TLS records nor socket buffers line up with its period and a
/// misplaced chunk shows up as a mismatch.
pub const PATTERN_LEN: usize = 65_521;

/// Bytes handed to the stream per write, and room for one read.
const CHUNK: usize = 64 * 1024;

pub async fn bulk(run: Arc<Run>, config: Arc<ClientConfig>) -> Map<String, Value> {
    let options = &run.options;
    let connector = TlsConnector::from(config);
    let mut tally = Tally::default();
    let started = Instant::now();
    tally.attempted = 1;

    let (mut stream, handshake) = match conn::open(&run.target, &connector).await {
        Ok(opened) => opened,
        Err(failure) => {
            tally.fail(&failure);
            return tally.report(1, started.elapsed());
        }
    };
    tally.handshake(&handshake);

    let pattern = pattern();
    let outcome = transfer(&run, &mut stream, &pattern).await;
    if outcome.is_ok() {
        conn::close(&mut stream, run.target.step_timeout).await;
    }
    drop(stream);

    let (upload, download) = match outcome {
        Ok(Moved {
            upload,
            download,
            request,
        }) => {
            tally.moved(conn::Moved {
                sent: options.upload + request,
                received: options.download,
            });
            if handshake.kind == Some(rustls::HandshakeKind::Resumed) {
                tally.fail(&Failure::Resumed);
            } else {
                tally.success(handshake.elapsed, started.elapsed());
            }
            (upload, download)
        }
        Err(failure) => {
            tally.fail(&failure);
            (None, None)
        }
    };

    let mut report = tally.report(1, started.elapsed());
    report.insert("upload".into(), direction(options.upload, upload));
    let mut down = direction(options.download, download);
    if let Value::Object(fields) = &mut down {
        // Only an echo can be checked: other bytes are the upstream's own.
        let verified = options.echo && download.is_some();
        fields.insert("verified".into(), json!(verified));
    }
    report.insert("download".into(), down);
    report
}

/// Seconds each direction took, from the end of the handshake.
struct Moved {
    upload: Option<Duration>,
    download: Option<Duration>,
    request: u64,
}

async fn transfer(run: &Run, stream: &mut Stream, pattern: &[u8]) -> Result<Moved, Failure> {
    let options = &run.options;
    let step = run.target.step_timeout;

    // A request first, when one is given: it may be what asks a source
    // upstream for the bytes to download.
    let request = options.request.as_deref().unwrap_or_default();
    if !request.is_empty() {
        conn::send(stream, request, step).await?;
    }

    let started = Instant::now();
    let (reader, writer) = tokio::io::split(&mut *stream);
    let both = async {
        tokio::try_join!(
            upload(writer, options.upload, pattern, step, started),
            download(
                reader,
                options.download,
                options.echo,
                pattern,
                step,
                started
            ),
        )
    };
    let (upload, download) = timeout_at(run.deadline.into(), both)
        .await
        .map_err(|_| Failure::Deadline)??;
    Ok(Moved {
        upload,
        download,
        request: request.len() as u64,
    })
}

async fn upload(
    mut writer: WriteHalf<&mut Stream>,
    total: u64,
    pattern: &[u8],
    step: Duration,
    started: Instant,
) -> Result<Option<Duration>, Failure> {
    if total == 0 {
        return Ok(None);
    }
    let mut sent = 0u64;
    while sent < total {
        let at = (sent % PATTERN_LEN as u64) as usize;
        let left = usize::try_from(total - sent).unwrap_or(usize::MAX);
        let end = pattern.len().min(at + CHUNK.min(left));
        let n = timeout(step, writer.write(&pattern[at..end]))
            .await
            .map_err(|_| Failure::Timeout(Step::Write))?
            .map_err(Failure::Write)?;
        if n == 0 {
            return Err(Failure::Write(std::io::ErrorKind::WriteZero.into()));
        }
        sent += n as u64;
    }
    timeout(step, writer.flush())
        .await
        .map_err(|_| Failure::Timeout(Step::Write))?
        .map_err(Failure::Write)?;
    Ok(Some(started.elapsed()))
}

async fn download(
    mut reader: ReadHalf<&mut Stream>,
    total: u64,
    echo: bool,
    pattern: &[u8],
    step: Duration,
    started: Instant,
) -> Result<Option<Duration>, Failure> {
    if total == 0 {
        return Ok(None);
    }
    let mut buffer = vec![0; CHUNK];
    let mut received = 0u64;
    while received < total {
        let room = buffer
            .len()
            .min(usize::try_from(total - received).unwrap_or(usize::MAX));
        let n = match timeout(step, reader.read(&mut buffer[..room])).await {
            Err(_) => return Err(Failure::Timeout(Step::Read)),
            Ok(Ok(0)) => {
                return Err(Failure::ShortRead {
                    got: received,
                    wanted: total,
                })
            }
            Ok(Ok(n)) => n,
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failure::Truncated)
            }
            Ok(Err(err)) => return Err(Failure::Read(err)),
        };
        if echo {
            if let Some(offset) = mismatch(pattern, received, &buffer[..n]) {
                return Err(Failure::WrongReply(format!(
                    "echo differs from what was sent at byte {offset}"
                )));
            }
        }
        received += n as u64;
    }
    Ok(Some(started.elapsed()))
}

/// Where `chunk`, read at `offset` of the stream, first differs from the
/// pattern; `None` when it matches.
pub fn mismatch(pattern: &[u8], offset: u64, chunk: &[u8]) -> Option<u64> {
    let mut at = (offset % PATTERN_LEN as u64) as usize;
    let mut checked = 0;
    while checked < chunk.len() {
        let len = (pattern.len() - at).min(chunk.len() - checked);
        let got = &chunk[checked..checked + len];
        if let Some(i) = got
            .iter()
            .zip(&pattern[at..at + len])
            .position(|(a, b)| a != b)
        {
            return Some(offset + (checked + i) as u64);
        }
        checked += len;
        at = 0;
    }
    None
}

/// A fixed run of bytes from xorshift32: anything but a repeated byte,
/// so a shifted or stale chunk cannot pass for the right one.
pub fn pattern() -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..PATTERN_LEN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

fn direction(bytes: u64, seconds: Option<Duration>) -> Value {
    let Some(seconds) = seconds else {
        return json!({"bytes": bytes, "seconds": null, "mib_per_second": null});
    };
    let seconds = seconds.as_secs_f64();
    let rate = if seconds > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / seconds
    } else {
        0.0
    };
    json!({
        "bytes": bytes,
        "seconds": round(seconds, 6),
        "mib_per_second": round(rate, 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_finds_the_first_wrong_byte_across_the_wrap() {
        let pattern = pattern();
        let offset = (PATTERN_LEN - 3) as u64;
        let mut chunk: Vec<u8> = pattern[PATTERN_LEN - 3..].to_vec();
        chunk.extend_from_slice(&pattern[..10]);
        assert_eq!(mismatch(&pattern, offset, &chunk), None);
        chunk[7] ^= 1;
        assert_eq!(mismatch(&pattern, offset, &chunk), Some(offset + 7));
        // A long stream of the pattern, checked at a later lap.
        assert_eq!(mismatch(&pattern, 3 * PATTERN_LEN as u64, &pattern), None);
    }

    #[test]
    fn pattern_is_not_trivial() {
        let pattern = pattern();
        let distinct: std::collections::BTreeSet<u8> = pattern.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_ne!(pattern[..16], pattern[16..32]);
    }
}
