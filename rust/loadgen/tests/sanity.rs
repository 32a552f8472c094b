//! `spicegw-load` against a rustls server inside the test process, on
//! 127.0.0.1 with the certificates of `tests/data` (see the README there).
//!
//! Each test starts its own server on its own thread and runtime, runs
//! the built binary with a small, bounded run, and reads its JSON report.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What the test server does with a connection once the handshake is done.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Like `spicegw-load serve` behind a gateway: read a line, answer
    /// `OK ` and the line, close.
    Line,
    /// Send back everything, until the client closes.
    Echo,
    /// Close (with close_notify) as soon as the handshake is done.
    Hangup,
    /// Relay both ways to a plain TCP upstream, like the gateway.
    Relay(SocketAddr),
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn server_config(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ServerConfig> {
    let read = |name| std::fs::read(data(name)).unwrap();
    let chain = spicegw_core::pem::parse(&read("server.pem"))
        .unwrap()
        .into_iter()
        .map(|block| CertificateDer::from(block.der))
        .collect();
    let key_block = spicegw_core::pem::parse(&read("server.key"))
        .unwrap()
        .remove(0);
    let key = PrivateKeyDer::try_from(key_block.der).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    // rustls' defaults: a session cache, two TLS 1.3 tickets per handshake.
    Arc::new(config)
}

/// Serves on a free port of 127.0.0.1 from a thread of its own, for as
/// long as the test process lives.
fn serve(behaviour: Behaviour, config: Arc<ServerConfig>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            let acceptor = TlsAcceptor::from(config);
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that gives up mid-way is the client's
                    // business; the server just drops the connection.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    match behaviour {
                        Behaviour::Line => {
                            let mut reader = BufReader::new(&mut tls);
                            let mut line = Vec::new();
                            if reader.read_until(b'\n', &mut line).await.is_err() {
                                return;
                            }
                            let mut reply = b"OK ".to_vec();
                            reply.extend_from_slice(&line);
                            let _ = tls.write_all(&reply).await;
                            let _ = tls.shutdown().await;
                        }
                        Behaviour::Echo => {
                            let mut buffer = vec![0; 64 * 1024];
                            while let Ok(n) = tls.read(&mut buffer).await {
                                if n == 0 || tls.write_all(&buffer[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = tls.shutdown().await;
                        }
                        Behaviour::Hangup => {
                            let _ = tls.shutdown().await;
                        }
                        Behaviour::Relay(upstream) => {
                            let Ok(mut tcp) = tokio::net::TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut tcp).await;
                        }
                    }
                });
            }
        });
    });
    addr
}

fn tls13_server(behaviour: Behaviour) -> SocketAddr {
    serve(behaviour, server_config(&[&rustls::version::TLS13]))
}

struct Outcome {
    code: i32,
    report: Value,
    stderr: String,
}

/// Runs `spicegw-load` to the end and parses its report. Every run here
/// is bounded by its own options; this only guards against a hang.
fn load(mode: &str, addr: SocketAddr, extra: &[&str]) -> Outcome {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_spicegw-load"))
        .arg(mode)
        .args(["--target", &addr.to_string()])
        .arg("--ca")
        .arg(data("ca.pem"))
        .args(["--max-seconds", "20", "--timeout", "5"])
        .args(extra)
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(40));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Outcome {
        code: output.status.code().unwrap(),
        report,
        stderr,
    }
}

fn count(report: &Value, path: &[&str]) -> u64 {
    let mut value = report;
    for key in path {
        value = &value[key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("no count at {path:?} in {report:#}"))
}

#[test]
fn connect_makes_full_tls13_handshakes() {
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "60",
            "--concurrency",
            "4",
            "--request",
            r"GET /\n",
            "--expect-prefix",
            r"OK GET /\n",
        ],
    );
    let report = &run.report;
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(report["mode"], "connect");
    assert_eq!(count(report, &["connections", "attempted"]), 60);
    assert_eq!(count(report, &["connections", "ok"]), 60);
    assert_eq!(count(report, &["resumed"]), 0);
    assert_eq!(count(report, &["handshakes", "full"]), 60);
    assert_eq!(count(report, &["protocol_versions", "TLSv1_3"]), 60);
    assert_eq!(count(report, &["key_exchange_groups", "X25519"]), 60);
    assert_eq!(count(report, &["bytes", "sent"]), 60 * 6);
    assert_eq!(count(report, &["bytes", "received"]), 60 * 9);
    assert!(report["connections_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["latency_ms"]["handshake"]["p50"].as_f64().unwrap() > 0.0);
}

#[test]
fn connect_tls12_on_several_threads() {
    let addr = serve(
        Behaviour::Line,
        server_config(&[&rustls::version::TLS12, &rustls::version::TLS13]),
    );
    let run = load(
        "connect",
        addr,
        &[
            "--tls12",
            "--connections",
            "20",
            "--concurrency",
            "3",
            "--threads",
            "2",
        ],
    );
    let report = &run.report;
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(count(report, &["protocol_versions", "TLSv1_2"]), 20);
    assert_eq!(count(report, &["resumed"]), 0);
    let suites = report["cipher_suites"].as_object().unwrap();
    assert!(
        suites
            .keys()
            .all(|suite| suite.starts_with("TLS_ECDHE_ECDSA_")),
        "{suites:?}"
    );
}

#[test]
fn resume_resumes_every_connection_after_priming() {
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "resume",
        addr,
        &[
            "--connections",
            "40",
            "--concurrency",
            "4",
            "--request",
            r"hi\n",
        ],
    );
    let report = &run.report;
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(count(report, &["priming", "handshakes", "full"]), 4);
    assert_eq!(count(report, &["resumed"]), 40);
    assert_eq!(count(report, &["connections", "ok"]), 40);
}

#[test]
fn resume_fails_when_the_server_never_resumes() {
    let mut config = (*server_config(&[&rustls::version::TLS13])).clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let addr = serve(Behaviour::Line, Arc::new(config));
    let run = load(
        "resume",
        addr,
        &["--connections", "5", "--request", r"hi\n"],
    );
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(
        count(&run.report, &["failures", "full_when_it_must_resume"]),
        5
    );
    assert_eq!(count(&run.report, &["resumed"]), 0);
}

#[test]
fn a_wrong_name_is_a_handshake_error() {
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "connect",
        addr,
        &["--connections", "3", "--server-name", "elsewhere.example"],
    );
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(count(&run.report, &["failures", "handshake_error"]), 3);
    let details = run.report["failure_details"].as_object().unwrap();
    assert!(
        details
            .keys()
            .any(|text| text.contains("invalid peer certificate")),
        "{details:?}"
    );
}

#[test]
fn nothing_listening_is_connect_refused() {
    // Bind and drop: the port was free a moment ago and nothing listens.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let run = load(
        "connect",
        addr,
        &["--connections", "4", "--concurrency", "2"],
    );
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(count(&run.report, &["failures", "connect_refused"]), 4);
    assert_eq!(count(&run.report, &["connections", "ok"]), 0);
}

#[test]
fn wrong_and_missing_replies_are_named() {
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "2",
            "--request",
            r"x\n",
            "--expect-prefix",
            "NO",
        ],
    );
    assert_eq!(count(&run.report, &["failures", "wrong_reply"]), 2);

    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "2",
            "--request",
            r"x\n",
            "--expect-bytes",
            "50",
        ],
    );
    assert_eq!(count(&run.report, &["failures", "short_read"]), 2);
    assert_eq!(run.code, 1);
}

#[test]
fn a_silent_server_times_out_and_the_run_still_ends() {
    // The echo server answers and keeps the connection open, so a client
    // that reads to the end of the stream waits until its step limit.
    let addr = tls13_server(Behaviour::Echo);
    let started = Instant::now();
    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "2",
            "--concurrency",
            "2",
            "--timeout",
            "0.3",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(count(&run.report, &["failures", "timeout"]), 2);
    assert_eq!(count(&run.report, &["failure_details", "timeout: read"]), 2);
}

#[test]
fn max_seconds_stops_a_long_run() {
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "100000000",
            "--max-seconds",
            "0.5",
            "--request",
            r"x\n",
        ],
    );
    assert_eq!(run.code, 0, "{:#}", run.report);
    assert_eq!(run.report["deadline_reached"], true);
    assert!(count(&run.report, &["connections", "ok"]) > 0);
    assert!(run.report["elapsed_seconds"].as_f64().unwrap() < 2.0);
}

#[test]
fn bulk_echo_checks_every_byte() {
    let addr = tls13_server(Behaviour::Echo);
    let run = load("bulk", addr, &["--upload", "3m", "--echo"]);
    let report = &run.report;
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(count(report, &["upload", "bytes"]), 3 << 20);
    assert_eq!(count(report, &["download", "bytes"]), 3 << 20);
    assert_eq!(report["download"]["verified"], true);
    assert!(report["download"]["mib_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(count(report, &["bytes", "received"]), 3 << 20);
}

#[test]
fn bulk_reports_an_upstream_that_sends_too_little() {
    // The line server sends "OK x\n" and closes: far from 1 MiB.
    let addr = tls13_server(Behaviour::Line);
    let run = load("bulk", addr, &["--download", "1m", "--request", r"x\n"]);
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(count(&run.report, &["failures", "short_read"]), 1);
    assert_eq!(run.report["download"]["verified"], false);
}

#[test]
fn idle_holds_and_pings_every_connection() {
    let addr = tls13_server(Behaviour::Echo);
    let run = load(
        "idle",
        addr,
        &[
            "--connections",
            "30",
            "--concurrency",
            "4",
            "--hold-seconds",
            "0.3",
            "--ping",
        ],
    );
    let report = &run.report;
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(count(report, &["established"]), 30);
    assert_eq!(count(report, &["alive"]), 30);
    assert_eq!(report["checked_by"], "ping");
    assert!(report["held_seconds"].as_f64().unwrap() >= 0.29);
    assert!(
        run.stderr.contains("30 connections established"),
        "{}",
        run.stderr
    );
}

#[test]
fn idle_notices_connections_the_server_closed() {
    let addr = tls13_server(Behaviour::Hangup);
    let run = load(
        "idle",
        addr,
        &["--connections", "5", "--hold-seconds", "0.2"],
    );
    assert_eq!(run.code, 1, "{:#}", run.report);
    assert_eq!(count(&run.report, &["established"]), 5);
    assert_eq!(count(&run.report, &["alive"]), 0);
    assert_eq!(count(&run.report, &["failures", "closed_while_idle"]), 5);
    assert_eq!(run.report["checked_by"], "read");

    // The same check against a server that keeps them open.
    let addr = tls13_server(Behaviour::Line);
    let run = load(
        "idle",
        addr,
        &["--connections", "5", "--hold-seconds", "0.2"],
    );
    assert_eq!(run.code, 0, "{:#}", run.report);
    assert_eq!(count(&run.report, &["alive"]), 5);
}

#[test]
fn usage_errors_exit_2_without_a_report() {
    let output = Command::new(env!("CARGO_BIN_EXE_spicegw-load"))
        .args(["connect", "--target", "192.0.2.1:443", "--ca", "x.pem"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_spicegw-load"))
        .args(["connect", "--target", "127.0.0.1:9", "--ca"])
        .arg(data("server.key"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("no CERTIFICATE block"), "{stderr}");
}

/// `serve` behind a relaying TLS server: lines, a checked sink and a
/// source, then a sink fed the wrong bytes; SIGTERM stops it, and its
/// report counts each.
#[test]
fn serve_answers_lines_sinks_and_sources() {
    let mut upstream = Command::new(env!("CARGO_BIN_EXE_spicegw-load"))
        .args(["serve", "--listen", "127.0.0.1:0", "--max-seconds", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufReader::new(upstream.stderr.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    let listening: SocketAddr = said
        .trim()
        .strip_prefix("serve: listening on ")
        .unwrap_or_else(|| panic!("{said:?}"))
        .parse()
        .unwrap();
    let addr = tls13_server(Behaviour::Relay(listening));

    let run = load(
        "connect",
        addr,
        &[
            "--connections",
            "20",
            "--concurrency",
            "4",
            "--request",
            r"GET x\n",
            "--expect-prefix",
            r"OK GET x\n",
        ],
    );
    assert_eq!(run.code, 0, "{:#}\n{}", run.report, run.stderr);

    // The reply comes only once every byte arrived as sent.
    let sink = [r"--request", r"SINK 3145728\n", "--upload", "3m"];
    let run = load("bulk", addr, &[&sink[..], &["--download", "11"]].concat());
    assert_eq!(run.code, 0, "{:#}\n{}", run.report, run.stderr);

    let source = ["--request", r"SOURCE 3145728\n", "--download", "3m"];
    let run = load("bulk", addr, &source);
    assert_eq!(run.code, 0, "{:#}\n{}", run.report, run.stderr);
    assert_eq!(count(&run.report, &["bytes", "received"]), 3 << 20);

    // Not the pattern: closed without a reply.
    let mut plain = std::net::TcpStream::connect(listening).unwrap();
    plain.write_all(b"SINK 4\nabcd").unwrap();
    let mut reply = Vec::new();
    plain.read_to_end(&mut reply).unwrap();
    assert!(reply.is_empty(), "{reply:?}");

    // SIGTERM ends it early, with its report.
    let killed = Command::new("kill")
        .args(["-TERM", &upstream.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = upstream.wait_with_output().unwrap();
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["stopped_by"], "signal");
    assert_eq!(count(&report, &["connections", "line"]), 20);
    assert_eq!(count(&report, &["connections", "sink"]), 2);
    assert_eq!(count(&report, &["connections", "source"]), 1);
    assert_eq!(count(&report, &["failures", "sink_mismatch"]), 1);
    assert_eq!(count(&report, &["failures", "io_error"]), 0);
    assert_eq!(count(&report, &["failures", "timeout"]), 0);
}
