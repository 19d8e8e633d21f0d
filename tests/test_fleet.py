"""A fleet on one machine (issue 11): 3 replicas follow one ConfigMap-style models.json and share one cache, a
balanced client keeps sending, a straggler keeps hitting a terminating replica, and neither a config swap nor a
rolling restart fails a single request.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import fleetsim
import modelgen
from conftest import model_entry
from fleetsim import Fleet, Load, answer, wait_until

STRAGGLE_SECONDS = 1.0  # kube-proxy's lag: requests that still reach a pod after its SIGTERM
DRAIN_SECONDS = 2.0  # > STRAGGLE_SECONDS, so the straggler is served; the default is 5


def loaded_from_cache(log: str, model: str) -> bool | None:
    for line in log.splitlines():
        if f"Loaded model {model};" in line:
            return line.rstrip().endswith("loaded from cache: True")
    return None


def test_fleet_swaps_config_and_rolls_without_a_failed_request(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, replicas=3, drain_seconds=DRAIN_SECONDS)
    modelgen.add_const(fleet.models / "a" / "1", delta=1.0)
    modelgen.add_const(fleet.models / "b" / "1", delta=2.0)
    modelgen.add_const(fleet.models / "b-next" / "1", delta=20.0)
    modelgen.add_const(fleet.models / "c" / "1", delta=3.0)
    fleet.write_config([model_entry("a", fleet.models / "a"), model_entry("b", fleet.models / "b")])
    served = ["a", "b"]
    stragglers: list[fleetsim.Outcome] = []
    try:
        first, *others = fleet.replicas
        fleet.start(first)  # compiles, and fills the shared cache
        for replica in others:
            fleet.launch(replica)
        for replica in others:
            replica.server.wait_ready()  # type: ignore[union-attr]
        for replica in fleet.replicas:
            log = replica.server.log  # type: ignore[union-attr]
            expected = replica is not first
            assert loaded_from_cache(log, "a") is expected and loaded_from_cache(log, "b") is expected, log
        load = Load(fleet.target, lambda: served, concurrency=4).start()
        wait_until(lambda: all(fleet.requests_served(r) > 0 for r in fleet.replicas), 10, "traffic on every replica")

        # The ConfigMap swap: c is added, b now points at other weights.
        written = time.monotonic()
        fleet.write_config([model_entry("a", fleet.models / "a"), model_entry("b", fleet.models / "b-next"),
                            model_entry("c", fleet.models / "c")])  # fmt: skip

        def converged(r: Any) -> bool:
            return answer(r.server.address, "c") == 3.0 and answer(r.server.address, "b") == 20.0

        wait_until(lambda: all(converged(r) for r in fleet.replicas), 10, "every replica on the new config")
        took = time.monotonic() - written
        assert took < 2.0, f"the replicas took {took:.2f} s to converge (the issue's bound: 2 s)"
        served.append("c")
        seen_c = wait_until(lambda: any(o.model == "c" and o.ok for o in load.outcomes), 2, "c through the balancer")
        assert seen_c

        # The rolling restart, one replica at a time. Its replacement reuses its port, so it starts once the old one
        # has exited (maxSurge 0 here, unlike the manifest's maxSurge 1): the two others carry the load meanwhile.
        for replica in fleet.replicas:
            old = replica.server
            assert old is not None
            old.signal(signal.SIGTERM)
            straggler = Load(old.address, lambda: served, concurrency=1, balanced=False)
            timer = threading.Timer(STRAGGLE_SECONDS, straggler.stop)
            straggler.start()
            timer.start()
            timer.join()
            stragglers += straggler.outcomes
            assert old.proc.wait(30) == 0, old.log[-3000:]
            assert "Shutdown complete" in old.log
            new = fleet.start(replica)
            for model in ("a", "b", "c"):
                assert loaded_from_cache(new.log, model) is True, new.log  # the shared cache
            before = fleet.requests_served(replica)
            wait_until(lambda r=replica, n=before: fleet.requests_served(r) > n + 10, 10, "traffic on the new replica")
        outcomes = load.stop()
    finally:
        fleet.stop()
    failures = [o for o in outcomes + stragglers if not o.ok]
    assert not failures, f"{len(failures)} failed request(s), first: {failures[:3]}"
    assert len(stragglers) > 10, "the straggler sent (almost) nothing: it proved nothing"
    assert {o.model for o in outcomes} == {"a", "b", "c"}
    assert len(outcomes) > 1000
    values = {(o.model, o.value) for o in outcomes}
    assert values <= {("a", 1.0), ("b", 2.0), ("b", 20.0), ("c", 3.0)}, values
    print(f"{len(outcomes)} balanced requests and {len(stragglers)} straggler requests, none failed")
