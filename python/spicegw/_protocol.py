"""Frame kinds of the supervisor-worker pipe protocol.

The frame layout and the bundle encoding live in Rust (`spicegw-core`'s
`frame` module), so both ends share one codec; these numbers must match
its `Kind` enum, which a test checks against the built module.
"""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    BUNDLE = 1
    TICKET_KEYS = 2
    SHUTDOWN = 3
    PING = 4
    READY = 64
    ACK = 65
    NACK = 66
    STATS = 67
    FATAL = 68
    PONG = 69
    LOG = 70
