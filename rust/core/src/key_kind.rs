//! Why a private key that parsed as PEM cannot sign: a damaged key, an RSA
//! key that is too small, or a kind rustls does not sign with.
//!
//! rustls only reports that none of its signers took the key. The operator
//! needs to know which of those it was, so the key's algorithm is read from
//! its DER (the object identifiers PKCS#8 and SEC1 carry) and the matching
//! aws-lc-rs loader is asked for its verdict.

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};

use crate::bundle::KeyFormat;

/// DER of the object identifiers that name a key's algorithm or curve.
const RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const SECP384R1: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// PKCS#8 names the algorithm right after its version number; looking
/// only at the start keeps key bytes from being read as an identifier.
const PKCS8_HEADER_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rsa,
    EcP256,
    EcP384,
    EcOtherCurve,
    Ed25519,
    Unknown,
}

impl Kind {
    fn of(der: &[u8], format: KeyFormat) -> Self {
        let head = &der[..der.len().min(PKCS8_HEADER_LEN)];
        let is_ec = match format {
            KeyFormat::Pkcs1 => return Self::Rsa,
            KeyFormat::Sec1 => true,
            KeyFormat::Pkcs8 => {
                if contains(head, RSA_ENCRYPTION) {
                    return Self::Rsa;
                }
                if contains(head, ED25519) {
                    return Self::Ed25519;
                }
                contains(head, EC_PUBLIC_KEY)
            }
        };
        if !is_ec {
            Self::Unknown
        } else if contains(der, PRIME256V1) {
            Self::EcP256
        } else if contains(der, SECP384R1) {
            Self::EcP384
        } else {
            Self::EcOtherCurve
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rsa => "RSA",
            Self::EcP256 => "ECDSA P-256",
            Self::EcP384 => "ECDSA P-384",
            Self::EcOtherCurve => "ECDSA",
            Self::Ed25519 => "Ed25519",
            Self::Unknown => "unknown",
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Why a key the provider refused cannot be used, and what would do.
/// `Ok` carries an unsupported kind, `Err` a damaged key (the reason
/// aws-lc-rs gave). Never quotes key bytes.
pub(crate) fn explain(der: &[u8], format: KeyFormat) -> Result<String, KeyDamage> {
    const USE: &str = "use ECDSA P-256 or P-384, Ed25519, or RSA of 2048 bits or more";
    let kind = Kind::of(der, format);
    let verdict = match kind {
        Kind::Rsa => match format {
            KeyFormat::Pkcs1 => RsaKeyPair::from_der(der).err(),
            _ => RsaKeyPair::from_pkcs8(der).err(),
        },
        Kind::EcP256 => EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, der).err(),
        Kind::EcP384 => EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, der).err(),
        Kind::Ed25519 => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).err(),
        Kind::EcOtherCurve => return Ok(format!("an ECDSA key on a curve rustls does not sign with (P-521 or another); {USE}")),
        Kind::Unknown => {
            return Ok(format!(
                "not an RSA, ECDSA or Ed25519 key (a DSA or other key, or one too damaged to tell); {USE}"
            ))
        }
    };
    match verdict.map(|rejected| rejected.description_()) {
        Some("TooSmall") => Ok(format!("an RSA key smaller than 2048 bits; {USE}")),
        Some("TooLarge") => Ok(format!("an RSA key larger than 8192 bits; {USE}")),
        Some(reason) => Err(KeyDamage {
            kind: kind.name(),
            reason,
        }),
        None => Ok(format!(
            "a {} key that rustls does not sign with; {USE}",
            kind.name()
        )),
    }
}

/// A key whose algorithm is known but whose contents do not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDamage {
    /// The algorithm the key names, e.g. "ECDSA P-256".
    pub kind: &'static str,
    /// What aws-lc-rs said, e.g. "InvalidEncoding" or "InconsistentComponents".
    pub reason: &'static str,
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;

    use super::*;

    fn p256_pkcs8() -> Vec<u8> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        doc.as_ref().to_vec()
    }

    #[test]
    fn kinds_are_read_from_the_identifiers() {
        assert_eq!(Kind::of(&p256_pkcs8(), KeyFormat::Pkcs8), Kind::EcP256);
        let rng = SystemRandom::new();
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        assert_eq!(Kind::of(ed.as_ref(), KeyFormat::Pkcs8), Kind::Ed25519);
        assert_eq!(
            Kind::of(&[0x30, 0x03, 0x02, 0x01, 0x00], KeyFormat::Pkcs1),
            Kind::Rsa
        );
        assert_eq!(
            Kind::of(&[0x30, 0x03, 0x02, 0x01, 0x00], KeyFormat::Pkcs8),
            Kind::Unknown
        );
    }

    #[test]
    fn a_changed_byte_is_damage_not_an_unsupported_kind() {
        let mut der = p256_pkcs8();
        // Inside the private scalar, after the PKCS#8 and SEC1 headers:
        // the public key it carries no longer matches.
        der[40] ^= 0x01;
        let damage = explain(&der, KeyFormat::Pkcs8).unwrap_err();
        assert_eq!(damage.kind, "ECDSA P-256");
    }

    #[test]
    fn an_unknown_algorithm_says_what_would_do() {
        let reason = explain(&[0x30, 0x03, 0x02, 0x01, 0x00], KeyFormat::Pkcs8).unwrap();
        assert!(
            reason.starts_with("not an RSA, ECDSA or Ed25519 key"),
            "{reason}"
        );
        assert!(reason.contains("RSA of 2048 bits or more"), "{reason}");
    }
}
