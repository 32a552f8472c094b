//! PROXY protocol version 2 headers, sent to upstreams that ask for them.
//!
//! The header carries the client's address and, for TLS endpoints, what
//! the handshake established: SNI, ALPN, protocol version, cipher and the
//! verified client certificate's common name (the PP2_TYPE_SSL TLV and
//! its sub-TLVs, as HAProxy defines them).

use std::net::SocketAddr;

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const VERSION_PROXY: u8 = 0x21;
const FAMILY_UNSPEC: u8 = 0x00;
const FAMILY_TCP4: u8 = 0x11;
const FAMILY_TCP6: u8 = 0x21;

const TYPE_ALPN: u8 = 0x01;
const TYPE_AUTHORITY: u8 = 0x02;
const TYPE_SSL: u8 = 0x20;
const SUBTYPE_SSL_VERSION: u8 = 0x21;
const SUBTYPE_SSL_CN: u8 = 0x22;
const SUBTYPE_SSL_CIPHER: u8 = 0x23;

const CLIENT_SSL: u8 = 0x01;
const CLIENT_CERT_CONN: u8 = 0x02;
const CLIENT_CERT_SESS: u8 = 0x04;

/// What the handshake established, for the SSL TLVs.
#[derive(Debug, Default)]
pub struct TlsFacts {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<&'static str>,
    pub cipher: Option<String>,
    /// The client's leaf certificate, present only when it was verified.
    pub client_cert: Option<Vec<u8>>,
}

/// A complete v2 PROXY header for one connection.
pub fn header(client: SocketAddr, local: SocketAddr, tls: Option<&TlsFacts>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    let family = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            body.extend_from_slice(&c.ip().octets());
            body.extend_from_slice(&l.ip().octets());
            body.extend_from_slice(&c.port().to_be_bytes());
            body.extend_from_slice(&l.port().to_be_bytes());
            FAMILY_TCP4
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            body.extend_from_slice(&c.ip().octets());
            body.extend_from_slice(&l.ip().octets());
            body.extend_from_slice(&c.port().to_be_bytes());
            body.extend_from_slice(&l.port().to_be_bytes());
            FAMILY_TCP6
        }
        _ => FAMILY_UNSPEC,
    };

    if let Some(tls) = tls {
        if let Some(alpn) = &tls.alpn {
            tlv(&mut body, TYPE_ALPN, alpn);
        }
        if let Some(sni) = &tls.sni {
            tlv(&mut body, TYPE_AUTHORITY, sni.as_bytes());
        }
        let mut ssl = Vec::new();
        let cn = tls.client_cert.as_deref().and_then(subject_common_name);
        let client_flags = match &tls.client_cert {
            Some(_) => CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS,
            None => CLIENT_SSL,
        };
        ssl.push(client_flags);
        // verify: 0 when a client certificate was presented and verified.
        let verify: u32 = if tls.client_cert.is_some() { 0 } else { 1 };
        ssl.extend_from_slice(&verify.to_be_bytes());
        if let Some(version) = tls.version {
            tlv(&mut ssl, SUBTYPE_SSL_VERSION, version.as_bytes());
        }
        if let Some(cn) = cn {
            tlv(&mut ssl, SUBTYPE_SSL_CN, cn.as_bytes());
        }
        if let Some(cipher) = &tls.cipher {
            tlv(&mut ssl, SUBTYPE_SSL_CIPHER, cipher.as_bytes());
        }
        tlv(&mut body, TYPE_SSL, &ssl);
    }

    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    // Addresses and a handful of short TLVs stay far below 64 KiB.
    let length = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// The first commonName of a certificate's subject, read straight from
/// the DER (no X.509 crate for one attribute).
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, mut tbs, _) = der_item(certificate)?;
    // version [0] is optional; then serial, signature, issuer, validity.
    if tbs.first() == Some(&0xa0) {
        tbs = der_item(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = der_item(tbs)?.2;
    }
    let (_, mut subject, _) = der_item(tbs)?;
    while !subject.is_empty() {
        let (_, mut set, rest) = der_item(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = der_item(set)?;
            set = rest;
            let (oid_tag, oid, value) = der_item(attribute)?;
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (string_tag, text, _) = der_item(value)?;
                return Some(decode_string(string_tag, text));
            }
        }
    }
    None
}

fn decode_string(tag: u8, bytes: &[u8]) -> String {
    if tag == 0x1e {
        // BMPString: UTF-16BE.
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        return String::from_utf16_lossy(&units);
    }
    String::from_utf8_lossy(bytes).into_owned()
}

/// One DER item: (tag, contents, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        let length = bytes.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (length, 2 + count)
    };
    let end = header.checked_add(length)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_without_tls_is_the_minimal_form() {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let bytes = header(client, local, None);
        assert_eq!(&bytes[..12], &SIGNATURE);
        assert_eq!(bytes[12], 0x21);
        assert_eq!(bytes[13], FAMILY_TCP4);
        assert_eq!(u16::from_be_bytes([bytes[14], bytes[15]]), 12);
        assert_eq!(&bytes[16..20], &[10, 0, 0, 1]);
        assert_eq!(&bytes[24..26], &40000u16.to_be_bytes());
    }

    #[test]
    fn tls_facts_become_tlvs() {
        let client: SocketAddr = "[::1]:1".parse().unwrap();
        let local: SocketAddr = "[::1]:2".parse().unwrap();
        let facts = TlsFacts {
            sni: Some("example.test".into()),
            alpn: Some(b"h2".to_vec()),
            version: Some("TLSv1.3"),
            ..TlsFacts::default()
        };
        let bytes = header(client, local, Some(&facts));
        assert_eq!(bytes[13], FAMILY_TCP6);
        let body = &bytes[16 + 36..];
        assert_eq!(body[0], TYPE_ALPN);
        assert_eq!(&body[3..5], b"h2");
        assert_eq!(body[5], TYPE_AUTHORITY);
        let declared = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        assert_eq!(declared, bytes.len() - 16);
    }

    #[test]
    fn malformed_der_gives_no_name_instead_of_a_panic() {
        for input in [
            &b""[..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x05, 1],
        ] {
            assert_eq!(subject_common_name(input), None);
        }
    }
}
