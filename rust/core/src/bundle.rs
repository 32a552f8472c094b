//! A certificate bundle: the chain and the one private key that signs for
//! its leaf, checked to belong together before anything serves it.
//!
//! The supervisor parses the PEM files with [`Bundle::from_pem`] and sends
//! the DER over the pipe; workers rebuild the same [`Bundle`] with
//! [`Bundle::from_der`]. Both paths end in [`Bundle::certified_key`], which
//! refuses a key that does not match the first certificate: rustls'
//! `CertifiedKey::new` alone would not notice (rustls/rustls#1918).

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;

use crate::key_kind::{self, KeyDamage};
use crate::pem::{self, Block, PemError};

/// Which of the two inputs an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The certificate chain.
    Certificate,
    /// The private key.
    Key,
    /// Both: the fault lies in how they relate.
    Pair,
}

impl Slot {
    /// A stable lowercase name, used across the Python boundary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Key => "key",
            Self::Pair => "pair",
        }
    }
}

/// Why a certificate and key were refused. Messages never hold key bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// The text is not readable PEM.
    Pem(Slot, PemError),
    /// The certificate slot holds no certificate but a private key.
    KeyInCertificateSlot,
    /// The key slot holds a certificate and no private key.
    CertificateInKeySlot,
    /// Certificate and key slots hold each other's content.
    Swapped,
    /// The certificate slot holds PEM blocks, none of them a certificate.
    NoCertificate { found: String },
    /// The key slot holds a public key.
    PublicKey,
    /// The key is protected by a passphrase; we never prompt for one.
    EncryptedKey,
    /// The key slot holds no private key block.
    NoKey { found: String },
    /// More than one private key block.
    SeveralKeys(usize),
    /// A key in a format rustls cannot use (OpenSSH, DSA, an odd curve).
    UnsupportedKey(String),
    /// A key of a known kind whose contents do not decode.
    DamagedKey(KeyDamage),
    /// A certificate that is not valid X.509 DER (1-based position).
    BadCertificate { index: usize, reason: String },
    /// The key does not belong to the first certificate, but to a later one.
    LeafNotFirst { index: usize },
    /// The key belongs to none of the certificates.
    KeyMismatch,
}

impl BundleError {
    /// The input the error is about.
    pub fn slot(&self) -> Slot {
        match self {
            Self::Pem(slot, _) => *slot,
            Self::KeyInCertificateSlot | Self::NoCertificate { .. } => Slot::Certificate,
            Self::BadCertificate { .. } => Slot::Certificate,
            Self::CertificateInKeySlot | Self::PublicKey | Self::EncryptedKey => Slot::Key,
            Self::NoKey { .. } | Self::SeveralKeys(_) | Self::UnsupportedKey(_) => Slot::Key,
            Self::DamagedKey(_) => Slot::Key,
            Self::Swapped | Self::LeafNotFirst { .. } | Self::KeyMismatch => Slot::Pair,
        }
    }
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pem(_, err) => err.fmt(f),
            Self::KeyInCertificateSlot => {
                f.write_str("private key found where a certificate was expected")
            }
            Self::CertificateInKeySlot => {
                f.write_str("certificate found where a private key was expected")
            }
            Self::Swapped => f.write_str(
                "the certificate and key look exchanged: the certificate input holds \
                 a private key and the key input holds a certificate",
            ),
            Self::NoCertificate { found } => {
                write!(f, "no CERTIFICATE block (found {found})")
            }
            Self::PublicKey => f.write_str("file holds a public key, not a private key"),
            Self::EncryptedKey => f.write_str(
                "private key is encrypted and spicegw never prompts for a passphrase; \
                 decrypt it first (openssl pkey -in KEY -out KEY.plain)",
            ),
            Self::NoKey { found } => write!(f, "no private key block (found {found})"),
            Self::SeveralKeys(n) => {
                write!(f, "holds {n} private keys; exactly one is expected")
            }
            Self::UnsupportedKey(reason) => write!(f, "unsupported private key: {reason}"),
            Self::DamagedKey(KeyDamage { kind, reason }) => write!(
                f,
                "private key is damaged: its {kind} key data does not decode ({reason}); \
                 export it again from where it was made"
            ),
            Self::BadCertificate { index, reason } => {
                write!(f, "certificate #{index} is not valid X.509: {reason}")
            }
            Self::LeafNotFirst { index } => write!(
                f,
                "leaf is not first: the key matches certificate #{index}, but the \
                 first certificate must be the one the key belongs to (put the leaf \
                 first, then its issuers)"
            ),
            Self::KeyMismatch => {
                f.write_str("private key does not match the certificate (key values mismatch)")
            }
        }
    }
}

impl std::error::Error for BundleError {}

/// The DER encoding a private key arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// `PRIVATE KEY`
    Pkcs8,
    /// `RSA PRIVATE KEY`
    Pkcs1,
    /// `EC PRIVATE KEY`
    Sec1,
}

impl KeyFormat {
    /// The encoding's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pkcs8 => "PKCS#8",
            Self::Pkcs1 => "PKCS#1 (RSA)",
            Self::Sec1 => "SEC1 (EC)",
        }
    }

    fn from_label(label: &str) -> Option<Self> {
        match label {
            "PRIVATE KEY" => Some(Self::Pkcs8),
            "RSA PRIVATE KEY" => Some(Self::Pkcs1),
            "EC PRIVATE KEY" => Some(Self::Sec1),
            _ => None,
        }
    }
}

/// A parsed chain and key, not yet checked against each other.
#[derive(Clone)]
pub struct Bundle {
    /// The chain, leaf first, as DER.
    pub certs: Vec<CertificateDer<'static>>,
    key_format: KeyFormat,
    key_der: Vec<u8>,
}

impl fmt::Debug for Bundle {
    // Spelled out so that no `{:?}` can ever print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("certs", &self.certs.len())
            .field("key_format", &self.key_format)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Reads a chain and a key from their PEM texts (the same text may
    /// hold both; blocks of the other kind are then ignored).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, BundleError> {
        let cert_blocks =
            pem::parse(cert_pem).map_err(|err| BundleError::Pem(Slot::Certificate, err))?;
        let key_blocks = pem::parse(key_pem).map_err(|err| BundleError::Pem(Slot::Key, err))?;

        let certs: Vec<CertificateDer<'static>> = cert_blocks
            .iter()
            .filter(|block| block.label == "CERTIFICATE")
            .map(|block| CertificateDer::from(block.der.clone()))
            .collect();
        let keys: Vec<&Block> = key_blocks
            .iter()
            .filter(|block| is_private_key(&block.label))
            .collect();

        if certs.is_empty() {
            let cert_has_key = cert_blocks.iter().any(|block| is_private_key(&block.label));
            let key_has_cert = key_blocks.iter().any(|block| block.label == "CERTIFICATE");
            return Err(match (cert_has_key, key_has_cert && keys.is_empty()) {
                (true, true) => BundleError::Swapped,
                (true, false) => BundleError::KeyInCertificateSlot,
                _ => BundleError::NoCertificate {
                    found: labels(&cert_blocks),
                },
            });
        }

        let key = match keys.as_slice() {
            [key] => *key,
            [] => return Err(missing_key(&key_blocks)),
            several => return Err(BundleError::SeveralKeys(several.len())),
        };
        if key.label == "ENCRYPTED PRIVATE KEY" || key.is_encrypted() {
            return Err(BundleError::EncryptedKey);
        }
        let Some(key_format) = KeyFormat::from_label(&key.label) else {
            return Err(BundleError::UnsupportedKey(format!(
                "a {} is not supported; convert to PKCS#8 (openssl pkcs8 -topk8 -nocrypt)",
                pem::describe(&key.label)
            )));
        };

        Self::from_der(certs, key_format, key.der.clone())
    }

    /// Rebuilds a bundle from DER, as a worker receives it.
    pub fn from_der(
        certs: Vec<CertificateDer<'static>>,
        key_format: KeyFormat,
        key_der: Vec<u8>,
    ) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::NoCertificate {
                found: "nothing".to_owned(),
            });
        }
        for (i, cert) in certs.iter().enumerate() {
            if let Err(err) = ParsedCertificate::try_from(cert) {
                let reason = match err {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
                        if other.to_string().contains("UnsupportedCertVersion") =>
                    {
                        "only X.509 version 3 certificates are supported; reissue it".to_owned()
                    }
                    other => other.to_string(),
                };
                return Err(BundleError::BadCertificate {
                    index: i + 1,
                    reason,
                });
            }
        }
        Ok(Self {
            certs,
            key_format,
            key_der,
        })
    }

    /// The encoding the key came in.
    pub fn key_format(&self) -> KeyFormat {
        self.key_format
    }

    /// The key's DER bytes, for the pipe to the workers and nothing else.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// Loads the key with `provider` and checks it signs for the leaf.
    pub fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, BundleError> {
        let signing_key = provider
            .key_provider
            .load_private_key(self.private_key_der())
            .map_err(
                |_| match key_kind::explain(&self.key_der, self.key_format) {
                    Ok(unsupported) => BundleError::UnsupportedKey(unsupported),
                    Err(damage) => BundleError::DamagedKey(damage),
                },
            )?;
        let certified = CertifiedKey::new(self.certs.clone(), Arc::clone(&signing_key));
        if certified.keys_match().is_ok() {
            return Ok(certified);
        }

        // Say which certificate the key does belong to, if any: a chain
        // written in the wrong order deserves a better hint than "mismatch".
        for (i, cert) in self.certs.iter().enumerate().skip(1) {
            let alone = CertifiedKey::new(vec![cert.clone()], Arc::clone(&signing_key));
            if alone.keys_match().is_ok() {
                return Err(BundleError::LeafNotFirst { index: i + 1 });
            }
        }
        Err(BundleError::KeyMismatch)
    }

    /// Whether both hold the same chain and the same private key, however
    /// encoded: line ends, PKCS#1 or PKCS#8, an `EC PARAMETERS` block make
    /// no rotation.
    pub fn same_as(&self, other: &Bundle, provider: &CryptoProvider) -> bool {
        if self.certs != other.certs {
            return false;
        }
        if self.key_der == other.key_der {
            return true;
        }
        // The public half identifies the key pair.
        match (self.public_key(provider), other.public_key(provider)) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => false,
        }
    }

    /// The SubjectPublicKeyInfo of the private key, when the provider can
    /// derive it.
    fn public_key(&self, provider: &CryptoProvider) -> Option<Vec<u8>> {
        let key = provider
            .key_provider
            .load_private_key(self.private_key_der())
            .ok()?;
        Some(key.public_key()?.as_ref().to_vec())
    }

    /// The SHA-256 of the leaf certificate's DER, lowercase hex.
    pub fn fingerprint(&self, provider: &CryptoProvider) -> String {
        let digest = sha256(provider, &self.certs[0]);
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn private_key_der(&self) -> PrivateKeyDer<'static> {
        let der = self.key_der.clone();
        match self.key_format {
            KeyFormat::Pkcs8 => PrivatePkcs8KeyDer::from(der).into(),
            KeyFormat::Pkcs1 => PrivatePkcs1KeyDer::from(der).into(),
            KeyFormat::Sec1 => PrivateSec1KeyDer::from(der).into(),
        }
    }
}

/// SHA-256 through whichever provider is in use, so the fingerprint does
/// not need a hashing crate of its own.
pub fn sha256(provider: &CryptoProvider, data: &[u8]) -> Vec<u8> {
    let hash = provider
        .cipher_suites
        .iter()
        .filter_map(|suite| suite.tls13())
        .map(|suite| suite.common.hash_provider)
        .find(|hash| hash.algorithm() == rustls::crypto::hash::HashAlgorithm::SHA256)
        .expect("every provider we build with has a TLS 1.3 SHA-256 suite");
    hash.hash(data).as_ref().to_vec()
}

fn is_private_key(label: &str) -> bool {
    label.ends_with("PRIVATE KEY")
}

fn missing_key(blocks: &[Block]) -> BundleError {
    let has = |wanted: &[&str]| blocks.iter().any(|b| wanted.contains(&b.label.as_str()));
    if has(&["PUBLIC KEY", "RSA PUBLIC KEY"]) {
        BundleError::PublicKey
    } else if has(&["CERTIFICATE"]) {
        BundleError::CertificateInKeySlot
    } else {
        BundleError::NoKey {
            found: labels(blocks),
        }
    }
}

fn labels(blocks: &[Block]) -> String {
    let names: Vec<String> = blocks
        .iter()
        .map(|block| pem::describe(&block.label))
        .collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_in_key_slot_is_named() {
        let text = b"-----BEGIN PUBLIC KEY-----\nTWFu\n-----END PUBLIC KEY-----\n";
        let err = missing_key(&pem::parse(text).unwrap());
        assert_eq!(err, BundleError::PublicKey);
        assert_eq!(err.slot(), Slot::Key);
    }

    #[test]
    fn labels_are_listed_when_nothing_fits() {
        let text = b"-----BEGIN X509 CRL-----\nTWFu\n-----END X509 CRL-----\n";
        let err = Bundle::from_pem(text, text).unwrap_err();
        assert_eq!(
            err,
            BundleError::NoCertificate {
                found: "X509 CRL block".to_owned()
            }
        );
    }
}
