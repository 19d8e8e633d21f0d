"""Random sequences of edits, folder changes, reshapes, requests and cancellations; invariants after every step.

In-process over the real Runtime and the real C test loader. HOTSERVE_PROPERTY_EXAMPLES raises the example count
(default 15 in `make test`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lifecycle_env import Env, X, loader_options

from engine.errors import ServingError
from engine.status import State

EXAMPLES = int(os.environ.get("HOTSERVE_PROPERTY_EXAMPLES", "15"))
MODELS = ("a", "b")  # a: plain IR; b: through the test loader, shape auto
VERSIONS = (1, 2, 3)
OTHER_SHAPE = np.ones((1, 12), np.float32)

step = st.one_of(
    st.tuples(st.just("nireq"), st.sampled_from(MODELS)),
    st.tuples(st.just("add"), st.sampled_from(MODELS), st.sampled_from(VERSIONS)),
    st.tuples(st.just("drop"), st.sampled_from(MODELS), st.sampled_from(VERSIONS)),
    st.tuples(st.just("policy"), st.sampled_from(MODELS), st.sampled_from(("latest", "all"))),
    st.tuples(st.just("presence"), st.sampled_from(MODELS)),
    st.tuples(st.just("request"), st.sampled_from(MODELS), st.sampled_from((None, *VERSIONS))),
    st.tuples(st.just("reshape"), st.just("b")),
    st.tuples(st.just("cancel"), st.sampled_from(MODELS)),
    st.tuples(st.just("during"), st.sampled_from(MODELS)),  # requests while a reload runs
)


def delta(name: str, version: int) -> float:
    return float(version) + (10.0 if name == "b" else 0.0)


class World:
    def __init__(self, root: Path) -> None:
        self.env = Env(root)
        self.env.loader()
        self.knobs: dict[str, dict[str, Any]] = {m: {"nireq": 1, "policy": "all", "present": True} for m in MODELS}
        self.on_disk: dict[str, set[int]] = {m: {1} for m in MODELS}
        for name in MODELS:
            self.env.version(name, 1, delta=delta(name, 1))
        self.apply()

    def apply(self) -> None:
        self.env.models.clear()
        for name, knobs in self.knobs.items():
            if not knobs["present"]:
                continue
            policy = {"all": {}} if knobs["policy"] == "all" else {"latest": {"num_versions": 1}}
            extra: dict[str, Any] = {"nireq": knobs["nireq"], "model_version_policy": policy}
            if name == "b":
                extra |= {"shape": "auto", "custom_loader_options": loader_options()}
            self.env.model(name, **extra)

    async def request(self, name: str, version: int | None, x: np.ndarray = X) -> None:
        try:
            number, out = await self.env.infer(name, version, x)
        except ServingError:
            return  # not served right now: a clear error is a fine answer
        np.testing.assert_allclose(out, x + delta(name, number), err_msg="answered by the version it names")
        assert version in (None, number)

    async def do(self, op: tuple[Any, ...]) -> None:
        kind, name = op[0], op[1]
        if kind == "nireq":
            self.knobs[name]["nireq"] = 3 - self.knobs[name]["nireq"]
        elif kind == "add":
            if op[2] not in self.on_disk[name]:
                self.env.version(name, op[2], delta=delta(name, op[2]))
                self.on_disk[name].add(op[2])
        elif kind == "drop":
            if op[2] in self.on_disk[name]:
                self.env.drop_version(name, op[2])
                self.on_disk[name].discard(op[2])
        elif kind == "policy":
            self.knobs[name]["policy"] = op[2]
        elif kind == "presence":
            self.knobs[name]["present"] = not self.knobs[name]["present"]
        elif kind == "request":
            await self.request(name, op[2])
            return
        elif kind == "reshape":
            await self.request(name, None, OTHER_SHAPE)
            return
        elif kind == "cancel":
            task = asyncio.create_task(self.request(name, None))
            for _ in range(3):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        elif kind == "during":
            self.knobs[name]["nireq"] = 3 - self.knobs[name]["nireq"]
            self.apply()
            reload = self.env.reload()
            await asyncio.gather(reload, *(self.request(m, None) for m in MODELS for _ in range(3)))
            return
        self.apply()
        await self.env.reload()

    def check(self, counters: Any) -> None:
        env = self.env
        assert env.violations == []
        loader_serving = 0
        for name, model in env.registry.models.items():
            for version, slot in model.slots.items():
                status = slot.status
                assert status.state in (State.AVAILABLE, State.END) or status.failed, (name, version, status)
                assert (slot.served is not None) == (status.state == State.AVAILABLE), (name, version, status)
                serving = int(status.state == State.AVAILABLE)
                assert env.gates.balanced(name, version, serving), ("a compile leaked or was freed twice", name)
                if name == "b":
                    loader_serving += serving
        assert counters["live_buffers"] == 0
        assert counters["release"] == 2 * counters["load_model"], "every loader load's buffers released once"
        assert counters["unload_model"] == counters["load_model"] - loader_serving, "every freed load unloaded once"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=8))
def test_random_lifecycles_keep_the_invariants(steps: list[tuple[Any, ...]], counters: Any) -> None:
    counters.reset()

    async def scenario(root: Path) -> None:
        world = World(root)
        await world.env.reload()
        await world.env.reconciler.settle()
        world.check(counters)
        for op in steps:
            await world.do(op)
            await world.env.reconciler.settle()
            world.check(counters)
        await world.env.close()
        assert counters["unload_model"] == counters["load_model"] and counters["deinit"] == counters["init"]

    with tempfile.TemporaryDirectory() as root:
        asyncio.run(asyncio.wait_for(scenario(Path(root)), 120))
