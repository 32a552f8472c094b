"""Listening sockets: one per worker slot and endpoint, all sharing the
endpoint's port through SO_REUSEPORT.

The supervisor creates them and keeps them open for as long as it serves.
A worker gets its slot's sockets when it is forked; if it dies, the
connections the kernel already queued on its socket stay there for its
replacement instead of being reset with a closing socket.

TODO(#6): while a slot's replacement waits out its respawn backoff (up to
10 s in a crash loop), the kernel still hashes new connections to that
slot's socket, where they wait and may reach the client's timeout; a
BPF reuseport program steering around dead slots would avoid it, and is
not written. The first respawn is immediate, so a single crash costs
0.1-0.4 s, not a backoff.
"""

from __future__ import annotations

import errno
import socket

from ._settings import Endpoint
from .errors import ConfigError

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available on this host",
}


def _family(endpoint: Endpoint) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in endpoint.listen.host else socket.AF_INET


def _fail(endpoint: Endpoint, err: OSError) -> ConfigError:
    reason = _REASONS.get(err.errno or 0, err.strerror or str(err))
    return ConfigError(f"{endpoint.origin} {endpoint.listen.display}: {reason}")


def probe(endpoint: Endpoint) -> None:
    """Fails fast, naming the flag, when the address is taken.

    The probe binds without SO_REUSEPORT, so a port held by any process,
    another spicegw included, is reported instead of silently shared.
    """
    try:
        sock = socket.socket(_family(endpoint), socket.SOCK_STREAM)
    except OSError as err:
        raise _fail(endpoint, err) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.listen.host, endpoint.listen.port))
    except OSError as err:
        raise _fail(endpoint, err) from None
    finally:
        sock.close()


def open_listener(endpoint: Endpoint, backlog: int) -> socket.socket:
    """A listening socket in the endpoint's SO_REUSEPORT group."""
    try:
        sock = socket.socket(_family(endpoint), socket.SOCK_STREAM)
    except OSError as err:
        raise _fail(endpoint, err) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit it: one system call less per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.listen.host, endpoint.listen.port))
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise _fail(endpoint, err) from None
    return sock
