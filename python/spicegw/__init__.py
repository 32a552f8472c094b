"""spicegw: a TLS gateway in front of plaintext services.

The command line (`spicegw run`) is the main interface; the names below
are for tests and for embedding the certificate checks elsewhere.
"""

from __future__ import annotations

from ._core import __version__
from .certs import Material, Source, describe_subject, load_material
from .errors import ConfigError, MaterialError, SpicegwError

__all__ = [
    "ConfigError",
    "Material",
    "MaterialError",
    "Source",
    "SpicegwError",
    "__version__",
    "describe_subject",
    "load_material",
]
