"""Errors the operator sees, and the exit codes of spicegw's processes."""

from __future__ import annotations

__all__ = [
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_WORKERS_FAILED",
    "ConfigError",
    "MaterialError",
    "SpicegwError",
]

EXIT_OK = 0
# Bad flags, bad configuration, bad certificate material: fix and rerun.
EXIT_CONFIG = 1
# Workers could not start or kept dying at boot; the log says why.
EXIT_WORKERS_FAILED = 3


class SpicegwError(Exception):
    """An error whose message is a complete, one-line explanation.

    The command line prints the message and exits; it never prints a
    traceback for these.
    """

    exit_code = EXIT_CONFIG


class ConfigError(SpicegwError):
    """A flag, a configuration field or an address is wrong."""


class MaterialError(SpicegwError):
    """Certificate or key material cannot be read or served.

    `kind` is "io" when a file is missing or unreadable and "parse" when
    its content is refused: the two results of a reload attempt.
    """

    def __init__(self, message: str, *, kind: str = "parse") -> None:
        super().__init__(message)
        self.kind = kind
