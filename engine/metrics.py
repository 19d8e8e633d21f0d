"""Prometheus metrics on their own CollectorRegistry.

Requests are counted as they happen (the dataplane calls `observe`); everything else — version states, load
times, cache use, reloads, in-flight requests — is read from the registry and reconciler at scrape time, so nothing
on the loading path knows about metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


class Metrics:
    def __init__(self, registry: Registry, reconciler: ReloadCounts, cache: ModelCache | None) -> None:
        self.registry = registry
        self.collectors = CollectorRegistry()
        per_version = ["model", "version", "api", "version_label"]  # version_label: the version's labels then
        self.requests = Counter("hotserve_requests", "Inference requests", per_version, registry=self.collectors)
        self.failures = Counter(
            "hotserve_request_failures", "Inference requests that failed", per_version, registry=self.collectors
        )
        self.latency = Histogram(
            "hotserve_request_duration_seconds", "Inference request latency", ["model", "api"],
            buckets=LATENCY_BUCKETS, registry=self.collectors,
        )  # fmt: skip
        self.collectors.register(_StateCollector(registry, reconciler, cache))
        self._series: set[tuple[str, str, str, str]] = set()
        # label children, looked up once per series rather than per request (prometheus_client's labels() locks)
        self._children: dict[tuple[str, str, str, str], list[Any]] = {}

    def observe(self, model: str, version: int | str | None, api: str, ok: bool, seconds: float) -> None:
        """Count one inference request, with the labels its version holds at that moment ("canary,stable").

        Names, versions and labels a client made up are labelled "": bounded series (labels come from the config).
        """
        entry = self.registry.models.get(model)
        tags = ""
        if entry is None:
            model, version = "", None
        else:
            if isinstance(version, str):
                version = entry.routes.labels.get(version)  # a failed request by label: the version it names
            elif not version and not entry.routes.routed:
                version = entry.default_version()  # a failed request without a version: the one it would have got
            if version not in entry.slots:
                version = None
            tags = entry.routes.names.get(version, "") if version else ""
        labels = (model, str(version) if version else "", api, tags)
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

    def render(self) -> bytes:
        self._prune()
        return generate_latest(self.collectors)

    def _prune(self) -> None:
        """Drop the series of versions the registry forgot and of models it no longer has: bounded series."""
        for labels in list(self._series):
            model, version, api, _ = labels
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
                inflight.add_metric(values, slot.served.inflight if slot.served is not None else 0)
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
