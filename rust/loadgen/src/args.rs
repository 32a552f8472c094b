//! The command line, parsed by hand: one mode word, then `--name value`
//! (or `--name=value`) options and a few bare switches.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "\
usage: spicegw-load MODE --target ADDR --ca FILE [OPTIONS]
       spicegw-load serve --listen ADDR [--max-seconds S] [--timeout S]
                          [--threads N]

Modes:
  connect   full TLS connections: connect, handshake, one request, the
            reply read to the end, close; resumption off and checked
  resume    one full handshake per lane, then connections that must resume
  bulk      one connection moving --upload and/or --download bytes
  idle      open connections, hold them, optionally ping each, close
  serve     a plain TCP upstream for the other modes, behind a proxy:
            each connection's first line picks what it does (below)

Common options:
  --target ADDR          server address, a loopback IP and port (required)
  --ca FILE              PEM file of the CA certificate(s) to trust (required)
  --server-name NAME     name to verify and send as SNI [localhost]
  --tls12                offer TLS 1.2 only [TLS 1.3 only]
  --groups LIST          key exchange groups, comma separated [X25519]
  --connections N        connections to make or open [100; bulk: 1]
  --concurrency C        connections in flight at once [1]
  --threads N            runtime threads; 1 is tokio's current_thread [1]
  --max-seconds S        no connection starts after S seconds [60]
  --timeout S            limit of each step of a connection [10]

connect and resume:
  --request STRING       bytes sent after the handshake, with \\r \\n \\t \\\\
                         \\0 and \\xHH escapes [GET / HTTP/1.0\\r\\n\\r\\n]
  --expect-bytes N       read N reply bytes and close, instead of reading
                         to the end of the stream
  --expect-prefix STRING the reply must start with STRING (same escapes)

bulk:
  --upload BYTES         bytes of a fixed pattern to send (suffix k, m, g)
  --download BYTES       bytes to read (suffix k, m, g)
  --echo                 the upstream echoes: read back what is sent and
                         check it byte for byte (--download defaults to
                         --upload)
  --request STRING       sent once before the transfer when given

idle:
  --hold-seconds S       how long to hold the open connections [10]
  --ping                 at the end, each connection sends a line that an
                         echoing upstream must send back

serve:
  --listen ADDR          where to listen, a loopback IP and port; port 0
                         picks one, and stderr says `serve: listening on
                         ADDR` once it listens (required)
  --max-seconds S        stop after S seconds [60]; SIGTERM stops it too
  --timeout S            limit of each read and write [10]
  First lines: `SINK <n>` reads n bytes of bulk's pattern, then replies
  `OK <n>\n`; `SOURCE <n>` sends n bytes of the pattern; `ECHO` sends
  back the rest of the stream; any other line is answered with `OK ` and
  the line. Each reply ends with the end of the stream.

One JSON object is written to stdout. Exit status: 0 when every
connection succeeded, 1 when any failed, 2 for a usage or setup error;
serve exits 0 when it stopped, whatever its connections did.
";

/// What the run does with its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Connect,
    Resume,
    Bulk,
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Resume => "resume",
            Self::Bulk => "bulk",
            Self::Idle => "idle",
        }
    }
}

/// Everything the command line says, checked.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub target: SocketAddr,
    pub ca: PathBuf,
    pub server_name: String,
    pub tls12: bool,
    pub groups: Vec<String>,
    pub connections: u64,
    pub concurrency: usize,
    pub threads: usize,
    pub max_seconds: Duration,
    pub timeout: Duration,
    /// `None` when not given; connect and resume then send the default.
    pub request: Option<Vec<u8>>,
    pub expect_bytes: Option<u64>,
    pub expect_prefix: Option<Vec<u8>>,
    pub upload: u64,
    pub download: u64,
    pub echo: bool,
    pub hold: Duration,
    pub ping: bool,
}

impl Options {
    /// What connect and resume send after the handshake.
    pub fn request_bytes(&self) -> &[u8] {
        self.request.as_deref().unwrap_or(DEFAULT_REQUEST)
    }
}

const DEFAULT_REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

/// What `serve` needs: it makes no TLS connections of its own.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub threads: usize,
    pub max_seconds: Duration,
    pub timeout: Duration,
}

/// What `main` is asked to do.
#[derive(Debug)]
pub enum Command {
    Run(Box<Options>),
    Serve(ServeOptions),
    Help,
}

/// The options `serve` takes; any other is a mistake there.
const SERVE_OPTIONS: [&str; 4] = ["--listen", "--threads", "--max-seconds", "--timeout"];

/// The mode word: a client mode, or the upstream.
enum Word {
    Client(Mode),
    Serve,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter().map(|arg| {
        arg.into_string()
            .map_err(|arg| format!("argument {arg:?} is not UTF-8"))
    });

    let mut word = None;
    let mut given = Vec::new();
    let mut listen = None;
    let mut target = None;
    let mut ca = None;
    let mut server_name = "localhost".to_owned();
    let mut tls12 = false;
    let mut groups = vec!["X25519".to_owned()];
    let mut connections = None;
    let mut concurrency = 1;
    let mut threads = 1;
    let mut max_seconds = Duration::from_secs(60);
    let mut timeout = Duration::from_secs(10);
    let mut request = None;
    let mut expect_bytes = None;
    let mut expect_prefix = None;
    let mut upload = 0;
    let mut download = 0;
    let mut echo = false;
    let mut hold = Duration::from_secs(10);
    let mut ping = false;

    while let Some(arg) = args.next() {
        let arg = arg?;
        if !arg.starts_with("--") {
            if word.is_some() {
                return Err(format!("unexpected argument {arg:?}"));
            }
            word = Some(parse_mode(&arg)?);
            continue;
        }

        // `--name=value` or `--name value`; switches take no value.
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let switch = matches!(name.as_str(), "--tls12" | "--echo" | "--ping" | "--help");
        if switch && inline.is_some() {
            return Err(format!("{name} takes no value"));
        }
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(value) => Ok(value),
                None => args
                    .next()
                    .transpose()?
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };

        given.push(name.clone());
        match name.as_str() {
            "--help" => return Ok(Command::Help),
            "--listen" => listen = Some(parse_loopback(&name, &value()?)?),
            "--tls12" => tls12 = true,
            "--echo" => echo = true,
            "--ping" => ping = true,
            "--target" => target = Some(parse_loopback(&name, &value()?)?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--server-name" => server_name = value()?,
            "--groups" => groups = parse_list(&name, &value()?)?,
            "--connections" => connections = Some(parse_count(&name, &value()?)?),
            "--concurrency" => concurrency = parse_size(&name, &value()?)?,
            "--threads" => threads = parse_size(&name, &value()?)?,
            "--max-seconds" => max_seconds = parse_seconds(&name, &value()?, false)?,
            "--timeout" => timeout = parse_seconds(&name, &value()?, false)?,
            "--hold-seconds" => hold = parse_seconds(&name, &value()?, true)?,
            "--request" => request = Some(unescape(&name, &value()?)?),
            "--expect-bytes" => expect_bytes = Some(parse_count(&name, &value()?)?),
            "--expect-prefix" => expect_prefix = Some(unescape(&name, &value()?)?),
            "--upload" => upload = parse_bytes(&name, &value()?)?,
            "--download" => download = parse_bytes(&name, &value()?)?,
            _ => return Err(format!("unknown option {name}")),
        }
    }

    let mode = match word.ok_or("no mode given (connect, resume, bulk, idle or serve)")? {
        Word::Client(mode) => mode,
        Word::Serve => {
            if let Some(name) = given
                .iter()
                .find(|name| !SERVE_OPTIONS.contains(&name.as_str()))
            {
                return Err(format!("{name} does not belong to serve"));
            }
            return Ok(Command::Serve(ServeOptions {
                listen: listen.ok_or("serve needs --listen")?,
                threads,
                max_seconds,
                timeout,
            }));
        }
    };
    if listen.is_some() {
        return Err("--listen belongs to serve".into());
    }
    let target = target.ok_or("--target is required")?;
    let ca = ca.ok_or("--ca is required")?;

    // Bulk moves its bytes over one connection; the others default to 100.
    let connections = match (mode, connections) {
        (Mode::Bulk, Some(n)) if n != 1 => {
            return Err("bulk uses one connection; leave out --connections".into())
        }
        (Mode::Bulk, _) => 1,
        (_, Some(n)) => n,
        (_, None) => 100,
    };
    // More lanes than connections would only sit idle.
    let concurrency = usize::try_from(connections).map_or(concurrency, |n| concurrency.min(n));

    if mode == Mode::Bulk {
        if echo {
            if upload == 0 {
                return Err("--echo needs --upload".into());
            }
            if download != 0 && download != upload {
                return Err("with --echo, --download must equal --upload or be left out".into());
            }
            download = upload;
        }
        if upload == 0 && download == 0 {
            return Err("bulk needs --upload or --download".into());
        }
    } else if upload != 0 || download != 0 || echo {
        return Err("--upload, --download and --echo belong to bulk".into());
    }
    if mode != Mode::Idle && ping {
        return Err("--ping belongs to idle".into());
    }
    if matches!(mode, Mode::Bulk | Mode::Idle)
        && (expect_bytes.is_some() || expect_prefix.is_some())
    {
        return Err("--expect-bytes and --expect-prefix belong to connect and resume".into());
    }
    if mode == Mode::Idle && request.is_some() {
        return Err("idle sends no request; see --ping".into());
    }

    Ok(Command::Run(Box::new(Options {
        mode,
        target,
        ca,
        server_name,
        tls12,
        groups,
        connections,
        concurrency,
        threads,
        max_seconds,
        timeout,
        request,
        expect_bytes,
        expect_prefix,
        upload,
        download,
        echo,
        hold,
        ping,
    })))
}

fn parse_mode(word: &str) -> Result<Word, String> {
    match word {
        "connect" => Ok(Word::Client(Mode::Connect)),
        "resume" => Ok(Word::Client(Mode::Resume)),
        "bulk" => Ok(Word::Client(Mode::Bulk)),
        "idle" => Ok(Word::Client(Mode::Idle)),
        "serve" => Ok(Word::Serve),
        _ => Err(format!(
            "unknown mode {word:?} (connect, resume, bulk, idle or serve)"
        )),
    }
}

/// An `IP:PORT` on the loopback network. This is a benchmark tool for
/// one machine: refusing other addresses keeps a slip of the finger from
/// sending load anywhere else, or from serving to anyone else.
fn parse_loopback(name: &str, text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{name} {text:?} is not IP:PORT"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{name} {addr} is not a loopback address; spicegw-load only loads this machine"
        ));
    }
    Ok(addr)
}

fn parse_list(name: &str, text: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect();
    if items.is_empty() {
        return Err(format!("{name} needs at least one name"));
    }
    Ok(items)
}

fn parse_count(name: &str, text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} {text:?} is not a whole number above 0")),
    }
}

fn parse_size(name: &str, text: &str) -> Result<usize, String> {
    let n = parse_count(name, text)?;
    usize::try_from(n).map_err(|_| format!("{name} {text:?} is too large"))
}

/// Seconds as a decimal number, at most a day: every run must end.
fn parse_seconds(name: &str, text: &str, zero_ok: bool) -> Result<Duration, String> {
    let bad = || format!("{name} {text:?} is not a number of seconds up to 86400");
    let seconds: f64 = text.parse().map_err(|_| bad())?;
    let low_ok = if zero_ok {
        seconds >= 0.0
    } else {
        seconds > 0.0
    };
    if !low_ok || !seconds.is_finite() || seconds > 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A byte count with an optional binary suffix: `64k`, `1m`, `2g`.
fn parse_bytes(name: &str, text: &str) -> Result<u64, String> {
    let lower = text.to_ascii_lowercase();
    let (digits, unit) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1 << 10),
        Some(b'm') => (&lower[..lower.len() - 1], 1 << 20),
        Some(b'g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{name} {text:?} is not a byte count (like 4096, 64k, 1g)"))
}

/// Reads `\r`, `\n`, `\t`, `\\`, `\0` and `\xHH` escapes, so a request
/// with line ends can be written on a command line.
fn unescape(name: &str, text: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("{name}: bad escape in {text:?}");
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        let decoded = match bytes.next().ok_or_else(bad)? {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' => {
                let high = bytes.next().ok_or_else(bad)?;
                let low = bytes.next().ok_or_else(bad)?;
                let hex = [high, low];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                u8::from_str_radix(hex, 16).map_err(|_| bad())?
            }
            _ => return Err(bad()),
        };
        out.push(decoded);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &str) -> Result<Options, String> {
        match parse(words.split(' ').map(OsString::from))? {
            Command::Run(options) => Ok(*options),
            Command::Serve(_) => Err("serve".into()),
            Command::Help => Err("help".into()),
        }
    }

    const BASE: &str = "--target 127.0.0.1:8443 --ca ca.pem";

    #[test]
    fn connect_defaults() {
        let options = parse_words(&format!("connect {BASE}")).unwrap();
        assert_eq!(options.mode, Mode::Connect);
        assert_eq!(options.connections, 100);
        assert_eq!(options.concurrency, 1);
        assert_eq!(options.groups, ["X25519"]);
        assert_eq!(options.request_bytes(), b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(options.timeout, Duration::from_secs(10));
    }

    #[test]
    fn values_inline_or_separate() {
        let options =
            parse_words(&format!("{BASE} --connections=5 connect --concurrency 32")).unwrap();
        assert_eq!(options.connections, 5);
        // Never more lanes than connections.
        assert_eq!(options.concurrency, 5);
    }

    #[test]
    fn escapes_in_request_and_prefix() {
        let options = parse_words(&format!(
            r"connect {BASE} --request GET\x20/\r\n --expect-prefix OK\t\\"
        ))
        .unwrap();
        assert_eq!(options.request.as_deref(), Some(&b"GET /\r\n"[..]));
        assert_eq!(options.expect_prefix.as_deref(), Some(&b"OK\t\\"[..]));
        assert!(parse_words(&format!(r"connect {BASE} --request \q")).is_err());
        assert!(parse_words(&format!(r"connect {BASE} --request \x4")).is_err());
    }

    #[test]
    fn target_must_be_loopback() {
        let err = parse_words("connect --target 10.0.0.1:443 --ca ca.pem").unwrap_err();
        assert!(err.contains("not a loopback address"), "{err}");
        assert!(parse_words("connect --target localhost:443 --ca ca.pem").is_err());
        assert!(parse_words("connect --target [::1]:443 --ca ca.pem").is_ok());
    }

    #[test]
    fn bulk_sizes_and_echo() {
        let options = parse_words(&format!("bulk {BASE} --upload 64k --echo")).unwrap();
        assert_eq!((options.upload, options.download), (65536, 65536));
        assert_eq!(options.connections, 1);
        assert!(parse_words(&format!("bulk {BASE}")).is_err());
        assert!(parse_words(&format!("bulk {BASE} --echo --upload 1k --download 2k")).is_err());
        assert!(parse_words(&format!("bulk {BASE} --download 1q")).is_err());
        assert!(parse_words(&format!("connect {BASE} --upload 1k")).is_err());
    }

    #[test]
    fn every_run_is_bounded() {
        assert!(parse_words(&format!("connect {BASE} --max-seconds 0")).is_err());
        assert!(parse_words(&format!("connect {BASE} --max-seconds inf")).is_err());
        assert!(parse_words(&format!("connect {BASE} --timeout NaN")).is_err());
        assert!(parse_words(&format!("connect {BASE} --connections 0")).is_err());
        assert!(parse_words(&format!("idle {BASE} --hold-seconds 0")).is_ok());
    }

    #[test]
    fn serve_takes_its_own_options() {
        let Command::Serve(options) =
            parse(["serve", "--listen", "127.0.0.1:0", "--max-seconds", "5"].map(OsString::from))
                .unwrap()
        else {
            panic!("not serve");
        };
        assert_eq!(options.listen.port(), 0);
        assert_eq!(options.max_seconds, Duration::from_secs(5));
        assert_eq!(options.timeout, Duration::from_secs(10));

        let serve = |words: &str| parse(words.split(' ').map(OsString::from)).unwrap_err();
        assert_eq!(serve("serve"), "serve needs --listen");
        let err = serve("serve --listen 10.1.2.3:80");
        assert!(err.contains("not a loopback address"), "{err}");
        let err = serve(&format!("serve --listen 127.0.0.1:0 {BASE}"));
        assert_eq!(err, "--target does not belong to serve");
        let err = parse_words(&format!("connect {BASE} --listen 127.0.0.1:0")).unwrap_err();
        assert_eq!(err, "--listen belongs to serve");
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse_words(&format!("connect {BASE} --frobnicate 1")).unwrap_err();
        assert_eq!(err, "unknown option --frobnicate");
        let err = parse_words(&format!("{BASE} --connections")).unwrap_err();
        assert_eq!(err, "--connections needs a value");
        let err = parse_words(BASE).unwrap_err();
        assert!(err.starts_with("no mode given"), "{err}");
        assert!(parse_words(&format!("connect {BASE} --tls12=yes")).is_err());
    }
}
