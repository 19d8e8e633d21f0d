"""Fleet benchmark: 3 replicas on 127.0.0.1 sharing a models folder, a ConfigMap-style config and a cache, under a
round_robin load with client-side health checking (tests/fleetsim.py), through a config swap and rolling restarts.

Measures: requests and failures, p50/p99 steady vs during the roll, the time for every replica to converge after
a ConfigMap swap, replica start-up cold vs from the shared cache, and, for comparison, the same roll with the drain
window cut short (a second SIGTERM at once), which is what a server without a drain does.

Prints a table and writes benchmarks/results/fleet.json.   .venv/bin/python benchmarks/fleet.py [--steady 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fleetsim
import modelgen
from fleetsim import Fleet, Load, Outcome, Replica, answer, logged_at, percentile, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
STRAGGLE_SECONDS = 1.0


def entry(name: str, base: Path) -> dict:
    return {"config": {"name": name, "base_path": str(base)}}


def latency_ms(outcomes: list[Outcome], q: float) -> float:
    return percentile([(o.ended - o.started) * 1000 for o in outcomes if o.ok], q)


def startup(replica: Replica, launched: float) -> dict[str, float]:
    """Process start → ready (wall), and the loading phase on the server's clock (first Loading → Server ready)."""
    log = replica.server.log  # type: ignore[union-attr]
    ready = logged_at(log, "Server ready")
    loading = logged_at(log, "Loading model")
    assert ready is not None and loading is not None
    return {"ready_s": ready - launched, "loading_s": ready - loading}


def roll(fleet: Fleet, served: list[str], cut_drain: bool) -> tuple[list[Outcome], list[float]]:
    """SIGTERM each replica in turn (a straggler hits it for 1 s), wait for its exit, start it again."""
    stragglers: list[Outcome] = []
    starts = []
    for replica in fleet.replicas:
        old = replica.server
        assert old is not None
        old.signal(signal.SIGTERM)
        if cut_drain:
            old.wait_for("health is NOT_SERVING")
            old.signal(signal.SIGTERM)
        straggler = Load(old.address, lambda: served, concurrency=1, balanced=False)
        timer = threading.Timer(STRAGGLE_SECONDS, straggler.stop)
        straggler.start()
        timer.start()
        timer.join()
        stragglers += straggler.outcomes
        assert old.proc.wait(60) == 0
        launched = time.time()
        fleet.start(replica)
        starts.append(startup(replica, launched)["ready_s"])
        before = fleet.requests_served(replica)
        wait_until(lambda r=replica, n=before: fleet.requests_served(r) > n + 10, 20, "traffic on the new replica")
    return stragglers, starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of steady load measured")
    parser.add_argument("--drain", type=float, default=2.0, help="the replicas' --drain_seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp), replicas=3, drain_seconds=args.drain)
        for name, delta in (("a", 1.0), ("b", 2.0), ("b-next", 20.0), ("c", 3.0)):
            modelgen.add_const(fleet.models / name / "1", delta=delta)
        for i in range(4):  # start-up work worth caching: four conv nets (~17 GFLOP each)
            modelgen.conv(fleet.models / f"conv{i}" / "1", seed=i)
        convs = [entry(f"conv{i}", fleet.models / f"conv{i}") for i in range(4)]
        fleet.write_config([entry("a", fleet.models / "a"), entry("b", fleet.models / "b"), *convs])
        served = ["a", "b"]
        result: dict[str, object] = {}
        try:
            first, *others = fleet.replicas
            launched = time.time()
            fleet.start(first)
            cold = startup(first, launched)
            warm = []
            for replica in others:
                launched = time.time()
                fleet.start(replica)
                warm.append(startup(replica, launched))
            result["startup"] = {
                "cold": cold,
                "shared_cache": {k: statistics.median(w[k] for w in warm) for k in cold},
            }

            load = Load(fleet.target, lambda: served, concurrency=4).start()
            wait_until(lambda: all(fleet.requests_served(r) > 0 for r in fleet.replicas), 10, "traffic everywhere")
            t0 = time.time()
            time.sleep(args.steady)
            steady = [o for o in load.outcomes if o.started >= t0]

            swapped = fleet.write_config([entry("a", fleet.models / "a"), entry("b", fleet.models / "b-next"),
                                          entry("c", fleet.models / "c"), *convs])  # fmt: skip
            converged = [
                max(
                    wait_until(lambda r=r: answer(r.server.address, "c") == 3.0, 30, "c", step=0.002),
                    wait_until(lambda r=r: answer(r.server.address, "b") == 20.0, 30, "new b", step=0.002),
                )
                - swapped
                for r in fleet.replicas
            ]
            loaded = [logged_at(r.server.log, "Loaded model c;") for r in fleet.replicas]  # type: ignore[union-attr]
            served.append("c")
            seen = wait_until(lambda: any(o.model == "c" and o.ok for o in load.outcomes), 10, "c via the balancer")
            result["swap"] = {
                "all_replicas_answer_s": max(converged),
                "all_replicas_loaded_s": max(t - swapped for t in loaded if t is not None),
                "balanced_client_sees_new_model_s": seen - swapped,
            }

            t1 = time.time()
            stragglers, restarts = roll(fleet, served, cut_drain=False)
            t2 = time.time()
            during = [o for o in load.outcomes if t1 <= o.started < t2]
            cut_stragglers, _ = roll(fleet, served, cut_drain=True)
            t3 = time.time()
            cut_balanced = [o for o in load.outcomes if t2 <= o.started < t3]
            outcomes = load.stop()
        finally:
            fleet.stop()
    result["requests"] = {
        "balanced": len([o for o in outcomes if o.started < t2]),
        "balanced_failed": sum(not o.ok for o in outcomes if o.started < t2),
        "straggler": len(stragglers),
        "straggler_failed": sum(not o.ok for o in stragglers),
    }
    result["latency_ms"] = {
        "steady_p50": latency_ms(steady, 50), "steady_p99": latency_ms(steady, 99),
        "roll_p50": latency_ms(during, 50), "roll_p99": latency_ms(during, 99),
    }  # fmt: skip
    result["restart_ready_s_median"] = statistics.median(restarts)
    result["without_drain"] = {
        "balanced": len(cut_balanced),
        "balanced_failed": sum(not o.ok for o in cut_balanced),
        "straggler": len(cut_stragglers),
        "straggler_failed": sum(not o.ok for o in cut_stragglers),
        "errors": sorted({o.error.split(":")[0] for o in cut_balanced + cut_stragglers if not o.ok}),
    }
    report(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'fleet.json'}")


def report(r: dict) -> None:
    req, lat, swap, up, cut = r["requests"], r["latency_ms"], r["swap"], r["startup"], r["without_drain"]
    rows = [
        ("requests through the balancer (steady, swap, roll)", f"{req['balanced']}, {req['balanced_failed']} failed"),
        ("straggler requests to terminating replicas", f"{req['straggler']}, {req['straggler_failed']} failed"),
        ("p50 / p99 steady", f"{lat['steady_p50']:.2f} / {lat['steady_p99']:.2f} ms"),
        ("p50 / p99 during the rolling restart", f"{lat['roll_p50']:.2f} / {lat['roll_p99']:.2f} ms"),
        ("swap → every replica answers the new config", f"{swap['all_replicas_answer_s'] * 1000:.0f} ms"),
        ("swap → balanced client gets the new model", f"{swap['balanced_client_sees_new_model_s'] * 1000:.0f} ms"),
        ("replica start, cold cache: ready / loading phase",
         f"{up['cold']['ready_s']:.2f} s / {up['cold']['loading_s'] * 1000:.0f} ms"),
        ("replica start, shared cache: ready / loading phase",
         f"{up['shared_cache']['ready_s']:.2f} s / {up['shared_cache']['loading_s'] * 1000:.0f} ms"),
        ("same roll, drain cut short: balanced / straggler failed",
         f"{cut['balanced_failed']} of {cut['balanced']} / {cut['straggler_failed']} of {cut['straggler']}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(f"| {'measurement'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    assert fleetsim  # the helpers live in tests/fleetsim.py
    main()
