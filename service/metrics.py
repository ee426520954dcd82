"""Prometheus metrics of the service: one ``onestage_`` prefix, base units (seconds), ``_total`` counters.

``METRICS`` lists every family with its type and labels, so that dashboards and alerts (docker/,
Grafana) can be checked against what the service exports. Each app owns a ``CollectorRegistry`` (its
batch-size buckets depend on the settings), exposed at ``GET /metrics``.
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

PREFIX = "onestage"
# Latency buckets (seconds): 1 ms to 60 s, dense where CPU and GPU requests land.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
FAILURE_REASONS = ("rejected", "timeout", "bad_input", "backend")
UNKNOWN_MODEL = "_unknown"  # the model label of requests naming no configured model
AUTH_FAILURE_REASONS = ("missing", "invalid")
UNNAMED_KEY = "_unnamed"  # the key_name label of keys given without a name
OTHER_KEYS = "_other"  # the key_name label of names beyond KEY_NAME_LIMIT (renamed keys accumulate until restart)
KEY_NAME_LIMIT = 32  # distinct key_name labels: per-client series stay few, whatever the key file holds


class MetricSpec(NamedTuple):
    name: str  # the family name as exposed (counters with _total; histograms add _bucket/_sum/_count)
    kind: str
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("onestage_request_duration_seconds", "histogram", ("model", "status"), "POST /segment latency, from arrival to response, by HTTP status"),
    MetricSpec("onestage_requests_in_flight", "gauge", ("model",), "POST /segment requests being handled"),
    MetricSpec("onestage_preprocess_duration_seconds", "histogram", ("model",), "decode, EXIF orientation and resize of one image"),
    MetricSpec("onestage_queue_wait_seconds", "histogram", ("model",), "wait in the batcher queue until the request's batch starts"),
    MetricSpec("onestage_inference_duration_seconds", "histogram", ("model",), "one batch through the runtime (padding included)"),
    MetricSpec("onestage_batch_size", "histogram", ("model",), "images per executed batch (exponential buckets up to max_batch_size)"),
    MetricSpec("onestage_queue_depth", "gauge", ("model",), "requests waiting in the batcher queue"),
    MetricSpec("onestage_mask_finishing_seconds", "histogram", ("model",), "paste, threshold and RLE/polygon encoding of one image's masks"),
    MetricSpec("onestage_failures_total", "counter", ("model", "reason"), "failed requests by reason: " + ", ".join(FAILURE_REASONS)),
    MetricSpec(
        "onestage_key_requests_total", "counter", ("key_name",),
        f"requests accepted per API key name (at most {KEY_NAME_LIMIT} names, then {OTHER_KEYS}; "
        f"keys without a name as {UNNAMED_KEY})",
    ),
    MetricSpec(
        "onestage_auth_failures_total", "counter", ("reason",),
        "requests refused with 401, by API key: " + " or ".join(AUTH_FAILURE_REASONS),
    ),
    MetricSpec("onestage_model_info", "info", ("model", "version", "method", "runtime", "providers"), "served models (value 1)"),
)
_HELP = {spec.name: spec.help for spec in METRICS}


def batch_size_buckets(max_batch_size: int) -> list[float]:
    """1, 2, 4, ... up to and including ``max_batch_size``."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    return [*buckets, float(max_batch_size)]


class Metrics:
    """The metric objects of one app, registered in its own registry."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "onestage_request_duration_seconds", _HELP["onestage_request_duration_seconds"], ("model", "status"), buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("onestage_requests_in_flight", _HELP["onestage_requests_in_flight"], ("model",), registry=r)
        self.preprocess = Histogram("onestage_preprocess_duration_seconds", _HELP["onestage_preprocess_duration_seconds"], ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("onestage_queue_wait_seconds", _HELP["onestage_queue_wait_seconds"], ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("onestage_inference_duration_seconds", _HELP["onestage_inference_duration_seconds"], ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("onestage_batch_size", _HELP["onestage_batch_size"], ("model",), buckets=batch_size_buckets(max_batch_size), registry=r)
        self.queue_depth = Gauge("onestage_queue_depth", _HELP["onestage_queue_depth"], ("model",), registry=r)
        self.mask_finishing = Histogram("onestage_mask_finishing_seconds", _HELP["onestage_mask_finishing_seconds"], ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.failures = Counter("onestage_failures", _HELP["onestage_failures_total"], ("model", "reason"), registry=r)
        self.key_requests_total = Counter(
            "onestage_key_requests", _HELP["onestage_key_requests_total"], ("key_name",), registry=r
        )
        self.auth_failures = Counter("onestage_auth_failures", _HELP["onestage_auth_failures_total"], ("reason",), registry=r)
        self._key_names: set[str] = set()
        self.key_requests(None)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        self.model_info = Info("onestage_model", _HELP["onestage_model_info"], ("model",), registry=r)

    def register_model(self, name: str) -> None:
        """Create a model's label sets, so that every series exists (at zero) from the start."""
        for metric in (self.in_flight, self.preprocess, self.queue_wait, self.inference, self.batch_size, self.queue_depth, self.mask_finishing):
            metric.labels(name)
        for reason in FAILURE_REASONS:
            self.failures.labels(name, reason)

    def key_requests(self, name: str | None) -> Counter:
        """The accepted-request counter of a key name; past KEY_NAME_LIMIT names, the shared ``_other`` one."""
        label = name or UNNAMED_KEY
        if label not in self._key_names:
            if len(self._key_names) >= KEY_NAME_LIMIT:
                label = OTHER_KEYS
            else:
                self._key_names.add(label)
        return self.key_requests_total.labels(label)

    def fail(self, model: str, reason: str) -> None:
        self.failures.labels(model, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
