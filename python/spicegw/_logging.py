"""Log format and setup: one line per event, UTC timestamps, to stderr."""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]  # typeshed is narrower

    def __init__(self) -> None:
        super().__init__(
            fmt="%(asctime)s.%(msecs)03dZ %(levelname)5s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )


def setup(level: str = "info") -> None:
    """Sends every spicegw logger to stderr in the gateway's format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
