"""A TCP echo upstream: returns every byte, then half-closes after the
client does. Usage: echo.py PORT"""

from __future__ import annotations

import socket
import sys
import threading


def serve(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(262144)
            if not data:
                break
            conn.sendall(data)
        # The client's end of stream reached us; pass it back.
        conn.shutdown(socket.SHUT_WR)


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=512)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
