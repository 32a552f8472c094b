"""The gateway's own status service: a tiny HTTP/1.1 server on a Unix
socket, run inside the supervisor's event loop.

It is never exposed directly. Endpoints reach it through the workers like
any other upstream (`--metrics`, `--dev`), so it is served with the same
TLS as everything else.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A request line and headers larger than this is refused.
_MAX_REQUEST = 16 * 1024
# A client that has not sent a whole request after this long is closed.
_CLIENT_TIMEOUT = 10.0

Response = tuple[int, str, bytes]
Router = Callable[[str, str], Response]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass
class _Client:
    sock: socket.socket
    opened: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)


class StatusServer:
    """Serves `route(method, path)` answers, one request per connection."""

    def __init__(self, path: str, route: Router, selector: selectors.BaseSelector):
        self.path = path
        self._route = route
        self._selector = selector
        self._clients: dict[int, _Client] = {}
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self._selector.unregister(self._listener)
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # Someone tidied up before us; nothing is lost.

    def expire(self, now: float) -> None:
        """Closes clients that have been silent too long."""
        for client in list(self._clients.values()):
            if now - client.opened > _CLIENT_TIMEOUT:
                self._drop(client)

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and the like: the client waits in the backlog and
                # is served once descriptors free up.
                return
            sock.setblocking(False)
            client = _Client(sock, time.monotonic())
            self._clients[sock.fileno()] = client
            self._selector.register(
                sock, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask)
            )

    def _on_client(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ and not client.outbox:
            try:
                data = client.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            if not data:
                self._drop(client)
                return
            client.inbox += data
            # Bare LF line ends are tolerated, as most servers do.
            if b"\r\n\r\n" not in client.inbox and b"\n\n" not in client.inbox:
                if len(client.inbox) > _MAX_REQUEST:
                    self._respond(client, (400, "text/plain", b"request too large\n"))
                return
            request = bytes(client.inbox)
            head_only = request.startswith(b"HEAD ")
            self._respond(client, self._answer(request), head_only=head_only)
            return
        if mask & selectors.EVENT_WRITE:
            self._send(client)

    def _answer(self, request: bytes) -> Response:
        line = request.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD", "POST"):
            return 405, "text/plain", b"only GET, HEAD and POST\n"
        return self._route(method, target.split("?", 1)[0])

    def _respond(self, client: _Client, response: Response, *, head_only: bool = False) -> None:
        status, content_type, body = response
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        client.outbox += head.encode("latin-1")
        if not head_only:
            client.outbox += body
        self._selector.modify(
            client.sock,
            selectors.EVENT_WRITE,
            lambda mask, c=client: self._on_client(c, mask),
        )
        self._send(client)

    def _send(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        del client.outbox[:sent]
        if not client.outbox:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass  # Never registered or already gone.
        client.sock.close()
