//! The rustls client side: trust, versions, key exchange groups and
//! resumption, on the same aws-lc-rs provider the gateway uses.

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use spicegw_core::pem;

use crate::args::Options;

/// TLS 1.3 tickets a lane's session store may hold. rustls keeps at most
/// eight per server name, whatever this says; one is all a lane needs.
const LANE_SESSIONS: usize = 8;

/// The client configuration for every connection of the run, with
/// resumption off. `resume` derives one per lane with [`with_sessions`].
pub fn base_config(options: &Options) -> Result<Arc<ClientConfig>, String> {
    let roots = load_roots(&options.ca)?;
    let provider = provider(&options.groups)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if options.tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };

    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(|err| format!("TLS versions: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A copy of `base` with its own in-memory session store. Each `resume`
/// lane gets one: TLS 1.3 tickets are single-use, so lanes sharing a
/// store would take each other's tickets (and rustls caps a store at
/// eight tickets per server name, fewer than a busy run has lanes).
pub fn with_sessions(base: &ClientConfig) -> Arc<ClientConfig> {
    let mut config = base.clone();
    config.resumption = Resumption::in_memory_sessions(LANE_SESSIONS);
    Arc::new(config)
}

/// The name to verify the server certificate against, sent as SNI.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| format!("--server-name {name:?} is neither a DNS name nor an IP address"))
}

/// aws-lc-rs with only the key exchange groups asked for, in that order
/// of preference; names as rustls spells them (`X25519`, `secp256r1`,
/// `X25519MLKEM768`), compared without regard to case.
fn provider(groups: &[String]) -> Result<CryptoProvider, String> {
    let default = aws_lc_rs::default_provider();
    let mut chosen = Vec::with_capacity(groups.len());
    for wanted in groups {
        let group = default
            .kx_groups
            .iter()
            .find(|group| format!("{:?}", group.name()).eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let known: Vec<String> = default
                    .kx_groups
                    .iter()
                    .map(|group| format!("{:?}", group.name()))
                    .collect();
                format!(
                    "--groups: unknown group {wanted:?} (known: {})",
                    known.join(", ")
                )
            })?;
        chosen.push(*group);
    }
    Ok(CryptoProvider {
        kx_groups: chosen,
        ..default
    })
}

/// Every CERTIFICATE block of the CA file, as trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let text = std::fs::read(path).map_err(|err| format!("--ca '{shown}': {err}"))?;
    let blocks = pem::parse(&text).map_err(|err| format!("--ca '{shown}': {err}"))?;

    let mut roots = RootCertStore::empty();
    for block in blocks.into_iter().filter(|b| b.label == "CERTIFICATE") {
        roots
            .add(CertificateDer::from(block.der))
            .map_err(|err| format!("--ca '{shown}': {err}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca '{shown}': no CERTIFICATE block"));
    }
    Ok(roots)
}
