"""Prometheus metrics on their own CollectorRegistry.

Requests are counted as they happen (the dataplane calls `observe`); everything else — version states, load
times, cache use, reloads, in-flight requests — is read from the registry and reconciler at scrape time, so nothing
on the loading path knows about metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .cache import ModelCache
from .reconciler import Reconciler
from .registry import Registry

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: Registry, reconciler: Reconciler, cache: ModelCache | None) -> None:
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
        self.collectors.register(_StateCollector(registry, reconciler, cache))

    def observe(self, model: str, version: int | None, api: str, ok: bool, seconds: float) -> None:
        labels = (model, str(version) if version else "", api)
        self.requests.labels(*labels).inc()
        if not ok:
            self.failures.labels(*labels).inc()
        self.latency.labels(model, api).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.collectors)


class _StateCollector(Collector):
    def __init__(self, registry: Registry, reconciler: Reconciler, cache: ModelCache | None) -> None:
        self.registry = registry
        self.reconciler = reconciler
        self.cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            "hotserve_version_state", "Version state (10 START … 50 END)", labels=["model", "version"]
        )
        load = GaugeMetricFamily(
            "hotserve_version_load_seconds", "Time the last load took", labels=["model", "version"]
        )
        cached = GaugeMetricFamily(
            "hotserve_version_loaded_from_cache",
            "1 when the version was imported from the cache",
            labels=["model", "version"],
        )
        inflight = GaugeMetricFamily("hotserve_inflight_requests", "Requests being served", labels=["model", "version"])
        for name, model in sorted(self.registry.models.items()):
            for number, slot in sorted(model.slots.items()):
                labels = [name, str(number)]
                state.add_metric(labels, int(slot.status.state))
                load.add_metric(labels, slot.status.load_seconds)
                cached.add_metric(labels, 1.0 if slot.status.loaded_from_cache else 0.0)
                inflight.add_metric(labels, slot.served.inflight if slot.served is not None else 0)
        yield from (state, load, cached, inflight)
        yield GaugeMetricFamily("hotserve_reloads", "Reconciles run since start", value=self.reconciler.runs)
        yield GaugeMetricFamily(
            "hotserve_reload_failures", "Reconciles that ended with errors", value=self.reconciler.failed_runs
        )
        if self.cache is not None:
            size, count = self.cache.stats()
            yield GaugeMetricFamily("hotserve_cache_bytes", "Bytes of compiled blobs in the cache dir", value=size)
            yield GaugeMetricFamily("hotserve_cache_blobs", "Compiled blobs in the cache dir", value=count)
