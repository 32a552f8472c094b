"""An upstream that counts what reaches it, for tests that must show
what the gateway did (or did not do) on the upstream side.

Usage: counting_upstream.py PORT MODE STATUS_FILE [LIMIT]

One thread and one selector serve every connection, so ten thousand
idle connections cost no threads. About every 50 ms, when something
changed, the counts are written to STATUS_FILE as JSON (written to a
temporary name, then renamed, so a reader never sees half a file):
accepted, open, received, sent.

echo    return every byte, and pass the client's end of stream back;
        stops reading while 1 MiB waits to be sent
flood   send a repeating pattern as fast as the peer takes it, up to
        LIMIT bytes (default 200 MiB), then close; discard what arrives
slow    read 16 KiB per connection every 50 ms, never answer
reset   abort every connection at once with a TCP RST (SO_LINGER 0)
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

# The flood: 0..255 over and over. A send may take any part of a piece,
# so the next piece starts where the last one stopped, one period on.
PERIOD = 256
PIECE = 64 * 1024
PATTERN = bytes(range(PERIOD)) * (PIECE // PERIOD + 1)
ECHO_HIGH_WATER = 1024 * 1024
SLOW_PIECE = 16 * 1024
SLOW_PERIOD = 0.05
REPORT_PERIOD = 0.05


@dataclass
class Conn:
    sock: socket.socket
    outbox: bytearray = field(default_factory=bytearray)
    peer_eof: bool = False
    to_send: int = 0  # flood: bytes still to send
    next_read: float = 0.0  # slow: when the next piece may be read
    events: int = 0


class Upstream:
    def __init__(self, port: int, mode: str, status: str, limit: int) -> None:
        self.mode = mode
        self.status = status
        self.limit = limit
        self.counts = {"accepted": 0, "open": 0, "received": 0, "sent": 0}
        self.reported: dict[str, int] | None = None
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)

    def run(self) -> None:
        last_report = 0.0
        while True:
            for key, mask in self.selector.select(self._wait()):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._serve(self.conns[key.fd], mask)
            if self.mode == "slow":
                for conn in list(self.conns.values()):
                    self._slow_read(conn)
            now = time.monotonic()
            if now - last_report >= REPORT_PERIOD and self.counts != self.reported:
                self._report()
                last_report = now

    def _wait(self) -> float:
        return SLOW_PERIOD if self.mode == "slow" else REPORT_PERIOD

    def _report(self) -> None:
        temporary = f"{self.status}.tmp"
        with open(temporary, "w") as file:
            json.dump(self.counts, file)
        os.replace(temporary, self.status)
        self.reported = dict(self.counts)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.counts["accepted"] += 1
            if self.mode == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, to_send=self.limit if self.mode == "flood" else 0)
            self.conns[sock.fileno()] = conn
            self.counts["open"] += 1
            self._watch(conn)

    def _watch(self, conn: Conn) -> None:
        wanted = 0
        reading = self.mode in ("echo", "flood") and not conn.peer_eof
        if reading and len(conn.outbox) < ECHO_HIGH_WATER:
            wanted |= selectors.EVENT_READ
        if conn.outbox or conn.to_send:
            wanted |= selectors.EVENT_WRITE
        if self.mode == "slow" and not conn.peer_eof:
            wanted = 0  # read on the clock, not on readiness
        if wanted == conn.events:
            return
        if conn.events and wanted:
            self.selector.modify(conn.sock, wanted)
        elif wanted:
            self.selector.register(conn.sock, wanted)
        else:
            self.selector.unregister(conn.sock)
        conn.events = wanted

    def _close(self, conn: Conn) -> None:
        if conn.events:
            self.selector.unregister(conn.sock)
        del self.conns[conn.sock.fileno()]
        conn.sock.close()
        self.counts["open"] -= 1

    def _serve(self, conn: Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                data = conn.sock.recv(262144)
                if not data:
                    conn.peer_eof = True
                else:
                    self.counts["received"] += len(data)
                    if self.mode == "echo":
                        conn.outbox += data
            if conn.outbox:
                sent = conn.sock.send(conn.outbox)
                del conn.outbox[:sent]
                self.counts["sent"] += sent
            elif conn.to_send and mask & selectors.EVENT_WRITE:
                start = (self.limit - conn.to_send) % PERIOD
                piece = PATTERN[start : start + min(PIECE, conn.to_send)]
                sent = conn.sock.send(piece)
                conn.to_send -= sent
                self.counts["sent"] += sent
        except BlockingIOError:
            pass
        except OSError:
            self._close(conn)  # reset by the gateway: nothing to answer
            return
        if self.mode == "flood" and conn.to_send == 0:
            self._close(conn)
            return
        if conn.peer_eof and not conn.outbox:
            self._close(conn)  # echo: the client's end of stream, passed on
            return
        self._watch(conn)

    def _slow_read(self, conn: Conn) -> None:
        now = time.monotonic()
        if now < conn.next_read:
            return
        conn.next_read = now + SLOW_PERIOD
        try:
            data = conn.sock.recv(SLOW_PIECE)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        self.counts["received"] += len(data)


def main() -> None:
    port, mode, status = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode not in ("echo", "flood", "slow", "reset"):
        raise SystemExit(f"unknown mode {mode!r}")
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 200 * 1024 * 1024
    Upstream(port, mode, status, limit).run()


if __name__ == "__main__":
    main()
