"""The field cases of tests/fixtures/cases (B1 … B12), replayed against a
running gateway with 2 workers.

Each case's events.sh is reproduced in Python with the same file
operations (rename from a temporary name in the same folder, rewrite in
place, `..data` symlink swap, delete, dangling link). The case gaps of
3 s become `GAP` (1 s), enough for five polls at 200 ms. Counts are the
exact ones the reload policy gives: each distinct content is judged
once; content that decodes to the pair already served is "unchanged"
and counted nowhere.

B13 needs the cluster scope and lives with its tests.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .harness import tls_connect, wait_until
from .reload_support import (
    HandshakeLoop,
    Live,
    Rig,
    assert_echoes,
    check_no_key_material,
    echo_connection,
)
from .rotation_files import CASES, GAP, SecretVolume, fingerprint, pause


@pytest.fixture
def rig(gateway, processes, tmp_path) -> Iterator[Rig]:
    rig = Rig(gateway, processes, tmp_path)
    yield rig
    rig.check_logs()


def data(case: str, name: str) -> bytes:
    return (CASES / case / name).read_bytes()


def gap_since(moment: float, seconds: float = GAP) -> None:
    """Lets the rest of a case's gap pass after checks made inside it."""
    left = moment + seconds - time.monotonic()
    if left > 0:
        pause(left)


# Logged when new bytes hold the pair already served (no count, no reload).
UNCHANGED = "decode to the served certificate and key"


def wait_for_unchanged(live: Live, number: int) -> None:
    """Waits for the `number`th "decodes to the served pair" line."""
    try:
        wait_until(lambda: live.log().count(UNCHANGED) >= number, 5)
    except AssertionError:
        raise AssertionError(
            f"expected {number} 'unchanged' judgement(s); counters {live.counts()}, "
            f"log:\n{live.log()}"
        ) from None


def check_refused_at_startup(rig: Rig, cert: Path, key: Path, *needles: str) -> str:
    """Starts a gateway on `cert` and `key`; it must exit non-zero with one
    line that names the file(s) and the reason, and no traceback."""
    began = time.monotonic()
    ended = rig.refused("--tls-certificate-file", str(cert), "--tls-key-file", str(key))
    assert ended.code != 0, ended.text
    assert time.monotonic() - began < 15, "startup with bad material should fail fast"
    assert "Traceback" not in ended.text, ended.text
    assert "worker(s) ready" not in ended.text, ended.text
    line = ended.error_line()
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    secrets = [path.read_bytes() for path in (cert, key)]
    check_no_key_material(ended.text, [s for s in secrets if b"PRIVATE KEY" in s])
    return line


# B1: cert and key replaced by two renames with a gap.


@pytest.mark.parametrize("sequence", ["key-first", "cert-first", "cert-only"])
def test_b1_pair_replaced_by_two_renames(rig, sequence):
    ca = CASES / "B1" / "ca.pem"
    cert, key = rig.files(data("B1", "old/cert.pem"), data("B1", "old/key.pem"))
    live = rig.start(cert, key, ca)
    assert live.subject() == "B1 old"

    with echo_connection(live) as held, HandshakeLoop(live.port, ca) as loop:
        if sequence == "cert-only":
            live.put(cert, data("B1", "new-samekey/cert.pem"))
            live.wait_subject("B1 renewed (same key)")
            live.wait_counts(ok=1)
            expected = "B1 renewed (same key)"
        else:
            steps = [(key, data("B1", "new/key.pem")), (cert, data("B1", "new/cert.pem"))]
            if sequence == "cert-first":
                steps.reverse()
            first, second = steps

            live.put(*first)
            began = time.monotonic()
            # The mismatch window: refused once, the old pair served.
            live.wait_counts(parse_error=1)
            live.check_refusal("parse_error", f"'{cert}'", f"'{key}'", "does not match")
            assert live.subject() == "B1 old"
            gap_since(began)
            assert live.counts()["ok"] == 0

            live.put(*second)
            took = live.wait_subject("B1 new (new key)")
            assert took < 5.0
            live.wait_counts(ok=1, parse_error=1)
            expected = "B1 new (new key)"
        assert_echoes(held, b"the long-lived connection still works\n")
    loop.check("B1 old", expected)
    assert live.wait_converged(fingerprint(cert.read_bytes())) == 2


# B2: Kubernetes Secret volume.


def test_b2_secret_volume_swaps_are_each_picked_up(rig):
    ca = CASES / "B2" / "ca.pem"

    def version(name: str) -> dict[str, bytes]:
        return {"tls.crt": data("B2", f"{name}/tls.crt"), "tls.key": data("B2", f"{name}/tls.key")}

    volume = SecretVolume(rig.folder / "secret", version("v1"))
    link = os.readlink(volume.path("tls.crt"))
    live = rig.start(volume.path("tls.crt"), volume.path("tls.key"), ca)
    assert live.subject() == "B2 v1"

    with echo_connection(live) as held, HandshakeLoop(live.port, ca) as loop:
        for number, name in enumerate(["v2", "v3"], start=1):
            live.secrets.append(version(name)["tls.key"])
            volume.swap(version(name))
            live.wait_subject(f"B2 {name}")
            live.wait_counts(ok=number)
        assert_echoes(held, b"opened on v1, still carrying data\n")
    loop.check("B2 v1", "B2 v2", "B2 v3")

    # The visible links never changed; only ..data moved, and the folders
    # of v1 and v2 are gone.
    assert os.readlink(volume.path("tls.crt")) == link
    versions = [p for p in volume.folder.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 1
    assert live.wait_converged(fingerprint(version("v3")["tls.crt"])) == 3


# B3: paths missing for a while.


@pytest.mark.parametrize("sequence", ["files-deleted", "dangling-link"])
def test_b3_missing_files_keep_the_old_pair_and_the_return_is_picked_up(rig, sequence):
    ca = CASES / "B3" / "ca.pem"
    old = data("B3", "old/cert.pem"), data("B3", "old/key.pem")
    new = data("B3", "new/cert.pem"), data("B3", "new/key.pem")
    live_dir = rig.folder / "live"
    if sequence == "files-deleted":
        cert, key = rig.files(*old)
    else:
        (live_dir / "gen-old").mkdir(parents=True)
        (live_dir / "gen-old" / "cert.pem").write_bytes(old[0])
        (live_dir / "gen-old" / "key.pem").write_bytes(old[1])
        os.symlink("gen-old", live_dir / "data")
        cert, key = live_dir / "cert.pem", live_dir / "key.pem"
        os.symlink("data/cert.pem", cert)
        os.symlink("data/key.pem", key)
    live = rig.start(cert, key, ca)
    live.secrets.append(new[1])
    supervisor = live.gw.pid
    workers = live.gw.worker_pids()

    with HandshakeLoop(live.port, ca) as loop:
        if sequence == "files-deleted":
            os.remove(cert)
            os.remove(key)
        else:
            os.symlink("gen-missing", live_dir / "data.tmp")
            os.replace(live_dir / "data.tmp", live_dir / "data")
            shutil.rmtree(live_dir / "gen-old")
        began = time.monotonic()

        live.wait_counts(io_error=1)
        live.check_refusal("io_error", f"'{cert}'", "No such file")
        assert live.subject() == "B3 old"
        gap_since(began)

        if sequence == "files-deleted":
            # The key first: a poll in between still sees no certificate.
            live.put(key, new[1])
            live.put(cert, new[0])
        else:
            (live_dir / "gen-new").mkdir()
            (live_dir / "gen-new" / "cert.pem").write_bytes(new[0])
            (live_dir / "gen-new" / "key.pem").write_bytes(new[1])
            os.symlink("gen-new", live_dir / "data.tmp")
            os.replace(live_dir / "data.tmp", live_dir / "data")
        live.wait_subject("B3 new")
        live.wait_counts(ok=1, io_error=1)
    loop.check("B3 old", "B3 new")

    # Neither the supervisor nor a worker restarted.
    assert live.gw.proc.poll() is None
    assert live.gw.pid == supervisor
    assert live.gw.worker_pids() == workers


# B4: certificate rewritten in place.


def test_b4_in_place_rewrite_is_judged_per_content(rig):
    ca = CASES / "B4" / "ca.pem"
    cert, key = rig.files(data("B4", "old/cert.pem"), data("B4", "old/key.pem"))
    inode = cert.stat().st_ino
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        live.rewrite(cert, b"")
        began = time.monotonic()
        live.wait_counts(parse_error=1)
        live.check_refusal("parse_error", f"'{cert}'", "empty")
        gap_since(began)

        live.rewrite(cert, data("B4", "new/cert.half.pem"))
        began = time.monotonic()
        live.wait_counts(parse_error=2)
        live.check_refusal("parse_error", f"'{cert}'", "no END line")
        assert live.subject() == "B4 old"
        gap_since(began)

        live.rewrite(cert, data("B4", "new/cert.pem"))
        live.wait_subject("B4 new (same key)")
        live.wait_counts(ok=1, parse_error=2)
    loop.check("B4 old", "B4 new (same key)")
    assert cert.stat().st_ino == inode
    assert len(live.refusals()) == 2


# B5: rotated certificate file is not PEM.

# What the log line must say for each bad file (besides the file name).
B5_REASONS = {
    "corrupt-base64": "bad base64",
    "html-error-page": "HTML",
    "der-not-pem": "DER",
    "no-end-line": "no END line",
    "key-in-cert-slot": "private key found where a certificate was expected",
    "swapped": "exchanged",
}


@pytest.mark.parametrize("bad", list(B5_REASONS))
def test_b5_bad_file_is_refused_once_and_recovery_is_served(rig, bad):
    ca = CASES / "B5" / "ca.pem"
    old_cert, old_key = data("B5", "old/cert.pem"), data("B5", "old/key.pem")
    cert, key = rig.files(old_cert, old_key)
    live = rig.start(cert, key, ca)

    # Between the two renames of `swapped` (and of the recovery after
    # it) both files hold the key; a poll landing there counts it once.
    transient = (B5_REASONS["key-in-cert-slot"],) if bad == "swapped" else ()

    with HandshakeLoop(live.port, ca) as loop:
        if bad == "swapped":
            live.put_all((cert, old_key), (key, old_cert))
            needles = [f"'{cert}'", f"'{key}'"]
        else:
            live.put(cert, data("B5", f"bad/{bad}.pem"))
            needles = [f"'{cert}'"]
        began = time.monotonic()
        live.wait_counts(parse_error=1, transient=transient)
        live.check_refusal("parse_error", *needles, B5_REASONS[bad])
        assert live.subject() == "B5 old"
        assert live.gw.proc.poll() is None
        gap_since(began, 2 * GAP)
        live.wait_counts(parse_error=1, transient=transient)

        live.put_all((key, old_key), (cert, data("B5", "good-new/cert.pem")))
        live.wait_subject("B5 good new (same key)")
        live.wait_counts(ok=1, parse_error=1, transient=transient)
    loop.check("B5 old", "B5 good new (same key)")
    lasting = [line for line in live.refusals() if not any(t in line for t in transient)]
    assert len(lasting) == 1, live.refusals()


@pytest.mark.parametrize("bad", list(B5_REASONS))
def test_b5_bad_file_at_startup_fails_fast(rig, bad):
    if bad == "swapped":
        cert, key = CASES / "B5" / "old/key.pem", CASES / "B5" / "old/cert.pem"
        needles = [f"'{cert}'", f"'{key}'"]
    else:
        cert, key = CASES / "B5" / f"bad/{bad}.pem", CASES / "B5" / "old/key.pem"
        needles = [f"'{cert}'"]
    check_refused_at_startup(rig, cert, key, *needles, B5_REASONS[bad])


# B7: line endings and escaped newlines.


@pytest.mark.parametrize(
    ("cert_name", "key_name"),
    [("cert.crlf.pem", "key.crlf.pem"), ("cert.pem", "key.crlf.pem")],
    ids=["crlf", "mixed"],
)
def test_b7_crlf_files_load_at_startup(rig, cert_name, key_name):
    ca = CASES / "B7" / "ca.pem"
    live = rig.start(CASES / "B7" / cert_name, CASES / "B7" / key_name, ca)
    assert live.subject() == "B7"
    assert live.counts() == {"ok": 0, "io_error": 0, "parse_error": 0}


def test_b7_crlf_inline_pem_is_served(rig):
    ca = CASES / "B7" / "ca.pem"
    cert_pem = data("B7", "cert.crlf.pem").decode()
    key_pem = data("B7", "key.crlf.pem").decode()
    assert "\r\n" in cert_pem and "\r\n" in key_pem
    live = rig.start_inline(cert_pem, key_pem, ca)
    assert live.subject() == "B7"
    assert "not hot-reloaded" in live.log()


def test_b7_rotation_to_crlf_is_unchanged(rig):
    ca = CASES / "B7" / "ca.pem"
    cert, key = rig.files(data("B7", "cert.pem"), data("B7", "key.pem"))
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        live.put_all((cert, data("B7", "cert.crlf.pem")), (key, data("B7", "key.crlf.pem")))
        wait_for_unchanged(live, 1)
        # Whatever the polls saw, the settled state is judged unchanged.
        assert live.force_check()["result"] == "unchanged"
        live.wait_counts()
        assert live.scope()["generation"] == 1
    loop.check("B7")
    assert "reloaded from" not in live.log()


ESCAPED = {
    "one-line": "no line breaks",
    "literal-backslash-n": "escaped \\n",
}


@pytest.mark.parametrize("form", ["file", "inline"])
@pytest.mark.parametrize("variant", list(ESCAPED))
def test_b7_escaped_pem_is_refused_at_startup(rig, variant, form):
    cert, key = CASES / "B7" / f"cert.{variant}.pem", CASES / "B7" / "key.pem"
    if form == "file":
        check_refused_at_startup(rig, cert, key, f"'{cert}'", ESCAPED[variant])
        return
    ended = rig.refused("--tls-certificate", cert.read_text(), "--tls-key", key.read_text())
    assert ended.code != 0, ended.text
    assert "Traceback" not in ended.text, ended.text
    line = ended.error_line()
    assert "--tls-certificate" in line and ESCAPED[variant] in line, line
    check_no_key_material(ended.text, [key.read_bytes()])


@pytest.mark.parametrize("variant", list(ESCAPED))
def test_b7_escaped_pem_is_refused_on_rotation(rig, variant):
    ca = CASES / "B7" / "ca.pem"
    cert, key = rig.files(data("B7", "cert.pem"), data("B7", "key.pem"))
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        live.put(cert, data("B7", f"cert.{variant}.pem"))
        live.wait_counts(parse_error=1)
        live.check_refusal("parse_error", f"'{cert}'", ESCAPED[variant])
        assert live.subject() == "B7"
    loop.check("B7")


# B9: EC PARAMETERS before the key.


def test_b9_ec_parameters_block_is_skipped_at_startup(rig):
    ca = CASES / "B9" / "ca.pem"
    live = rig.start(CASES / "B9" / "cert.pem", CASES / "B9" / "key.ecparams.pem", ca)
    assert live.subject() == "B9"
    assert live.counts() == {"ok": 0, "io_error": 0, "parse_error": 0}


def test_b9_rotation_between_key_encodings_is_unchanged(rig):
    ca = CASES / "B9" / "ca.pem"
    cert, key = rig.files(data("B9", "cert.pem"), data("B9", "key.pkcs8.pem"))
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        for number, name in enumerate(["key.ecparams.pem", "key.sec1.pem"], start=1):
            live.put(key, data("B9", name))
            began = time.monotonic()
            wait_for_unchanged(live, number)
            gap_since(began)
        live.wait_counts()
        assert live.scope()["generation"] == 1
    loop.check("B9")


# B10: key encodings and algorithms.

B10_PAIRS = {
    "rsa-pkcs1": ("rsa.crt", "rsa-pkcs1.key", "B10 rsa"),
    "rsa-pkcs8": ("rsa.crt", "rsa-pkcs8.key", "B10 rsa"),
    "ec-sec1": ("ec.crt", "ec-sec1.key", "B10 ec"),
    "ec-pkcs8": ("ec.crt", "ec-pkcs8.key", "B10 ec"),
    "ed25519-pkcs8": ("ed25519.crt", "ed25519-pkcs8.key", "B10 ed25519"),
}
# The public key type of the leaf, and the signature type OpenSSL reports.
B10_KINDS = {
    "rsa": (rsa.RSAPublicKey, "RSA-PSS"),
    "ec": (ec.EllipticCurvePublicKey, "ECDSA"),
    "ed25519": (ed25519.Ed25519PublicKey, "ed25519"),
}


def peer_signature_type(port: int, ca: Path) -> str:
    """The server's handshake signature type as `openssl s_client` sees it
    (Python's ssl module does not expose it)."""
    command = [
        *("openssl", "s_client", "-brief", "-verify_return_error"),
        *("-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", str(ca)),
    ]
    done = subprocess.run(
        command, input="", capture_output=True, text=True, timeout=20, check=False
    )
    output = done.stdout + done.stderr
    assert "Verification: OK" in output, output
    match = re.search(r"^(?:Peer )?[Ss]ignature type: (\S+)", output, re.MULTILINE)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("form", ["file", "inline"])
@pytest.mark.parametrize("pair", list(B10_PAIRS))
def test_b10_each_key_encoding_loads_at_startup(rig, pair, form):
    ca = CASES / "B10" / "ca.pem"
    cert_name, key_name, subject = B10_PAIRS[pair]
    cert, key = CASES / "B10" / cert_name, CASES / "B10" / key_name
    if form == "file":
        live = rig.start(cert, key, ca)
    else:
        live = rig.start_inline(cert.read_text(), key.read_text(), ca)

    kind = cert_name.split(".")[0]
    key_type, signature = B10_KINDS[kind]
    # Ed25519 needs a client that offers it: TLS 1.3 guarantees it.
    minimum = ssl.TLSVersion.TLSv1_3 if kind == "ed25519" else ssl.TLSVersion.TLSv1_2
    with tls_connect(live.port, ca, minimum=minimum) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        leaf = x509.load_der_x509_certificate(der)
        assert isinstance(leaf.public_key(), key_type)
    assert live.subject(minimum=minimum) == subject
    assert peer_signature_type(live.port, ca) == signature


@pytest.mark.parametrize(
    ("cert_name", "first", "second", "subject"),
    [
        ("rsa.crt", "rsa-pkcs1.key", "rsa-pkcs8.key", "B10 rsa"),
        ("ec.crt", "ec-sec1.key", "ec-pkcs8.key", "B10 ec"),
    ],
    ids=["rsa-pkcs1-to-pkcs8", "ec-sec1-to-pkcs8"],
)
def test_b10_rotation_between_encodings_of_one_key_is_unchanged(
    rig, cert_name, first, second, subject
):
    ca = CASES / "B10" / "ca.pem"
    cert, key = rig.files(data("B10", cert_name), data("B10", first))
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        live.put(key, data("B10", second))
        wait_for_unchanged(live, 1)
        live.wait_counts()
        assert live.scope()["generation"] == 1
    loop.check(subject)


def test_b10_rotation_to_another_algorithm_key_first(rig):
    ca = CASES / "B10" / "ca.pem"
    cert, key = rig.files(data("B10", "rsa.crt"), data("B10", "rsa-pkcs1.key"))
    live = rig.start(cert, key, ca)
    assert peer_signature_type(live.port, ca) == "RSA-PSS"

    with HandshakeLoop(live.port, ca) as loop:
        live.put(key, data("B10", "ec-sec1.key"))
        began = time.monotonic()
        # The mismatch window: refused once, RSA still served.
        live.wait_counts(parse_error=1)
        live.check_refusal("parse_error", f"'{cert}'", f"'{key}'", "does not match")
        assert live.subject() == "B10 rsa"
        gap_since(began)

        live.put(cert, data("B10", "ec.crt"))
        live.wait_subject("B10 ec")
        live.wait_counts(ok=1, parse_error=1)
    loop.check("B10 rsa", "B10 ec")
    assert peer_signature_type(live.port, ca) == "ECDSA"


PUBLIC_KEY = "file holds a public key, not a private key"


def test_b10_public_key_in_the_key_slot_is_refused_at_startup(rig):
    cert, key = CASES / "B10" / "rsa.crt", CASES / "B10" / "rsa-public-only.key"
    check_refused_at_startup(rig, cert, key, f"'{key}'", PUBLIC_KEY)


def test_b10_public_key_in_the_key_slot_is_refused_on_rotation(rig):
    ca = CASES / "B10" / "ca.pem"
    cert, key = rig.files(data("B10", "rsa.crt"), data("B10", "rsa-pkcs1.key"))
    live = rig.start(cert, key, ca)

    with HandshakeLoop(live.port, ca) as loop:
        live.put(key, data("B10", "rsa-public-only.key"))
        live.wait_counts(parse_error=1)
        live.check_refusal("parse_error", f"'{key}'", PUBLIC_KEY)
        assert live.subject() == "B10 rsa"
    loop.check("B10 rsa")


# B12: chain order and completeness.

B12_REFUSED = {
    "leaf-last": "leaf is not first",
    "root-first": "leaf is not first",
    "intermediate-only": "does not match",
}


@pytest.fixture
def b12_trust(tmp_path: Path) -> Path:
    """Root and intermediate together: a client that needs no chain from
    the server (for the status service and the handshake loop)."""
    path = tmp_path / "root-and-intermediate.pem"
    path.write_bytes(data("B12", "ca-root.pem") + data("B12", "inter.pem"))
    return path


def check_unknown_issuer(live: Live, root: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        live.subject(root)
    # OpenSSL's words for "unknown issuer".
    assert failure.value.verify_code == 20, failure.value
    assert "unable to get local issuer certificate" in str(failure.value)


@pytest.mark.parametrize(
    "variant", ["good", "leaf-only", "leaf-last", "root-first", "intermediate-only"]
)
def test_b12_chain_variants_at_startup(rig, b12_trust, variant):
    root = CASES / "B12" / "ca-root.pem"
    cert, key = CASES / "B12" / f"chain.{variant}.pem", CASES / "B12" / "leaf.key"
    if variant in B12_REFUSED:
        check_refused_at_startup(rig, cert, key, f"'{cert}'", B12_REFUSED[variant])
        return

    live = rig.start(cert, key, b12_trust)
    assert live.subject() == "B12 leaf"
    if variant == "good":
        assert live.subject(root) == "B12 leaf"
        assert "chain incomplete" not in live.log()
    else:
        check_unknown_issuer(live, root)
        startup = live.log().split("worker(s) ready")[0]
        assert "chain incomplete" in startup and f"'{cert}'" in startup
    # A note about the chain is not a reload failure.
    assert live.counts() == {"ok": 0, "io_error": 0, "parse_error": 0}


@pytest.mark.parametrize("variant", ["leaf-only", "leaf-last", "root-first", "intermediate-only"])
def test_b12_chain_variants_on_rotation(rig, b12_trust, variant):
    root = CASES / "B12" / "ca-root.pem"
    cert, key = rig.files(data("B12", "chain.good.pem"), data("B12", "leaf.key"))
    live = rig.start(cert, key, b12_trust)
    assert live.subject(root) == "B12 leaf"

    # The leaf stays the same; what changes is the chain sent with it.
    # Clients that know the intermediate verify either way.
    with HandshakeLoop(live.port, b12_trust) as loop:
        live.put(cert, data("B12", f"chain.{variant}.pem"))
        if variant in B12_REFUSED:
            live.wait_counts(parse_error=1)
            live.check_refusal("parse_error", f"'{cert}'", B12_REFUSED[variant])
            assert live.subject(root) == "B12 leaf"
        else:
            live.wait_counts(ok=1)
            assert live.wait_converged(fingerprint(data("B12", "leaf.pem"))) == 2
            check_unknown_issuer(live, root)
            after = live.log().split("certificate reloaded from")[1]
            assert "chain incomplete" in after
    loop.check("B12 leaf")
