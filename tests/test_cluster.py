"""The cluster scope (node mTLS): endpoints that refuse clients without a
certificate from the node CA, a bundle (CA, certificate, key) that
reloads and is counted under scope="cluster", field case B13 (a key
that belongs to no certificate, in one scope only), and resumption
state that dies with the client trust it was granted under.

B13's events.sh is reproduced in Python with the same renames; its 5 s
waits become `GAP` (five polls at 200 ms).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spicegw import _pki

from .config_support import (
    Authority,
    MutualLive,
    Witness,
    client_context,
    ended,
    error_line,
    exchange,
    refused,
    start_witness,
    write_pod,
)
from .harness import Pair, free_port, wait_until
from .reload_support import (
    POLL,
    RESULTS,
    SERVED_WITHIN,
    STEADY,
    HandshakeLoop,
    Live,
    check_no_key_material,
    common_name,
)
from .rotation_files import CASES, fingerprint, make_leaf, pause, put

B13 = CASES / "B13"
SCOPES = ("public", "cluster")


def b13_authority() -> _pki.Issued:
    return _pki.load_issued(str(B13 / "ca.pem"), str(B13 / "ca.key"))


def node_client(folder: Path, common_name: str = "B13 node") -> Pair:
    """A client certificate from the node CA, as a peer node holds."""
    issued = _pki.issue(b13_authority(), common_name, names=(), server=False, client=True)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{common_name}.pem", folder / f"{common_name}.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    return Pair(cert, key, B13 / "ca.pem", issued)


# A gateway with both scopes on files the test owns.


@dataclass
class Both:
    """A running gateway serving the public scope on `public` and the
    cluster scope on `cluster` (each holding cert.pem and key.pem)."""

    live: Live  # the public endpoint, counters and status
    cluster_port: int
    public: Path
    cluster: Path
    node_ca: Path
    witness: Witness
    client: Pair

    def counts(self) -> dict[str, dict[str, int]]:
        return {scope: self.live.counts(scope) for scope in SCOPES}

    def settle(self, timeout: float = SERVED_WITHIN, **expected: dict[str, int]) -> None:
        """Waits until each scope's reload counters are what `expected`
        says (results and scopes not named are 0), then checks that they
        stay there for a few more polls."""
        want = {s: {r: expected.get(s, {}).get(r, 0) for r in RESULTS} for s in SCOPES}
        try:
            wait_until(lambda: self.counts() == want, timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"reload counters {self.counts()}, expected {want}") from None
        deadline = time.monotonic() + STEADY
        for _ in range(100):
            if time.monotonic() > deadline:
                break
            now = self.counts()
            assert now == want, f"reload counters moved to {now}, expected to stay {want}"
            time.sleep(0.1)

    def cluster_subject(self, client: Pair | None = None) -> str:
        outcome = exchange(self.cluster_port, client_context(self.node_ca, client or self.client))
        assert outcome.ok, outcome.error
        assert outcome.subject is not None
        return outcome.subject

    def refusals(self, scope: str) -> list[str]:
        return [line for line in self.live.refusals() if f" {scope} certificate " in line]


def lay_out(folder: Path) -> tuple[Path, Path]:
    """`events.sh LIVE setup`: both pairs copied in with renames."""
    for scope in SCOPES:
        (folder / scope).mkdir(parents=True)
        put(folder / scope / "cert.pem", (B13 / scope / "cert.pem").read_bytes())
        put(folder / scope / "key.pem", (B13 / scope / "key.pem").read_bytes())
    return folder / "public", folder / "cluster"


def both_flags(public: Path, cluster: Path, node_ca: Path) -> list[str]:
    return [
        *("--tls-enabled", "true"),
        *("--tls-certificate-file", str(public / "cert.pem")),
        *("--tls-key-file", str(public / "key.pem")),
        *("--node-mtls-ca-certificate-file", str(node_ca)),
        *("--node-mtls-certificate-file", str(cluster / "cert.pem")),
        *("--node-mtls-key-file", str(cluster / "key.pem")),
    ]


@pytest.fixture
def both(gateway, processes, tmp_path) -> Iterator[Both]:
    public, cluster = lay_out(tmp_path / "LIVE")
    node_ca = tmp_path / "node-ca.pem"
    put(node_ca, (B13 / "ca.pem").read_bytes())
    witness = start_witness(processes, tmp_path)
    port, cluster_port, metrics = free_port(), free_port(), free_port()
    gw = gateway(
        *both_flags(public, cluster, node_ca),
        *("--workers", "2", "--tls-poll-interval", POLL, "--metrics", f"127.0.0.1:{metrics}"),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{witness.port}"),
        *("--cluster", f"127.0.0.1:{cluster_port}"),
        *("--cluster-upstream", f"127.0.0.1:{witness.port}"),
    )
    live = Live(gw, port, metrics, B13 / "ca.pem", public / "cert.pem", public / "key.pem")
    live.secrets += [(B13 / s / "key.pem").read_bytes() for s in SCOPES]
    client = node_client(tmp_path / "clients")
    result = Both(live, cluster_port, public, cluster, node_ca, witness, client)
    yield result
    live.assert_log_clean()


class MutualLoop(HandshakeLoop):
    """HandshakeLoop for the cluster endpoint: presents a node client
    certificate and carries one echo per connection, since a TLS 1.3
    client learns that its certificate was refused only when it reads."""

    def __init__(self, port: int, ca: Path, client: Pair, **kwargs):
        super().__init__(port, ca, **kwargs)
        self.context.load_cert_chain(str(client.cert), str(client.key))

    def _handshake(self) -> str:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            self.context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            name = common_name(tls.getpeercert())
            tls.sendall(b"node to node\n")
            echoed = b""
            while len(echoed) < 13:
                chunk = tls.recv(64)
                if not chunk:
                    raise ConnectionResetError("the cluster endpoint closed the connection")
                echoed += chunk
            return name


# Who may use a cluster endpoint.


def test_cluster_endpoints_refuse_clients_without_a_node_certificate(both, tmp_path):
    other = Authority.create(tmp_path / "other", "other CA")
    port = both.cluster_port
    trust = both.node_ca

    # The public pair comes from the node CA but may only serve (no
    # clientAuth usage): it is no node's client certificate.
    server_only = client_context(trust)
    server_only.load_cert_chain(both.public / "cert.pem", both.public / "key.pem")

    assert exchange(port, client_context(trust, both.client)).ok
    both.witness.wait_accepted(1)
    for name, context in [
        ("no certificate", client_context(trust)),
        ("another CA's certificate", client_context(trust, other.client("intruder"))),
        ("a node CA certificate for servers only", server_only),
    ]:
        assert refused(exchange(port, context)), f"a client with {name} got in"
    # No upstream connection for any of them: the next good client's
    # connection is the second one.
    assert exchange(port, client_context(trust, both.client)).ok
    both.witness.wait_accepted(2)

    # The public endpoint asks for nothing.
    assert exchange(both.live.port, client_context(trust)).ok
    both.witness.wait_accepted(3)


def test_spicepod_cluster_endpoint_refuses_clients_without_a_certificate(
    gateway, processes, tmp_path
):
    lay_out(tmp_path / "LIVE")
    witness = start_witness(processes, tmp_path)
    port, peers = free_port(), free_port()
    # Relative paths: the spicepod's folder is tmp_path.
    pod = write_pod(
        tmp_path,
        f"""\
runtime:
  tls:
    enabled: true
    certificate_file: LIVE/public/cert.pem
    key_file: LIVE/public/key.pem
  node_mtls:
    ca_certificate_file: {B13 / "ca.pem"}
    certificate_file: LIVE/cluster/cert.pem
    key_file: LIVE/cluster/key.pem
endpoints:
  - name: api
    listen: 127.0.0.1:{port}
    upstream: 127.0.0.1:{witness.port}
  - name: peers
    listen: 127.0.0.1:{peers}
    upstream: 127.0.0.1:{witness.port}
    scope: cluster
    alpn: [h2]
""",
    )
    gateway("--config", str(pod), "--workers", "1")
    trust = B13 / "ca.pem"
    client = node_client(tmp_path / "clients")

    anonymous = exchange(peers, client_context(trust, alpn=["h2"]))
    assert refused(anonymous), "a client without a certificate got into the cluster scope"
    node = exchange(peers, client_context(trust, client, alpn=["h2"]))
    assert node.ok, node.error
    assert node.subject == "B13 cluster" and node.alpn == "h2"
    witness.wait_accepted(1)
    public_client = exchange(port, client_context(trust))
    assert public_client.ok and public_client.subject == "B13 public"
    witness.wait_accepted(2)


def test_cluster_endpoint_needs_node_mtls(gateway, tmp_path, server_pair, echo_port):
    code, output = ended(
        gateway(
            *("--tls-enabled", "true", "--tls-certificate-file", str(server_pair.cert)),
            *("--tls-key-file", str(server_pair.key)),
            *("--cluster-upstream", f"127.0.0.1:{echo_port}"),
            ready=False,
        )
    )
    assert code != 0
    assert "node mTLS" in error_line(output)


# The cluster bundle reloads, counted under its own scope.


def test_cluster_bundle_reloads_under_scope_cluster(both, tmp_path):
    key = serialization.load_pem_private_key((B13 / "cluster" / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issuer = b13_authority()

    with (
        HandshakeLoop(both.live.port, B13 / "ca.pem") as public_loop,
        MutualLoop(both.cluster_port, both.node_ca, both.client) as cluster_loop,
    ):
        # 1. A renewed certificate on the same key.
        renewed = make_leaf(issuer, "B13 cluster renewed", key=key)[0]
        put(both.cluster / "cert.pem", renewed)
        both.settle(cluster={"ok": 1})
        wait_until(lambda: both.cluster_subject() == "B13 cluster renewed", SERVED_WITHIN)

        # 2. The node CA file gains a second CA: its nodes get in too.
        newcomer = Authority.create(tmp_path / "second", "second node CA")
        stranger = newcomer.client("node of the second CA")
        assert refused(exchange(both.cluster_port, client_context(both.node_ca, stranger)))
        put(both.node_ca, (B13 / "ca.pem").read_bytes() + newcomer.path.read_bytes())
        both.settle(cluster={"ok": 2})
        newcomer_context = client_context(both.node_ca, stranger)
        wait_until(lambda: exchange(both.cluster_port, newcomer_context).ok, SERVED_WITHIN)

        # 3. A new key and certificate, key first: the window between the
        #    renames is refused once, then the pair is taken.
        cert_pem, key_pem = make_leaf(issuer, "B13 cluster rekeyed")
        both.live.secrets.append(key_pem)
        put(both.cluster / "key.pem", key_pem)
        both.settle(cluster={"ok": 2, "parse_error": 1})
        put(both.cluster / "cert.pem", cert_pem)
        both.settle(cluster={"ok": 3, "parse_error": 1})
        wait_until(lambda: both.cluster_subject() == "B13 cluster rekeyed", SERVED_WITHIN)
    public_loop.check("B13 public")
    cluster_loop.check("B13 cluster", "B13 cluster renewed", "B13 cluster rekeyed")
    assert both.live.counts("public") == {"ok": 0, "io_error": 0, "parse_error": 0}
    status = both.live.tls_status()["scopes"]["cluster"]  # type: ignore[index]
    assert status["fingerprint"] == fingerprint(cert_pem)


# B13: a key that belongs to no certificate, in one scope only.

BREAKS = {
    "break-cluster": ("cluster", "unrelated.key.pem"),
    "break-cluster-rsa": ("cluster", "unrelated-rsa.key.pem"),
    "break-public": ("public", "unrelated.key.pem"),
}


@pytest.mark.parametrize("step", list(BREAKS))
def test_b13_a_broken_scope_never_touches_the_other(both, step):
    broken, bad_key = BREAKS[step]
    healthy = "public" if broken == "cluster" else "cluster"
    folder = both.cluster if broken == "cluster" else both.public
    subjects = {"public": "B13 public", "cluster": "B13 cluster"}

    def serving() -> dict[str, str]:
        return {"public": both.live.subject(), "cluster": both.cluster_subject()}

    assert serving() == subjects
    before = both.live.tls_status()["scopes"]  # type: ignore[index]

    with (
        HandshakeLoop(both.live.port, B13 / "ca.pem") as public_loop,
        MutualLoop(both.cluster_port, both.node_ca, both.client) as cluster_loop,
    ):
        # Step 2 (or 4): the broken scope counts one parse_error; the other
        # does not move.
        both.live.secrets.append((B13 / bad_key).read_bytes())
        put(folder / "key.pem", (B13 / bad_key).read_bytes())
        began = time.monotonic()
        both.settle(**{broken: {"parse_error": 1}})
        lines = both.refusals(broken)
        assert len(lines) == 1, both.live.log()
        assert "(parse_error)" in lines[0] and "does not match" in lines[0], lines[0]
        assert f"'{folder / 'key.pem'}'" in lines[0], lines[0]
        assert not both.refusals(healthy), both.live.log()
        assert serving() == subjects
        pause(max(0.0, began + 1.0 - time.monotonic()))

        # Step 3: the scope's own key returns.
        put(folder / "key.pem", (B13 / broken / "key.pem").read_bytes())
        pause()
        assert serving() == subjects
        assert both.live.counts(healthy) == {"ok": 0, "io_error": 0, "parse_error": 0}
    public_loop.check("B13 public")
    cluster_loop.check("B13 cluster")

    # Every worker still serves what it served before, in both scopes.
    after = both.live.tls_status()["scopes"]  # type: ignore[index]
    for scope in SCOPES:
        assert after[scope]["fingerprint"] == before[scope]["fingerprint"]
        workers = {worker["fingerprint"] for worker in after[scope]["workers"]}
        assert workers == {before[scope]["fingerprint"]}
    assert after[healthy]["generation"] == before[healthy]["generation"]

    # The case's expectation for step 3: the fix is a reload of that scope
    # only (ok +1), the other scope still untouched.
    both.settle(**{broken: {"ok": 1, "parse_error": 1}})


@pytest.mark.parametrize("bad_key", ["unrelated.key.pem", "unrelated-rsa.key.pem"])
def test_b13_startup_with_a_broken_cluster_key_refuses_to_start(gateway, tmp_path, bad_key):
    public, cluster = lay_out(tmp_path / "LIVE")
    put(cluster / "key.pem", (B13 / bad_key).read_bytes())
    port, cluster_port = free_port(), free_port()
    began = time.monotonic()
    gw = gateway(
        *both_flags(public, cluster, B13 / "ca.pem"),
        *("--workers", "2", "--http", f"127.0.0.1:{port}", "--http-upstream", "127.0.0.1:9"),
        *("--cluster", f"127.0.0.1:{cluster_port}", "--cluster-upstream", "127.0.0.1:9"),
        ready=False,
    )
    code, output = ended(gw)
    assert code != 0
    assert time.monotonic() - began < 15
    line = error_line(output)
    for needle in ("cluster", f"'{cluster / 'cert.pem'}'", f"'{cluster / 'key.pem'}'"):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert "does not match" in line
    assert "Traceback" not in output and "worker(s) ready" not in output
    check_no_key_material(output, [(B13 / bad_key).read_bytes()])

    # No half-configured listener is left: nothing accepts on either port.
    assert gw.worker_pids() == []
    for listen in (port, cluster_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen), timeout=2).close()


# Resumption state from the old trust is dropped when the client CA changes.


def resume(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None):
    """One connection offering `session`; (new session, resumed?)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        # TLS 1.3 tickets arrive after the handshake: one echo brings them.
        tls.sendall(b"resume?\n")
        echoed = b""
        while len(echoed) < 8:  # at most 8 reads: each brings a byte or more
            chunk = tls.recv(64)
            assert chunk, "the connection ended before the echo"
            echoed += chunk
        assert echoed == b"resume?\n"
        return tls.session, tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("scope", ["public", "cluster"])
def test_sessions_from_the_old_client_trust_do_not_resume(
    gateway, processes, tmp_path, ca, server_pair, scope, version
):
    witness = start_witness(processes, tmp_path)
    first = Authority.create(tmp_path / "first", "first client CA")
    trust_file = tmp_path / "client-ca.pem"
    put(trust_file, first.path.read_bytes())
    port, metrics = free_port(), free_port()
    flags = [
        *("--workers", "2", "--tls-enabled", "true", "--tls-poll-interval", POLL),
        *("--tls-certificate-file", str(server_pair.cert), "--tls-key-file", str(server_pair.key)),
        *("--metrics", f"127.0.0.1:{metrics}"),
    ]
    if scope == "public":
        flags += ["--tls-client-auth-mode", "required"]
        flags += ["--tls-client-auth-ca-file", str(trust_file)]
        flags += ["--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{witness.port}"]
    else:
        flags += ["--node-mtls-ca-certificate-file", str(trust_file)]
        flags += ["--node-mtls-certificate-file", str(server_pair.cert)]
        flags += ["--node-mtls-key-file", str(server_pair.key)]
        flags += ["--cluster", f"127.0.0.1:{port}"]
        flags += ["--cluster-upstream", f"127.0.0.1:{witness.port}"]
    gw = gateway(*flags)
    alice = first.client("alice")
    context = client_context(ca.path, alice, version=version)
    # In the public scope the status service wants alice's certificate too.
    live = MutualLive(gw, port, metrics, ca.path, None, None)
    live.context = client_context(ca.path, alice)

    session, reused = resume(port, context, None)
    assert not reused
    for _ in range(4):  # with 2 workers, both have resumed it
        _, reused = resume(port, context, session)
        assert reused, "resumption does not work at all: the test shows nothing"

    # The trust changes; alice's CA is still in it.
    second = Authority.create(tmp_path / "second", "second client CA")
    put(trust_file, first.path.read_bytes() + second.path.read_bytes())
    wait_until(lambda: live.counts(scope).get("ok") == 1, SERVED_WITHIN)

    def converged() -> bool:
        served = live.tls_status()["scopes"][scope]  # type: ignore[index]
        workers = {worker["generation"] for worker in served["workers"]}
        return workers == {served["generation"]}

    wait_until(converged, SERVED_WITHIN)

    for _ in range(4):
        fresh, reused = resume(port, context, session)
        assert not reused, "a session granted under the old client CA was resumed"
    # New sessions resume as before.
    for _ in range(2):
        _, reused = resume(port, context, fresh)
        assert reused
