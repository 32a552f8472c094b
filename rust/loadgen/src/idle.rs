//! The `idle` mode: many open connections doing nothing, to measure what
//! the server keeps per connection.
//!
//! Lanes open the connections (handshake done, nothing sent), then the
//! run holds them all for `--hold-seconds`. At the end each connection is
//! checked: with `--ping` it sends a line that an echoing upstream must
//! return; without, it must not have been closed by the server meanwhile.
//! A connection counts as ok when it opened and passed its check.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, HandshakeKind};
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use crate::conn::{self, Expect, Failure, Handshake, Stream};
use crate::tally::{round, Tally};
use crate::Run;

/// An open connection waiting for the end of the hold.
struct Held {
    index: u64,
    stream: Stream,
    handshake: Handshake,
}

pub async fn idle(run: Arc<Run>, config: Arc<ClientConfig>) -> Map<String, Value> {
    let options = &run.options;
    let connector = TlsConnector::from(config);
    let started = Instant::now();

    // Open.
    let next = Arc::new(AtomicU64::new(0));
    let opening: Vec<JoinHandle<(Tally, Vec<Held>, bool)>> = (0..options.concurrency)
        .map(|_| {
            tokio::spawn(open_lane(
                Arc::clone(&run),
                connector.clone(),
                Arc::clone(&next),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    let mut held = Vec::new();
    let mut deadline_reached = false;
    for handle in opening {
        let (lane, streams, cut) = join(handle).await;
        tally.merge(lane);
        held.extend(streams);
        deadline_reached |= cut;
    }
    let opened_seconds = started.elapsed();
    let established = held.len() as u64;

    // Hold, no longer than the run may last. The line on stderr tells a
    // benchmark when to look at the server.
    let hold_until = (Instant::now() + options.hold).min(run.deadline);
    let _ = writeln!(
        std::io::stderr(),
        "idle: {established} connections established, holding them for {:.1} s",
        hold_until
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    );
    let hold_started = Instant::now();
    tokio::time::sleep_until(hold_until.into()).await;
    let held_seconds = hold_started.elapsed();

    // Check and close, spread over the same number of lanes.
    let mut shares: Vec<Vec<Held>> = (0..options.concurrency).map(|_| Vec::new()).collect();
    for (i, connection) in held.into_iter().enumerate() {
        shares[i % options.concurrency].push(connection);
    }
    let checking: Vec<JoinHandle<Tally>> = shares
        .into_iter()
        .map(|share| tokio::spawn(check_lane(Arc::clone(&run), share)))
        .collect();
    for handle in checking {
        tally.merge(join(handle).await);
    }

    let mut report = tally.report(options.connections, started.elapsed());
    // The rate is of opening, not of the whole run with its hold.
    let opening_rate = established as f64 / opened_seconds.as_secs_f64().max(1e-9);
    report.insert(
        "connections_per_second".into(),
        json!(round(opening_rate, 1)),
    );
    report.insert("established".into(), json!(established));
    report.insert("alive".into(), json!(tally.ok));
    report.insert(
        "checked_by".into(),
        json!(if options.ping { "ping" } else { "read" }),
    );
    report.insert(
        "open_seconds".into(),
        json!(round(opened_seconds.as_secs_f64(), 6)),
    );
    report.insert(
        "held_seconds".into(),
        json!(round(held_seconds.as_secs_f64(), 6)),
    );
    report.insert("deadline_reached".into(), json!(deadline_reached));
    report
}

async fn open_lane(
    run: Arc<Run>,
    connector: TlsConnector,
    next: Arc<AtomicU64>,
) -> (Tally, Vec<Held>, bool) {
    let mut tally = Tally::default();
    let mut held = Vec::new();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= run.options.connections {
            return (tally, held, false);
        }
        if Instant::now() >= run.deadline {
            return (tally, held, true);
        }
        tally.attempted += 1;
        match conn::open(&run.target, &connector).await {
            Ok((stream, handshake)) => {
                tally.handshake(&handshake);
                if handshake.kind == Some(HandshakeKind::Resumed) {
                    tally.fail(&Failure::Resumed);
                    continue;
                }
                held.push(Held {
                    index,
                    stream,
                    handshake,
                });
            }
            Err(failure) => tally.fail(&failure),
        }
    }
}

async fn check_lane(run: Arc<Run>, share: Vec<Held>) -> Tally {
    let step = run.target.step_timeout;
    let mut tally = Tally::default();
    let mut buffer = vec![0; 256];
    for mut connection in share {
        // `exchange` closes a pinged connection itself.
        let outcome = if run.options.ping {
            ping(&mut connection, step, &mut buffer).await
        } else {
            let open = still_open(&mut connection.stream, &mut buffer).await;
            conn::close(&mut connection.stream, step).await;
            open
        };
        match outcome {
            Ok(moved) => {
                tally.moved(moved);
                // The connection's time is the time to open it; the
                // hold is the same for all and says nothing.
                let opened = connection.handshake.elapsed;
                tally.success(opened, opened);
            }
            Err(failure) => tally.fail(&failure),
        }
    }
    tally
}

/// Sends a numbered line and reads it back from an echoing upstream.
async fn ping(
    connection: &mut Held,
    step: Duration,
    buffer: &mut [u8],
) -> Result<conn::Moved, Failure> {
    let line = format!("ping {:010}\n", connection.index);
    let expect = Expect {
        bytes: Some(line.len() as u64),
        prefix: Some(line.as_bytes()),
    };
    conn::exchange(
        &mut connection.stream,
        line.as_bytes(),
        &expect,
        step,
        buffer,
    )
    .await
}

/// Whether the server left the connection open: a read that would wait
/// means open; the end of the stream or an error means closed. The read
/// is polled once and never waits (a zero timeout polls its future once
/// before it looks at the clock).
///
/// The read runs outside tokio's cooperative budget: a lane checking
/// thousands of connections never yields, and once its budget is spent a
/// constrained read would report "would wait" for a closed connection.
async fn still_open(stream: &mut Stream, buffer: &mut [u8]) -> Result<conn::Moved, Failure> {
    let read = tokio::task::unconstrained(stream.read(buffer));
    match timeout(Duration::ZERO, read).await {
        Err(_) => Ok(conn::Moved::default()),
        Ok(Ok(0)) => Err(Failure::Closed),
        Ok(Ok(n)) => Ok(conn::Moved {
            sent: 0,
            received: n as u64,
        }),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => Err(Failure::Closed),
        Ok(Err(err)) => Err(Failure::Read(err)),
    }
}

async fn join<T>(handle: JoinHandle<T>) -> T {
    match handle.await {
        Ok(value) => value,
        // Lanes are never aborted, so this is a panic: pass it on.
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
