"""A TLS client for relay tests: one thread sends and receives at once,
and can end its sending side while it keeps reading.

Python's `ssl.SSLSocket` can do neither: two threads must not share one
SSL object, and `unwrap()` hands back the plain socket, so nothing more
can be read through TLS. Here the TLS state machine runs over memory
BIOs and a non-blocking socket, and the test decides when bytes move.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import ssl
import time
from pathlib import Path
from types import TracebackType

from .harness import client_context

# Plaintext handed to the TLS object per write (one TLS record holds
# 16 KiB), and how much ciphertext may wait for the socket before the
# client stops encrypting and waits for the network.
_WRITE_PIECE = 64 * 1024
_HIGH_WATER = 1024 * 1024
_READ_SIZE = 256 * 1024


class TlsStream:
    """One TLS connection to 127.0.0.1:`port`.

    What arrives is counted and hashed as it is read (`received`,
    `received_digest`); with `keep=True` it is also kept in `data`.
    `eof` is set when the server's stream has ended; `clean_eof` says
    whether it ended with a close_notify rather than a bare TCP close.
    """

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        server_name: str = "localhost",
        keep: bool = False,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
    ) -> None:
        context = client_context(ca, minimum=minimum, maximum=maximum)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_name)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._events = 0
        self._ciphertext = bytearray()  # records the socket has not taken yet
        self._socket_eof = False

        self.sent = 0
        self.sent_digest = hashlib.sha256()
        self.received = 0
        self.received_digest = hashlib.sha256()
        self.data: bytearray | None = bytearray() if keep else None
        self.eof = False
        self.clean_eof = False

    def __enter__(self) -> TlsStream:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._selector.close()
        self.sock.close()

    def handshake(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._step(deadline)
        self._collect_ciphertext()

    def send(self, data: bytes, timeout: float = 30.0) -> None:
        """Sends all of `data`, reading whatever arrives meanwhile."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        offset = 0
        while offset < len(view) or self._ciphertext:
            while offset < len(view) and len(self._ciphertext) < _HIGH_WATER:
                piece = view[offset : offset + _WRITE_PIECE]
                self.tls.write(piece)
                offset += len(piece)
                self._collect_ciphertext()
            self._step(deadline)
        self.sent += len(data)
        self.sent_digest.update(data)

    def close_write(self, timeout: float = 10.0) -> None:
        """Half-closes: a close_notify, then a TCP FIN; reading goes on."""
        deadline = time.monotonic() + timeout
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; the server's comes later.
        self._collect_ciphertext()
        while self._ciphertext:
            self._step(deadline)
        self.sock.shutdown(socket.SHUT_WR)

    def read_until_eof(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._step(deadline)

    def read_at_least(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received < count:
            if self.eof:
                raise EOFError(f"stream ended after {self.received} of {count} bytes")
            self._step(deadline)

    def _collect_ciphertext(self) -> None:
        self._ciphertext += self._outgoing.read()

    def _step(self, deadline: float) -> None:
        """Waits once for the socket, then moves what it can both ways."""
        self._collect_ciphertext()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"TLS stream stalled: sent {self.sent}, received {self.received}, eof={self.eof}"
            )
        wanted = 0 if self._socket_eof else selectors.EVENT_READ
        if self._ciphertext:
            wanted |= selectors.EVENT_WRITE
        if wanted == 0:
            raise EOFError("the server closed the connection; nothing more can move")
        self._watch(wanted)

        for _key, mask in self._selector.select(min(remaining, 0.5)):
            if mask & selectors.EVENT_WRITE:
                try:
                    written = self.sock.send(self._ciphertext)
                except BlockingIOError:
                    written = 0
                del self._ciphertext[:written]
            if mask & selectors.EVENT_READ:
                try:
                    data = self.sock.recv(_READ_SIZE)
                except BlockingIOError:
                    continue
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                    self._socket_eof = True
                self._read_plaintext()

    def _watch(self, events: int) -> None:
        if self._events == events:
            return
        if self._events:
            self._selector.modify(self.sock, events)
        else:
            self._selector.register(self.sock, events)
        self._events = events

    def _read_plaintext(self) -> None:
        while not self.eof:
            try:
                data = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # close_notify after ours (see below for before ours).
                self.eof = self.clean_eof = True
                break
            except ssl.SSLEOFError:
                # TCP closed with no close_notify: a truncation.
                self.eof = True
                break
            if not data:
                # close_notify while our side is still open.
                self.eof = self.clean_eof = True
                break
            self.received += len(data)
            self.received_digest.update(data)
            if self.data is not None:
                self.data += data
        # Reading may produce records to send (a key update answer).
        self._collect_ciphertext()
