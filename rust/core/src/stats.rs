//! A worker's counters. Connection tasks bump them; the worker's control
//! loop sends a snapshot to the supervisor, which owns the metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Upper bounds, in microseconds, of the handshake duration histogram.
pub const HANDSHAKE_BUCKETS_US: [u64; 10] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

/// Every counter a worker keeps. Relaxed atomics: each counter is only
/// ever read as a snapshot, never used to order other memory.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub accept_errors: AtomicU64,
    pub handshakes_tls12: AtomicU64,
    pub handshakes_tls13: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    pub handshake_errors: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub handshake_us_sum: AtomicU64,
    pub handshake_us_buckets: [AtomicU64; HANDSHAKE_BUCKETS_US.len() + 1],
    pub open_connections: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub relay_errors: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

/// A point-in-time copy of [`Stats`], serialised into the Stats frame.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub accepted: u64,
    pub accept_errors: u64,
    pub handshakes_tls12: u64,
    pub handshakes_tls13: u64,
    pub handshakes_resumed: u64,
    pub handshake_errors: u64,
    pub handshake_timeouts: u64,
    pub handshake_us_sum: u64,
    pub handshake_us_buckets: Vec<u64>,
    pub open_connections: u64,
    pub upstream_connect_errors: u64,
    pub relay_errors: u64,
    pub idle_timeouts: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Records one finished handshake's duration.
    pub fn observe_handshake(&self, micros: u64) {
        Self::add(&self.handshake_us_sum, micros);
        let bucket = HANDSHAKE_BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(HANDSHAKE_BUCKETS_US.len());
        Self::bump(&self.handshake_us_buckets[bucket]);
    }

    /// The value of a handshake step that finished in time, or `None`
    /// after counting why it did not (an error or the deadline).
    pub fn handshake_step<T>(
        &self,
        step: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match step {
            Ok(Ok(value)) => Some(value),
            Ok(Err(_)) => {
                Self::bump(&self.handshake_errors);
                None
            }
            Err(_) => {
                Self::bump(&self.handshake_timeouts);
                None
            }
        }
    }

    /// Counts how a relay ended: idle too long, or broken (a reset, a
    /// failed write) rather than closed by both sides.
    pub fn count_relay_end(&self, outcome: &std::io::Result<()>) {
        match outcome {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                Self::bump(&self.idle_timeouts);
            }
            Err(_) => Self::bump(&self.relay_errors),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |counter: &AtomicU64| counter.load(Relaxed);
        Snapshot {
            accepted: get(&self.accepted),
            accept_errors: get(&self.accept_errors),
            handshakes_tls12: get(&self.handshakes_tls12),
            handshakes_tls13: get(&self.handshakes_tls13),
            handshakes_resumed: get(&self.handshakes_resumed),
            handshake_errors: get(&self.handshake_errors),
            handshake_timeouts: get(&self.handshake_timeouts),
            handshake_us_sum: get(&self.handshake_us_sum),
            handshake_us_buckets: self.handshake_us_buckets.iter().map(get).collect(),
            open_connections: get(&self.open_connections),
            upstream_connect_errors: get(&self.upstream_connect_errors),
            relay_errors: get(&self.relay_errors),
            idle_timeouts: get(&self.idle_timeouts),
            bytes_to_upstream: get(&self.bytes_to_upstream),
            bytes_to_client: get(&self.bytes_to_client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_durations_land_in_their_bucket() {
        let stats = Stats::default();
        stats.observe_handshake(100);
        stats.observe_handshake(250);
        stats.observe_handshake(251);
        stats.observe_handshake(u64::from(u32::MAX));
        let snap = stats.snapshot();
        assert_eq!(snap.handshake_us_buckets[0], 2);
        assert_eq!(snap.handshake_us_buckets[1], 1);
        assert_eq!(snap.handshake_us_buckets[HANDSHAKE_BUCKETS_US.len()], 1);
        assert_eq!(snap.handshake_us_sum, 100 + 250 + 251 + u64::from(u32::MAX));
    }
}
