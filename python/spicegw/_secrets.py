"""Secret stores and `${secrets:name}` / `${env:NAME}` references.

Stores are searched newest-declared first ("the last declared wins").
The env store reads the process environment, then `.env.local`, then
`.env`. A directory store reads one file per secret, as Kubernetes
mounts a Secret. Values never appear in logs or error messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

_REFERENCE = re.compile(r"\$\{(secrets|env):([^}]*)\}")
# Any ${word:…}: the ones that are not secrets or env are mistakes.
_ANY_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):[^}]*\}")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class EnvStore:
    """The process environment, with `.env.local` and `.env` beneath it."""

    folder: Path
    name: str = "env"
    _files: dict[str, str] | None = field(default=None, repr=False)

    def get(self, key: str) -> str | None:
        for candidate in (key, key.upper()):
            if candidate in os.environ:
                return os.environ[candidate]
        files = self._load()
        for candidate in (key, key.upper()):
            if candidate in files:
                return files[candidate]
        return None

    def describe(self) -> str:
        return "env"

    def _load(self) -> dict[str, str]:
        if self._files is None:
            values: dict[str, str] = {}
            # .env.local overrides .env.
            for filename in (".env", ".env.local"):
                values.update(_read_dotenv(self.folder / filename))
            self._files = values
        return self._files


@dataclass
class DirectoryStore:
    """One file per secret: `<folder>/<name>` holds the value."""

    folder: Path
    name: str

    def get(self, key: str) -> str | None:
        if not _NAME.match(key) or key.startswith("."):
            return None
        path = self.folder / key
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            # The value itself must not be shown; its name and store are.
            raise ConfigError(
                f"secret '{key}' in directory store {self.folder}: not UTF-8 text"
            ) from None
        except OSError as err:
            raise ConfigError(
                f"secret '{key}' in directory store {self.folder}: cannot read it: {err.strerror}"
            ) from None

    def describe(self) -> str:
        return f"directory:{self.folder}"


Store = EnvStore | DirectoryStore


def _read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; quotes around a value are removed, and a double
    quoted value may span lines (a PEM, say)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
    values: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if value.startswith('"') and not (len(value) > 1 and value.endswith('"')):
            # A double-quoted value that continues on the next lines.
            parts = [value[1:]]
            while index < len(lines) and not lines[index].rstrip().endswith('"'):
                parts.append(lines[index])
                index += 1
            if index < len(lines):
                parts.append(lines[index].rstrip()[:-1])
                index += 1
            value = "\n".join(parts)
        elif len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def resolve(text: str, origin: str, stores: list[Store]) -> str:
    """Replaces every `${secrets:name}` and `${env:NAME}` in `text`."""

    def substitute(match: re.Match[str]) -> str:
        kind, key = match.group(1), match.group(2).strip()
        if not key:
            raise ConfigError(f"{origin}: empty ${{{kind}:}} reference")
        if kind == "env":
            value = os.environ.get(key)
            if value is None:
                raise ConfigError(f"{origin}: environment variable '{key}' is not set")
            return value
        for store in reversed(stores):
            found = store.get(key)
            if found is not None:
                return found
        # In the order they were asked: the last declared first.
        searched = ", ".join(store.describe() for store in reversed(stores)) or "none"
        raise ConfigError(f"{origin}: secret '{key}' not found (stores searched: {searched})")

    for match in _ANY_REFERENCE.finditer(text):
        if match.group(1) not in ("secrets", "env"):
            raise ConfigError(
                f"{origin}: unknown reference ${{{match.group(1)}:…}} (use ${{secrets:NAME}} "
                "or ${env:NAME})"
            )
    return _REFERENCE.sub(substitute, text)


def has_reference(text: str) -> bool:
    return _REFERENCE.search(text) is not None


def has_secret(text: str) -> bool:
    """Whether `text` refers to a secret (not merely an environment
    variable): its value must then never be shown."""
    return any(match.group(1) == "secrets" for match in _REFERENCE.finditer(text))
