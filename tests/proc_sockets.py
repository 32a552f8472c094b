"""Which process holds which TCP socket (Linux).

A socket has an inode. The kernel lists TCP sockets with their inodes
in /proc/net/tcp (and answers sock_diag queries about one of them), and
every process that holds a socket has a `socket:[inode]` link among its
descriptors in /proc. Joining the two tells which worker listens on a
port, or which worker took a connection.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

LISTEN = "0A"
ESTABLISHED = "01"


def tcp_inodes(port: int, state: str) -> set[int]:
    """Inodes of IPv4 TCP sockets in `state` whose local port is `port`."""
    inodes: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds; empty once it is gone."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # Closed between listing and reading.
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def sockets_held(pid: int, port: int, state: str) -> int:
    """How many sockets on local `port` in `state` process `pid` holds."""
    return len(socket_inodes(pid) & tcp_inodes(port, state))


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie.

    An orphaned worker is reparented; if nobody reaps it, it lingers as
    a zombie, which holds no sockets and runs no code: gone for our
    purpose.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


# sock_diag(7): ask the kernel for one TCP socket by its address pair.
# Reading /proc/net/tcp instead costs a line per socket in the namespace,
# TIME_WAIT ones included, which on a busy machine is tens of thousands.
_NETLINK_SOCK_DIAG = 4  # not exported by the socket module
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_TCP_ESTABLISHED = 1


def connection_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the established socket 127.0.0.1:`local_port` ->
    127.0.0.1:`remote_port` (the server end of a client connection)."""
    loopback = socket.inet_aton("127.0.0.1") + bytes(12)
    sockid = struct.pack("!HH16s16s", local_port, remote_port, loopback, loopback)
    sockid += struct.pack("=III", 0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_ESTABLISHED)
    request += sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(5)
        diag.send(header + request)
        reply = diag.recv(65536)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        return None  # ENOENT: no such socket (any more).
    # nlmsghdr (16), then inet_diag_msg: family, state, timer, retrans
    # (4), the socket id (48), expires, rqueue, wqueue, uid (16), inode.
    state = reply[16 + 1]
    (peer_port,) = struct.unpack_from("!H", reply, 16 + 4 + 2)
    (inode,) = struct.unpack_from("=I", reply, 16 + 4 + 48 + 16)
    # The kernel's lookup falls back to the listener when no connection
    # matches; that is not the socket asked for.
    if state != _TCP_ESTABLISHED or peer_port != remote_port:
        return None
    return int(inode)
