"""Prometheus metrics of the service: one ``onestage_`` prefix, base units (seconds), ``_total`` counters.

``METRICS`` is the one table of every family (type, labels, help, buckets); ``Metrics`` builds its
collectors from it, so dashboards and alerts (docker/, Grafana) can be checked against what the service
exports. Each app owns a ``CollectorRegistry`` (its batch-size buckets depend on the settings), exposed at
``GET /metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Latency buckets (seconds): 1 ms to 60 s, dense where CPU and GPU requests land.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
FAILURE_REASONS = ("rejected", "timeout", "bad_input", "backend")
MODEL_STATES = ("loading", "ready", "failed")  # service.models.State; "failed" lasts until the process restarts
UNKNOWN_MODEL = "_unknown"  # the model label of requests naming no configured model
MODEL_INFO_KEYS = ("version", "method", "runtime", "providers")
AUTH_FAILURE_REASONS = ("missing", "invalid")
UNNAMED_KEY = "_unnamed"  # the key_name label of keys given without a name
OTHER_KEYS = "_other"  # the key_name label of names beyond KEY_NAME_LIMIT (renamed keys accumulate until restart)
KEY_NAME_LIMIT = 32  # distinct key_name labels: per-client series stay few, whatever the key file holds

Kind = Literal["histogram", "gauge", "counter", "info"]
Buckets = Literal["latency", "batch_size", "tiles"]


class MetricSpec(NamedTuple):
    attribute: str  # the ``Metrics`` attribute holding the collector
    name: str  # the family name as exposed (counters with _total; histograms add _bucket/_sum/_count)
    kind: Kind
    labels: tuple[str, ...]  # as exposed (an info family's keys included)
    help: str
    buckets: Buckets | None = None  # histograms only


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("request_duration", "onestage_request_duration_seconds", "histogram", ("model", "status"),
               "POST /segment latency, from arrival to response, by HTTP status", "latency"),
    MetricSpec("in_flight", "onestage_requests_in_flight", "gauge", ("model",),
               "POST /segment requests being handled"),
    MetricSpec("preprocess", "onestage_preprocess_duration_seconds", "histogram", ("model",),
               "decode, EXIF orientation and resize of one image", "latency"),
    MetricSpec("queue_wait", "onestage_queue_wait_seconds", "histogram", ("model",),
               "wait in the batcher queue until the request's batch starts", "latency"),
    MetricSpec("inference", "onestage_inference_duration_seconds", "histogram", ("model",),
               "one batch through the runtime (padding included)", "latency"),
    MetricSpec("batch_size", "onestage_batch_size", "histogram", ("model",),
               "images per executed batch (exponential buckets up to max_batch_size)", "batch_size"),
    MetricSpec("queue_depth", "onestage_queue_depth", "gauge", ("model",),
               "requests waiting in the batcher queue"),
    MetricSpec("queue_capacity", "onestage_queue_capacity", "gauge", ("model",),
               "requests the model admits (queued, or reading their body) before it answers 503: max_queue_size "
               "once its batcher runs, 0 while it loads or after it failed"),
    MetricSpec("mask_finishing", "onestage_mask_finishing_seconds", "histogram", ("model",),
               "paste, threshold and RLE/polygon encoding of one image's masks", "latency"),
    MetricSpec("tiles", "onestage_tiles_per_request", "histogram", ("model",),
               "tiles an image was cut into (1: it fit a shape bucket whole)", "tiles"),
    MetricSpec("failures", "onestage_failures_total", "counter", ("model", "reason"),
               "failed requests by reason: " + ", ".join(FAILURE_REASONS)),
    MetricSpec("key_requests_total", "onestage_key_requests_total", "counter", ("key_name",),
               f"requests accepted per API key name (at most {KEY_NAME_LIMIT} names, then {OTHER_KEYS}; "
               f"keys without a name as {UNNAMED_KEY})"),
    MetricSpec("auth_failures", "onestage_auth_failures_total", "counter", ("reason",),
               "requests refused with 401, by API key: " + " or ".join(AUTH_FAILURE_REASONS)),
    MetricSpec("model_info", "onestage_model_info", "info", ("model", *MODEL_INFO_KEYS),
               "served models (value 1)"),
    MetricSpec("model_state", "onestage_model_state", "gauge", ("model", "state"),
               "1 for the model's load state (" + ", ".join(MODEL_STATES) + "), 0 for the others"),
)  # fmt: skip


# Tiles per request: 1 (whole image) to a 40-megapixel image in 256-pixel tiles.
TILE_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def batch_size_buckets(max_batch_size: int) -> list[float]:
    """1, 2, 4, ... up to and including ``max_batch_size``."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    return [*buckets, float(max_batch_size)]


def _is_state(state: Callable[[], str], wanted: str) -> float:
    """1.0 while ``state()`` is ``wanted``, else 0.0 (a gauge read at scrape time)."""
    return float(state() == wanted)


class Metrics:
    """The collectors of one app, built from ``METRICS`` in its own registry."""

    request_duration: Histogram
    in_flight: Gauge
    preprocess: Histogram
    queue_wait: Histogram
    inference: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    queue_capacity: Gauge
    mask_finishing: Histogram
    tiles: Histogram
    failures: Counter
    key_requests_total: Counter
    auth_failures: Counter
    model_info: Info
    model_state: Gauge

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        buckets = {
            "latency": LATENCY_BUCKETS,
            "batch_size": batch_size_buckets(max_batch_size),
            "tiles": TILE_COUNT_BUCKETS,
        }
        for spec in METRICS:
            setattr(self, spec.attribute, _collector(spec, buckets, self.registry))
        self._key_names: set[str] = set()
        self.key_requests(None)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)

    def register_model(self, name: str, state: Callable[[], str]) -> None:
        """Create a model's label sets, so that every series exists (at zero) from the start; ``state`` returns
        the model's load state (one of ``MODEL_STATES``) and is read at every scrape, so the state series follow
        the model whichever code changes its state."""
        for spec in METRICS:
            collector = getattr(self, spec.attribute)
            if spec.labels == ("model",):
                collector.labels(name)
        for reason in FAILURE_REASONS:
            self.failures.labels(name, reason)
        for each in MODEL_STATES:
            self.model_state.labels(name, each).set_function(partial(_is_state, state, each))

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


def _collector(
    spec: MetricSpec, buckets: Mapping[str, Sequence[float]], registry: CollectorRegistry
) -> Histogram | Gauge | Counter | Info:
    """The collector of one table row. prometheus_client adds the ``_total`` (counter) and ``_info`` (info)
    suffixes itself, and an info family's keys are the values passed to ``info``, not constructor labels."""
    if spec.kind == "histogram":
        if spec.buckets is None:
            raise ValueError(f"histogram {spec.name} needs buckets")
        return Histogram(spec.name, spec.help, spec.labels, buckets=buckets[spec.buckets], registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "counter":
        return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
    labels = tuple(label for label in spec.labels if label not in MODEL_INFO_KEYS)
    return Info(spec.name.removesuffix("_info"), spec.help, labels, registry=registry)
