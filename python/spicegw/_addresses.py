"""Listen and upstream addresses as operators write them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ListenAddress:
    """Where an endpoint listens: a literal IP and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    """Where an endpoint's connections go: resolved TCP addresses, or a
    Unix socket path."""

    text: str
    tcp: tuple[str, ...] = ()
    unix: str | None = None

    def to_json(self) -> dict[str, object]:
        if self.unix is not None:
            return {"unix": self.unix}
        return {"tcp": list(self.tcp)}

    def __str__(self) -> str:
        return self.text


def _split_host_port(text: str, flag: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{flag} '{text}': expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{flag} '{text}': expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"{flag} '{text}': write IPv6 addresses as [ADDR]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag} '{text}': port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_listen(text: str, flag: str) -> ListenAddress:
    """Parses HOST:PORT for a listener. The host must be an IP address
    (":PORT" listens on every IPv4 address); a name such as "localhost"
    is resolved to its first address."""
    host, port = _split_host_port(text.strip(), flag)
    if port == 0:
        raise ConfigError(
            f"{flag} '{text}': port 0 is not allowed (every worker would get its own port)"
        )
    if host in ("", "*"):
        return ListenAddress("0.0.0.0", port)
    try:
        return ListenAddress(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    return ListenAddress(_resolve(host, port, flag, text)[0][0], port)


def parse_upstream(text: str, flag: str) -> Upstream:
    """Parses HOST:PORT (resolved now, every address kept, tried in
    order) or unix:PATH."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{flag} '{text}': unix: needs a socket path")
        return Upstream(text=text, unix=path)
    host, port = _split_host_port(text, flag)
    if port == 0:
        raise ConfigError(f"{flag} '{text}': port 0 is not a destination")
    if host == "":
        raise ConfigError(f"{flag} '{text}': the upstream needs a host")
    addresses = [
        f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        for ip, _ in _resolve(host, port, flag, text)
    ]
    return Upstream(text=text, tcp=tuple(addresses))


def _resolve(host: str, port: int, flag: str, text: str) -> list[tuple[str, int]]:
    """Every (ip, family) the name resolves to, IPv4 first, no repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"{flag} '{text}': cannot resolve '{host}': {err.strerror}") from None
    found: list[tuple[str, int]] = []
    for family, _, _, _, sockaddr in infos:
        entry = (str(sockaddr[0]), int(family))
        if entry not in found:
            found.append(entry)
    found.sort(key=lambda entry: entry[1] != socket.AF_INET)
    return found
