//! A PEM reader that tolerates what OpenSSL tolerates and says precisely
//! why it refuses the rest.
//!
//! Tolerated: CRLF, lone CR or mixed line ends, a UTF-8 byte order mark,
//! text before, between and after blocks, RFC 1421 headers inside a block,
//! and whitespace inside base64 lines. Refused with a reason: a PEM with no
//! line breaks, `\n` written as two characters, a BEGIN line without its
//! END line, a damaged base64 body, binary DER, an HTML page and an empty
//! file.

use std::fmt;

/// One decoded `-----BEGIN LABEL-----` … `-----END LABEL-----` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The label between `BEGIN ` and the closing dashes.
    pub label: String,
    /// RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`), names as written.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub der: Vec<u8>,
}

impl Block {
    /// Whether RFC 1421 headers mark the body as encrypted (legacy
    /// OpenSSL `-----BEGIN RSA PRIVATE KEY-----` with a passphrase).
    pub fn is_encrypted(&self) -> bool {
        self.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("Proc-Type") && value.contains("ENCRYPTED")
        })
    }
}

/// Why a text could not be read as PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PemError {
    /// Nothing but whitespace.
    Empty,
    /// Binary data that starts like a DER SEQUENCE.
    Der,
    /// An HTML document (an error page saved in place of the file).
    Html,
    /// Text with no `-----BEGIN` line at all.
    NoBlock,
    /// BEGIN and END on a single line: the line breaks were stripped.
    NoLineBreaks,
    /// Line breaks written as the two characters `\` and `n`.
    EscapedNewlines,
    /// A BEGIN line whose END line never comes (a truncated file).
    MissingEnd { label: String, line: usize },
    /// An END line whose label differs from its BEGIN line.
    MismatchedEnd {
        begin: String,
        end: String,
        line: usize,
    },
    /// A body line that is not base64.
    BadBase64 { label: String, line: usize },
}

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("file is empty"),
            Self::Der => f.write_str(
                "holds binary DER, not PEM (convert it with `openssl x509 -inform der`)",
            ),
            Self::Html => f.write_str("holds an HTML page, not PEM"),
            Self::NoBlock => f.write_str("no PEM block found (no -----BEGIN line)"),
            Self::NoLineBreaks => f.write_str(
                "PEM has no line breaks (BEGIN and END are on one line); \
                 restore the newlines",
            ),
            Self::EscapedNewlines => f.write_str(
                "PEM contains escaped \\n sequences instead of line breaks; \
                 write real newlines",
            ),
            Self::MissingEnd { label, line } => write!(
                f,
                "the {} begun on line {line} has no END line (file truncated?)",
                describe(label)
            ),
            Self::MismatchedEnd { begin, end, line } => write!(
                f,
                "the END line on line {line} ({}) closes a {}",
                describe(end),
                describe(begin)
            ),
            Self::BadBase64 { label, line } => {
                write!(
                    f,
                    "bad base64 on line {line} inside the {}",
                    describe(label)
                )
            }
        }
    }
}

impl std::error::Error for PemError {}

/// How messages name a block. Key labels are described, not quoted: the
/// words of a key's PEM header are never printed, so a search of logs
/// for them finds nothing even when a key file is broken.
pub fn describe(label: &str) -> String {
    match label {
        "PRIVATE KEY" => "PKCS#8 key block".to_owned(),
        "RSA PRIVATE KEY" => "PKCS#1 RSA key block".to_owned(),
        "EC PRIVATE KEY" => "SEC1 EC key block".to_owned(),
        "ENCRYPTED PRIVATE KEY" => "encrypted PKCS#8 key block".to_owned(),
        other if other.ends_with("PRIVATE KEY") => "key block of another kind".to_owned(),
        other => format!("{other} block"),
    }
}

/// Reads every PEM block in `input`, in order.
///
/// An input with no block at all is an error; so is any block that is
/// malformed, even when other blocks are fine: a half-written file must
/// never be taken for a shorter valid one.
pub fn parse(input: &[u8]) -> Result<Vec<Block>, PemError> {
    let input = input.strip_prefix(b"\xef\xbb\xbf").unwrap_or(input);
    if input.iter().all(u8::is_ascii_whitespace) {
        return Err(PemError::Empty);
    }
    if !contains(input, b"-----BEGIN ") {
        return Err(classify_non_pem(input));
    }
    if contains(input, b"-----\\n") || contains(input, b"\\n-----") {
        return Err(PemError::EscapedNewlines);
    }

    let mut blocks = Vec::new();
    let mut open: Option<OpenBlock> = None;
    for (index, raw) in split_lines(input).enumerate() {
        let line_no = index + 1;
        let line = trim(raw);
        match open.as_mut() {
            None => {
                if let Some(label) = begin_label(line)? {
                    open = Some(OpenBlock::new(label, line_no));
                }
            }
            Some(block) => {
                if let Some(end) = strip_marker(line, b"-----END ") {
                    let block = open.take().expect("checked just above");
                    blocks.push(block.finish(end, line_no)?);
                } else if line.starts_with(b"-----BEGIN ") {
                    return Err(PemError::MissingEnd {
                        label: block.label.clone(),
                        line: block.line,
                    });
                } else {
                    block.push(line, line_no)?;
                }
            }
        }
    }
    if let Some(block) = open {
        return Err(PemError::MissingEnd {
            label: block.label,
            line: block.line,
        });
    }
    Ok(blocks)
}

struct OpenBlock {
    label: String,
    line: usize,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    in_body: bool,
}

impl OpenBlock {
    fn new(label: String, line: usize) -> Self {
        Self {
            label,
            line,
            headers: Vec::new(),
            body: Vec::new(),
            in_body: false,
        }
    }

    fn push(&mut self, line: &[u8], line_no: usize) -> Result<(), PemError> {
        if !self.in_body {
            if line.is_empty() {
                // The blank line that ends the RFC 1421 headers.
                if !self.headers.is_empty() {
                    self.in_body = true;
                }
                return Ok(());
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
                let value = String::from_utf8_lossy(&line[colon + 1..])
                    .trim()
                    .to_owned();
                self.headers.push((name, value));
                return Ok(());
            }
            self.in_body = true;
        }
        for &byte in line {
            match byte {
                b' ' | b'\t' => {}
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' | b'=' => {
                    self.body.push(byte);
                }
                _ => {
                    return Err(PemError::BadBase64 {
                        label: self.label.clone(),
                        line: line_no,
                    })
                }
            }
        }
        Ok(())
    }

    fn finish(self, end: &[u8], line_no: usize) -> Result<Block, PemError> {
        let end = String::from_utf8_lossy(end).into_owned();
        if end != self.label {
            return Err(PemError::MismatchedEnd {
                begin: self.label,
                end,
                line: line_no,
            });
        }
        let der = decode_base64(&self.body).ok_or_else(|| PemError::BadBase64 {
            label: self.label.clone(),
            line: self.line,
        })?;
        Ok(Block {
            label: self.label,
            headers: self.headers,
            der,
        })
    }
}

fn classify_non_pem(input: &[u8]) -> PemError {
    if input.len() >= 2 && input[0] == 0x30 && (0x80..=0x84).contains(&input[1]) {
        return PemError::Der;
    }
    let head = &input[..input.len().min(512)];
    let lower: Vec<u8> = head.to_ascii_lowercase();
    if contains(&lower, b"<html") || contains(&lower, b"<!doctype") {
        return PemError::Html;
    }
    PemError::NoBlock
}

/// The label of a BEGIN line, `None` for any other line outside a block.
fn begin_label(line: &[u8]) -> Result<Option<String>, PemError> {
    let Some(rest) = line.strip_prefix(b"-----BEGIN ") else {
        return Ok(None);
    };
    let Some(close) = find(rest, b"-----") else {
        return Ok(None);
    };
    if close + 5 < rest.len() {
        // Something follows the BEGIN marker on the same line: the body
        // and END line were joined onto it.
        return Err(PemError::NoLineBreaks);
    }
    Ok(Some(String::from_utf8_lossy(&rest[..close]).into_owned()))
}

fn strip_marker<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    line.strip_prefix(prefix)?.strip_suffix(b"-----")
}

/// Splits on LF, CRLF or a lone CR.
fn split_lines(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = input;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(cut) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
            let line = rest;
            rest = &[];
            return Some(line);
        };
        let line = &rest[..cut];
        let crlf = rest[cut] == b'\r' && rest.get(cut + 1) == Some(&b'\n');
        rest = &rest[cut + if crlf { 2 } else { 1 }..];
        Some(line)
    })
}

fn trim(line: &[u8]) -> &[u8] {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &line[start..end]
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Decodes standard base64 with optional `=` padding; `None` when the
/// length or the padding is impossible.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let unpadded = text.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    let padding = text.len() - unpadded;
    if padding > 2 || (padding > 0 && text.len() % 4 != 0) {
        return None;
    }
    let body = &text[..unpadded];
    if body.contains(&b'=') || body.len() % 4 == 1 {
        return None;
    }

    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            acc = (acc << 6) | u32::from(sextet(c)?);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nTWFu\nTWE=\n-----END CERTIFICATE-----\n";

    #[test]
    fn reads_a_block_with_text_around_it() {
        let text = format!("subject=CN foo\n{CERT}trailing words\n");
        let blocks = parse(text.as_bytes()).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].label, "CERTIFICATE");
        assert_eq!(blocks[0].der, b"ManMa");
    }

    #[test]
    fn crlf_lone_cr_and_bom_read_the_same() {
        let crlf = CERT.replace('\n', "\r\n");
        let cr = CERT.replace('\n', "\r");
        let bom = format!("\u{feff}{CERT}");
        let want = parse(CERT.as_bytes()).unwrap();
        for text in [crlf, cr, bom] {
            assert_eq!(parse(text.as_bytes()).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn one_line_pem_is_named() {
        let joined = CERT.replace('\n', "");
        assert_eq!(parse(joined.as_bytes()), Err(PemError::NoLineBreaks));
    }

    #[test]
    fn escaped_newlines_are_named() {
        let escaped = CERT.replace('\n', "\\n");
        assert_eq!(parse(escaped.as_bytes()), Err(PemError::EscapedNewlines));
    }

    #[test]
    fn truncated_block_is_missing_its_end() {
        let half = &CERT[..38];
        assert!(matches!(
            parse(half.as_bytes()),
            Err(PemError::MissingEnd { line: 1, .. })
        ));
    }

    #[test]
    fn damaged_body_line_is_located() {
        let bad = CERT.replace("TWE=", "T!E=");
        assert!(matches!(
            parse(bad.as_bytes()),
            Err(PemError::BadBase64 { line: 3, .. })
        ));
    }

    #[test]
    fn non_pem_inputs_are_classified() {
        assert_eq!(parse(b"  \n"), Err(PemError::Empty));
        assert_eq!(parse(&[0x30, 0x82, 1, 2]), Err(PemError::Der));
        assert_eq!(parse(b"<HTML><body>502</body>"), Err(PemError::Html));
        assert_eq!(parse(b"hello"), Err(PemError::NoBlock));
    }

    #[test]
    fn legacy_encrypted_headers_are_kept() {
        let text = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                    DEK-Info: AES-128-CBC,00\n\nTWFu\n-----END RSA PRIVATE KEY-----\n";
        let blocks = parse(text.as_bytes()).unwrap();
        assert!(blocks[0].is_encrypted());
        assert_eq!(blocks[0].der, b"Man");
    }

    #[test]
    fn base64_padding_rules() {
        assert_eq!(decode_base64(b"TWFu").unwrap(), b"Man");
        assert_eq!(decode_base64(b"TWE=").unwrap(), b"Ma");
        assert_eq!(decode_base64(b"TQ==").unwrap(), b"M");
        assert_eq!(decode_base64(b"TQ").unwrap(), b"M");
        assert!(decode_base64(b"T").is_none());
        assert!(decode_base64(b"TQ===").is_none());
        assert!(decode_base64(b"T=Qa").is_none());
    }
}
