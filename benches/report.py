"""Figures per peer and the table printed at the end of a bench session."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Round:
    """One round against one peer."""

    us_per_connection: float
    seconds: float
    # Ticks the server CPU was busy outside the peer's processes, as a
    # share of the peer's own: interrupts, softirqs, and anything else
    # that ran there. A round far above the others was disturbed.
    elsewhere: float


@dataclass
class PeerFigures:
    """One peer's rounds: server CPU µs per connection and wall seconds."""

    name: str
    connections: int
    us_per_connection: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    elsewhere: list[float] = field(default_factory=list)

    def add(self, result: Round) -> None:
        self.us_per_connection.append(result.us_per_connection)
        self.seconds.append(result.seconds)
        self.elsewhere.append(result.elsewhere)

    @property
    def rounds(self) -> int:
        return len(self.us_per_connection)

    @property
    def median_us(self) -> float:
        return statistics.median(self.us_per_connection)

    @property
    def connections_per_second(self) -> float:
        return self.connections / statistics.median(self.seconds)

    def extra_info(self) -> dict[str, object]:
        return {
            "us_per_connection_median": round(self.median_us, 1),
            "us_per_connection_rounds": [round(us, 1) for us in self.us_per_connection],
            "connections": self.connections,
            "rounds": self.rounds,
            "connections_per_second_median": round(self.connections_per_second, 1),
            "server_cpu_busy_elsewhere_rounds": [round(share, 3) for share in self.elsewhere],
        }


@dataclass
class Summary:
    peers: list[PeerFigures] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratio(self, numerator: str, denominator: str) -> float:
        by_name = {peer.name: peer for peer in self.peers}
        return by_name[numerator].median_us / by_name[denominator].median_us

    def table(self) -> list[str]:
        lines = [
            f"{'peer':<10} {'µs/conn':>8} {'min':>6} {'max':>6} "
            f"{'conns x rounds':>15} {'conn/s':>7} {'elsewhere':>9}"
        ]
        for peer in self.peers:
            lines.append(
                f"{peer.name:<10} {peer.median_us:>8.1f} "
                f"{min(peer.us_per_connection):>6.0f} {max(peer.us_per_connection):>6.0f} "
                f"{peer.connections:>8} x {peer.rounds:<4} "
                f"{peer.connections_per_second:>7.0f} "
                f"{statistics.median(peer.elsewhere):>9.0%}"
            )
        return lines + self.notes
