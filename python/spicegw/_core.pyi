"""The native module, built from rust/py (spicegw-core underneath)."""

from typing import final

__all__ = [
    "CRYPTO_PROVIDER",
    "EXIT_BOOT_FAILED",
    "EXIT_PROTOCOL",
    "HANDSHAKE_BUCKETS_US",
    "Bundle",
    "FrameDecoder",
    "PemError",
    "__version__",
    "encode_frame",
    "parse_bundle",
    "parse_pem",
    "run_worker",
    "set_parent_death_signal",
]

__version__: str
EXIT_BOOT_FAILED: int
EXIT_PROTOCOL: int
CRYPTO_PROVIDER: str
HANDSHAKE_BUCKETS_US: list[int]

class PemError(ValueError):
    """Certificate or key material that cannot be served.

    `slot` names the input at fault: "certificate", "key" or "pair".
    """

    slot: str

@final
class Bundle:
    """A checked certificate chain and its private key.

    The key never leaves this object except inside a worker frame.
    """

    @property
    def certificates(self) -> list[bytes]:
        """The chain as DER, leaf first."""

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf, lowercase hex."""

    @property
    def key_format(self) -> str:
        """The key's encoding: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)."""

    def same_as(self, other: Bundle) -> bool:
        """Whether `other` decodes to the same chain and key."""

    def frame(
        self,
        scope: str,
        generation: int,
        client_auth: str = "none",
        client_ca: list[bytes] = ...,
    ) -> bytes:
        """A Bundle frame for a worker."""

@final
class FrameDecoder:
    """Splits what a worker writes into (kind, generation, payload)."""

    def __new__(cls) -> FrameDecoder: ...
    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Raises ValueError when the stream is not the protocol."""

def parse_bundle(certificate: bytes, key: bytes) -> Bundle:
    """Reads and checks a chain and its key; raises PemError."""

def parse_pem(text: bytes) -> list[tuple[str, bytes]]:
    """Every PEM block as (label, der); raises PemError."""

def encode_frame(kind: int, generation: int, payload: bytes | None = None) -> bytes:
    """A Shutdown or Ping frame."""

def run_worker(config: str, pipe_in: int, pipe_out: int, listeners: list[int]) -> int:
    """Serves until drained or orphaned; owns every descriptor given."""

def set_parent_death_signal(signal: int, expected_parent: int) -> bool:
    """PR_SET_PDEATHSIG; False when the parent is already gone."""
