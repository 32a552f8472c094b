//! `spicegw-load`: a TLS load client for spicegw's benchmarks.
//!
//! One process, one tokio runtime, a bounded run: at most
//! `--connections` connections and `--max-seconds` seconds, then one JSON
//! report on stdout. See `spicegw-load --help` for the modes and options.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use rustls::ClientConfig;
use serde_json::{json, Map, Value};

mod args;
mod bulk;
mod conn;
mod connect;
mod idle;
mod serve;
mod tally;
mod tls;

use args::{Command, Mode, Options, ServeOptions};
use conn::Target;

/// What every task of a run shares.
pub struct Run {
    pub options: Options,
    pub target: Target,
    /// No connection starts after this, and a bulk transfer stops here.
    pub deadline: Instant,
}

fn main() -> ExitCode {
    let options = match args::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(options)) => *options,
        Ok(Command::Serve(options)) => return serve(&options),
        Ok(Command::Help) => {
            let _ = std::io::stdout().write_all(args::USAGE.as_bytes());
            return ExitCode::SUCCESS;
        }
        Err(message) => return setup_error(&message, true),
    };
    let config = match tls::base_config(&options) {
        Ok(config) => config,
        Err(message) => return setup_error(&message, false),
    };
    let name = match tls::server_name(&options.server_name) {
        Ok(name) => name,
        Err(message) => return setup_error(&message, false),
    };
    let runtime = match build_runtime(options.threads) {
        Ok(runtime) => runtime,
        Err(err) => return setup_error(&format!("cannot start the runtime: {err}"), false),
    };

    let run = Arc::new(Run {
        target: Target {
            addr: options.target,
            name,
            step_timeout: options.timeout,
        },
        deadline: Instant::now() + options.max_seconds,
        options,
    });
    let report = runtime.block_on(run_mode(Arc::clone(&run), config));
    // Connections still open belong to tasks that have ended; nothing
    // needs waiting for.
    runtime.shutdown_background();

    // `resume` counts its priming connections apart; they count here.
    let report = Value::Object(report);
    let failed = [&report["connections"], &report["priming"]["connections"]]
        .into_iter()
        .any(|counts| counts["failed"].as_u64().is_some_and(|n| n > 0));
    if let Err(message) = write_report(&report) {
        return setup_error(&message, false);
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `serve`: the upstream, until its deadline or a signal; then its
/// report. It exits 0 whatever its connections did: the clients' reports
/// say whether they were served.
fn serve(options: &ServeOptions) -> ExitCode {
    let runtime = match build_runtime(options.threads) {
        Ok(runtime) => runtime,
        Err(err) => return setup_error(&format!("cannot start the runtime: {err}"), false),
    };
    let report = match runtime.block_on(serve::serve(options)) {
        Ok(report) => report,
        Err(message) => return setup_error(&message, false),
    };
    // Connections still open are dropped with the runtime.
    runtime.shutdown_background();
    match write_report(&Value::Object(report)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => setup_error(&message, false),
    }
}

fn write_report(report: &Value) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, report)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .map_err(|err| format!("cannot write the report: {err}"))
}

async fn run_mode(run: Arc<Run>, config: Arc<ClientConfig>) -> Map<String, Value> {
    let options = &run.options;
    let mut report = Map::new();
    report.insert("mode".into(), json!(options.mode.name()));
    report.insert("target".into(), json!(options.target.to_string()));
    report.insert("server_name".into(), json!(options.server_name));
    report.insert(
        "tls_version".into(),
        json!(if options.tls12 { "1.2" } else { "1.3" }),
    );
    report.insert("groups".into(), json!(options.groups));
    report.insert("threads".into(), json!(options.threads));
    report.insert("concurrency".into(), json!(options.concurrency));

    let fields = match options.mode {
        Mode::Connect => connect::connect(Arc::clone(&run), config).await,
        Mode::Resume => connect::resume(Arc::clone(&run), config).await,
        Mode::Bulk => bulk::bulk(Arc::clone(&run), config).await,
        Mode::Idle => idle::idle(Arc::clone(&run), config).await,
    };
    report.extend(fields);
    report
}

/// `--threads 1` runs everything on this thread; more start tokio's
/// multi-thread scheduler with that many workers.
fn build_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn setup_error(message: &str, usage: bool) -> ExitCode {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "spicegw-load: {message}");
    if usage {
        let _ = writeln!(stderr, "run `spicegw-load --help` for usage");
    }
    ExitCode::from(2)
}
