//! `spicegw._core`: the Python face of spicegw-core.
//!
//! The supervisor calls [`parse_bundle`] to check certificate material with
//! the very code the workers run, [`Bundle::frame`] and [`encode_frame`] to
//! talk to workers, and [`FrameDecoder`] to read their answers. A forked
//! worker calls [`run_worker`], which releases the GIL and does not come
//! back until the worker is done: no Python runs per connection.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use spicegw_core::bundle::{self, BundleError};
use spicegw_core::config::WorkerConfig;
use spicegw_core::frame::{self, BundleMessage, ClientAuth, Kind};
use spicegw_core::{pem, tls, worker};

create_exception!(
    _core,
    PemError,
    PyValueError,
    "Certificate or key material that cannot be served."
);

/// A checked certificate chain and private key.
///
/// The key stays inside this object; Python only ever sees the frame
/// that carries it to a worker.
#[pyclass(module = "spicegw._core", frozen)]
struct Bundle {
    inner: bundle::Bundle,
    fingerprint: String,
}

#[pymethods]
impl Bundle {
    /// The chain as DER, leaf first.
    #[getter]
    fn certificates<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.inner
            .certs
            .iter()
            .map(|cert| PyBytes::new(py, cert.as_ref()))
            .collect()
    }

    /// SHA-256 of the leaf certificate, lowercase hex.
    #[getter]
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key's encoding: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    #[getter]
    fn key_format(&self) -> &'static str {
        self.inner.key_format().name()
    }

    /// Whether `other` decodes to the same chain and key.
    fn same_as(&self, other: &Bundle) -> bool {
        self.inner.same_as(&other.inner, &tls::provider())
    }

    /// A Bundle frame for a worker.
    #[pyo3(signature = (scope, generation, client_auth = "none", client_ca = Vec::new()))]
    fn frame<'py>(
        &self,
        py: Python<'py>,
        scope: String,
        generation: u64,
        client_auth: &str,
        client_ca: Vec<Vec<u8>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let client_auth = match client_auth {
            "none" => ClientAuth::None,
            "request" => ClientAuth::Request,
            "required" => ClientAuth::Required,
            other => {
                return Err(PyValueError::new_err(format!(
                    "client_auth must be none, request or required, not {other:?}"
                )))
            }
        };
        let message = BundleMessage {
            scope,
            bundle: self.inner.clone(),
            client_auth,
            client_ca: client_ca.into_iter().map(Into::into).collect(),
        };
        let bytes = frame::encode(Kind::Bundle, generation, &message.encode());
        Ok(PyBytes::new(py, &bytes))
    }

    fn __repr__(&self) -> String {
        format!(
            "<Bundle {} certificate(s), {} key, sha256 {}>",
            self.inner.certs.len(),
            self.inner.key_format().name(),
            &self.fingerprint
        )
    }
}

/// Reads and checks a certificate chain and its private key from PEM.
///
/// Raises PemError with `slot` set to "certificate", "key" or "pair".
#[pyfunction]
fn parse_bundle(py: Python<'_>, certificate: &[u8], key: &[u8]) -> PyResult<Bundle> {
    let provider = tls::provider();
    let checked = bundle::Bundle::from_pem(certificate, key)
        .and_then(|parsed| parsed.certified_key(&provider).map(|_| parsed));
    match checked {
        Ok(inner) => {
            let fingerprint = inner.fingerprint(&provider);
            Ok(Bundle { inner, fingerprint })
        }
        Err(err) => Err(pem_error(py, &err)),
    }
}

/// Decodes every PEM block of a text: a list of (label, der).
///
/// For trust anchors (client CAs) and diagnostics; refuses what the
/// bundle reader refuses.
#[pyfunction]
fn parse_pem<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
    let blocks = pem::parse(text).map_err(|err| PemError::new_err(err.to_string()))?;
    Ok(blocks
        .into_iter()
        .map(|block| (block.label, PyBytes::new(py, &block.der)))
        .collect())
}

fn pem_error(py: Python<'_>, err: &BundleError) -> PyErr {
    let exc = PemError::new_err(err.to_string());
    // Setting an attribute on a fresh exception instance cannot fail in
    // practice; if it did, the message alone still says what is wrong.
    let _ = exc.value(py).setattr("slot", err.slot().as_str());
    exc
}

/// Encodes one frame of the pipe protocol.
#[pyfunction]
#[pyo3(signature = (kind, generation, payload = None))]
fn encode_frame<'py>(
    py: Python<'py>,
    kind: u8,
    generation: u64,
    payload: Option<&[u8]>,
) -> PyResult<Bound<'py, PyBytes>> {
    let payload = payload.unwrap_or_default();
    let kind = match kind {
        2 => Kind::TicketKeys,
        3 => Kind::Shutdown,
        4 => Kind::Ping,
        _ => {
            return Err(PyValueError::new_err(format!(
                "the supervisor cannot send frames of kind {kind}"
            )))
        }
    };
    Ok(PyBytes::new(py, &frame::encode(kind, generation, payload)))
}

/// Splits the bytes a worker writes into frames.
#[pyclass(module = "spicegw._core")]
#[derive(Default)]
struct FrameDecoder {
    inner: frame::Decoder,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns every complete frame as (kind, generation,
    /// payload). Raises ValueError when the stream is not the protocol.
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<Vec<(u8, u64, Bound<'py, PyBytes>)>> {
        self.inner.feed(data);
        let mut frames = Vec::new();
        while let Some(frame) = self
            .inner
            .next_frame()
            .map_err(|err| PyValueError::new_err(err.to_string()))?
        {
            frames.push((
                frame.kind as u8,
                frame.generation,
                PyBytes::new(py, &frame.payload),
            ));
        }
        Ok(frames)
    }
}

/// Serves as a worker until drained or orphaned; returns the exit code.
///
/// Takes ownership of both pipe descriptors and of the listening sockets
/// (one per endpoint, in config order). The GIL is released for the whole
/// run.
#[pyfunction]
fn run_worker(
    py: Python<'_>,
    config: &str,
    pipe_in: RawFd,
    pipe_out: RawFd,
    listeners: Vec<RawFd>,
) -> PyResult<i32> {
    let config = WorkerConfig::from_json(config)
        .map_err(|err| PyValueError::new_err(format!("worker config: {err}")))?;
    let mut all = vec![pipe_in, pipe_out];
    all.extend(&listeners);
    let mut unique = all.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != all.len() {
        return Err(PyValueError::new_err("a descriptor is given twice"));
    }
    for &fd in &all {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(PyOSError::new_err(format!("descriptor {fd} is not open")));
        }
    }
    // SAFETY: the caller hands every descriptor over (documented above), we
    // just checked each is open and distinct, and nothing else closes them.
    let owned = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let (pipe_in, pipe_out) = (owned(pipe_in), owned(pipe_out));
    let listeners = listeners.into_iter().map(owned).collect();
    Ok(py.detach(move || worker::run(config, pipe_in, pipe_out, listeners)))
}

/// Asks the kernel to send `signal` to this process when its parent dies.
///
/// Returns False when the parent is already gone (the request came too
/// late to be useful).
#[pyfunction]
fn set_parent_death_signal(signal: i32, expected_parent: i32) -> PyResult<bool> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a plain integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(PyOSError::new_err(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // The parent may have died between fork and prctl.
    // SAFETY: getppid has no preconditions.
    Ok(unsafe { libc::getppid() } == expected_parent)
}

#[pymodule(gil_used = false)]
mod _core {
    #[pymodule_export]
    use super::{
        encode_frame, parse_bundle, parse_pem, run_worker, set_parent_death_signal, Bundle,
        FrameDecoder, PemError,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("EXIT_BOOT_FAILED", super::worker::EXIT_BOOT_FAILED)?;
        m.add("EXIT_PROTOCOL", super::worker::EXIT_PROTOCOL)?;
        m.add("CRYPTO_PROVIDER", "aws-lc-rs")?;
        m.add(
            "HANDSHAKE_BUCKETS_US",
            spicegw_core::stats::HANDSHAKE_BUCKETS_US.to_vec(),
        )?;
        Ok(())
    }
}
