//! Counting what the connections did, lane by lane, and turning the sum
//! into the report's JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls::HandshakeKind;
use serde_json::{json, Map, Value};

use crate::conn::{Failure, Handshake, Moved};

/// Distinct failure texts kept in `failure_details`; the rest are counted
/// under "other", so a run of odd errors cannot grow the report without
/// bound.
const MAX_DETAILS: usize = 32;

/// The outcome of a set of connections. Each lane keeps its own and the
/// run adds them up at the end, so no lock sits in the connection path.
#[derive(Default)]
pub struct Tally {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    failures: BTreeMap<&'static str, u64>,
    details: BTreeMap<String, u64>,
    handshakes: BTreeMap<&'static str, u64>,
    versions: BTreeMap<String, u64>,
    suites: BTreeMap<String, u64>,
    groups: BTreeMap<String, u64>,
    pub moved: Moved,
    /// Microseconds, of successful connections only.
    handshake_us: Vec<u64>,
    connection_us: Vec<u64>,
}

impl Tally {
    /// Notes what a finished handshake negotiated; called whether or not
    /// the connection goes on to succeed.
    pub fn handshake(&mut self, handshake: &Handshake) {
        let kind = match handshake.kind {
            Some(HandshakeKind::Full) => "full",
            Some(HandshakeKind::FullWithHelloRetryRequest) => "full_with_hello_retry",
            Some(HandshakeKind::Resumed) => "resumed",
            None => "unknown",
        };
        bump(&mut self.handshakes, kind);
        bump_name(&mut self.versions, handshake.version.as_ref());
        bump_name(&mut self.suites, handshake.suite.as_ref());
        bump_name(&mut self.groups, handshake.group.as_ref());
    }

    pub fn moved(&mut self, moved: Moved) {
        self.moved.sent += moved.sent;
        self.moved.received += moved.received;
    }

    pub fn success(&mut self, handshake: Duration, connection: Duration) {
        self.ok += 1;
        self.handshake_us.push(micros(handshake));
        self.connection_us.push(micros(connection));
    }

    pub fn fail(&mut self, failure: &Failure) {
        self.failed += 1;
        bump(&mut self.failures, failure.kind());
        let text = failure.to_string();
        if self.details.len() < MAX_DETAILS || self.details.contains_key(&text) {
            *self.details.entry(text).or_default() += 1;
        } else {
            *self.details.entry("other".to_owned()).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        self.failed += other.failed;
        for (kind, n) in other.failures {
            *self.failures.entry(kind).or_default() += n;
        }
        for (text, n) in other.details {
            if self.details.len() < MAX_DETAILS || self.details.contains_key(&text) {
                *self.details.entry(text).or_default() += n;
            } else {
                *self.details.entry("other".to_owned()).or_default() += n;
            }
        }
        for (kind, n) in other.handshakes {
            *self.handshakes.entry(kind).or_default() += n;
        }
        for (mine, theirs) in [
            (&mut self.versions, other.versions),
            (&mut self.suites, other.suites),
            (&mut self.groups, other.groups),
        ] {
            for (name, n) in theirs {
                *mine.entry(name).or_default() += n;
            }
        }
        self.moved(other.moved);
        self.handshake_us.extend(other.handshake_us);
        self.connection_us.extend(other.connection_us);
    }

    pub fn resumed(&self) -> u64 {
        self.handshakes.get("resumed").copied().unwrap_or(0)
    }

    /// The report's fields for this set of connections. `requested` is
    /// what the command line asked for; `elapsed` the wall time they took.
    pub fn report(&mut self, requested: u64, elapsed: Duration) -> Map<String, Value> {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 {
            self.ok as f64 / seconds
        } else {
            0.0
        };
        let mut out = Map::new();
        out.insert(
            "connections".into(),
            json!({
                "requested": requested,
                "attempted": self.attempted,
                "ok": self.ok,
                "failed": self.failed,
            }),
        );
        out.insert("failures".into(), json!(self.failures));
        out.insert("failure_details".into(), json!(self.details));
        out.insert("handshakes".into(), json!(self.handshakes));
        out.insert("resumed".into(), json!(self.resumed()));
        out.insert("protocol_versions".into(), json!(self.versions));
        out.insert("cipher_suites".into(), json!(self.suites));
        out.insert("key_exchange_groups".into(), json!(self.groups));
        out.insert("elapsed_seconds".into(), json!(round(seconds, 6)));
        out.insert("connections_per_second".into(), json!(round(per_second, 1)));
        out.insert(
            "bytes".into(),
            json!({"sent": self.moved.sent, "received": self.moved.received}),
        );
        out.insert(
            "latency_ms".into(),
            json!({
                "handshake": summary(&mut self.handshake_us),
                "connection": summary(&mut self.connection_us),
            }),
        );
        out
    }
}

fn bump(counts: &mut BTreeMap<&'static str, u64>, key: &'static str) {
    *counts.entry(key).or_default() += 1;
}

/// Counts a rustls enum under its Debug name (`TLSv1_3`, `X25519`).
fn bump_name(counts: &mut BTreeMap<String, u64>, value: Option<&impl std::fmt::Debug>) {
    let name = value.map_or_else(|| "none".to_owned(), |value| format!("{value:?}"));
    *counts.entry(name).or_default() += 1;
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Median, 90th and 99th percentile and maximum, in milliseconds; null
/// when nothing was measured.
fn summary(samples: &mut [u64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort_unstable();
    let at = |share: f64| {
        // The nearest-rank percentile: the smallest sample with at least
        // `share` of all samples at or below it.
        let rank = (share * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    json!({
        "p50": round(at(0.50), 3),
        "p90": round(at(0.90), 3),
        "p99": round(at(0.99), 3),
        "max": round(at(1.0), 3),
    })
}

/// Rounds for the report: more digits than this are noise.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        let got = summary(&mut samples);
        assert_eq!(
            got,
            json!({"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0})
        );
        assert_eq!(
            summary(&mut [7000]),
            json!({"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0})
        );
        assert_eq!(summary(&mut []), Value::Null);
    }

    #[test]
    fn failure_details_are_bounded() {
        let mut tally = Tally::default();
        for n in 0..(MAX_DETAILS + 5) {
            tally.fail(&Failure::WrongReply(format!("reply {n}")));
        }
        tally.fail(&Failure::WrongReply("reply 0".into()));
        assert_eq!(tally.details.len(), MAX_DETAILS + 1);
        assert_eq!(tally.details["other"], 5);
        assert_eq!(tally.details["wrong_reply: reply 0"], 2);
        assert_eq!(tally.failures["wrong_reply"], MAX_DETAILS as u64 + 6);
    }

    #[test]
    fn lanes_add_up() {
        let mut one = Tally {
            attempted: 2,
            ..Tally::default()
        };
        one.success(Duration::from_millis(1), Duration::from_millis(2));
        one.fail(&Failure::Resumed);
        let mut two = Tally {
            attempted: 1,
            ..Tally::default()
        };
        two.fail(&Failure::Resumed);
        one.merge(two);
        let report = one.report(3, Duration::from_secs(1));
        assert_eq!(
            report["connections"],
            json!({"requested": 3, "attempted": 3, "ok": 1, "failed": 2})
        );
        assert_eq!(report["failures"], json!({"resumed_when_it_must_not": 2}));
        assert_eq!(report["connections_per_second"], json!(1.0));
    }
}
