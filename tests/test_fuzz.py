"""Property tests of everything that parses untrusted or hand-written
input: the pipe protocol decoder, the PEM reader, the certificate pair
checks and the spicepod.yaml loader. No input may crash them, hang them,
or get a mismatched certificate and key accepted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spicegw import _config, _core, _pki
from spicegw.certs import Source, check_material
from spicegw.errors import ConfigError, MaterialError

CERT = Source.file("certificate", "cert.pem", "--tls-certificate-file")
KEY = Source.file("key", "key.pem", "--tls-key-file")

FUZZ = settings(
    max_examples=int(os.environ.get("SPICEGW_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pairs() -> list[_pki.Issued]:
    ca = _pki.make_ca("fuzz CA")
    return [_pki.issue(ca, f"fuzz {n}", names=["localhost"]) for n in range(2)]


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), max_size=20))
def test_frame_decoder_never_crashes_on_garbage(data, cuts):
    decoder = _core.FrameDecoder()
    position = 0
    try:
        for cut in [*cuts, len(data)]:
            for kind, _, payload in decoder.feed(data[position : position + cut]):
                assert 0 < kind < 256
                assert isinstance(payload, bytes)
            position += cut
    except ValueError:
        pass  # Refusing a broken stream is the expected answer.


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from([2, 3, 4]), st.integers(0, 2**64 - 1), st.binary(max_size=300)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 97),
)
def test_frames_survive_any_split(frames, step):
    stream = b"".join(_core.encode_frame(kind, gen, payload) for kind, gen, payload in frames)
    decoder = _core.FrameDecoder()
    received = []
    for offset in range(0, len(stream), step):
        received.extend(decoder.feed(stream[offset : offset + step]))
    assert received == list(frames)


@FUZZ
@given(st.binary(max_size=4096))
def test_pem_reader_refuses_cleanly(data):
    try:
        blocks = _core.parse_pem(data)
    except _core.PemError:
        return
    assert all(isinstance(label, str) and isinstance(der, bytes) for label, der in blocks)


def _mutate(text: bytes, position: int, replacement: bytes) -> bytes:
    position %= max(len(text), 1)
    return text[:position] + replacement + text[position + len(replacement) :]


@FUZZ
@given(
    st.integers(0, 1),
    st.integers(0, 1),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=4),
    st.booleans(),
)
def test_no_mutation_gets_a_mismatched_pair_accepted(pairs, cert_of, key_of, at, junk, in_key):
    cert = pairs[cert_of].cert_pem()
    key = pairs[key_of].key_pem()
    if in_key:
        key = _mutate(key, at, junk)
    else:
        cert = _mutate(cert, at, junk)
    try:
        material = check_material(cert, key, CERT, KEY)
    except MaterialError as err:
        assert "\n" not in str(err)
        return
    # Whatever got through must be a real pair: the key belongs to the
    # leaf that will be served.
    assert cert_of == key_of
    leaf = x509.load_der_x509_certificate(material.bundle.certificates[0])
    assert leaf.public_key().public_numbers() == pairs[key_of].key.public_key().public_numbers()


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=30),
    st.sampled_from(["${secrets:missing}", "${env:SPICEGW_FUZZ_UNSET}", "127.0.0.1:1", "h2"]),
)
yaml_keys = st.sampled_from(
    [
        "runtime", "tls", "enabled", "certificate_file", "key", "endpoints", "name",
        "listen", "upstream", "scope", "alpn", "secrets", "from", "node_mtls", "x",
    ]
)  # fmt: skip
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(yaml_keys, inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(yaml_values)
def test_spicepod_loader_answers_with_config_errors_only(tmp_path_factory, document):
    folder = tmp_path_factory.mktemp("pod")
    path = Path(folder) / "spicepod.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        _config.load(path)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        assert message
