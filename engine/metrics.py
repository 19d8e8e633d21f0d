"""Prometheus metrics on their own CollectorRegistry.

Requests are counted as they happen (the dataplane calls `observe`); everything else — version states, load
times, cache use, reloads, in-flight requests — is read from the registry and reconciler at scrape time, so nothing
on the loading path knows about metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache import ModelCache
from .registry import Registry
from .status import State


class ReloadCounts(Protocol):
    """What metrics read of the reconciler."""

    @property
    def runs(self) -> int: ...

    @property
    def failed_runs(self) -> int: ...


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: Registry, reconciler: ReloadCounts, cache: ModelCache | None) -> None:
        self.registry = registry
        self.collectors = CollectorRegistry()
        self.requests = Counter(
            "hotserve_requests", "Inference requests", ["model", "version", "api"], registry=self.collectors
        )
        self.failures = Counter(
            "hotserve_request_failures", "Inference requests that failed", ["model", "version", "api"],
            registry=self.collectors,
        )  # fmt: skip
        self.latency = Histogram(
            "hotserve_request_duration_seconds", "Inference request latency", ["model", "api"],
            buckets=LATENCY_BUCKETS, registry=self.collectors,
        )  # fmt: skip
        self.batch_size = Histogram(
            "hotserve_batch_size", "Rows per inference the dynamic batcher ran (_count: its inferences)", ["model"],
            buckets=BATCH_BUCKETS, registry=self.collectors,
        )  # fmt: skip
        self.queue_time = Histogram(
            "hotserve_queue_duration_seconds", "Time a request waited in its model's batching queue", ["model"],
            buckets=QUEUE_BUCKETS, registry=self.collectors,
        )  # fmt: skip
        self._batched: dict[str, tuple[Any, Any]] = {}  # model → its two batching children
        self.collectors.register(_StateCollector(registry, reconciler, cache))
        self._series: set[tuple[str, str, str]] = set()
        # label children, looked up once per series rather than per request (prometheus_client's labels() locks)
        self._children: dict[tuple[str, str, str], list[Any]] = {}

    def observe(self, model: str, version: int | None, api: str, ok: bool, seconds: float) -> None:
        """Count one inference request. Names and versions a client made up are labelled "": bounded series."""
        entry = self.registry.models.get(model)
        if entry is None:
            model, version = "", None
        elif not version:
            version = entry.default_version()  # a failed request without a version: the one it would have got
        elif version not in entry.slots:
            version = None
        labels = (model, str(version) if version else "", api)
        children = self._children.get(labels)
        if children is None:
            self._series.add(labels)
            children = [self.requests.labels(*labels), None, self.latency.labels(model, api)]
            self._children[labels] = children
        children[0].inc()
        if not ok:
            if children[1] is None:  # a failures series appears with the first failure, as before
                children[1] = self.failures.labels(*labels)
            children[1].inc()
        children[2].observe(seconds)

    def batch(self, model: str, rows: int, queued_seconds: Sequence[float]) -> None:
        """One inference of a dynamic batcher (batching.BatchObserver); models come from models.json: bounded."""
        children = self._batched.get(model)
        if children is None:
            children = self._batched[model] = (self.batch_size.labels(model), self.queue_time.labels(model))
        children[0].observe(rows)
        for seconds in queued_seconds:
            children[1].observe(seconds)

    def render(self) -> bytes:
        self._prune()
        return generate_latest(self.collectors)

    def _prune(self) -> None:
        """Drop the series of versions the registry forgot and of models it no longer has: bounded series."""
        for model in [m for m in self._batched if m not in self.registry.models]:
            del self._batched[model]
            for histogram in (self.batch_size, self.queue_time):
                with contextlib.suppress(KeyError):
                    histogram.remove(model)
        for labels in list(self._series):
            model, version, api = labels
            entry = self.registry.models.get(model) if model else None
            if model and (entry is None or (version and int(version) not in entry.slots)):
                self._series.discard(labels)
                self._children.pop(labels, None)
                for counter in (self.requests, self.failures):
                    with contextlib.suppress(KeyError):
                        counter.remove(*labels)
                if entry is None:
                    with contextlib.suppress(KeyError):
                        self.latency.remove(model, api)
                    for other in [k for k in self._children if k[0] == model and k[2] == api]:
                        self._children.pop(other)  # they hold the latency child just removed


class _StateCollector(Collector):
    def __init__(self, registry: Registry, reconciler: ReloadCounts, cache: ModelCache | None) -> None:
        self.registry = registry
        self.reconciler = reconciler
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        state = GaugeMetricFamily("hotserve_version_state", "Version state (10 START … 50 END)", labels=labels)
        load = GaugeMetricFamily("hotserve_version_load_seconds", "Time the last load took", labels=labels)
        cached = GaugeMetricFamily(
            "hotserve_version_loaded_from_cache",
            "1 when the version was imported from the cache; label cache says whether the cache is used, or why not",
            labels=[*labels, "cache"],
        )
        inflight = GaugeMetricFamily("hotserve_inflight_requests", "Requests being served", labels=labels)
        hits = misses = 0
        for name, model in sorted(self.registry.models.items()):
            for number, slot in sorted(model.slots.items()):
                status, values = slot.status, [name, str(number)]
                state.add_metric(values, int(status.state))
                load.add_metric(values, status.load_seconds)
                cached.add_metric([*values, status.cache], 1.0 if status.loaded_from_cache else 0.0)
                served = slot.served
                batches = served.batcher.running if served is not None and served.batcher is not None else 0
                inflight.add_metric(values, served.inflight - batches if served is not None else 0)
                if status.state == State.AVAILABLE and status.cache.startswith("enabled"):
                    hits += status.loaded_from_cache
                    misses += not status.loaded_from_cache
        yield from (state, load, cached, inflight)
        yield CounterMetricFamily("hotserve_reloads", "Reconciles run since start", value=self.reconciler.runs)
        yield CounterMetricFamily(
            "hotserve_reload_failures", "Reconciles that ended with errors", value=self.reconciler.failed_runs
        )
        if self.cache is not None:
            size, count = self.cache.stats()
            yield GaugeMetricFamily(
                "hotserve_cache_hits", "AVAILABLE versions whose compile was imported from the cache", value=hits
            )
            yield GaugeMetricFamily(
                "hotserve_cache_misses", "AVAILABLE versions compiled afresh with the cache enabled", value=misses
            )
            yield GaugeMetricFamily("hotserve_cache_bytes", "Bytes of compiled blobs in the cache dir", value=size)
            yield GaugeMetricFamily("hotserve_cache_blobs", "Compiled blobs in the cache dir", value=count)
