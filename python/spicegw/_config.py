"""Reading spicepod.yaml: `runtime.tls`, `runtime.node_mtls`, secret
stores and spicegw's generic `endpoints`.

Every error names the file, the line and the key. Keys spicegw does not
know are errors, except the sections that belong to the Spice runtime
(datasets, models, …), which spicegw accepts and leaves alone so one
spicepod.yaml can serve both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import _secrets
from .errors import ConfigError

# Spice sections spicegw reads nothing from; accepted as they are.
_SPICE_TOP_LEVEL = {
    "version", "kind", "name", "metadata", "datasets", "models", "embeddings",
    "catalogs", "views", "dependencies", "extensions", "tools", "evals",
    "workers", "params", "snapshots", "management",
}  # fmt: skip
_SPICE_RUNTIME = {
    "results_cache", "dataset_load_parallelism", "task_history", "tracing",
    "telemetry", "params", "cors", "auth", "shutdown_timeout", "caching",
    "flight", "output_level", "scheduler", "query", "memory_limit",
    "ready_state", "temp_directory", "api_key", "metrics",
}  # fmt: skip
_TLS_KEYS = {
    "enabled", "certificate_file", "key_file", "certificate", "key",
    "client_auth_mode", "client_auth_ca_file", "client_auth_ca",
}  # fmt: skip
_NODE_MTLS_KEYS = {"ca_certificate_file", "certificate_file", "key_file"}
_ENDPOINT_KEYS = {"name", "listen", "upstream", "scope", "alpn", "proxy_protocol"}
_SECRET_KEYS = {"from", "name", "description", "params"}
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class Value:
    """A string from the file, with where it came from (for messages).

    `shown` is what messages may repeat: the text as written when it
    holds a `${secrets:…}` reference, never the secret's value.
    """

    text: str
    origin: str
    shown: str | None = None


@dataclass(frozen=True)
class PodEndpoint:
    name: str
    listen: Value
    upstream: Value
    scope: str
    alpn: tuple[str, ...]
    proxy_protocol: bool
    origin: str


@dataclass
class Spicepod:
    path: Path
    tls_enabled: bool | None = None
    tls: dict[str, Value] = field(default_factory=dict)
    node_mtls: dict[str, Value] = field(default_factory=dict)
    endpoints: list[PodEndpoint] = field(default_factory=list)
    stores: list[_secrets.Store] = field(default_factory=list)


class _Reader:
    """Walks the YAML node tree, checking keys and types with line numbers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A value's line is the line of its key: a block value starts on
        # the line after.
        self._key_lines: dict[int, int] = {}

    def where(self, node: Node, key: str) -> str:
        line = self._key_lines.get(id(node), node.start_mark.line)
        return f"{self.path}:{line + 1}: {key}"

    def mapping(self, node: Node, key: str, allowed: set[str] | None) -> dict[str, Node]:
        if not isinstance(node, MappingNode):
            raise ConfigError(f"{self.where(node, key)}: expected a mapping")
        result: dict[str, Node] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            path = f"{key}.{name}" if key else name
            if name in result:
                raise ConfigError(f"{self.where(key_node, path)}: duplicate key")
            self._key_lines[id(value_node)] = key_node.start_mark.line
            if allowed is not None and name not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(
                    f"{self.where(key_node, path)}: unknown key (expected one of: {known})"
                )
            result[name] = value_node
        return result

    def string(self, node: Node, key: str) -> Value:
        if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            raise ConfigError(f"{self.where(node, key)}: expected a string")
        return Value(str(node.value), self.where(node, key))

    def boolean(self, node: Node, key: str) -> bool:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
            return str(node.value).lower() in ("true", "yes", "on")
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            lowered = str(node.value).strip().lower()
            if lowered in ("true", "false"):
                return lowered == "true"
        raise ConfigError(f"{self.where(node, key)}: expected true or false")

    def sequence(self, node: Node, key: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise ConfigError(f"{self.where(node, key)}: expected a list")
        return list(node.value)


def load(path: Path) -> Spicepod:
    """Reads and checks a spicepod.yaml; raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config '{path}': cannot read it: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None

    pod = Spicepod(path=path, stores=[])
    if root is None:
        pod.stores = [_secrets.EnvStore(path.parent)]
        return pod
    reader = _Reader(path)
    top = reader.mapping(root, "", _SPICE_TOP_LEVEL | {"runtime", "secrets", "endpoints"})

    pod.stores = _stores(reader, top.get("secrets"), path.parent)
    runtime = top.get("runtime")
    if runtime is not None:
        section = reader.mapping(runtime, "runtime", _SPICE_RUNTIME | {"tls", "node_mtls"})
        if "tls" in section:
            tls = reader.mapping(section["tls"], "runtime.tls", _TLS_KEYS)
            for name, node in tls.items():
                key = f"runtime.tls.{name}"
                if name == "enabled":
                    pod.tls_enabled = reader.boolean(node, key)
                else:
                    value = _resolved(reader.string(node, key), pod.stores)
                    pod.tls[name] = _relative_to(path, value) if name.endswith("_file") else value
        if "node_mtls" in section:
            mtls = reader.mapping(section["node_mtls"], "runtime.node_mtls", _NODE_MTLS_KEYS)
            for name, node in mtls.items():
                key = f"runtime.node_mtls.{name}"
                value = _resolved(reader.string(node, key), pod.stores)
                pod.node_mtls[name] = _relative_to(path, value)

    if "endpoints" in top:
        for index, node in enumerate(reader.sequence(top["endpoints"], "endpoints")):
            pod.endpoints.append(_endpoint(reader, node, index, pod.stores))
    return pod


def _relative_to(spicepod: Path, value: Value) -> Value:
    """File fields are relative to the spicepod's folder, so the gateway
    finds them whatever its working directory."""
    if not value.text or Path(value.text).is_absolute():
        return value
    return Value(str(spicepod.parent / value.text), value.origin, value.shown)


def _resolved(value: Value, stores: list[_secrets.Store]) -> Value:
    if not _secrets.has_reference(value.text):
        return value
    resolved = _secrets.resolve(value.text, value.origin, stores)
    shown = value.text if _secrets.has_secret(value.text) else None
    return Value(resolved, value.origin, shown=shown)


def _stores(reader: _Reader, node: Node | None, folder: Path) -> list[_secrets.Store]:
    if node is None:
        return [_secrets.EnvStore(folder)]
    stores: list[_secrets.Store] = []
    for index, entry in enumerate(reader.sequence(node, "secrets")):
        key = f"secrets[{index}]"
        fields = reader.mapping(entry, key, _SECRET_KEYS)
        if "from" not in fields:
            raise ConfigError(f"{reader.where(entry, key)}: 'from' is required")
        source = reader.string(fields["from"], f"{key}.from")
        name = reader.string(fields["name"], f"{key}.name").text if "name" in fields else ""
        kind, _, argument = source.text.partition(":")
        if kind == "env":
            stores.append(_secrets.EnvStore(folder, name or "env"))
        elif kind == "directory":
            if not argument:
                raise ConfigError(f"{source.origin}: write directory:/path/to/folder")
            directory = Path(argument)
            if not directory.is_absolute():
                directory = folder / directory
            if not directory.is_dir():
                raise ConfigError(f"{source.origin}: {directory} is not a directory")
            stores.append(_secrets.DirectoryStore(directory, name or source.text))
        else:
            raise ConfigError(
                f"{source.origin}: unsupported secret store '{source.text}' "
                "(supported: env, directory:PATH)"
            )
    return stores


def _endpoint(reader: _Reader, node: Node, index: int, stores: list[_secrets.Store]) -> PodEndpoint:
    key = f"endpoints[{index}]"
    fields = reader.mapping(node, key, _ENDPOINT_KEYS)
    for required in ("name", "listen", "upstream"):
        if required not in fields:
            raise ConfigError(f"{reader.where(node, key)}: '{required}' is required")
    name_value = reader.string(fields["name"], f"{key}.name")
    name = name_value.text
    if not _ENDPOINT_NAME.match(name):
        raise ConfigError(f"{name_value.origin}: use letters, digits, '.', '-' and '_' (up to 64)")
    scope = "public"
    if "scope" in fields:
        scope_value = reader.string(fields["scope"], f"{key}.scope")
        if scope_value.text not in ("public", "cluster"):
            raise ConfigError(f"{scope_value.origin}: expected public or cluster")
        scope = scope_value.text
    alpn: tuple[str, ...] = ()
    if "alpn" in fields:
        items = reader.sequence(fields["alpn"], f"{key}.alpn")
        alpn = tuple(reader.string(item, f"{key}.alpn").text for item in items)
        for protocol in alpn:
            if not 1 <= len(protocol.encode()) <= 255:
                raise ConfigError(
                    f"{reader.where(fields['alpn'], f'{key}.alpn')}: each protocol name "
                    "needs 1 to 255 bytes"
                )
    proxy = False
    if "proxy_protocol" in fields:
        proxy = reader.boolean(fields["proxy_protocol"], f"{key}.proxy_protocol")
    return PodEndpoint(
        name=name,
        listen=_resolved(reader.string(fields["listen"], f"{key}.listen"), stores),
        upstream=_resolved(reader.string(fields["upstream"], f"{key}.upstream"), stores),
        scope=scope,
        alpn=alpn,
        proxy_protocol=proxy,
        origin=reader.where(node, key),
    )
