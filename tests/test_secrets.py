"""`${secrets:name}` in spicepod.yaml: the env store (the environment,
`.env.local`, `.env`), the directory store, the order stores are
searched in, a secret that is nowhere, and secret values kept out of
every log line, error and status answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .config_support import (
    assert_no_key_lines,
    client_context,
    ended,
    error_line,
    exchange,
    spicegw,
    write_pod,
)
from .harness import Pair, free_port, http_get

# The secrets the spicepods below refer to; the env store also finds a
# name in upper case (GW_CERT for gw_cert), as environment variables are.
TLS_FROM_SECRETS = """\
    enabled: true
    certificate: ${secrets:gw_cert}
    key: ${secrets:gw_key}
"""


def pod_text(stores: str, port: int, upstream: str, metrics: int | None = None) -> str:
    text = f"{stores}runtime:\n  tls:\n{TLS_FROM_SECRETS}"
    text += f"endpoints:\n  - name: api\n    listen: 127.0.0.1:{port}\n    upstream: {upstream}\n"
    return text


def dotenv(values: dict[str, str]) -> str:
    """A .env file; multi-line values (PEM) in double quotes."""
    return "".join(f'{name}="{value.strip()}"\n' for name, value in values.items())


def pem_env(pair: Pair) -> dict[str, str]:
    return {"GW_CERT": pair.cert_pem, "GW_KEY": pair.key_pem}


def secret_dir(folder: Path, values: dict[str, str]) -> Path:
    """A directory store: one file per secret, as Kubernetes mounts them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (folder / name).write_text(value)
    return folder


def scan(text: str, *secrets: str) -> None:
    """No secret value, nor any line of a PEM secret, appears in `text`."""
    assert_no_key_lines(text, *(s.encode() for s in secrets if "PRIVATE KEY" in s))
    for secret in secrets:
        if "-----BEGIN" not in secret:
            assert secret not in text, f"the secret value {secret!r} appears"


@pytest.fixture
def pairs(ca) -> dict[str, Pair]:
    names = ("environment", ".env", ".env.local", "directory", "env store")
    return {name: ca.pair(f"from {name}", stem=name.replace(" ", "-")) for name in names}


@pytest.mark.parametrize(
    ("layers", "served"),
    [
        ((".env",), ".env"),
        ((".env", ".env.local"), ".env.local"),
        ((".env", ".env.local", "environment"), "environment"),
        (("environment",), "environment"),
    ],
    ids=["dotenv", "local-overrides-dotenv", "environment-overrides-both", "environment"],
)
def test_env_store_layers(gateway, tmp_path, ca, echo_port, pairs, layers, served):
    port = free_port()
    pod = write_pod(tmp_path, pod_text("", port, f"127.0.0.1:{echo_port}"))
    env: dict[str, str] = {}
    for layer in layers:
        if layer == "environment":
            env.update(pem_env(pairs["environment"]))
        else:
            (tmp_path / layer).write_text(dotenv(pem_env(pairs[layer])))

    gw = gateway("--config", str(pod), "--workers", "1", env=env)
    outcome = exchange(port, client_context(ca.path))
    assert outcome.ok, outcome.error
    assert outcome.subject == f"from {served}"
    assert "not hot-reloaded" in gw.text()
    scan(gw.text(), *(pairs[layer].key_pem for layer in layers))


def test_directory_store(gateway, tmp_path, ca, echo_port, pairs):
    port = free_port()
    pair = pairs["directory"]
    secret_dir(tmp_path / "mounted", {"gw_cert": pair.cert_pem, "gw_key": pair.key_pem})
    stores = "secrets:\n  - from: directory:mounted\n    name: mounted\n"
    pod = write_pod(tmp_path, pod_text(stores, port, f"127.0.0.1:{echo_port}"))
    gw = gateway("--config", str(pod), "--workers", "1")
    outcome = exchange(port, client_context(ca.path))
    assert outcome.ok, outcome.error
    assert outcome.subject == "from directory"
    scan(gw.text(), pair.key_pem)


@pytest.mark.parametrize("order", ["env-then-directory", "directory-then-env"])
def test_last_declared_store_wins(gateway, tmp_path, ca, echo_port, pairs, order):
    port, metrics = free_port(), free_port()
    directory, env_pair = pairs["directory"], pairs["env store"]
    secret_dir(tmp_path / "mounted", {"gw_cert": directory.cert_pem, "gw_key": directory.key_pem})
    env_entry = "  - from: env\n    name: env\n"
    dir_entry = "  - from: directory:mounted\n    name: mounted\n"
    entries = [env_entry, dir_entry] if order == "env-then-directory" else [dir_entry, env_entry]
    # Only the env store knows the upstream: a name one store lacks is
    # looked up in the next.
    text = pod_text("secrets:\n" + "".join(entries), port, "${secrets:gw_upstream}")
    pod = write_pod(tmp_path, text)
    env = {**pem_env(env_pair), "GW_UPSTREAM": f"127.0.0.1:{echo_port}"}

    gw = gateway(
        *("--config", str(pod), "--workers", "1", "--metrics", f"127.0.0.1:{metrics}"), env=env
    )
    outcome = exchange(port, client_context(ca.path))
    assert outcome.ok, outcome.error
    winner = "directory" if order == "env-then-directory" else "env store"
    assert outcome.subject == f"from {winner}"

    # Neither the log nor the status service shows a secret.
    answers = [http_get(metrics, ca.path, path)[1].decode() for path in ("/v1/tls", "/metrics")]
    scan("\n".join([gw.text(), *answers]), directory.key_pem, env_pair.key_pem)


@pytest.mark.parametrize("command", ["run", "check"])
def test_missing_secret_is_an_error_naming_it(gateway, tmp_path, pairs, echo_port, command):
    stores = "secrets:\n  - from: env\n    name: env\n  - from: directory:mounted\n    name: m\n"
    secret_dir(tmp_path / "mounted", {"gw_cert": pairs["directory"].cert_pem})
    text = pod_text(stores, free_port(), f"127.0.0.1:{echo_port}")
    pod = write_pod(tmp_path, text)
    key_line = next(n for n, line in enumerate(text.splitlines(), 1) if "gw_key" in line)
    if command == "run":
        code, output = ended(gateway("--config", str(pod), ready=False))
        assert code != 0
        line = error_line(output)
    else:
        done = spicegw("check", "--config", str(pod))
        assert done.returncode == 1
        output = done.stdout + done.stderr
        line = next(text for text in output.splitlines() if text.startswith("error:"))
    assert "secret 'gw_key' not found" in line, line
    assert f"{pod}:{key_line}: runtime.tls.key" in line, line
    # Listed in the order they are asked: the last declared first.
    searched = line.split("stores searched: ", 1)[1]
    assert searched.index(str(tmp_path / "mounted")) < searched.index("env"), line
    assert "Traceback" not in output


def test_mismatched_secret_pair_error_shows_no_key(gateway, tmp_path, pairs, echo_port):
    """A certificate and a key from secrets that do not belong together:
    the error says so without a byte of either secret."""
    env = {"GW_CERT": pairs["environment"].cert_pem, "GW_KEY": pairs[".env"].key_pem}
    pod = write_pod(tmp_path, pod_text("", free_port(), f"127.0.0.1:{echo_port}"))
    code, output = ended(gateway("--config", str(pod), ready=False, env=env))
    assert code != 0
    assert "does not match" in error_line(output)
    scan(output, env["GW_KEY"])

    done = spicegw("check", "--config", str(pod), env=env)
    assert done.returncode == 1
    assert "does not match" in done.stdout
    scan(done.stdout + done.stderr, env["GW_KEY"])


# A secret may hold any string of the spicepod; when that string is wrong,
# the error names the field and the secret, never the value.
VALUE_IN_ERROR = {
    "upstream": ("upstream: ${secrets:gw_upstream}", "gw_upstream", "db.internal:s3cr3t-token"),
    "listen": ("listen: ${secrets:gw_listen}", "gw_listen", "hunter2-listen-token"),
}


@pytest.mark.parametrize("field", list(VALUE_IN_ERROR))
def test_bad_secret_value_is_not_echoed_in_the_error(gateway, tmp_path, echo_port, field):
    reference, name, value = VALUE_IN_ERROR[field]
    endpoint = {
        "listen": f"listen: 127.0.0.1:{free_port()}",
        "upstream": f"upstream: 127.0.0.1:{echo_port}",
    }
    endpoint[field] = reference
    text = f"endpoints:\n  - name: api\n    {endpoint['listen']}\n    {endpoint['upstream']}\n"
    pod = write_pod(tmp_path, text)
    env = {name.upper(): value}

    code, output = ended(gateway("--config", str(pod), ready=False, env=env))
    assert code != 0
    line = error_line(output)
    assert f"endpoints[0].{field}" in line, line
    scan(output, value)

    done = spicegw("check", "--config", str(pod), env=env)
    assert done.returncode == 1
    scan(done.stdout + done.stderr, value)
