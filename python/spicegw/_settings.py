"""The gateway's resolved settings: what to serve and with which limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._addresses import ListenAddress, Upstream
from ._devmode import DevMaterial
from .certs import Source

PUBLIC = "public"
CLUSTER = "cluster"


@dataclass(frozen=True)
class Limits:
    """Per-connection time limits (seconds) and per-worker caps."""

    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_handshakes: int = 1024
    backlog: int = 1024

    def to_json(self) -> dict[str, int]:
        return {
            "handshake_timeout_ms": round(self.handshake_timeout * 1000),
            "connect_timeout_ms": round(self.connect_timeout * 1000),
            "idle_timeout_ms": round(self.idle_timeout * 1000),
            "max_handshakes": self.max_handshakes,
        }


@dataclass(frozen=True)
class Endpoint:
    """A listener and its upstream. `upstream` None means the gateway's
    own status service; `scope` None means plaintext."""

    name: str
    listen: ListenAddress
    upstream: Upstream | None
    scope: str | None
    alpn: tuple[str, ...] = ()
    proxy_protocol: bool = False
    origin: str = ""

    def describe_upstream(self) -> str:
        return str(self.upstream) if self.upstream else "the status service"


@dataclass(frozen=True)
class ScopeSettings:
    """Where a certificate scope's material comes from."""

    name: str
    cert: Source
    key: Source
    client_auth: str = "none"
    client_ca: Source | None = None

    @property
    def reloadable(self) -> bool:
        """Only file-backed pairs are watched; inline and secret material
        is loaded once."""
        return self.cert.is_file and self.key.is_file


@dataclass(frozen=True)
class Settings:
    endpoints: tuple[Endpoint, ...]
    scopes: tuple[ScopeSettings, ...] = ()
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    drain_timeout: float = 30.0
    worker_timeout: float = 10.0
    poll_interval: float = 2.0
    ticket_rotation: float = 3600.0
    stats_interval: float = 1.0
    dev: DevMaterial | None = None

    @property
    def tls(self) -> bool:
        return bool(self.scopes)
