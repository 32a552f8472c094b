//! A worker process: its control loop on the supervisor's pipe, its
//! listeners, and the life of every connection.
//!
//! The worker waits for a bundle for each scope it serves, starts
//! accepting on its own SO_REUSEPORT listeners, says Ready, then serves
//! until the supervisor asks it to drain or disappears.
//!
//! The supervisor creates each worker slot's listening sockets and keeps
//! them open across the worker's lifetimes: when a worker dies, the
//! connections queued on its socket wait for the replacement instead of
//! being reset, as they would be if the socket closed with the worker. Connections never wait on the control
//! loop: a new bundle is a pointer swap they pick up at their next
//! handshake.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::{EndpointConfig, Limits, WorkerConfig};
use crate::frame::{self, BundleMessage, Decoder, Frame, Kind};
use crate::relay::relay;
use crate::stats::Stats;
use crate::tickets::{SharedKeys, TicketKeys};
use crate::tls::{EndpointConfigs, ScopeTls};
use crate::tls_conn::{self, TlsConn};
use crate::{proxy, upstream};

/// The worker served and drained normally, or its supervisor is gone.
pub const EXIT_OK: i32 = 0;
/// The worker could not start (bad config, bundle refused, bind failed);
/// respawning it would fail the same way.
pub const EXIT_BOOT_FAILED: i32 = 3;
/// The pipe carried something that is not the protocol.
pub const EXIT_PROTOCOL: i32 = 4;

/// How long a new worker waits for its first bundles.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept error such as EMFILE, so a full fd table does not
/// turn the accept loop into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line per this interval for a repeated failure
/// (accept errors, an upstream that refuses).
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Runs a worker to the end and returns its exit code. `listeners` are the
/// listening sockets of the endpoints, in the order of `config.endpoints`.
pub fn run(
    config: WorkerConfig,
    pipe_in: OwnedFd,
    pipe_out: OwnedFd,
    listeners: Vec<OwnedFd>,
) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return EXIT_BOOT_FAILED,
    };
    warm_up();
    runtime.block_on(async move {
        let control = match Control::new(pipe_in, pipe_out) {
            Ok(control) => control,
            Err(_) => return EXIT_BOOT_FAILED,
        };
        control.run(config, listeners).await
    })
}

/// Seeds the random generator before the first client arrives: in a
/// freshly forked process the first draw gathers entropy and takes tens of
/// milliseconds, which would otherwise land on one client's handshake.
fn warm_up() {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut seed = [0u8; 32];
    let _ = SystemRandom::new().fill(&mut seed);
}

/// One endpoint as connections see it.
struct Endpoint {
    config: EndpointConfig,
    /// `None` for a plaintext endpoint.
    tls: Option<ArcSwap<EndpointConfigs>>,
    /// Handshakes in progress on this endpoint. Each endpoint has its
    /// own, so a flood on one cannot starve another (the status port).
    handshakes: Semaphore,
    /// Upstream connect failures, reported at most every few seconds.
    upstream_failures: RateLimitedLog,
}

/// What every connection task shares.
struct Shared {
    endpoints: Vec<Endpoint>,
    limits: Limits,
    /// Lines for the supervisor's log, rate-limited by the sender.
    log: mpsc::UnboundedSender<String>,
    stats: Stats,
}

/// The worker's side of the pipe and the state only it touches.
struct Control {
    rx: pipe::Receiver,
    tx: pipe::Sender,
    decoder: Decoder,
    read_buf: Vec<u8>,
    scopes: HashMap<String, ScopeTls>,
    ticket_keys: SharedKeys,
}

enum Outcome {
    /// Drain within this deadline, then exit.
    Drain(Duration),
    /// The supervisor is gone.
    Orphaned,
}

impl Control {
    fn new(pipe_in: OwnedFd, pipe_out: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            rx: pipe::Receiver::from_owned_fd(pipe_in)?,
            tx: pipe::Sender::from_owned_fd(pipe_out)?,
            decoder: Decoder::default(),
            read_buf: vec![0; 64 * 1024],
            scopes: HashMap::new(),
            ticket_keys: Arc::new(ArcSwap::from_pointee(TicketKeys::default())),
        })
    }

    async fn run(mut self, config: WorkerConfig, listeners: Vec<OwnedFd>) -> i32 {
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<String>();
        let shared = match self.boot(&config, log_tx.clone()).await {
            Ok(Some(shared)) => shared,
            Ok(None) => return EXIT_OK,
            Err(message) => {
                let payload = json!({ "error": message }).to_string();
                let _ = self.send(Kind::Fatal, 0, payload.as_bytes()).await;
                return EXIT_BOOT_FAILED;
            }
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accept_tasks = Vec::new();
        if listeners.len() != shared.endpoints.len() {
            let message = format!(
                "{} listening sockets for {} endpoints",
                listeners.len(),
                shared.endpoints.len()
            );
            let payload = json!({ "error": message }).to_string();
            let _ = self.send(Kind::Fatal, 0, payload.as_bytes()).await;
            return EXIT_BOOT_FAILED;
        }
        for ((index, endpoint), fd) in shared.endpoints.iter().enumerate().zip(listeners) {
            let listener = match adopt_listener(fd) {
                Ok(listener) => listener,
                Err(err) => {
                    let message = format!(
                        "cannot use the listening socket of {} (endpoint {}): {err}",
                        endpoint.config.listen, endpoint.config.name
                    );
                    let payload = json!({ "error": message }).to_string();
                    let _ = self.send(Kind::Fatal, 0, payload.as_bytes()).await;
                    return EXIT_BOOT_FAILED;
                }
            };
            accept_tasks.push(tokio::spawn(accept_loop(
                Arc::clone(&shared),
                index,
                listener,
                stop_rx.clone(),
                log_tx.clone(),
            )));
        }
        drop(log_tx);

        let acks: Vec<(String, u64, String)> = self
            .scopes
            .iter()
            .map(|(scope, tls)| (scope.clone(), tls.generation, tls.fingerprint.clone()))
            .collect();
        for (scope, generation, fingerprint) in acks {
            if self.ack(&scope, generation, &fingerprint).await.is_err() {
                return EXIT_OK;
            }
        }
        let ready = json!({ "pid": std::process::id() }).to_string();
        if self.send(Kind::Ready, 0, ready.as_bytes()).await.is_err() {
            return EXIT_OK;
        }

        let outcome = self.serve(&shared, &config, &mut log_rx).await;
        let deadline = match outcome {
            Ok(Outcome::Drain(deadline)) => deadline,
            Ok(Outcome::Orphaned) => return EXIT_OK,
            Err(code) => return code,
        };

        // Close the listeners first, so new connections are refused at
        // once, then give the open ones until the deadline.
        let _ = stop_tx.send(true);
        for task in accept_tasks {
            let _ = task.await;
        }
        let mut until = Instant::now() + deadline;
        while shared.stats.open_connections.load(Relaxed) > 0 && Instant::now() < until {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                frame = self.next_frame() => match frame {
                    // A second stop request may shorten the deadline.
                    Ok(Some(frame)) if frame.kind == Kind::Shutdown => {
                        until = until.min(Instant::now() + shutdown_deadline(&frame));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return EXIT_OK,
                },
            }
        }
        EXIT_OK
    }

    /// Waits for every scope's first bundle; `Ok(None)` when told to stop
    /// (or orphaned) before that.
    async fn boot(
        &mut self,
        config: &WorkerConfig,
        log: mpsc::UnboundedSender<String>,
    ) -> Result<Option<Arc<Shared>>, String> {
        let wanted = config.scopes();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while wanted.iter().any(|scope| !self.scopes.contains_key(scope)) {
            let frame = match timeout_at(deadline, self.next_frame()).await {
                Err(_) => return Err("no certificate bundle arrived in time".to_owned()),
                Ok(Err(err)) => return Err(format!("pipe from the supervisor: {err}")),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(frame))) => frame,
            };
            match frame.kind {
                Kind::Bundle => {
                    let message = BundleMessage::decode(&frame.payload)
                        .map_err(|err| format!("bundle frame: {err}"))?;
                    let tls = ScopeTls::build(&message, frame.generation, None)
                        .map_err(|err| format!("scope {}: {err}", message.scope))?;
                    self.scopes.insert(message.scope, tls);
                }
                Kind::TicketKeys => self.install_ticket_keys(&frame)?,
                Kind::Ping => {
                    let _ = self.send(Kind::Pong, frame.generation, b"").await;
                }
                Kind::Shutdown => return Ok(None),
                other => return Err(format!("unexpected {other:?} frame during boot")),
            }
        }

        let mut endpoints = Vec::new();
        for endpoint in &config.endpoints {
            let tls = match &endpoint.scope {
                None => None,
                Some(scope) => {
                    let configs = self.scopes[scope]
                        .endpoint_configs(&endpoint.name, &endpoint.alpn, &self.ticket_keys)
                        .map_err(|err| format!("endpoint {}: {err}", endpoint.name))?;
                    Some(ArcSwap::from_pointee(configs))
                }
            };
            endpoints.push(Endpoint {
                config: endpoint.clone(),
                tls,
                handshakes: Semaphore::new(config.limits.max_handshakes.max(1)),
                upstream_failures: RateLimitedLog::default(),
            });
        }
        Ok(Some(Arc::new(Shared {
            endpoints,
            limits: config.limits.clone(),
            log,
            stats: Stats::default(),
        })))
    }

    /// The control loop while serving.
    async fn serve(
        &mut self,
        shared: &Arc<Shared>,
        config: &WorkerConfig,
        logs: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<Outcome, i32> {
        let mut stats_tick =
            tokio::time::interval(Duration::from_millis(config.stats_interval_ms.max(10)));
        let mut sigterm = signal(SignalKind::terminate()).map_err(|_| EXIT_BOOT_FAILED)?;
        loop {
            tokio::select! {
                _ = sigterm.recv() => {
                    return Ok(Outcome::Drain(Duration::from_millis(config.drain_timeout_ms)));
                }
                frame = self.next_frame() => {
                    let frame = match frame {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return Ok(Outcome::Orphaned),
                        Err(err) => {
                            let payload = json!({ "error": err.to_string() }).to_string();
                            let _ = self.send(Kind::Fatal, 0, payload.as_bytes()).await;
                            return Err(EXIT_PROTOCOL);
                        }
                    };
                    match self.handle(shared, frame).await {
                        Ok(Some(outcome)) => return Ok(outcome),
                        Ok(None) => {}
                        Err(_) => return Ok(Outcome::Orphaned),
                    }
                }
                _ = stats_tick.tick() => {
                    let snapshot = shared.stats.snapshot();
                    let payload = serde_json::to_vec(&snapshot).unwrap_or_default();
                    if self.send(Kind::Stats, 0, &payload).await.is_err() {
                        return Ok(Outcome::Orphaned);
                    }
                }
                Some(line) = logs.recv() => {
                    let payload = json!({ "level": "warning", "message": line }).to_string();
                    if self.send(Kind::Log, 0, payload.as_bytes()).await.is_err() {
                        return Ok(Outcome::Orphaned);
                    }
                }
            }
        }
    }

    async fn handle(&mut self, shared: &Arc<Shared>, frame: Frame) -> io::Result<Option<Outcome>> {
        match frame.kind {
            Kind::Bundle => self.install(shared, &frame).await?,
            Kind::TicketKeys => {
                if let Err(error) = self.install_ticket_keys(&frame) {
                    let payload = json!({ "level": "error", "message": error }).to_string();
                    self.send(Kind::Log, 0, payload.as_bytes()).await?;
                }
            }
            Kind::Ping => self.send(Kind::Pong, frame.generation, b"").await?,
            Kind::Shutdown => return Ok(Some(Outcome::Drain(shutdown_deadline(&frame)))),
            // Frames only workers send; a supervisor never sends them.
            _ => {}
        }
        Ok(None)
    }

    /// Swaps in a new bundle for its scope, or says why not.
    async fn install(&mut self, shared: &Arc<Shared>, frame: &Frame) -> io::Result<()> {
        let built = BundleMessage::decode(&frame.payload)
            .map_err(|err| err.to_string())
            .and_then(|message| {
                let previous = self.scopes.get(&message.scope);
                let tls = ScopeTls::build(&message, frame.generation, previous)?;
                let mut configs = Vec::new();
                for endpoint in &shared.endpoints {
                    let config = &endpoint.config;
                    if config.scope.as_deref() == Some(message.scope.as_str()) {
                        let server_configs =
                            tls.endpoint_configs(&config.name, &config.alpn, &self.ticket_keys)?;
                        configs.push((endpoint, server_configs));
                    }
                }
                Ok((message.scope, tls, configs))
            });

        match built {
            Ok((scope, tls, configs)) => {
                for (endpoint, config) in configs {
                    if let Some(current) = &endpoint.tls {
                        current.store(Arc::new(config));
                    }
                }
                let fingerprint = tls.fingerprint.clone();
                self.scopes.insert(scope.clone(), tls);
                self.ack(&scope, frame.generation, &fingerprint).await
            }
            Err(error) => {
                let payload = json!({ "error": error }).to_string();
                self.send(Kind::Nack, frame.generation, payload.as_bytes())
                    .await
            }
        }
    }

    /// New session ticket keys; every endpoint's ticketer sees them at once.
    fn install_ticket_keys(&self, frame: &Frame) -> Result<(), String> {
        let keys = TicketKeys::decode(frame.generation, &frame.payload)
            .map_err(|err| format!("ticket keys: {err}"))?;
        self.ticket_keys.store(Arc::new(keys));
        Ok(())
    }

    async fn ack(&mut self, scope: &str, generation: u64, fingerprint: &str) -> io::Result<()> {
        let payload = json!({ "scope": scope, "fingerprint": fingerprint }).to_string();
        self.send(Kind::Ack, generation, payload.as_bytes()).await
    }

    /// The next frame from the supervisor; `None` when the pipe closed.
    /// Cancel-safe: bytes read are kept in the decoder.
    async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?
            {
                return Ok(Some(frame));
            }
            let n = self.rx.read(&mut self.read_buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.feed(&self.read_buf[..n]);
        }
    }

    async fn send(&mut self, kind: Kind, generation: u64, payload: &[u8]) -> io::Result<()> {
        self.tx
            .write_all(&frame::encode(kind, generation, payload))
            .await
    }
}

/// The drain deadline a Shutdown frame carries (0 when malformed: stop now).
fn shutdown_deadline(frame: &Frame) -> Duration {
    let millis = frame
        .payload
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    Duration::from_millis(millis.into())
}

/// Takes over a listening socket the supervisor created.
fn adopt_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn accept_loop(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    log: mpsc::UnboundedSender<String>,
) {
    let exhaustion = RateLimitedLog::default();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    Stats::bump(&shared.stats.accepted);
                    tokio::spawn(serve_connection(Arc::clone(&shared), index, tcp));
                }
                Err(err) => {
                    Stats::bump(&shared.stats.accept_errors);
                    if is_resource_exhaustion(&err) {
                        if let Some(count) = exhaustion.note(Instant::now()) {
                            let name = &shared.endpoints[index].config.name;
                            let _ = log.send(format!(
                                "endpoint {name}: cannot accept connections: {err}; \
                                 retrying, new clients wait in the backlog \
                                 ({count} time(s) since the last report)"
                            ));
                        }
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            },
        }
    }
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Counts events and says when one is worth a log line: the first, then at
/// most one every `LOG_INTERVAL`.
#[derive(Default)]
struct RateLimitedLog {
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    /// Records one event; returns how many happened since the last report
    /// when this one should be reported.
    fn note(&self, now: Instant) -> Option<u64> {
        // Poisoning needs a panic while holding the lock, which the two
        // statements below cannot cause; a poisoned lock is used anyway.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.1 += 1;
        let due = state.0.is_none_or(|at| now - at >= LOG_INTERVAL);
        if !due {
            return None;
        }
        let count = state.1;
        *state = (Some(now), 0);
        Some(count)
    }
}

/// Counts a connection as open from accept until its last byte.
struct OpenGuard<'a>(&'a Stats);

impl<'a> OpenGuard<'a> {
    fn new(stats: &'a Stats) -> Self {
        Stats::bump(&stats.open_connections);
        Self(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

async fn serve_connection(shared: Arc<Shared>, index: usize, tcp: TcpStream) {
    let _open = OpenGuard::new(&shared.stats);
    let accepted_at = Instant::now();
    let endpoint = &shared.endpoints[index];
    let stats = &shared.stats;
    let limits = &shared.limits;
    let addresses = match endpoint.config.proxy_protocol {
        true => tcp.peer_addr().ok().zip(tcp.local_addr().ok()),
        false => None,
    };

    let Some(tls) = &endpoint.tls else {
        let header = addresses.map(|(client, local)| proxy::header(client, local, None));
        let Some(mut upstream) = connect_upstream(&shared, index, header).await else {
            return;
        };
        let mut tcp = tcp;
        let outcome = relay(
            &mut tcp,
            &mut upstream,
            limits.idle_timeout(),
            &stats.bytes_to_upstream,
            &stats.bytes_to_client,
        )
        .await;
        stats.count_relay_end(&outcome);
        return;
    };

    // The deadline is absolute from accept: a client trickling bytes does
    // not extend it, and waiting for a handshake slot counts against it.
    let deadline = accepted_at + limits.handshake_timeout();

    // Reading the ClientHello costs no crypto, so it happens before a slot
    // is taken: silent or trickling clients cannot hold the slots that
    // real handshakes need.
    let hello = timeout_at(deadline, tls_conn::read_client_hello(&tcp)).await;
    let Some(accepted) = stats.handshake_step(hello) else {
        return;
    };
    let Ok(Ok(permit)) = timeout_at(deadline, endpoint.handshakes.acquire()).await else {
        Stats::bump(&stats.handshake_timeouts);
        return;
    };
    let config = tls.load().for_client(&accepted.client_hello());
    let handshake = timeout_at(deadline, TlsConn::handshake(tcp, accepted, config)).await;
    let Some(mut client) = stats.handshake_step(handshake) else {
        return;
    };
    drop(permit);
    stats.observe_handshake(accepted_at.elapsed().as_micros() as u64);
    let session = client.session();
    match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => Stats::bump(&stats.handshakes_tls12),
        _ => Stats::bump(&stats.handshakes_tls13),
    }
    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        Stats::bump(&stats.handshakes_resumed);
    }

    let header = addresses.map(|(peer, local)| {
        let facts = tls_facts(session);
        proxy::header(peer, local, Some(&facts))
    });
    let Some(mut upstream) = connect_upstream(&shared, index, header).await else {
        return;
    };
    let outcome = relay(
        &mut client,
        &mut upstream,
        limits.idle_timeout(),
        &stats.bytes_to_upstream,
        &stats.bytes_to_client,
    )
    .await;
    stats.count_relay_end(&outcome);
}

/// What a PROXY header reports about a finished handshake.
fn tls_facts(session: &rustls::ServerConnection) -> proxy::TlsFacts {
    proxy::TlsFacts {
        sni: session.server_name().map(str::to_owned),
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
        version: match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
            Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
            _ => None,
        },
        cipher: session
            .negotiated_cipher_suite()
            .and_then(|suite| suite.suite().as_str())
            .map(str::to_owned),
        client_cert: session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| cert.as_ref().to_vec()),
    }
}

async fn connect_upstream(
    shared: &Shared,
    index: usize,
    proxy_header: Option<Vec<u8>>,
) -> Option<upstream::UpstreamStream> {
    let endpoint = &shared.endpoints[index].config;
    let limit = shared.limits.connect_timeout();
    let connect = async {
        let mut stream = upstream::connect(&endpoint.upstream, limit).await?;
        if let Some(header) = proxy_header {
            // A fresh socket takes a header this small at once; the limit
            // only guards against an upstream that never reads at all.
            timeout(limit, stream.write_all(&header))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
        Ok::<_, io::Error>(stream)
    };
    match connect.await {
        Ok(stream) => Some(stream),
        Err(err) => {
            Stats::bump(&shared.stats.upstream_connect_errors);
            let failures = &shared.endpoints[index].upstream_failures;
            if let Some(count) = failures.note(Instant::now()) {
                let _ = shared.log.send(format!(
                    "endpoint {}: cannot connect to the upstream: {err}; its clients are \
                     closed ({count} time(s) since the last report)",
                    endpoint.name
                ));
            }
            None
        }
    }
}
