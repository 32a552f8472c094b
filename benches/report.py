"""The figures of a bench session, and the tables printed and written at
its end.

A `Figure` is one question (server CPU per connection, memory per idle
connection...), asked in one or more `Row`s (a TLS version, a client
concurrency...). Each row holds a `Cell` per peer: the values of its
rounds, and for each round how busy the server core was outside the
peer (`elsewhere`, see `measure.Sample`). Tables put spicegw beside each
peer with the ratio spicegw / peer.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stage import PEER_NAMES


@dataclass
class Cell:
    """One peer's rounds in one row."""

    values: list[float] = field(default_factory=list)
    elsewhere: list[float] = field(default_factory=list)
    # Anything else worth keeping: negotiated suite, rates, counts.
    info: dict[str, Any] = field(default_factory=dict)
    # Printed under the table, e.g. that a peer ran with one worker.
    note: str = ""

    def add(self, value: float, elsewhere: float | None = None) -> None:
        self.values.append(value)
        if elsewhere is not None:
            self.elsewhere.append(elsewhere)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def noise(self) -> float | None:
        return statistics.median(self.elsewhere) if self.elsewhere else None

    def as_dict(self) -> dict[str, Any]:
        noise = self.noise
        return {
            "median": round(self.median, 4),
            "rounds": [round(value, 4) for value in self.values],
            "elsewhere_rounds": [round(share, 3) for share in self.elsewhere],
            "elsewhere_median": None if noise is None else round(noise, 3),
            **({"note": self.note} if self.note else {}),
            **self.info,
        }


@dataclass
class Row:
    label: str
    unit: str
    cells: dict[str, Cell] = field(default_factory=dict)
    digits: int = 1
    # False where a ratio means nothing (a count of failures, a change in
    # per cent); such rows are left out of the plot too.
    ratio: bool = True

    def cell(self, peer: str) -> Cell:
        return self.cells.setdefault(peer, Cell())


@dataclass
class Figure:
    key: str
    title: str
    # "lower is better", "higher is better", or "" when it depends.
    better: str
    rows: dict[str, Row] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(self, label: str, unit: str, *, digits: int = 1, ratio: bool = True) -> Row:
        return self.rows.setdefault(label, Row(label, unit, digits=digits, ratio=ratio))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def peers(self) -> list[str]:
        present = {peer for row in self.rows.values() for peer in row.cells}
        return [name for name in PEER_NAMES if name in present or name in self.skipped]

    def extra_info(self, labels: list[str] | None = None) -> dict[str, Any]:
        """The figure, or the rows named in `labels`, as pytest-benchmark's
        `extra_info`: per peer and row the median, rounds and noise, and
        the ratios spicegw / peer."""
        rows = [row for row in self.rows.values() if labels is None or row.label in labels]
        info: dict[str, Any] = {"figure": self.title, "better": self.better}
        for peer in self.peers():
            if peer in self.skipped:
                info[peer] = {"skipped": self.skipped[peer]}
                continue
            info[peer] = {row.label: row.cells[peer].as_dict() for row in rows if peer in row.cells}
        found = {row.label: ratios(row) for row in rows}
        info["ratios_spicegw_over"] = {
            label: {peer: round(ratio, 3) for peer, ratio in by_peer.items()}
            for label, by_peer in found.items()
            if by_peer
        }
        if self.notes:
            info["notes"] = self.notes
        return info


def ratios(row: Row) -> dict[str, float]:
    """spicegw / peer for each other peer in the row, when both have a
    figure and the row takes ratios."""
    mine = row.cells.get("spicegw")
    if not row.ratio or mine is None or not mine.values:
        return {}
    return {
        peer: mine.median / cell.median
        for peer, cell in row.cells.items()
        if peer != "spicegw" and cell.values and cell.median != 0
    }


# Footnote marks; not `*`, which markdown reads as a list or emphasis.
MARKS = ("†", "‡", "§", "¶")


def _format(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _table(figure: Figure) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes of one figure, as strings."""
    peers = figure.peers()
    others = [peer for peer in peers if peer != "spicegw"]
    header = ["case", *peers, *[f"÷{peer}" for peer in others], "noise"]
    lines = []
    marks: dict[str, str] = {}
    for row in figure.rows.values():
        line = [f"{row.label} ({row.unit})"]
        for peer in peers:
            cell = row.cells.get(peer)
            if peer in figure.skipped or cell is None or not cell.values:
                line.append("—")
                continue
            text = _format(cell.median, row.digits)
            if cell.note:
                mark = marks.setdefault(cell.note, MARKS[len(marks) % len(MARKS)])
                text += mark
            line.append(text)
        found = ratios(row)
        line.extend(f"{found[peer]:.2f}" if peer in found else "" for peer in others)
        noise = [cell.noise for cell in row.cells.values() if cell.noise is not None]
        line.append(f"≤{max(noise):.0%}" if noise else "")
        lines.append(line)

    notes = [f"{mark} {text}" for text, mark in marks.items()]
    notes += [f"{peer}: skipped, {why}" for peer, why in figure.skipped.items()]
    notes += figure.notes
    return header, lines, notes


def _heading(figure: Figure) -> str:
    better = f"; {figure.better}" if figure.better else ""
    return f"{figure.title}{better}"


# The order of the figures in the tables and the plot, whatever order
# the test modules ran in.
ORDER = ("handshake", "resume", "scaling", "bulk", "idle", "storm", "rotation")


@dataclass
class Summary:
    figures: dict[str, Figure] = field(default_factory=dict)
    # Said once under all tables: machine, knobs, what the noise means.
    notes: list[str] = field(default_factory=list)

    def figure(self, key: str, title: str, better: str) -> Figure:
        found = self.figures.setdefault(key, Figure(key, title, better))
        rank = {name: index for index, name in enumerate(ORDER)}
        self.figures = dict(
            sorted(self.figures.items(), key=lambda item: rank.get(item[0], len(ORDER)))
        )
        return found

    def text(self) -> list[str]:
        out: list[str] = []
        for figure in self.figures.values():
            header, rows, notes = _table(figure)
            widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
            out.append(f"== {_heading(figure)}")
            for line in [header, *rows]:
                cells = [line[0].ljust(widths[0])]
                pairs = zip(line[1:], widths[1:], strict=True)
                cells += [text.rjust(width) for text, width in pairs]
                out.append("  ".join(cells).rstrip())
            out.extend(f"   {note}" for note in notes)
            out.append("")
        out.extend(self.notes)
        return out

    def markdown(self) -> str:
        out: list[str] = []
        for figure in self.figures.values():
            header, rows, notes = _table(figure)
            out.append(f"**{_heading(figure)}**")
            out.append("")
            out.append("| " + " | ".join(header) + " |")
            out.append("| --- |" + " ---: |" * (len(header) - 1))
            out.extend("| " + " | ".join(line) + " |" for line in rows)
            if notes:
                out.append("")
                out.extend(f"- {note}" for note in notes)
            out.append("")
        out.extend(f"{note}  " for note in self.notes)
        return "\n".join(out).rstrip() + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "figures": {key: figure.extra_info() for key, figure in self.figures.items()},
            "notes": self.notes,
        }

    def write(self, folder: Path) -> list[Path]:
        """summary.txt, summary.md and summary.json in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        written = {
            folder / "summary.txt": "\n".join(self.text()) + "\n",
            folder / "summary.md": self.markdown(),
            folder / "summary.json": json.dumps(self.as_json(), indent=1, ensure_ascii=False),
        }
        for path, text in written.items():
            path.write_text(text)
        return list(written)
