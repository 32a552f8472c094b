"""`spicegw check` (the dry run) and `spicegw status` (a verified look
at a running gateway): each bad input is caught with exit 1 and a line
naming it; a good setup prints the startup line; status verifies the
gateway against the root it is given and nothing else.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from .config_support import Authority, assert_no_key_lines, spicegw, write_pod
from .harness import Pair, free_port, tls_file_flags
from .rotation_files import make_leaf, write_private

STARTUP = "All endpoints secured with TLS using certificate: "


def check(folder: Path, *args: str, env: dict[str, str] | None = None):
    """`spicegw check ARGS` run in `folder` (where no stray spicepod.yaml
    can be picked up); (exit code, output)."""
    done = spicegw("check", *args, cwd=folder, env=env)
    return done.returncode, done.stdout + done.stderr


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# spicegw check.


def test_check_passes_and_prints_the_startup_line_run_prints(
    gateway, tmp_path, server_pair, echo_port
):
    port = free_port()
    flags = [*tls_file_flags(server_pair.cert, server_pair.key), "--http", f"127.0.0.1:{port}"]
    flags += ["--http-upstream", f"127.0.0.1:{echo_port}"]
    code, output = check(tmp_path, *flags)
    assert code == 0, output
    assert errors(output) == []
    assert f"{STARTUP}CN=localhost" in output.splitlines()
    assert output.rstrip().endswith("check: ok")
    assert_no_key_lines(output, server_pair.key.read_bytes())

    gw = gateway(*flags, "--workers", "1")
    logged = re.search(f"{STARTUP}(.*)$", gw.text(), re.MULTILINE)
    assert logged is not None and logged.group(1) == "CN=localhost"


def test_check_passes_with_a_spicepod_and_secrets(tmp_path, server_pair):
    pod = write_pod(
        tmp_path,
        """\
runtime:
  tls:
    enabled: true
    certificate_file: ${secrets:cert_file}
    key: ${secrets:tls_key}
endpoints:
  - name: api
    listen: 127.0.0.1:8443
    upstream: 127.0.0.1:8080
""",
    )
    env = {"CERT_FILE": str(server_pair.cert), "TLS_KEY": server_pair.key_pem}
    code, output = check(tmp_path, "--config", str(pod), env=env)
    assert code == 0, output
    assert f"{STARTUP}CN=localhost" in output
    assert "loaded once" in output
    assert_no_key_lines(output, server_pair.key.read_bytes())


@pytest.fixture
def bad_inputs(tmp_path, ca, server_pair) -> dict[str, tuple[list[str], list[str]]]:
    """Per bad input: the flags, and what the error line must say."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    other_key = ca.pair("someone else", stem="other").key

    bad_pem = folder / "bad.pem"
    bad_pem.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"
    )

    now = dt.datetime.now(dt.UTC)
    ended_on = now - dt.timedelta(days=3)
    cert, key = make_leaf(
        ca.issued, "expired", not_before=now - dt.timedelta(days=90), not_after=ended_on
    )
    expired, expired_key = folder / "expired.pem", folder / "expired.key"
    expired.write_bytes(cert)
    write_private(expired_key, key)

    missing_secret = write_pod(
        folder,
        f"runtime:\n  tls:\n    enabled: true\n    certificate_file: {server_pair.cert}\n"
        "    key: ${secrets:nowhere_key}\n",
        name="secret.yaml",
    )
    unknown_key = write_pod(
        folder,
        f"runtime:\n  tls:\n    enabled: true\n    certificate_file: {server_pair.cert}\n"
        f"    key_file: {server_pair.key}\n    key_password: hunter2\n",
        name="unknown.yaml",
    )
    missing = folder / "missing.pem"
    return {
        "missing file": (
            tls_file_flags(missing, server_pair.key),
            [f"'{missing}'", "No such file"],
        ),
        "bad PEM": (tls_file_flags(bad_pem, server_pair.key), [f"'{bad_pem}'", "bad base64"]),
        "key of another certificate": (
            tls_file_flags(server_pair.cert, other_key),
            [f"'{server_pair.cert}'", f"'{other_key}'", "does not match"],
        ),
        "expired certificate": (
            tls_file_flags(expired, expired_key),
            [f"'{expired}'", "expired", f"{ended_on:%Y-%m-%d %H:%M}"],
        ),
        "missing secret": (["--config", str(missing_secret)], ["nowhere_key", "not found"]),
        "unknown key": (
            ["--config", str(unknown_key)],
            [f"{unknown_key}:6: runtime.tls.key_password", "unknown key"],
        ),
    }


BAD_INPUTS = [
    "missing file",
    "bad PEM",
    "key of another certificate",
    "expired certificate",
    "missing secret",
    "unknown key",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_check_catches_each_bad_input(tmp_path, bad_inputs, case):
    flags, needles = bad_inputs[case]
    key_files = [Path(f) for f in flags if f.endswith(".key")]
    code, output = check(tmp_path, *flags, "--http-upstream", "127.0.0.1:9")
    assert code == 1, output
    found = errors(output)
    assert len(found) == 1, output
    for needle in needles:
        assert needle in found[0], f"{needle!r} not in {found[0]!r}"
    assert "Traceback" not in output
    assert "check: ok" not in output
    assert_no_key_lines(output, *(path.read_bytes() for path in key_files))


def test_check_shows_the_dates_of_an_expired_certificate(tmp_path, bad_inputs):
    flags, _ = bad_inputs["expired certificate"]
    code, output = check(tmp_path, *flags, "--http-upstream", "127.0.0.1:9")
    assert code == 1
    window = re.search(r"valid from (\S+ \S+) to (\S+ \S+) UTC", output)
    assert window is not None, output
    starts = dt.datetime.strptime(window.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC)
    ends = dt.datetime.strptime(window.group(2), "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    assert ends < now and now - ends < dt.timedelta(days=4)
    assert now - starts > dt.timedelta(days=80)


# spicegw status.


def status(port: int, *args: str):
    done = spicegw("status", "--endpoint", f"https://127.0.0.1:{port}", "--timeout", "10s", *args)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def metrics_gateway(gateway, server_pair, echo_port):
    metrics = free_port()
    gateway(
        *tls_file_flags(server_pair.cert, server_pair.key),
        *("--workers", "2", "--metrics", f"127.0.0.1:{metrics}"),
        *("--http", f"127.0.0.1:{free_port()}", "--http-upstream", f"127.0.0.1:{echo_port}"),
    )
    return metrics


def test_status_verifies_with_the_given_root(metrics_gateway, ca):
    code, out, err = status(metrics_gateway, "--tls-root-certificate-file", str(ca.path))
    assert code == 0, err
    assert "2/2 workers ready, TLS on" in out
    assert re.search(r"^public: CN=localhost; generation \d+, sha256 [0-9a-f]{64}", out, re.M), out


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spicegw: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_status_refuses_a_wrong_root(metrics_gateway, tmp_path):
    other = Authority.create(tmp_path, "unrelated root")
    code, out, err = status(metrics_gateway, "--tls-root-certificate-file", str(other.path))
    assert code != 0
    assert out == ""
    line = one_error_line(err)
    assert "not trusted" in line and "unable to get local issuer certificate" in line, line


def test_status_without_a_root_does_not_fall_back_to_no_verification(metrics_gateway):
    """The system roots do not know the test CA: verification fails."""
    code, out, err = status(metrics_gateway)
    assert code != 0
    assert out == ""
    assert "not trusted" in one_error_line(err)


def test_status_with_an_unreadable_root_names_it(metrics_gateway, tmp_path):
    missing = tmp_path / "no-such-root.pem"
    code, out, err = status(metrics_gateway, "--tls-root-certificate-file", str(missing))
    assert code != 0 and out == ""
    line = one_error_line(err)
    assert "--tls-root-certificate-file" in line and str(missing) in line, line


def test_status_with_client_certificate_against_required_mode(
    gateway, tmp_path, ca, server_pair, echo_port
):
    clients = Authority.create(tmp_path / "clients", "client CA")
    other = Authority.create(tmp_path / "other", "other CA")
    metrics = free_port()
    gateway(
        *tls_file_flags(server_pair.cert, server_pair.key),
        *("--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(clients.path)),
        *("--workers", "1", "--metrics", f"127.0.0.1:{metrics}"),
        *("--http", f"127.0.0.1:{free_port()}", "--http-upstream", f"127.0.0.1:{echo_port}"),
    )
    root = ("--tls-root-certificate-file", str(ca.path))

    def as_client(pair: Pair) -> tuple[str, ...]:
        return (
            *("--client-tls-certificate-file", str(pair.cert)),
            *("--client-tls-key-file", str(pair.key)),
        )

    operator = clients.client("operator")
    code, out, err = status(metrics, *root, *as_client(operator))
    assert code == 0, err
    assert "1/1 workers ready, TLS on" in out

    done = spicegw(
        *("reload", "--endpoint", f"https://127.0.0.1:{metrics}", *root, *as_client(operator))
    )
    assert done.returncode == 0, done.stderr
    assert "public: unchanged" in done.stdout

    for name, extra in [
        ("no client certificate", ()),
        ("a certificate from another CA", as_client(other.client("intruder"))),
    ]:
        code, out, err = status(metrics, *root, *extra)
        assert code != 0, f"status with {name} got an answer"
        assert out == ""
        one_error_line(err)

    # Half a client identity is a usage error, caught before connecting.
    code, out, err = status(metrics, *root, "--client-tls-certificate-file", str(operator.cert))
    assert code != 0
    assert "go together" in one_error_line(err)
