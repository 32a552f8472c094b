"""Conformance scanners against a running gateway: sslyze with Mozilla's
"intermediate" profile, nmap's ssl-enum-ciphers and testssl.sh.

`.ci/run` installs all three (sslyze in its own virtual environment,
because it pins its own `cryptography`). Run by hand, a missing scanner
skips its test and says which one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .harness import Gateway, free_port, start_upstream

ROOT = Path(__file__).resolve().parent.parent

# testssl.sh findings of severity HIGH that are spicegw by design, each
# with its reason. Anything else HIGH, and anything CRITICAL, fails.
TESTSSL_ALLOWED = {
    # rustls honours the client's cipher order (all offered suites are
    # AEAD with forward secrecy; Mozilla's intermediate profile does not
    # ask for a server order either).
    "cipher_order",
    # The test PKI has no CRL or OCSP responder; revocation is the
    # certificate issuer's business, not the gateway's.
    "cert_revocation",
}


def _tool(name: str, *candidates: Path) -> str:
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, ca) -> dict[str, int]:
    """One gateway with a public endpoint and a cluster (mTLS) endpoint."""
    folder = tmp_path_factory.mktemp("scan")
    server = ca.pair("localhost", stem="scan-server")
    node = ca.pair("localhost", stem="scan-node")
    upstream_port = free_port()
    upstream = start_upstream("http", upstream_port, folder / "upstream.log")
    public, cluster = free_port(), free_port()
    gateway = Gateway(
        [
            "--workers", "2", "--tls-enabled", "true",
            "--tls-certificate-file", str(server.cert), "--tls-key-file", str(server.key),
            "--http", f"127.0.0.1:{public}", "--http-upstream", f"127.0.0.1:{upstream_port}",
            "--node-mtls-ca-certificate-file", str(ca.path),
            "--node-mtls-certificate-file", str(node.cert), "--node-mtls-key-file", str(node.key),
            "--cluster", f"127.0.0.1:{cluster}", "--cluster-upstream", f"127.0.0.1:{upstream_port}",
        ],
        folder / "gateway.log",
    )  # fmt: skip
    try:
        gateway.wait_ready()
        yield {"public": public, "cluster": cluster}
    finally:
        gateway.stop()
        upstream.stop()


def _sslyze(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    sslyze = _tool(
        "sslyze",
        Path(os.environ.get("SPICEGW_SSLYZE", "/nonexistent")),
        ROOT / ".tools" / "sslyze" / "bin" / "sslyze",
    )
    done = subprocess.run(
        [sslyze, f"--json_out={out}", *args], capture_output=True, text=True, timeout=180
    )
    return done, json.loads(out.read_text())


def test_sslyze_finds_the_public_endpoint_mozilla_intermediate(scanned, ca, tmp_path):
    done, report = _sslyze(
        [
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={ca.path}",
            f"localhost:{scanned['public']}",
        ],
        tmp_path / "public.json",
    )
    (result,) = report["server_scan_results"]
    assert result["scan_status"] == "COMPLETED", result
    # sslyze reports compliance in its exit code and its last lines.
    assert done.returncode == 0, done.stdout[-2000:]
    assert "OK - Compliant" in done.stdout


def test_sslyze_sees_client_authentication_required_on_the_cluster_endpoint(scanned, ca, tmp_path):
    _, report = _sslyze(
        [f"--certinfo_ca_file={ca.path}", "--certinfo", f"localhost:{scanned['cluster']}"],
        tmp_path / "cluster.json",
    )
    (result,) = report["server_scan_results"]
    connectivity = result["connectivity_result"]
    assert connectivity["client_auth_requirement"] == "REQUIRED", connectivity


def test_nmap_grades_a_with_only_tls12_and_tls13(scanned):
    nmap = _tool("nmap")
    done = subprocess.run(
        [nmap, "-Pn", "-p", str(scanned["public"]), "--script", "ssl-enum-ciphers",
         "-oX", "-", "127.0.0.1"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    script = ET.fromstring(done.stdout).find(".//script[@id='ssl-enum-ciphers']")
    assert script is not None, done.stdout
    versions = sorted(table.get("key") for table in script.findall("table"))
    assert versions == ["TLSv1.2", "TLSv1.3"]
    strength = script.find("elem[@key='least strength']")
    assert strength is not None and strength.text == "A"
    grades = {elem.text for elem in script.iter("elem") if elem.get("key") == "strength"}
    assert grades == {"A"}


def test_testssl_finds_nothing_critical(scanned, ca, tmp_path):
    testssl = _tool("testssl", Path("/usr/bin/testssl.sh"))
    report = tmp_path / "testssl.json"
    subprocess.run(
        [testssl, "--quiet", "--color", "0", "--warnings", "off", "--add-ca", str(ca.path),
         "--jsonfile", str(report), f"127.0.0.1:{scanned['public']}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    findings = json.loads(report.read_text())
    assert any(item["id"] == "TLS1_3" for item in findings)
    critical = [f for f in findings if f["severity"] == "CRITICAL"]
    high = [f for f in findings if f["severity"] == "HIGH" and f["id"] not in TESTSSL_ALLOWED]
    assert critical == [], critical
    assert high == [], high
    offered = {f["id"]: f["finding"] for f in findings if f["id"] in ("SSLv2", "SSLv3", "TLS1")}
    assert all(text.startswith("not offered") for text in offered.values()), offered
