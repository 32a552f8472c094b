"""An upstream that sends back every byte it receives, for the bulk and
idle runs of spicegw-load (`--echo`, `--ping`).

Usage: echo_upstream.py PORT

One thread and one selector, like upstream.py. A connection's reply is
written before more is read from it, so a fast client cannot make the
upstream hold more than one read's worth of its bytes.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys

CHUNK = 256 * 1024


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    # Bytes read from a connection and not yet written back to it.
    unsent: dict[socket.socket, memoryview] = {}

    while True:
        for key, _events in selector.select():
            if key.data is None:
                _accept(listener, selector)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                if conn in unsent:
                    _write(conn, selector, unsent)
                else:
                    _read(conn, selector, unsent)
            except OSError:
                _close(conn, selector, unsent)


def _accept(listener: socket.socket, selector: selectors.BaseSelector) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(conn, selectors.EVENT_READ, conn)


def _read(
    conn: socket.socket,
    selector: selectors.BaseSelector,
    unsent: dict[socket.socket, memoryview],
) -> None:
    data = conn.recv(CHUNK)
    if not data:
        _close(conn, selector, unsent)
        return
    unsent[conn] = memoryview(data)
    _write(conn, selector, unsent)


def _write(
    conn: socket.socket,
    selector: selectors.BaseSelector,
    unsent: dict[socket.socket, memoryview],
) -> None:
    # Registered for writing only while a reply waits (see below).
    waiting = selector.get_key(conn).events == selectors.EVENT_WRITE
    pending = unsent[conn]
    try:
        sent = conn.send(pending)
    except BlockingIOError:
        sent = 0
    pending = pending[sent:]
    if pending:
        # Wait until the socket takes more, and read nothing meanwhile.
        unsent[conn] = pending
        if not waiting:
            selector.modify(conn, selectors.EVENT_WRITE, conn)
    else:
        del unsent[conn]
        if waiting:
            selector.modify(conn, selectors.EVENT_READ, conn)


def _close(
    conn: socket.socket,
    selector: selectors.BaseSelector,
    unsent: dict[socket.socket, memoryview],
) -> None:
    unsent.pop(conn, None)
    selector.unregister(conn)
    conn.close()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(int(sys.argv[1]))


if __name__ == "__main__":
    main()
