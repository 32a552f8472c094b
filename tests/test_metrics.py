"""Metric names are public API: /metrics shows exactly the documented
list, with the types documented, and the README's table names the same
metrics."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from spicegw._metrics import METRICS

from .harness import free_port, http_get, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def _families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def test_metrics_endpoint_shows_exactly_the_documented_metrics(gateway, tls_args, echo_port, ca):
    port, metrics = free_port(), free_port()
    gateway(
        *tls_args, "--workers", "2", "--http", f"127.0.0.1:{port}",
        "--http-upstream", f"127.0.0.1:{echo_port}", "--metrics", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    # One relayed connection, so worker counters have something to say.
    status, _ = http_get(metrics, ca.path, "/health")
    assert status == 200

    def families() -> dict[str, str]:
        _, body = http_get(metrics, ca.path, "/metrics")
        found = _families(body.decode())
        documented = {spec.name for spec in METRICS}
        return found if documented <= set(found) else {}

    found = wait_until(families, timeout=10)
    assert isinstance(found, dict)
    assert found == {spec.name: spec.kind for spec in METRICS}


def test_readme_documents_every_metric():
    table = README.read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)`", table, flags=re.MULTILINE))
    names = {spec.name for spec in METRICS}
    # The histogram's _sum shares a row with its _bucket.
    missing = {name for name in names if name not in documented and not name.endswith("_sum")}
    assert missing == set()
    assert documented - names == set(), "README lists metrics that do not exist"


def test_supervisor_stays_single_threaded_for_every_fork(gateway, tls_args, echo_port, ca):
    """Metrics live in the supervisor, which forks again whenever a worker
    dies: the meter must not have started a thread a fork would copy."""
    port, metrics = free_port(), free_port()
    gw = gateway(
        *tls_args, "--workers", "2", "--http", f"127.0.0.1:{port}",
        "--http-upstream", f"127.0.0.1:{echo_port}", "--metrics", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    status, _ = http_get(metrics, ca.path, "/metrics")
    assert status == 200
    assert len(list(Path(f"/proc/{gw.pid}/task").iterdir())) == 1

    victim = gw.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "is serving again" in gw.text(), timeout=10)
    assert len(list(Path(f"/proc/{gw.pid}/task").iterdir())) == 1
    assert "threads are running before fork" not in gw.text()
