//! Turning a scope's bundle into rustls server configurations.
//!
//! Each endpoint holds its current `ServerConfig` behind an `ArcSwap`. A
//! new bundle builds fresh configurations and swaps them in; a handshake
//! takes the `Arc` that was current when it began and keeps it to the end,
//! so a rotation never touches a handshake or a connection in flight.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, RootCertStore, ServerConfig};

use crate::bundle::{sha256, BundleError};
use crate::frame::{BundleMessage, ClientAuth};
use crate::tickets::{SharedKeys, Ticketer};

/// Sessions remembered for resumption before ticket keys arrive, per
/// scope and worker.
const SESSION_CACHE_SIZE: usize = 4096;
/// Tickets sent after a full TLS 1.3 handshake. One resumes the next
/// connection; each extra one costs a seal and a record on every handshake.
const TLS13_TICKETS: usize = 1;

/// The crypto provider every handshake and every check uses: aws-lc-rs,
/// chosen by measurement (`examples/handshake_cost.rs`); the `crypto-ring`
/// feature swaps in ring to compare.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        #[cfg(not(feature = "crypto-ring"))]
        use rustls::crypto::aws_lc_rs::{cipher_suite as suites, default_provider};
        #[cfg(feature = "crypto-ring")]
        use rustls::crypto::ring::{cipher_suite as suites, default_provider};

        // Mozilla's "intermediate" order, which the server applies (see
        // `server_config`): AES-128-GCM with SHA-256 first. It is also the
        // cheapest handshake here: SHA-256 runs on the CPU's SHA
        // extensions, where SHA-384 does not.
        let cipher_suites = vec![
            suites::TLS13_AES_128_GCM_SHA256,
            suites::TLS13_AES_256_GCM_SHA384,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suites::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites,
            ..default_provider()
        })
    }))
}

/// What a worker serves for one scope.
pub struct ScopeTls {
    pub generation: u64,
    pub fingerprint: String,
    certified: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    client_ca: Vec<CertificateDer<'static>>,
    client_auth: ClientAuth,
    sessions: Arc<dyn StoresServerSessions>,
    /// Names the client trust, so tickets die with it.
    trust: Vec<u8>,
}

impl ScopeTls {
    /// Checks a bundle and prepares it; `previous` is the scope's state
    /// before, whose session cache is kept unless the client trust changed.
    pub fn build(
        message: &BundleMessage,
        generation: u64,
        previous: Option<&ScopeTls>,
    ) -> Result<Self, String> {
        let provider = provider();
        let certified = message
            .bundle
            .certified_key(&provider)
            .map_err(|err: BundleError| err.to_string())?;
        let verifier = client_verifier(message, &provider)?;

        // Resumption state belongs to the trust it was granted under: when
        // the client CA or the mode changes, old sessions must not resume.
        let same_trust = previous.is_some_and(|old| {
            old.client_auth == message.client_auth && old.client_ca == message.client_ca
        });
        let sessions = match previous {
            Some(old) if same_trust => Arc::clone(&old.sessions),
            _ => ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        };

        let mut trust = vec![message.client_auth as u8];
        for ca in &message.client_ca {
            trust.extend_from_slice(&sha256(&provider, ca));
        }
        Ok(Self {
            generation,
            fingerprint: message.bundle.fingerprint(&provider),
            certified: Arc::new(certified),
            verifier,
            client_ca: message.client_ca.clone(),
            client_auth: message.client_auth,
            sessions,
            trust: sha256(&provider, &trust),
        })
    }

    /// The server configurations of one endpoint of this scope.
    pub fn endpoint_configs(
        &self,
        endpoint: &str,
        alpn: &[String],
        ticket_keys: &SharedKeys,
    ) -> Result<EndpointConfigs, String> {
        Ok(EndpointConfigs {
            server_order: self.server_config(endpoint, alpn, ticket_keys, true)?,
            client_order: self.server_config(endpoint, alpn, ticket_keys, false)?,
        })
    }

    /// A server configuration for one endpoint of this scope; tickets are
    /// sealed with keys derived for this endpoint and this client trust.
    fn server_config(
        &self,
        endpoint: &str,
        alpn: &[String],
        ticket_keys: &SharedKeys,
        server_order: bool,
    ) -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|err| err.to_string())?;
        let builder = match &self.verifier {
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(FixedCert(Arc::clone(&self.certified))));
        config.ignore_client_order = server_order;
        config.alpn_protocols = alpn
            .iter()
            .map(|protocol| protocol.as_bytes().to_vec())
            .collect();
        config.session_storage = Arc::clone(&self.sessions);
        let mut context = endpoint.as_bytes().to_vec();
        context.push(0);
        context.extend_from_slice(&self.trust);
        config.ticketer = Arc::new(Ticketer::new(Arc::clone(ticket_keys), context));
        config.send_tls13_tickets = TLS13_TICKETS;
        Ok(Arc::new(config))
    }
}

fn client_verifier(
    message: &BundleMessage,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
    if message.client_auth == ClientAuth::None {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    for ca in &message.client_ca {
        roots
            .add(ca.clone())
            .map_err(|err| format!("client CA certificate refused: {err}"))?;
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = match message.client_auth {
        ClientAuth::Request => builder.allow_unauthenticated(),
        _ => builder,
    };
    let verifier = builder
        .build()
        .map_err(|err| format!("client CA unusable: {err}"))?;
    Ok(Some(verifier))
}

/// An endpoint's two configurations, identical but for whose cipher
/// order wins.
///
/// Every suite offered is an AEAD with forward secrecy, so the server's
/// order picks the cheapest one both sides support (AES-128-GCM). A client
/// that lists ChaCha20 first says it lacks AES hardware; it gets its own
/// order instead, the "equal preference" idea of BoringSSL.
pub struct EndpointConfigs {
    server_order: Arc<ServerConfig>,
    client_order: Arc<ServerConfig>,
}

impl EndpointConfigs {
    /// The configuration most clients get: the server's cipher order.
    pub fn server_order(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server_order)
    }

    /// The configuration for a client, by the first suite it offers.
    pub fn for_client(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        let chacha_first = matches!(
            hello.cipher_suites().first(),
            Some(
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        );
        Arc::clone(match chacha_first {
            true => &self.client_order,
            false => &self.server_order,
        })
    }
}

/// Serves one certified key to every client.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}
