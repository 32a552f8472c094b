"""The upstream behind every peer: answers one line, then closes.

Usage: upstream.py PORT

A connection sends one request line; the upstream replies with
`RESPONSE_PREFIX` followed by that line, then closes its side. The
prefix makes the reply differ from the request, so the load client can
tell that bytes went up to the upstream and came back down.

One thread and one selector: no per-connection thread or task, so the
upstream costs little of the load core it shares with the clients.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys

RESPONSE_PREFIX = b"OK "

# A request longer than this without a newline is refused by closing.
MAX_REQUEST = 4096


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytearray] = {}

    while True:
        for key, _events in selector.select():
            if key.data is None:
                _accept(listener, selector, pending)
                continue

            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            buffer = pending[conn]
            try:
                data = conn.recv(MAX_REQUEST)
            except OSError:
                data = b""
            buffer += data
            line_end = buffer.find(b"\n")
            if data and line_end < 0 and len(buffer) < MAX_REQUEST:
                continue

            if line_end >= 0:
                # Replies are a few dozen bytes: an empty socket buffer
                # takes them whole, so this non-blocking send completes.
                try:
                    conn.sendall(RESPONSE_PREFIX + buffer[: line_end + 1])
                except OSError:
                    pass  # The proxy gave up on this connection; just close.
            selector.unregister(conn)
            del pending[conn]
            conn.close()


def _accept(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    pending: dict[socket.socket, bytearray],
) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending[conn] = bytearray()
        selector.register(conn, selectors.EVENT_READ, conn)


def main() -> None:
    # The bench ends this process with SIGKILL by PID; SIGTERM from a
    # person at a terminal should end it quietly too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(int(sys.argv[1]))


if __name__ == "__main__":
    main()
