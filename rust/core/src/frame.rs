//! The pipe protocol between the supervisor and a worker.
//!
//! Every message is a frame: a 16-byte header, then `length` bytes of
//! payload.
//!
//! ```text
//! 0      2      3      4             8                     16
//! | "SG" | kind | 0    | length (BE) | generation (BE)     | payload…
//! ```
//!
//! Supervisor to worker: [`Kind::Bundle`] (one scope's chain, key and
//! client-auth settings as tagged fields), [`Kind::TicketKeys`],
//! [`Kind::Ping`] and [`Kind::Shutdown`]. Worker to supervisor: [`Kind::Ready`],
//! [`Kind::Ack`], [`Kind::Nack`], [`Kind::Stats`], [`Kind::Pong`],
//! [`Kind::Log`] and [`Kind::Fatal`], each with a small JSON payload.

use std::fmt;

use rustls::pki_types::CertificateDer;

use crate::bundle::{Bundle, KeyFormat};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SG";
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// The largest payload accepted; a certificate bundle is a few kilobytes.
pub const MAX_PAYLOAD: usize = 4 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A scope's certificate bundle; `generation` numbers it.
    Bundle = 1,
    /// Session ticket master keys, newest first (see `tickets`).
    TicketKeys = 2,
    /// Stop accepting, drain, exit; payload: deadline in ms (u32, BE).
    Shutdown = 3,
    /// Liveness probe; the worker answers with a Pong of the same number.
    Ping = 4,
    /// Worker listening and serving the bundles it was given.
    Ready = 64,
    /// Worker serves `generation` for a scope.
    Ack = 65,
    /// Worker refused the bundle of `generation`.
    Nack = 66,
    /// Counters since the worker started.
    Stats = 67,
    /// The worker cannot go on; payload says why.
    Fatal = 68,
    /// Answer to a Ping.
    Pong = 69,
    /// Something the operator should read, already rate-limited.
    Log = 70,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Bundle,
            2 => Self::TicketKeys,
            3 => Self::Shutdown,
            4 => Self::Ping,
            64 => Self::Ready,
            65 => Self::Ack,
            66 => Self::Nack,
            67 => Self::Stats,
            68 => Self::Fatal,
            69 => Self::Pong,
            70 => Self::Log,
            _ => return None,
        })
    }
}

/// A complete frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub generation: u64,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    // The payload of a bundle holds a private key: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A stream of bytes that is not a valid frame sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    BadMagic,
    UnknownKind(u8),
    TooLarge(usize),
    BadField(&'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("frame does not start with the protocol magic"),
            Self::UnknownKind(kind) => write!(f, "unknown frame kind {kind}"),
            Self::TooLarge(len) => write!(f, "frame payload of {len} bytes is too large"),
            Self::BadField(what) => write!(f, "malformed bundle field: {what}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Encodes one frame.
pub fn encode(kind: Kind, generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.push(0);
    // MAX_PAYLOAD fits a u32; larger payloads are a bug on our side.
    let length = u32::try_from(payload.len()).expect("payload below 4 GiB");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a byte stream into frames; feed it whatever the pipe gives.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Appends bytes read from the pipe.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` when more bytes are needed.
    ///
    /// After an error the stream cannot be resynchronised; the caller
    /// drops the pipe.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.buf[..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let kind = Kind::from_u8(self.buf[2]).ok_or(FrameError::UnknownKind(self.buf[2]))?;
        let length = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let length = length as usize;
        if length > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(length));
        }
        if self.buf.len() < HEADER_LEN + length {
            return Ok(None);
        }
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&self.buf[8..16]);
        let payload = self.buf[HEADER_LEN..HEADER_LEN + length].to_vec();
        self.buf.drain(..HEADER_LEN + length);
        Ok(Some(Frame {
            kind,
            generation: u64::from_be_bytes(generation),
            payload,
        }))
    }
}

/// Whether and how a scope asks clients for a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAuth {
    #[default]
    None,
    Request,
    Required,
}

/// A scope's bundle as it crosses the pipe.
#[derive(Clone, Debug)]
pub struct BundleMessage {
    pub scope: String,
    pub bundle: Bundle,
    pub client_auth: ClientAuth,
    /// Trust anchors for client certificates (DER).
    pub client_ca: Vec<CertificateDer<'static>>,
}

const TAG_SCOPE: u8 = 1;
const TAG_CERT: u8 = 2;
const TAG_KEY_PKCS8: u8 = 3;
const TAG_KEY_PKCS1: u8 = 4;
const TAG_KEY_SEC1: u8 = 5;
const TAG_CLIENT_CA: u8 = 6;
const TAG_CLIENT_AUTH: u8 = 7;

impl BundleMessage {
    /// The payload of a [`Kind::Bundle`] frame: tag (u8), length (u32 BE),
    /// value, repeated.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |tag: u8, value: &[u8]| {
            out.push(tag);
            let length = u32::try_from(value.len()).expect("field below 4 GiB");
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(value);
        };
        field(TAG_SCOPE, self.scope.as_bytes());
        for cert in &self.bundle.certs {
            field(TAG_CERT, cert.as_ref());
        }
        let key_tag = match self.bundle.key_format() {
            KeyFormat::Pkcs8 => TAG_KEY_PKCS8,
            KeyFormat::Pkcs1 => TAG_KEY_PKCS1,
            KeyFormat::Sec1 => TAG_KEY_SEC1,
        };
        field(key_tag, self.bundle.key_der());
        for ca in &self.client_ca {
            field(TAG_CLIENT_CA, ca.as_ref());
        }
        let mode = match self.client_auth {
            ClientAuth::None => 0,
            ClientAuth::Request => 1,
            ClientAuth::Required => 2,
        };
        field(TAG_CLIENT_AUTH, &[mode]);
        out
    }

    /// Parses a [`Kind::Bundle`] payload. The certificates are checked to
    /// be X.509; whether the key matches is [`Bundle::certified_key`]'s job.
    pub fn decode(mut payload: &[u8]) -> Result<Self, FrameError> {
        let mut scope = None;
        let mut certs = Vec::new();
        let mut key = None;
        let mut client_ca = Vec::new();
        let mut client_auth = ClientAuth::None;

        while !payload.is_empty() {
            if payload.len() < 5 {
                return Err(FrameError::BadField("truncated field header"));
            }
            let tag = payload[0];
            let length = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
            let length = length as usize;
            let value = payload
                .get(5..5 + length)
                .ok_or(FrameError::BadField("field runs past the payload"))?;
            payload = &payload[5 + length..];

            match tag {
                TAG_SCOPE => {
                    let text = std::str::from_utf8(value)
                        .map_err(|_| FrameError::BadField("scope is not UTF-8"))?;
                    scope = Some(text.to_owned());
                }
                TAG_CERT => certs.push(CertificateDer::from(value.to_vec())),
                TAG_KEY_PKCS8 | TAG_KEY_PKCS1 | TAG_KEY_SEC1 => {
                    if key.is_some() {
                        return Err(FrameError::BadField("more than one key"));
                    }
                    let format = match tag {
                        TAG_KEY_PKCS8 => KeyFormat::Pkcs8,
                        TAG_KEY_PKCS1 => KeyFormat::Pkcs1,
                        _ => KeyFormat::Sec1,
                    };
                    key = Some((format, value.to_vec()));
                }
                TAG_CLIENT_CA => client_ca.push(CertificateDer::from(value.to_vec())),
                TAG_CLIENT_AUTH => {
                    client_auth = match value {
                        [0] => ClientAuth::None,
                        [1] => ClientAuth::Request,
                        [2] => ClientAuth::Required,
                        _ => return Err(FrameError::BadField("client auth mode")),
                    }
                }
                _ => return Err(FrameError::BadField("unknown tag")),
            }
        }

        let scope = scope.ok_or(FrameError::BadField("no scope"))?;
        let (key_format, key_der) = key.ok_or(FrameError::BadField("no key"))?;
        let bundle = Bundle::from_der(certs, key_format, key_der)
            .map_err(|_| FrameError::BadField("certificate is not X.509"))?;
        Ok(Self {
            scope,
            bundle,
            client_auth,
            client_ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_come_out_whole() {
        let mut bytes = encode(Kind::Ping, 7, b"");
        bytes.extend(encode(Kind::Stats, 0, b"{\"a\":1}"));
        let mut decoder = Decoder::default();
        let mut frames = Vec::new();
        for byte in bytes {
            decoder.feed(&[byte]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].kind, frames[0].generation), (Kind::Ping, 7));
        assert_eq!(frames[1].payload, b"{\"a\":1}");
    }

    #[test]
    fn garbage_is_refused_not_waited_on() {
        let mut decoder = Decoder::default();
        decoder.feed(&[0u8; 16]);
        assert_eq!(decoder.next_frame(), Err(FrameError::BadMagic));

        let mut decoder = Decoder::default();
        let mut bytes = encode(Kind::Ping, 0, b"");
        bytes[2] = 200;
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame(), Err(FrameError::UnknownKind(200)));

        let mut decoder = Decoder::default();
        let mut bytes = encode(Kind::Ping, 0, b"");
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        decoder.feed(&bytes);
        assert!(matches!(decoder.next_frame(), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn bundle_fields_must_be_whole() {
        for payload in [&[1u8, 0, 0][..], &[1, 0, 0, 0, 9, b'x'], &[99, 0, 0, 0, 0]] {
            assert!(BundleMessage::decode(payload).is_err(), "{payload:?}");
        }
        // A scope alone lacks a key.
        let scope_only = [TAG_SCOPE, 0, 0, 0, 1, b'p'];
        assert_eq!(
            BundleMessage::decode(&scope_only).unwrap_err(),
            FrameError::BadField("no key")
        );
    }
}
