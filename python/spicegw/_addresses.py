"""Listen and upstream addresses as operators write them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class ListenAddress:
    """Where an endpoint listens: a literal IP and a port. `shown` replaces
    it in messages when it came from a secret."""

    host: str
    port: int
    shown: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def display(self) -> str:
        return self.shown if self.shown is not None else str(self)


@dataclass(frozen=True)
class Upstream:
    """Where an endpoint's connections go: resolved TCP addresses, or a
    Unix socket path. `text` is how messages show it."""

    text: str
    tcp: tuple[str, ...] = ()
    unix: str | None = None

    def to_json(self) -> dict[str, object]:
        if self.unix is not None:
            return {"unix": self.unix}
        return {"tcp": list(self.tcp)}

    def __str__(self) -> str:
        return self.text


def _split_host_port(text: str, where: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{where}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"{where}: write IPv6 addresses as [ADDR]:PORT")
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not digits or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _where(flag: str, text: str, shown: str | None) -> str:
    return f"{flag} '{shown if shown is not None else text}'"


def parse_listen(text: str, flag: str, shown: str | None = None) -> ListenAddress:
    """Parses HOST:PORT for a listener. The host must be an IP address
    (":PORT" listens on every IPv4 address); a name such as "localhost"
    is resolved to its first address. `shown` stands for the text in
    messages (a secret's value is never repeated)."""
    where = _where(flag, text, shown)
    host, port = _split_host_port(text.strip(), where)
    if port == 0:
        raise ConfigError(f"{where}: port 0 is not allowed (every worker would get its own port)")
    if host in ("", "*"):
        return ListenAddress("0.0.0.0", port, shown)
    try:
        return ListenAddress(str(ipaddress.ip_address(host)), port, shown)
    except ValueError:
        pass
    return ListenAddress(_resolve(host, port, where, secret=shown is not None)[0][0], port, shown)


def parse_upstream(text: str, flag: str, shown: str | None = None) -> Upstream:
    """Parses HOST:PORT (resolved now, every address kept, tried in
    order) or unix:PATH. `shown` as for parse_listen."""
    text = text.strip()
    where = _where(flag, text, shown)
    label = shown if shown is not None else text
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{where}: unix: needs a socket path")
        return Upstream(text=label, unix=path)
    host, port = _split_host_port(text, where)
    if port == 0:
        raise ConfigError(f"{where}: port 0 is not a destination")
    if host == "":
        raise ConfigError(f"{where}: the upstream needs a host")
    addresses = [
        f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        for ip, _ in _resolve(host, port, where, secret=shown is not None)
    ]
    return Upstream(text=label, tcp=tuple(addresses))


def _resolve(host: str, port: int, where: str, *, secret: bool) -> list[tuple[str, int]]:
    """Every (ip, family) the name resolves to, IPv4 first, no repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        name = "the host" if secret else f"'{host}'"
        raise ConfigError(f"{where}: cannot resolve {name}: {err.strerror}") from None
    found: list[tuple[str, int]] = []
    for family, _, _, _, sockaddr in infos:
        entry = (str(sockaddr[0]), int(family))
        if entry not in found:
            found.append(entry)
    found.sort(key=lambda entry: entry[1] != socket.AF_INET)
    return found
