//! Server-side CPU of one full TLS 1.3 handshake, in memory, no sockets.
//!
//! Drives a rustls client and a spicegw server configuration through
//! complete handshakes in one thread and times only the server's calls,
//! in thread CPU time.
//! Shows the floor the network-facing figure can approach, and compares
//! crypto providers (`--features crypto-ring`).
//!
//! Usage: handshake_cost CERT.pem KEY.pem CA.pem [HANDSHAKES]

// An example reports on standard output.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
use spicegw_core::bundle::Bundle;
use spicegw_core::frame::{BundleMessage, ClientAuth};
use spicegw_core::tickets::TicketKeys;
use spicegw_core::tls::{provider, ScopeTls};

/// CPU time of this thread: other processes on the core do not count.
struct Instant(Duration);

impl Instant {
    fn now() -> Self {
        let mut spec = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut spec) };
        Self(Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32))
    }

    fn elapsed(&self) -> Duration {
        Self::now().0 - self.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: handshake_cost CERT.pem KEY.pem CA.pem [HANDSHAKES]");
        std::process::exit(2);
    }
    let read = |path: &str| std::fs::read(path).expect("readable file");
    let count: u32 = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(2000);

    let bundle = Bundle::from_pem(&read(&args[1]), &read(&args[2])).expect("a valid pair");
    let message = BundleMessage {
        scope: "public".into(),
        bundle,
        client_auth: ClientAuth::None,
        client_ca: Vec::new(),
    };
    let scope = ScopeTls::build(&message, 1, None).expect("a usable bundle");
    // Ticket keys as the supervisor sends them: one ticket is sealed per
    // handshake, as in production.
    let mut payload = 3600u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&[7u8; 48]);
    let ticket_keys = TicketKeys::decode(1, &payload).expect("ticket keys");
    let keys = Arc::new(ArcSwap::from_pointee(ticket_keys));
    let server_config = scope
        .endpoint_configs("bench", &[], &keys)
        .expect("a server config")
        .server_order();

    let mut roots = RootCertStore::empty();
    for block in spicegw_core::pem::parse(&read(&args[3])).expect("a CA file") {
        roots.add(block.der.into()).expect("a CA certificate");
    }
    let mut client_config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);

    let mut server_time = Duration::ZERO;
    for _ in 0..count {
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let mut client = ClientConnection::new(Arc::clone(&client_config), name).expect("client");
        let started = Instant::now();
        let mut server = ServerConnection::new(Arc::clone(&server_config)).expect("server");
        server_time += started.elapsed();
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).expect("client flight");
            let started = Instant::now();
            if !wire.is_empty() {
                server.read_tls(&mut &wire[..]).expect("server read");
                server.process_new_packets().expect("server handshake");
            }
            let mut reply = Vec::new();
            server.write_tls(&mut reply).expect("server flight");
            server_time += started.elapsed();
            if !reply.is_empty() {
                client.read_tls(&mut &reply[..]).expect("client read");
                client.process_new_packets().expect("client handshake");
            }
        }
        // One request and reply, so the record layer is in the figure.
        client
            .writer()
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .expect("client write");
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("client record");
        let started = Instant::now();
        server.read_tls(&mut &wire[..]).expect("server read");
        server.process_new_packets().expect("server record");
        let mut request = [0u8; 64];
        let _ = server.reader().read(&mut request);
        server
            .writer()
            .write_all(b"HTTP/1.0 200 OK\r\n\r\n")
            .expect("server write");
        server.send_close_notify();
        let mut reply = Vec::new();
        server.write_tls(&mut reply).expect("server record");
        drop(server);
        server_time += started.elapsed();
    }
    let per = server_time.as_secs_f64() * 1e6 / f64::from(count);
    #[cfg(feature = "crypto-ring")]
    let name = "ring";
    #[cfg(not(feature = "crypto-ring"))]
    let name = "aws-lc-rs";
    println!("{name}: {per:.1} µs of server CPU per handshake ({count} handshakes)");
}
