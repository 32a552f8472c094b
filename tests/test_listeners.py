"""The supervisor's listening sockets: several share one port, and every
connection they accept has Nagle's algorithm off."""

from __future__ import annotations

import select
import socket

from spicegw._addresses import ListenAddress
from spicegw._listeners import open_listener
from spicegw._settings import Endpoint

from .harness import free_port


def test_accepted_connections_have_nagle_off_and_the_port_is_shared():
    endpoint = Endpoint("t", ListenAddress("127.0.0.1", free_port()), None, None)
    listeners = [open_listener(endpoint, 16), open_listener(endpoint, 16)]
    client = socket.create_connection(("127.0.0.1", endpoint.listen.port))
    try:
        readable, _, _ = select.select(listeners, [], [], 5.0)
        assert len(readable) == 1
        accepted, _ = readable[0].accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        for listener in listeners:
            listener.close()
