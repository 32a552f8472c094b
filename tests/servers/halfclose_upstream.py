"""An upstream that shows whether end of stream crosses the gateway.
Usage: halfclose_upstream.py PORT MODE

digest       read until the client's end of stream, then answer with the
             hex SHA-256 of everything read and close: the answer only
             comes if the client's half-close reached us.
speak-first  send a greeting and end our side at once, then read until
             the client's end of stream and print one line to stdout:
             "received N bytes sha256 HEX".
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading

GREETING = b"hello, this side is done talking\n"


def read_to_end(conn: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    while data := conn.recv(262144):
        digest.update(data)
        count += len(data)
    return count, digest.hexdigest()


def digest(conn: socket.socket) -> None:
    with conn:
        _, hexdigest = read_to_end(conn)
        conn.sendall(hexdigest.encode())


def speak_first(conn: socket.socket) -> None:
    with conn:
        try:
            conn.sendall(GREETING)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            # The test harness probes readiness with a connection that
            # leaves at once; there is nobody to report to.
            return
        count, hexdigest = read_to_end(conn)
        print(f"received {count} bytes sha256 {hexdigest}", flush=True)


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    serve = {"digest": digest, "speak-first": speak_first}[mode]
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
