"""Prometheus metrics on their own CollectorRegistry.

Requests are counted as they happen (the dataplane calls `observe`); everything else — version states, load
times, cache use, reloads, in-flight requests — is read from the registry and reconciler at scrape time, so nothing
on the loading path knows about metrics.

With `--grpc_workers N` every worker writes prometheus_client's multiprocess files (the supervisor's private dir)
and a scrape of any worker reads all of them: request counts and latencies are the fleet's sums. A worker's state is
published into multiprocess gauges by its "metrics sync" loop (and at each of its own scrapes): version state, load
time and cache use per worker (label `pid`), in-flight requests and cache hits summed, reloads counted over the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import metrics_dir
from .cache import ModelCache
from .metrics_dir import scrape_lock
from .registry import Registry
from .status import State


class ReloadCounts(Protocol):
    """What metrics read of the reconciler."""

    @property
    def runs(self) -> int: ...

    @property
    def failed_runs(self) -> int: ...


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SYNC_SECONDS = 0.25  # how stale another worker's state may be in a scrape
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(
        self, registry: Registry, reconciler: ReloadCounts, cache: ModelCache | None, multiprocess: bool = False
    ) -> None:
        self.registry = registry
        self.collectors = CollectorRegistry()
        self.multiprocess = multiprocess
        self.served = 0  # requests this process counted (published per worker in multiprocess mode)
        per_version = ["model", "version", "api", "version_label"]  # version_label: the version's labels then
        self.requests = Counter("hotserve_requests", "Inference requests", per_version, registry=self.collectors)
        self.failures = Counter(
            "hotserve_request_failures", "Inference requests that failed", per_version, registry=self.collectors
        )
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
        self._fleet: _FleetState | None = None
        if multiprocess:
            from prometheus_client import multiprocess as mp

            self._fleet = _FleetState(registry, reconciler, self)
            self._dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # the supervisor's (engine/metrics_dir.py)
            self._held = metrics_dir.hold(self._dir)  # kept while this worker lives, even past its supervisor
            self._scrape = CollectorRegistry()  # every worker's files, and the cache dir they share
            self._scrape.register(_Known(mp.MultiProcessCollector(None), registry))
            self._scrape.register(_CacheDirCollector(cache))
        else:
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
        self.served += 1
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
        if self._fleet is not None:
            self._fleet.publish()  # this worker's own state is fresh; the others' at most SYNC_SECONDS old
            with scrape_lock(self._dir):  # not while a dead worker's are folded
                return generate_latest(self._scrape)
        return generate_latest(self.collectors)

    async def run(self) -> None:
        """Multiprocess mode: keep this worker's state in the shared files (run under the server's supervisor)."""
        assert self._fleet is not None
        while True:
            self._fleet.publish()
            await asyncio.sleep(SYNC_SECONDS)

    def _prune(self) -> None:
        """Drop the series of versions the registry forgot and of models it no longer has: bounded series."""
        for model in [m for m in self._batched if m not in self.registry.models]:
            del self._batched[model]
            for histogram in (self.batch_size, self.queue_time):
                with contextlib.suppress(KeyError):
                    histogram.remove(model)
        for labels in list(self._series):
            model, version, api, _ = labels
            entry = self.registry.models.get(model) if model else None
            if model and (entry is None or (version and int(version) not in entry.slots)):
                self._series.discard(labels)
                self._children.pop(labels, None)
                if self.multiprocess:
                    continue  # files cannot forget a series: _Known leaves it out of the scrape instead
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
            yield GaugeMetricFamily(
                "hotserve_cache_hits", "AVAILABLE versions whose compile was imported from the cache", value=hits
            )
            yield GaugeMetricFamily(
                "hotserve_cache_misses", "AVAILABLE versions compiled afresh with the cache enabled", value=misses
            )
            yield from _CacheDirCollector(self.cache).collect()


class _CacheDirCollector(Collector):
    """The compiled-model cache dir, read at scrape time (multiprocess mode: every worker shares it)."""

    def __init__(self, cache: ModelCache | None) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        if self.cache is not None:
            size, count = self.cache.stats()
            yield GaugeMetricFamily("hotserve_cache_bytes", "Bytes of compiled blobs in the cache dir", value=size)
            yield GaugeMetricFamily("hotserve_cache_blobs", "Compiled blobs in the cache dir", value=count)


class _Known(Collector):
    """Samples of models and versions this worker's registry still has (the files keep every series written)."""

    def __init__(self, inner: Collector, registry: Registry) -> None:
        self.inner = inner
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.inner.collect():
            metric.samples = [s for s in metric.samples if self._known(s.labels)]
            yield metric

    def _known(self, labels: dict[str, str]) -> bool:
        model = labels.get("model")
        if not model:
            return True
        entry = self.registry.models.get(model)
        version = labels.get("version", "")
        return entry is not None and (not version or int(version) in entry.slots)


class _FleetState:
    """One worker's state, written into multiprocess gauges (and the fleet's reload counters)."""

    def __init__(self, registry: Registry, reconciler: ReloadCounts, metrics: Metrics) -> None:
        self.registry = registry
        self.reconciler = reconciler
        self.metrics = metrics
        labels = ["model", "version"]
        # a worker's own view, labelled by pid (liveall: a dead worker's series go with it)
        self.state = Gauge("hotserve_version_state", "Version state (10 START … 50 END), per worker", labels,
                           multiprocess_mode="liveall", registry=None)  # fmt: skip
        self.load = Gauge("hotserve_version_load_seconds", "Time the last load took, per worker", labels,
                          multiprocess_mode="liveall", registry=None)  # fmt: skip
        self.cached = Gauge(
            "hotserve_version_loaded_from_cache",
            "1 when the version was imported from the cache, per worker; label cache says whether the cache is "
            "used, or why not",
            [*labels, "cache"], multiprocess_mode="liveall", registry=None,
        )  # fmt: skip
        self.inflight = Gauge("hotserve_inflight_requests", "Requests being served (all workers)", labels,
                              multiprocess_mode="livesum", registry=None)  # fmt: skip
        self.hits = Gauge("hotserve_cache_hits", "AVAILABLE versions imported from the cache (all workers)",
                          multiprocess_mode="livesum", registry=None)  # fmt: skip
        self.misses = Gauge("hotserve_cache_misses", "AVAILABLE versions compiled afresh with the cache enabled "
                            "(all workers)", multiprocess_mode="livesum", registry=None)  # fmt: skip
        self.worker_requests = Gauge("hotserve_worker_requests", "Inference requests this worker served since it "
                                     "started", multiprocess_mode="liveall", registry=None)  # fmt: skip
        self.reloads = Counter("hotserve_reloads", "Reconciles run since start (all workers)", registry=None)
        self.reload_failures = Counter(
            "hotserve_reload_failures", "Reconciles that ended with errors (all workers)", registry=None
        )
        self._counted = (0, 0)
        self._last: dict[tuple[object, ...], float] = {}

    def _set(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        key = (gauge, *labels)
        if self._last.get(key) != value:  # an mmap write only when it changed
            self._last[key] = value
            (gauge.labels(*labels) if labels else gauge).set(value)

    def publish(self) -> None:
        hits = misses = 0
        for name, model in self.registry.models.items():
            for number, slot in model.slots.items():
                status, values = slot.status, (name, str(number))
                self._set(self.state, values, int(status.state))
                self._set(self.load, values, status.load_seconds)
                self._set(self.cached, (*values, status.cache), 1.0 if status.loaded_from_cache else 0.0)
                self._set(self.inflight, values, slot.served.inflight if slot.served is not None else 0)
                if status.state == State.AVAILABLE and status.cache.startswith("enabled"):
                    hits += status.loaded_from_cache
                    misses += not status.loaded_from_cache
        self._set(self.hits, (), hits)
        self._set(self.misses, (), misses)
        self._set(self.worker_requests, (), self.metrics.served)
        runs, failed = self.reconciler.runs, self.reconciler.failed_runs
        if runs > self._counted[0]:
            self.reloads.inc(runs - self._counted[0])
        if failed > self._counted[1]:
            self.reload_failures.inc(failed - self._counted[1])
        self._counted = (runs, failed)
