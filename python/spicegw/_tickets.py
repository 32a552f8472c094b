"""Session ticket master keys: made, rotated and handed to every worker
by the supervisor, so a ticket from one worker resumes on any other."""

from __future__ import annotations

import os

from . import _core
from ._protocol import Kind

# TLS 1.3 caps a ticket's lifetime at seven days.
_MAX_LIFETIME = 7 * 24 * 3600


class TicketKeyRing:
    """The newest key seals; the one before it still opens tickets for
    one more rotation period, so no ticket dies early."""

    def __init__(self, rotation: float, now: float, keep: int = 2) -> None:
        self.rotation = rotation
        self.generation = 0
        self.next_rotation = now
        self._keep = keep
        self._keys: list[tuple[bytes, bytes]] = []
        self.rotate(now)

    def rotate(self, now: float) -> None:
        self.generation += 1
        self._keys.insert(0, (os.urandom(16), os.urandom(32)))
        del self._keys[self._keep :]
        self.next_rotation = now + self.rotation

    @property
    def lifetime(self) -> int:
        return max(1, min(int(self.rotation), _MAX_LIFETIME))

    def frame(self) -> bytes:
        """The TicketKeys frame for the keys in force (holds secrets)."""
        payload = self.lifetime.to_bytes(4, "big") + b"".join(
            key_id + secret for key_id, secret in self._keys
        )
        return _core.encode_frame(Kind.TICKET_KEYS, self.generation, payload)

    def __repr__(self) -> str:
        return f"TicketKeyRing(generation={self.generation}, keys={len(self._keys)})"
