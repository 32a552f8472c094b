//! What a worker serves, as the supervisor describes it (JSON).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A worker's whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// 0-based position among the workers, for logs and stats.
    pub index: u32,
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// How often the worker reports its counters, in milliseconds.
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// How long open connections may run on after SIGTERM reaches the
    /// worker directly (systemd signals the whole group), in milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

/// One listener and where its connections go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// The certificate scope, `None` for a plaintext endpoint.
    pub scope: Option<String>,
    /// ALPN protocols offered, in order of preference.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Send a PROXY protocol v2 header to the upstream first.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// Where an endpoint's connections are relayed to.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upstream {
    /// Addresses tried in order until one accepts.
    Tcp(Vec<SocketAddr>),
    /// A Unix stream socket.
    Unix(PathBuf),
}

/// Time limits and caps; each one bounds something a peer controls.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Accept to finished handshake, absolute (not reset by progress).
    pub handshake_timeout_ms: u64,
    /// Opening the upstream connection.
    pub connect_timeout_ms: u64,
    /// No byte in either direction for this long closes the connection.
    pub idle_timeout_ms: u64,
    /// Handshakes in progress at once; later clients wait for a slot
    /// until their handshake deadline, then are closed.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            max_handshakes: 1024,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

fn default_stats_interval_ms() -> u64 {
    1000
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

impl WorkerConfig {
    /// Parses the JSON the supervisor hands to a new worker.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The scopes whose bundles must arrive before the worker may listen.
    pub fn scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = self
            .endpoints
            .iter()
            .filter_map(|endpoint| endpoint.scope.clone())
            .collect();
        scopes.sort();
        scopes.dedup();
        scopes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_supervisor_shape() {
        let text = r#"{
            "index": 1,
            "endpoints": [
                {"name": "http", "listen": "127.0.0.1:8090",
                 "upstream": {"tcp": ["127.0.0.1:8080"]}, "scope": "public",
                 "alpn": ["http/1.1"]},
                {"name": "status", "listen": "127.0.0.1:9090",
                 "upstream": {"unix": "/tmp/s.sock"}, "scope": null}
            ],
            "limits": {"handshake_timeout_ms": 500}
        }"#;
        let config = WorkerConfig::from_json(text).unwrap();
        assert_eq!(config.index, 1);
        assert_eq!(config.scopes(), vec!["public".to_owned()]);
        assert_eq!(
            config.limits.handshake_timeout(),
            Duration::from_millis(500)
        );
        assert_eq!(config.limits.max_handshakes, 1024);
        assert!(matches!(config.endpoints[1].upstream, Upstream::Unix(_)));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = r#"{"index": 0, "endpoints": [], "colour": "red"}"#;
        assert!(WorkerConfig::from_json(text).is_err());
    }
}
