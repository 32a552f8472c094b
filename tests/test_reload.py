"""Certificate hot reload: a running gateway (2 workers) picks up new
files without failing a handshake, refuses bad content once and keeps
serving the old pair, and says what it did in the log, in /metrics, in
/v1/tls and through `spicegw reload`.

Each test keeps a client handshaking in the background through the
change and requires that none of those handshakes fails.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .harness import http_get, tls_connect, wait_until
from .reload_support import (
    MISMATCH,
    STEADY,
    HandshakeLoop,
    Live,
    Rig,
    assert_echoes,
    common_name,
    echo_connection,
    reload_command,
    server_side_owner,
)
from .rotation_files import SecretVolume, fingerprint, make_leaf


@pytest.fixture
def rig(gateway, processes, tmp_path) -> Iterator[Rig]:
    rig = Rig(gateway, processes, tmp_path)
    yield rig
    rig.check_logs()


def old_and_new(ca) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    return make_leaf(ca.issued, "reload old"), make_leaf(ca.issued, "reload new")


# Rotations that must be served.


@pytest.mark.parametrize("kind", ["rename", "in-place", "secret-volume"])
def test_rotation_is_served_without_a_failed_handshake_or_a_dropped_connection(rig, ca, kind):
    old, new = old_and_new(ca)
    if kind == "secret-volume":
        volume = SecretVolume(rig.folder / "volume", {"tls.crt": old[0], "tls.key": old[1]})
        cert, key = volume.path("tls.crt"), volume.path("tls.key")
    else:
        cert, key = rig.files(*old)
    inode = cert.stat().st_ino
    live = rig.start(cert, key, ca.path)
    assert live.subject() == "reload old"

    with echo_connection(live) as held, HandshakeLoop(live.port, ca.path) as loop:
        # A poll may land between the two files' changes (for rewrites
        # also between truncation and write): see Live.wait_counts.
        transient: tuple[str, ...] = ()
        if kind == "rename":
            live.put_all((cert, new[0]), (key, new[1]))
            transient = (MISMATCH,)
        elif kind == "in-place":
            live.rewrite(cert, new[0])
            live.rewrite(key, new[1])
            transient = (MISMATCH, "file is empty")
        else:
            live.secrets.append(new[1])
            volume.swap({"tls.crt": new[0], "tls.key": new[1]})

        live.wait_subject("reload new")
        assert live.wait_converged(fingerprint(new[0])) == 2
        converged = time.monotonic()
        live.wait_counts(ok=1, transient=transient)
        assert set(loop.since(converged)) == {"reload new"}

        # The connection opened on the old certificate still carries data.
        assert_echoes(held, b"after the change\n")

    loop.check("reload old", "reload new")
    if kind == "in-place":
        assert cert.stat().st_ino == inode
    log = live.log()
    assert "public certificate reloaded from" in log
    assert "2/2 workers serve public generation 2" in log
    for line in live.refusals():
        assert any(reason in line for reason in transient), line


# Content that must be refused.

# Each variant changes the files of a gateway serving "reload old" and
# says what the gateway must count and which words the log line needs.
Variant = Callable[[Live, Any, ec.EllipticCurvePrivateKey], tuple[str, list[str]]]


def _garbage(live: Live, _ca, _key) -> tuple[str, list[str]]:
    assert live.cert is not None
    live.put(live.cert, b"this is not a certificate\n")
    return "parse_error", [f"'{live.cert}'", "no PEM block"]


def _truncated(live: Live, ca, key) -> tuple[str, list[str]]:
    assert live.cert is not None
    cert_pem, _ = make_leaf(ca.issued, "reload truncated", key=key)
    live.put(live.cert, cert_pem[: len(cert_pem) // 2])
    return "parse_error", [f"'{live.cert}'", "no END line"]


def _mismatched_key(live: Live, ca, _key) -> tuple[str, list[str]]:
    assert live.cert is not None and live.key is not None
    _, other_key = make_leaf(ca.issued, "reload other")
    live.put(live.key, other_key)
    return "parse_error", [f"'{live.cert}'", f"'{live.key}'", "does not match"]


def _expired(live: Live, ca, key) -> tuple[str, list[str]]:
    assert live.cert is not None
    now = dt.datetime.now(dt.UTC)
    cert_pem, _ = make_leaf(
        ca.issued,
        "reload expired",
        key=key,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    live.put(live.cert, cert_pem)
    return "parse_error", [f"'{live.cert}'", "expired"]


def _missing_key(live: Live, _ca, _key) -> tuple[str, list[str]]:
    assert live.key is not None
    os.remove(live.key)
    return "io_error", [f"'{live.key}'", "No such file"]


def _readable_key(live: Live, _ca, _key) -> tuple[str, list[str]]:
    assert live.key is not None
    live.key.chmod(0o644)
    return "io_error", [f"'{live.key}'", "readable by others", "0600"]


VARIANTS: dict[str, Variant] = {
    "garbage": _garbage,
    "truncated": _truncated,
    "mismatched-key": _mismatched_key,
    "expired": _expired,
    "missing-key": _missing_key,
    "readable-key": _readable_key,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bad_content_is_counted_once_and_the_old_pair_keeps_serving(rig, ca, variant):
    key = ec.generate_private_key(ec.SECP256R1())
    old = make_leaf(ca.issued, "reload old", key=key)
    recovered = make_leaf(ca.issued, "reload recovered", key=key)
    cert_path, key_path = rig.files(*old)
    live = rig.start(cert_path, key_path, ca.path)

    with HandshakeLoop(live.port, ca.path) as loop:
        result, needles = VARIANTS[variant](live, ca, key)
        live.wait_counts(**{result: 1})
        assert live.subject() == "reload old"
        line = live.check_refusal(result, *needles)
        assert "still serving generation 1" in line

        # A check forced now sees the same content: reported, not counted.
        answer = live.force_check()
        assert answer["result"] == result
        assert answer["generation"] == 1
        live.hold_counts({"ok": 0, "io_error": 0, "parse_error": 0, result: 1})
        assert len(live.refusals()) == 1

        # Fixing the files is a new content: judged, and served.
        live.put(key_path, old[1])
        live.put(cert_path, recovered[0])
        live.wait_subject("reload recovered")
        live.wait_counts(ok=1, **{result: 1})

    loop.check("reload old", "reload recovered")
    assert live.gw.proc.poll() is None


# What the operator sees.


def test_metrics_over_tls_show_the_reload_counter(rig, ca):
    old, new = old_and_new(ca)
    cert, key = rig.files(*old)
    live = rig.start(cert, key, ca.path)

    text = live.metrics_text()
    for result in ("ok", "io_error", "parse_error"):
        assert f'runtime_tls_reload_total{{result="{result}",scope="public"}} 0' in text

    # The status service is behind the same TLS as every endpoint.
    status, _ = http_get(live.metrics, ca.path, "/health")
    assert status == 200
    assert live.subject() == "reload old"

    with HandshakeLoop(live.metrics, ca.path) as loop:
        live.put_all((cert, new[0]), (key, new[1]))
        live.wait_counts(ok=1, transient=(MISMATCH,))
    loop.check("reload old", "reload new")

    text = live.metrics_text()
    assert 'runtime_tls_reload_total{result="ok",scope="public"} 1' in text
    assert 'runtime_tls_reload_total{result="parse_error",scope="public"} 0' in text
    assert 'runtime_tls_serving_generation{scope="public",worker="0"} 2' in text
    assert 'runtime_tls_serving_generation{scope="public",worker="1"} 2' in text


def test_sighup_makes_the_supervisor_check_at_once(rig, ca):
    old, new = old_and_new(ca)
    cert, key = rig.files(*old)
    # With a minute between polls, only the signal can explain a reload.
    live = rig.start(cert, key, ca.path, poll="60s")

    with HandshakeLoop(live.port, ca.path) as loop:
        live.put_all((cert, new[0]), (key, new[1]))
        # Nothing picks the change up on its own.
        deadline = time.monotonic() + STEADY
        while time.monotonic() < deadline:
            assert live.subject() == "reload old"
        assert live.counts()["ok"] == 0

        live.gw.signal(signal.SIGHUP)
        took = live.wait_subject("reload new")
        assert took < 2.0, f"SIGHUP took {took:.1f} s to be served"
        live.wait_counts(ok=1)
    loop.check("reload old", "reload new")
    live.gw.wait_for_log(r"SIGHUP received: checking the certificate files now")

    # A signal with nothing new on disk changes nothing.
    live.gw.signal(signal.SIGHUP)
    live.gw.wait_for_log(r"certificate files unchanged since the last check")
    live.wait_counts(ok=1)
    assert live.scope()["generation"] == 2


def test_reload_command_prints_the_outcome(rig, ca):
    old, new = old_and_new(ca)
    cert, key = rig.files(*old)
    live = rig.start(cert, key, ca.path, poll="60s")

    with HandshakeLoop(live.port, ca.path) as loop:
        live.put_all((cert, new[0]), (key, new[1]))
        done = reload_command(live)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "public: ok" in done.stdout
        assert fingerprint(new[0]) in done.stdout
        assert "(2/2 workers)" in done.stdout
        # The command returns once every worker serves the new pair.
        assert live.subject() == "reload new"

        live.put(cert, b"-- not PEM at all --\n")
        for _ in range(2):
            done = reload_command(live)
            assert done.returncode == 1, done.stdout + done.stderr
            assert "public: rejected (parse_error)" in done.stdout
            assert f"'{cert}'" in done.stdout
            assert "no PEM block" in done.stdout
            assert f"still serving generation 2, sha256 {fingerprint(new[0])}" in done.stdout
            # Asking again does not count the same content again.
            assert live.counts() == {"ok": 1, "io_error": 0, "parse_error": 1}
        assert live.subject() == "reload new"
    loop.check("reload old", "reload new")


def test_respawned_worker_serves_the_newest_generation(rig, ca):
    old, new = old_and_new(ca)
    cert, key = rig.files(*old)
    live = rig.start(cert, key, ca.path)

    with HandshakeLoop(live.port, ca.path) as loop:
        live.put_all((cert, new[0]), (key, new[1]))
        live.wait_subject("reload new")
        assert live.wait_converged(fingerprint(new[0])) == 2
    loop.check("reload old", "reload new")

    def worker(index: int) -> dict[str, Any] | None:
        workers = live.scope()["workers"]
        assert isinstance(workers, list)
        return next((w for w in workers if w["index"] == index), None)

    before = worker(0)
    assert before is not None
    victim = before["pid"]
    os.kill(victim, signal.SIGKILL)

    def respawned() -> int | None:
        entry = worker(0)
        if entry is None or entry["pid"] == victim or entry["generation"] != 2:
            return None
        assert entry["fingerprint"] == fingerprint(new[0])
        return int(entry["pid"])

    replacement = wait_until(respawned, 15, interval=0.1)
    assert isinstance(replacement, int)
    live.gw.wait_for_log(rf"worker 0 \(pid {victim}\) was killed by SIGKILL")

    # Open connections until one is owned by the new worker, and check
    # what it presented; meanwhile every handshake sees the new pair.
    owners = set()
    with HandshakeLoop(live.port, ca.path) as after:
        for _ in range(64):
            with tls_connect(live.port, ca.path) as tls:
                assert common_name(tls.getpeercert()) == "reload new"
                mine = tls.getsockname()[1]
                owners.add(wait_until(partial(server_side_owner, live.port, mine, live.gw), 5))
            if replacement in owners:
                break
    after.check("reload new")
    assert replacement in owners, f"no connection reached the respawned worker: {owners}"


def test_log_never_shows_private_key_material(rig, ca):
    key = ec.generate_private_key(ec.SECP256R1())
    old = make_leaf(ca.issued, "reload old", key=key)
    other = make_leaf(ca.issued, "reload other")
    cert, key_path = rig.files(*old)
    live = rig.start(cert, key_path, ca.path, "--log-level", "debug")

    with HandshakeLoop(live.port, ca.path) as loop:
        # A private key where the certificate belongs.
        live.put(cert, other[1])
        live.wait_counts(parse_error=1)
        # The two files exchanged.
        live.put_all((cert, old[1]), (key_path, old[0]))
        wait_until(lambda: live.counts()["parse_error"] >= 2)
        # A key that belongs to no certificate in the file.
        live.put_all((cert, old[0]), (key_path, other[1]))
        wait_until(lambda: "does not match" in live.refusals()[-1])
    loop.check("reload old")

    # The scan covers the whole log, debug lines included: no PEM key
    # header and no base64 line of any key file this test wrote.
    assert "PRIVATE KEY" not in live.log()
    assert any(other[1] == secret for secret in live.secrets)
    live.assert_log_clean()
