"""The environment knobs of the bench suite, read once, in one place.

`SPICEGW_BENCH_QUICK=1` shrinks every count at once (a check that all
runs, in about two minutes); any knob set on its own wins over it.
benches/README.md lists them with their defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from .stage import PEER_NAMES

QUICK = os.environ.get("SPICEGW_BENCH_QUICK", "") not in ("", "0")


def _number(name: str, full: float, quick: float) -> float:
    text = os.environ.get(name)
    return float(text) if text else (quick if QUICK else full)


def _count(name: str, full: int, quick: int) -> int:
    return int(_number(name, full, quick))


# Connections per peer per measurement, and rounds of the connection
# figures (medians over rounds; peers take turns going first).
CONNECTIONS = _count("SPICEGW_BENCH_CONNECTIONS", 2000, 300)
ROUNDS = _count("SPICEGW_BENCH_ROUNDS", 5, 1)

# Client concurrencies of the full-handshake figures; the other figures
# use the highest.
CONCURRENCY = tuple(
    int(level) for level in os.environ.get("SPICEGW_BENCH_CONCURRENCY", "8,32").split(",")
)

# Bytes per bulk transfer, each direction, and rounds.
BULK_BYTES = _count("SPICEGW_BENCH_BULK_BYTES", 100_000_000, 20_000_000)
BULK_ROUNDS = _count("SPICEGW_BENCH_BULK_ROUNDS", 3, 1)

# Idle connections held open for the memory figure.
IDLE_CONNECTIONS = _count("SPICEGW_BENCH_IDLE", 2000, 500)

# The reload storm: seconds of load per phase, and storms per peer. The
# phases alternate, a baseline first and last: with 2 storms, five
# phases per peer.
STORM_SECONDS = _number("SPICEGW_BENCH_STORM_SECONDS", 5.0, 3.0)
STORM_ROUNDS = _count("SPICEGW_BENCH_STORM_ROUNDS", 2, 1)

# Which peers to run, comma separated; the others are reported skipped.
PEERS = tuple(
    name for name in os.environ.get("SPICEGW_BENCH_PEERS", ",".join(PEER_NAMES)).split(",") if name
)
unknown = set(PEERS) - set(PEER_NAMES)
if unknown:
    raise ValueError(f"SPICEGW_BENCH_PEERS: unknown peers {sorted(unknown)}")

# Where the summary files and the plot go. By default they are written
# only by a run with --benchmark-enable, to benches/results.
RESULTS = os.environ.get("SPICEGW_BENCH_RESULTS", "")
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
