"""The summary as one PNG: a panel per figure, a group of bars per row,
a bar per peer (the median, with a line from the lowest to the highest
round). Rows without ratios (counts, changes in per cent) stay in the
tables only.

matplotlib comes with the `bench` extra (`pip install -e ".[bench]"`);
without it the tables are still written and the plot is said missing.
"""

from __future__ import annotations

import math
from pathlib import Path

from .report import Figure, Row, Summary
from .stage import PEER_NAMES

COLOURS = {"spicegw": "#c0392b", "nginx": "#2e86c1", "haproxy": "#27ae60", "asyncio": "#7f8c8d"}

# Panel titles; the tables carry the long ones.
SHORT = {
    "handshake": "CPU per full connection, 1 worker (µs, lower is better)",
    "resume": "CPU per resumed connection, 2 workers (µs, lower is better)",
    "scaling": "Connections per CPU-second (higher is better)",
    "bulk": "Relay CPU per GB (CPU-s, lower is better)",
    "idle": "Memory per 1,000 idle connections (MiB, lower is better)",
    "storm": "Throughput during a reload storm (conn/s, higher is better)",
}


def _plotted(figure: Figure) -> list[Row]:
    return [row for row in figure.rows.values() if row.ratio and row.cells]


def plot(summary: Summary, path: Path) -> tuple[Path | None, str]:
    """Writes the PNG; returns its path, or None and the reason."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, 'matplotlib is not installed (pip install -e ".[bench]")'

    panels = [figure for figure in summary.figures.values() if _plotted(figure)]
    if not panels:
        return None, "no figure to plot"
    columns = 2 if len(panels) > 1 else 1
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7 * columns, 3.8 * lines), squeeze=False)

    for axis, figure in zip(axes.flat, panels, strict=False):
        rows = _plotted(figure)
        peers = [name for name in PEER_NAMES if any(name in row.cells for row in rows)]
        width = 0.8 / max(len(peers), 1)
        for index, name in enumerate(peers):
            spots, heights, low, high = [], [], [], []
            for spot, row in enumerate(rows):
                cell = row.cells.get(name)
                if cell is None or not cell.values:
                    continue
                median = cell.median
                spots.append(spot + (index - (len(peers) - 1) / 2) * width)
                heights.append(median)
                low.append(median - min(cell.values))
                high.append(max(cell.values) - median)
            axis.bar(
                spots,
                heights,
                width,
                yerr=[low, high],
                label=name,
                color=COLOURS.get(name, "#999999"),
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels([row.label for row in rows], fontsize=8, rotation=12)
        axis.set_title(SHORT.get(figure.key, figure.title), fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
        axis.legend(fontsize=7, ncols=len(peers))

    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    fig.suptitle(
        "spicegw beside nginx, HAProxy and an asyncio proxy: 1 core each, medians of rounds",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""
