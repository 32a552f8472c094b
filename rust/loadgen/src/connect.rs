//! The `connect` and `resume` modes: short connections, each a request
//! and its reply, made by `--concurrency` lanes at once.
//!
//! A lane is a task that makes one connection after another. Lanes take
//! connection numbers from one shared counter, so the run stops after
//! exactly `--connections`, or when a lane sees that `--max-seconds` has
//! passed before it starts another one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustls::{ClientConfig, HandshakeKind};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::conn::{self, Expect, Failure};
use crate::tally::Tally;
use crate::tls;
use crate::Run;

/// Room for one read of a reply.
const READ_BUFFER: usize = 16 * 1024;

/// Which handshake every connection of a phase must make.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Must {
    BeFull,
    Resume,
}

/// Full handshakes only: resumption is off in the client, and a
/// connection that resumes all the same counts as failed.
pub async fn connect(run: Arc<Run>, config: Arc<ClientConfig>) -> Map<String, Value> {
    let connector = TlsConnector::from(config);
    let lanes = vec![connector; run.options.concurrency];

    let started = Instant::now();
    let (mut tally, deadline_reached) =
        phase(&run, lanes, Must::BeFull, run.options.connections).await;
    let mut report = tally.report(run.options.connections, started.elapsed());
    report.insert("deadline_reached".into(), json!(deadline_reached));
    report
}

/// Every lane makes one full handshake to get a session ticket, then the
/// measured connections must all resume.
///
/// Each lane has its own session store: TLS 1.3 tickets are single-use,
/// each resumed connection brings the lane its next ticket, and with
/// one store per lane no lane can take another's.
pub async fn resume(run: Arc<Run>, base: Arc<ClientConfig>) -> Map<String, Value> {
    let lanes: Vec<TlsConnector> = (0..run.options.concurrency)
        .map(|_| TlsConnector::from(tls::with_sessions(&base)))
        .collect();

    // One connection per lane, so each lane has its own first ticket.
    let first = lanes.len() as u64;
    let priming = lanes
        .iter()
        .map(|lane| {
            spawn_lane(
                &run,
                lane.clone(),
                Must::BeFull,
                Arc::new(AtomicU64::new(0)),
                1,
            )
        })
        .collect();
    let started = Instant::now();
    let (mut primed, _) = join_lanes(priming).await;
    let priming_seconds = started.elapsed();

    let started = Instant::now();
    let (mut tally, deadline_reached) =
        phase(&run, lanes, Must::Resume, run.options.connections).await;
    let mut report = tally.report(run.options.connections, started.elapsed());
    report.insert("deadline_reached".into(), json!(deadline_reached));

    let priming = primed.report(first, priming_seconds);
    let keep = ["connections", "failures", "failure_details", "handshakes"];
    let priming: Map<String, Value> = priming
        .into_iter()
        .filter(|(key, _)| keep.contains(&key.as_str()))
        .collect();
    report.insert("priming".into(), Value::Object(priming));
    report
}

/// Runs one lane per connector until `total` connections are made or the
/// deadline passes; returns their sum and whether the deadline cut it.
async fn phase(run: &Arc<Run>, lanes: Vec<TlsConnector>, must: Must, total: u64) -> (Tally, bool) {
    let next = Arc::new(AtomicU64::new(0));
    let handles = lanes
        .into_iter()
        .map(|lane| spawn_lane(run, lane, must, Arc::clone(&next), total))
        .collect();
    join_lanes(handles).await
}

fn spawn_lane(
    run: &Arc<Run>,
    connector: TlsConnector,
    must: Must,
    next: Arc<AtomicU64>,
    total: u64,
) -> JoinHandle<(Tally, bool)> {
    let run = Arc::clone(run);
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let mut buffer = vec![0; READ_BUFFER];
        loop {
            if next.fetch_add(1, Ordering::Relaxed) >= total {
                return (tally, false);
            }
            if Instant::now() >= run.deadline {
                return (tally, true);
            }
            one(&run, &connector, must, &mut tally, &mut buffer).await;
        }
    })
}

async fn join_lanes(handles: Vec<JoinHandle<(Tally, bool)>>) -> (Tally, bool) {
    let mut sum = Tally::default();
    let mut deadline_reached = false;
    for handle in handles {
        match handle.await {
            Ok((tally, cut)) => {
                sum.merge(tally);
                deadline_reached |= cut;
            }
            // Lanes are never aborted, so this is a panic: pass it on.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
    (sum, deadline_reached)
}

/// One connection from connect to close, counted in `tally`.
async fn one(
    run: &Run,
    connector: &TlsConnector,
    must: Must,
    tally: &mut Tally,
    buffer: &mut [u8],
) {
    tally.attempted += 1;
    let started = Instant::now();
    let options = &run.options;

    let (mut stream, handshake) = match conn::open(&run.target, connector).await {
        Ok(opened) => opened,
        Err(failure) => return tally.fail(&failure),
    };
    tally.handshake(&handshake);

    // The request goes out even after a wrong kind of handshake: the
    // connection's life is part of what is measured, and in `resume` the
    // reply brings the lane its next ticket.
    let expect = Expect {
        bytes: options.expect_bytes,
        prefix: options.expect_prefix.as_deref(),
    };
    let exchanged = conn::exchange(
        &mut stream,
        options.request_bytes(),
        &expect,
        run.target.step_timeout,
        buffer,
    )
    .await;
    drop(stream);

    let resumed = handshake.kind == Some(HandshakeKind::Resumed);
    let outcome = match (must, resumed) {
        (Must::BeFull, true) => Err(Failure::Resumed),
        (Must::Resume, false) => Err(Failure::NotResumed),
        _ => exchanged,
    };
    match outcome {
        Ok(moved) => {
            tally.moved(moved);
            tally.success(handshake.elapsed, started.elapsed());
        }
        Err(failure) => tally.fail(&failure),
    }
}
