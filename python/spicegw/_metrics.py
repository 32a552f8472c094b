"""The gateway's metrics: one OpenTelemetry meter in the supervisor,
read out as Prometheus text on the status service's /metrics.

Metric names are public API. `METRICS` below is the one documented list;
a test checks that /metrics shows exactly these names.

Workers keep their own counters and send them over their pipes; the
supervisor turns them into observable instruments. A worker that dies
leaves its last counts behind in `retired`, so totals never go backwards
when a worker is replaced.

TODO(#3): design section 5 also asks for OTLP export "where configured".
Neither the design nor an issue names how it is configured, and the SDK's
periodic exporter runs a thread, which must not be alive when the
supervisor forks a worker; export would have to be driven from the
supervisor's own loop with a bounded timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from . import _core


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "runtime_tls_reload_total",
        "counter",
        ("scope", "result"),
        "Certificate reload attempts, once per distinct on-disk content "
        "(result: ok, io_error, parse_error).",
    ),
    MetricSpec(
        "runtime_tls_handshakes_total",
        "counter",
        ("result", "version"),
        "TLS handshakes by result (ok, error, timeout) and protocol version.",
    ),
    MetricSpec(
        "runtime_tls_resumed_handshakes_total",
        "counter",
        (),
        "Handshakes that resumed an earlier session (a ticket from any worker).",
    ),
    MetricSpec(
        "runtime_tls_handshake_duration_seconds",
        "histogram",
        ("le",),
        "Seconds from accept to finished handshake.",
    ),
    MetricSpec(
        "runtime_tls_certificate_not_after_seconds",
        "gauge",
        ("scope",),
        "Unix time at which the served leaf certificate expires.",
    ),
    MetricSpec(
        "runtime_tls_serving_generation",
        "gauge",
        ("scope", "worker"),
        "Certificate generation each worker acknowledged serving.",
    ),
    MetricSpec(
        "spicegw_connections_accepted_total",
        "counter",
        (),
        "TCP connections accepted by all workers.",
    ),
    MetricSpec(
        "spicegw_accept_errors_total",
        "counter",
        (),
        "accept() failures (descriptor exhaustion and the like).",
    ),
    MetricSpec(
        "spicegw_open_connections",
        "gauge",
        (),
        "Connections open now, from accept to close.",
    ),
    MetricSpec(
        "spicegw_relayed_bytes_total",
        "counter",
        ("direction",),
        "Bytes relayed, by direction (to_upstream, to_client).",
    ),
    MetricSpec(
        "spicegw_upstream_connect_errors_total",
        "counter",
        (),
        "Upstream connections that failed or timed out.",
    ),
    MetricSpec(
        "spicegw_relay_errors_total",
        "counter",
        (),
        "Relayed connections that broke (a reset, a failed write) instead of closing.",
    ),
    MetricSpec(
        "spicegw_idle_timeouts_total",
        "counter",
        (),
        "Relayed connections closed after --idle-timeout without a byte.",
    ),
    MetricSpec(
        "spicegw_worker_restarts_total",
        "counter",
        (),
        "Workers replaced after they died.",
    ),
    MetricSpec(
        "spicegw_workers_ready",
        "gauge",
        (),
        "Workers that are up and serving.",
    ),
)

# Handshake histogram bounds, as the Rust workers count them (µs).
_BUCKETS_US = tuple(_core.HANDSHAKE_BUCKETS_US)


@dataclass
class GatewayView:
    """What the supervisor exposes to the metrics callbacks."""

    totals: Callable[[], Mapping[str, object]]
    open_connections: Callable[[], int]
    workers_ready: Callable[[], int]
    restarts: Callable[[], int]
    generations: Callable[[], Iterable[tuple[str, int, int]]]
    not_after: Callable[[], Iterable[tuple[str, float]]]


class Metrics:
    """The meter, its instruments and the Prometheus rendering."""

    def __init__(self, view: GatewayView, scopes: Iterable[str]) -> None:
        self._view = view
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "spicegw"}),
        )
        meter = self._provider.get_meter("spicegw", _core.__version__)
        help_of = {spec.name: spec.help for spec in METRICS}

        self._reloads = meter.create_counter(
            "runtime_tls_reload_total", description=help_of["runtime_tls_reload_total"]
        )
        # Every scope and result exists from the start, at zero, so
        # dashboards and alerts see the series before the first reload.
        for scope in scopes:
            for result in ("ok", "io_error", "parse_error"):
                self._reloads.add(0, {"scope": scope, "result": result})

        observers: dict[str, Callable[[CallbackOptions], Iterable[Observation]]] = {
            "runtime_tls_handshakes_total": self._handshakes,
            "runtime_tls_resumed_handshakes_total": self._total("handshakes_resumed"),
            # A histogram from the workers' bucket counts: three counters
            # that /metrics shows as one Prometheus histogram family.
            "runtime_tls_handshake_duration_seconds_bucket": self._duration_buckets,
            "runtime_tls_handshake_duration_seconds_sum": self._duration_sum,
            "runtime_tls_handshake_duration_seconds_count": self._duration_count,
            "runtime_tls_certificate_not_after_seconds": self._not_after,
            "runtime_tls_serving_generation": self._generations,
            "spicegw_connections_accepted_total": self._total("accepted"),
            "spicegw_accept_errors_total": self._total("accept_errors"),
            "spicegw_open_connections": lambda _o: [Observation(view.open_connections())],
            "spicegw_relayed_bytes_total": self._bytes,
            "spicegw_upstream_connect_errors_total": self._total("upstream_connect_errors"),
            "spicegw_relay_errors_total": self._total("relay_errors"),
            "spicegw_idle_timeouts_total": self._total("idle_timeouts"),
            "spicegw_worker_restarts_total": lambda _o: [Observation(view.restarts())],
            "spicegw_workers_ready": lambda _o: [Observation(view.workers_ready())],
        }
        kinds = {spec.name: spec.kind for spec in METRICS}
        for name, observe in observers.items():
            family = _family(name)
            kind = kinds[family]
            create = (
                meter.create_observable_gauge
                if kind == "gauge"
                else meter.create_observable_counter
            )
            create(name, callbacks=[observe], description=help_of[family])

    def count_reload(self, scope: str, result: str) -> None:
        self._reloads.add(1, {"scope": scope, "result": result})

    def shutdown(self) -> None:
        self._provider.shutdown()

    def prometheus(self) -> str:
        """Everything, in the Prometheus text exposition format."""
        data = self._reader.get_metrics_data()
        lines: list[str] = []
        if data is None:
            return ""
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                announced: set[str] = set()
                for metric in scope_metrics.metrics:
                    if not isinstance(metric.data, Sum | Gauge):
                        continue
                    family = _family(metric.name)
                    kind = "gauge"
                    if family != metric.name:
                        kind = "histogram"
                    elif isinstance(metric.data, Sum) and metric.data.is_monotonic:
                        kind = "counter"
                    if family not in announced:
                        announced.add(family)
                        lines.append(f"# HELP {family} {metric.description}")
                        lines.append(f"# TYPE {family} {kind}")
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        lines.append(_sample(metric.name, point))
        return "\n".join(lines) + "\n"

    def _total(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(_number(self._view.totals().get(key)))]

        return observe

    def _handshakes(self, _options: CallbackOptions) -> Iterable[Observation]:
        totals = self._view.totals()
        series = (
            ("handshakes_tls13", "ok", "1.3"),
            ("handshakes_tls12", "ok", "1.2"),
            ("handshake_errors", "error", "unknown"),
            ("handshake_timeouts", "timeout", "unknown"),
        )
        return [
            Observation(_number(totals.get(key)), {"result": result, "version": version})
            for key, result, version in series
        ]

    def _duration_buckets(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = self._view.totals().get("handshake_us_buckets")
        per_bucket = list(counts) if isinstance(counts, list) else []
        per_bucket += [0] * (len(_BUCKETS_US) + 1 - len(per_bucket))
        observations = []
        running = 0
        for bound, count in zip((*_BUCKETS_US, math.inf), per_bucket, strict=False):
            running += _number(count)
            le = "+Inf" if bound == math.inf else _seconds_label(int(bound))
            observations.append(Observation(running, {"le": le}))
        return observations

    def _duration_count(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = self._view.totals().get("handshake_us_buckets")
        return [Observation(sum(counts) if isinstance(counts, list) else 0)]

    def _duration_sum(self, _options: CallbackOptions) -> Iterable[Observation]:
        micros = _number(self._view.totals().get("handshake_us_sum"))
        return [Observation(micros / 1_000_000)]

    def _bytes(self, _options: CallbackOptions) -> Iterable[Observation]:
        totals = self._view.totals()
        return [
            Observation(_number(totals.get("bytes_to_upstream")), {"direction": "to_upstream"}),
            Observation(_number(totals.get("bytes_to_client")), {"direction": "to_client"}),
        ]

    def _generations(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(generation, {"scope": scope, "worker": str(worker)})
            for scope, worker, generation in self._view.generations()
        ]

    def _not_after(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(when, {"scope": scope}) for scope, when in self._view.not_after()]


_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def _family(name: str) -> str:
    """The documented metric a series belongs to: a histogram's _bucket,
    _sum and _count series belong to the histogram."""
    for part in _HISTOGRAM_PARTS:
        base = name.removesuffix(part)
        if base != name and any(spec.name == base for spec in METRICS):
            return base
    return name


def _number(value: object) -> int:
    return value if isinstance(value, int) else 0


def _seconds_label(micros: int) -> str:
    return f"{micros / 1_000_000:g}"


def _sample(name: str, point: NumberDataPoint) -> str:
    labels = ",".join(
        f'{key}="{_escape(str(value))}"' for key, value in sorted((point.attributes or {}).items())
    )
    value = point.value
    text = repr(float(value)) if isinstance(value, float) else str(value)
    return f"{name}{{{labels}}} {text}" if labels else f"{name} {text}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
