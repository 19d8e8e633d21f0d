"""Version labels and traffic weights (issue 13): the pure resolution (engine/routing.py) and, in-process over the
real reconciler, lifecycle and OpenVINO, a label moved to a version whose compile the test holds (Gates)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lifecycle_env import Env, X, aio
from stats import binomial_bound, random_keys

from engine.config import Routing
from engine.errors import Code, ServingError
from engine.frontend.dataplane import Tensor
from engine.routing import NO_ROUTES, Routes, resolve
from engine.status import State

KEYS = 20_000


def routes(traffic: dict[int | str, int], available: set[int], labels: dict[str, int] | None = None) -> Routes:
    routing = Routing(labels or {}, tuple(traffic.items()))
    return resolve("m", routing, available, NO_ROUTES)[0]


# ---- pure: rendezvous hashing ----
def test_a_weight_change_moves_only_the_keys_it_must() -> None:
    """90/10 → 80/20: weighted rendezvous hashing moves keys only to the version whose weight grew, ~10 % of them."""
    before, after = routes({3: 90, 4: 10}, {3, 4}), routes({3: 80, 4: 20}, {3, 4})
    keys = random_keys(KEYS)
    moved = [k for k in keys if before.route(k) != after.route(k)]
    assert all(before.route(k) == 3 and after.route(k) == 4 for k in moved), "a key moved away from the canary"
    bound = binomial_bound(KEYS, 0.10)
    assert abs(len(moved) - 0.10 * KEYS) <= bound, (len(moved), bound)
    on_canary = sum(after.route(k) == 4 for k in keys)
    assert abs(on_canary - 0.20 * KEYS) <= binomial_bound(KEYS, 0.20)


def test_a_key_lands_on_the_same_version_for_the_same_weights_and_an_unavailable_versions_keys_spread() -> None:
    keys = random_keys(2000)
    first = routes({1: 50, 2: 30, 3: 20}, {1, 2, 3})
    again = routes({"a": 50, 2: 30, 3: 20}, {1, 2, 3}, labels={"a": 1})  # the same weights, spelled with a label
    assert [first.route(k) for k in keys] == [again.route(k) for k in keys]
    without = routes({1: 50, 2: 30, 3: 20}, {1, 3})  # version 2 is not AVAILABLE: only its keys move
    for key in keys:
        if first.route(key) != 2:
            assert without.route(key) == first.route(key)
        else:
            assert without.route(key) in (1, 3)
    assert routes({1: 50, 2: 0}, {1, 2}).route(keys[0]) == 1, "a version of weight 0 is never chosen"


def test_draws_follow_the_weights_and_skip_what_is_not_available() -> None:
    table = routes({1: 70, 2: 30, 3: 5}, {1, 2})
    n = 20_000
    drawn = [table.draw() for _ in range(n)]
    assert set(drawn) == {1, 2}, "version 3 is not AVAILABLE: its weight goes to the others"
    assert abs(drawn.count(2) - n * 0.3) <= binomial_bound(n, 0.3)
    assert table.main == 1 and routes({1: 5, 2: 5}, {1, 2}).main == 2, "most weighted; a tie: the higher version"
    assert routes({1: 5}, set()).draw() is None
    assert routes({1: 5}, set()).route("k") is None


def test_labels_are_availability_first() -> None:
    routing = Routing({"stable": 3}, ())
    start, _ = resolve("m", routing, {3}, NO_ROUTES)
    assert start.labels == {"stable": 3} and start.pending == {}
    moved, said = resolve("m", Routing({"stable": 4}, ()), {3}, start)
    assert moved.labels == {"stable": 3} and moved.pending == {"stable": 4}
    assert said == ["Version label stable of model m stays on version 3 until version 4 is AVAILABLE"]
    assert resolve("m", Routing({"stable": 4}, ()), {3}, moved)[1] == [], "logged once per transition"
    switched, said = resolve("m", Routing({"stable": 4}, ()), {3, 4}, moved)
    assert switched.labels == {"stable": 4} and switched.pending == {}
    assert said == ["Version label stable of model m now points at version 4 (was 3)"]
    fresh, _ = resolve("m", Routing({"canary": 9}, ()), set(), NO_ROUTES)
    assert fresh.labels == {"canary": 9}, "a new label names its version at once (requests wait for its load)"
    unready, _ = resolve("m", Routing({"stable": 3}, ()), set(), NO_ROUTES)
    gone, _ = resolve("m", Routing({"stable": 4}, ()), {4}, unready)
    assert gone.labels == {"stable": 4}, "nothing AVAILABLE to stay on: the label moves"
    assert switched.names == {4: "stable"} and routes({}, {1}, {"b": 1, "a": 1}).names == {1: "a,b"}


# ---- in-process: the real reconciler and lifecycle ----
@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def by_label(env: Env, label: str) -> int:
    number, outputs = await env.plane.infer("m", label, [Tensor("b", "FP32", (1, 10), X)])
    np.testing.assert_allclose(outputs[0].data, X + number)  # version v adds v: the answer is that version's
    return number


@aio
async def test_a_label_moved_to_a_loading_version_waits_then_switches_with_no_failed_request(env: Env) -> None:
    env.version("m", 3)
    env.model("m", model_version_policy={"specific": {"versions": [3]}}, version_labels={"stable": 3})
    assert (await env.reload()).ok
    env.version("m", 4)
    env.model("m", model_version_policy={"specific": {"versions": [3, 4]}}, version_labels={"stable": 4})
    gate = env.gates.arm("compile", "m", 4)
    reload = asyncio.create_task(env.reload())
    await gate.reached()
    model = env.registry.models["m"]
    assert model.routes.labels == {"stable": 3} and model.routes.pending == {"stable": 4}
    seen: list[list[int]] = [[] for _ in range(4)]
    done = asyncio.Event()
    broken: list[str] = []

    async def client(i: int) -> None:
        while not done.is_set():
            target = model.routes.labels["stable"]
            if env.state("m", target) != State.AVAILABLE:
                broken.append(f"the label pointed at version {target} while it was {env.state('m', target)}")
            seen[i].append(await by_label(env, "stable"))
            await asyncio.sleep(0)

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    await env.until(lambda: all(len(s) >= 50 for s in seen), "50 requests per client while version 4 compiles")
    assert all(set(s) == {3} for s in seen), "the label stays on version 3 while 4 is not AVAILABLE"
    gate.release()
    assert (await reload).ok
    marks = [len(s) for s in seen]
    await env.until(lambda: all(len(s) >= m + 20 for s, m in zip(seen, marks, strict=True)), "20 more each")
    done.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    assert not broken
    for s in seen:
        first4 = s.index(4)
        assert set(s[:first4]) == {3} and set(s[first4:]) == {4}, "switched once, atomically"
    assert env.gates.passed[("compile", "m", 3)] == 1, "version 3 was never reloaded"
    await env.close()


@aio
async def test_a_label_with_nothing_available_to_stay_on_meets_its_versions_error(env: Env) -> None:
    env.version("m", 1)
    env.model("m", model_version_policy={"specific": {"versions": [1]}}, version_labels={"stable": 1})
    assert (await env.reload()).ok
    env.version("m", 2)
    env.gates.arm("compile", "m", 2, error=RuntimeError("out of memory"))
    env.model("m", model_version_policy={"specific": {"versions": [2]}}, version_labels={"stable": 2})
    assert not (await env.reload()).ok
    await env.reconciler.settle()  # the policy no longer wants version 1: it retires
    view = env.plane.model_view("m")
    assert env.state("m", 1) == State.END and view.labels(2) == ("stable",), "nothing to stay on: the label moves"
    assert "out of memory" in env.status("m", 2).error_message
    with pytest.raises(ServingError) as caught:
        await by_label(env, "stable")
    assert caught.value.code == Code.MODEL_VERSION_NOT_LOADED_YET and "out of memory" in str(caught.value)
    await env.close()


@aio
async def test_a_failed_canary_keeps_the_label_on_the_serving_version(env: Env) -> None:
    env.version("m", 1)
    env.model("m", model_version_policy={"all": {}}, version_labels={"stable": 1})
    assert (await env.reload()).ok
    env.version("m", 2)
    env.gates.arm("compile", "m", 2, error=RuntimeError("out of memory"))
    env.model("m", model_version_policy={"all": {}}, version_labels={"stable": 2})
    assert not (await env.reload()).ok
    view = env.plane.model_view("m")
    assert view.labels(1) == ("stable",) and view.pending_labels(2) == ("stable",)
    assert "out of memory" in env.status("m", 2).error_message
    assert await by_label(env, "stable") == 1
    assert (await env.reload()).ok, "an operator's reload retries version 2"
    assert await by_label(env, "stable") == 2
    await env.close()


@aio
async def test_label_and_traffic_edits_apply_live_without_touching_a_version(env: Env, caplog: Any) -> None:
    for v in (1, 2, 3):
        env.version("m", v)
    env.version("m", 4)
    env.gates.arm("compile", "m", 4, error=RuntimeError("broken canary"))
    env.model("m", model_version_policy={"all": {}})
    assert not (await env.reload()).ok
    compiles = {v: env.gates.passed[("compile", "m", v)] for v in (1, 2, 3, 4)}
    generations = {v: env.lifecycle.get("m", v).generation for v in (1, 2, 3, 4)}
    caplog.set_level(logging.INFO, "hotserve")
    edits: list[dict[str, Any]] = [
        {"version_labels": {"stable": 1, "canary": 2}},
        {"version_labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 90, "canary": 10}},
        {"version_labels": {"stable": 2}, "traffic": {"1": 1, "stable": 3, "4": 5}},
        {},
    ]
    for edit in edits:
        env.model("m", model_version_policy={"all": {}}, **edit)
        env.write()
        result = await env.reconciler.trigger()  # not forced: a forced reload would retry the failed version
        assert result.changed, edit
    assert {v: env.gates.passed[("compile", "m", v)] for v in (1, 2, 3, 4)} == compiles, "no compile, no retry"
    assert {v: env.lifecycle.get("m", v).generation for v in (1, 2, 3, 4)} == generations
    assert "Will reload model" not in caplog.text and "Will add model" not in caplog.text
    traffic = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Traffic of model m")]
    assert traffic == [
        "Traffic of model m: version 1 90 %, version 2 10 %",
        "Traffic of model m: version 1 25 %, version 2 75 % (not AVAILABLE, their weight goes to the others: 4)",
        "Traffic of model m: none configured; requests without a version get the default version",
    ]
    assert (await env.infer("m"))[0] == 3, "no traffic: the default version again"
    await env.close()


@aio
async def test_traffic_draws_only_weighted_available_versions_and_logs_once(env: Env, caplog: Any) -> None:
    for v in (1, 2, 3):
        env.version("m", v)
    env.model("m", model_version_policy={"all": {}}, traffic={"1": 1, "2": 1})
    assert (await env.reload()).ok
    caplog.set_level(logging.INFO, "hotserve")
    got = [(await env.infer("m"))[0] for _ in range(200)]
    assert set(got) == {1, 2}, "version 3 has no weight: never drawn"
    env.drop_version("m", 2)  # its folder deleted: the policy retires it, its weight stays configured
    assert (await env.reload()).ok
    await env.reconciler.settle()
    got = [(await env.infer("m"))[0] for _ in range(200)]
    assert set(got) == {1}, "version 2 retired: its weight goes to version 1"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Traffic of model m")]
    assert lines == ["Traffic of model m: version 1 100 % (not AVAILABLE, their weight goes to the others: 2)"]
    env.drop_version("m", 1)
    assert (await env.reload()).ok
    with pytest.raises(ServingError) as caught:
        await env.infer("m")
    assert caught.value.code == Code.MODEL_VERSION_MISSING and "no version that traffic names" in str(caught.value)
    await env.close()


@aio
async def test_unknown_label_and_bad_version_strings(env: Env) -> None:
    from engine.frontend.dataplane import parse_version

    env.version("m", 1)
    env.model("m", version_labels={"stable": 1})
    assert (await env.reload()).ok
    with pytest.raises(ServingError) as caught:
        await by_label(env, "nope")
    assert caught.value.code == Code.MODEL_VERSION_LABEL_MISSING
    assert str(caught.value) == "Model with requested version label is not found - label: nope"
    assert parse_version("") is None and parse_version("7") == 7 and parse_version("canary") == "canary"
    with pytest.raises(ServingError) as bad:
        parse_version("1.5")
    assert bad.value.code == Code.MODEL_VERSION_INVALID_FORMAT
    assert "1.5 is neither a version number nor a version label" in str(bad.value)
    await env.close()


@pytest.mark.parametrize("text", ["\u0663", "1_0", " 2", "2 ", "+2", "-1", "\uff12", "9" * 5000])
def test_a_version_string_is_ascii_digits_or_a_label(text: str) -> None:
    """Python's int() reads "٣" as 3 and "1_0" as 10: a request version is ASCII digits, or a label, or refused."""
    from engine.frontend.dataplane import parse_version

    with pytest.raises(ServingError) as bad:
        parse_version(text)
    assert bad.value.code == Code.MODEL_VERSION_INVALID_FORMAT, text
    assert "is neither a version number nor a version label" in str(bad.value)
    assert parse_version("03") == 3 and parse_version("0") == 0


@aio
async def test_a_label_moved_to_a_version_the_same_edit_retires_is_refused(env: Env) -> None:
    """Moving `stable` to version 4 while the specific policy drops 4 would move the label at once (4 is AVAILABLE)
    and then retire 4 under it, with version 3 AVAILABLE: the entry is a config error and nothing changes."""
    for v in (3, 4):
        env.version("m", v)
    env.model("m", model_version_policy={"specific": {"versions": [3, 4]}}, version_labels={"stable": 3})
    assert (await env.reload()).ok
    env.model("m", model_version_policy={"specific": {"versions": [3]}}, version_labels={"stable": 4})
    result = await env.reload()
    await env.reconciler.settle()
    assert not result.ok and "version 4 is not in model_version_policy specific versions [3]" in result.errors[0]
    assert env.state("m", 4) == State.AVAILABLE and await by_label(env, "stable") == 3, "the entry stays as it was"
    await env.close()


@aio
async def test_a_traffic_edit_applies_while_another_version_compiles(env: Env) -> None:
    """A rollback of the weights must not wait for a compile: the run that loads version 3 (held here) would delay
    the coalesced run that applies the edit until the compile ends, minutes for a large model."""
    for v in (1, 2):
        env.version("m", v)
    env.model("m", model_version_policy={"all": {}}, traffic={"1": 100})
    assert (await env.reload()).ok
    env.version("m", 3)
    gate = env.gates.arm("compile", "m", 3)
    loading = env.reconciler.trigger(force=True)
    await gate.reached()
    env.model("m", model_version_policy={"all": {}}, traffic={"2": 100})
    env.write()
    edit = env.reconciler.trigger()

    def routes() -> Routes:
        return env.registry.models["m"].routes

    await env.until(lambda: routes().drawn == ((2, 100),), "the new weights while version 3 compiles")
    assert {(await env.infer("m"))[0] for _ in range(20)} == {2}
    assert env.state("m", 3) == State.LOADING and not loading.done()
    gate.release()
    assert (await loading).ok and (await edit).ok
    assert (await edit).changed, "the run after the compile reports the routing change it carries"
    assert routes().drawn == ((2, 100),) and env.state("m", 3) == State.AVAILABLE
    await env.close()


@aio
async def test_a_drawn_requests_failure_is_counted_on_the_version_it_was_drawn_to(env: Env) -> None:
    """The canary's failures are what an operator watches (README: hotserve_request_failures_total{version="4"}):
    a request drawn to it that fails must count there, not on version ""."""
    from engine.frontend.dataplane import DataPlane
    from engine.metrics import Metrics

    for v in (1, 2):
        env.version("m", v)
    env.model("m", model_version_policy={"all": {}}, version_labels={"canary": 2}, traffic={"canary": 100})
    assert (await env.reload()).ok
    metrics = Metrics(env.registry, env.reconciler, None)
    plane = DataPlane(env.registry, env.reload, lambda: None, env.reconciler.reshape, observe=metrics.observe)
    with pytest.raises(ServingError) as bad:
        await plane.infer("m", None, [Tensor("b", "FP32", (1, 5), X[:, :5])])  # a shape the canary refuses
    assert bad.value.code == Code.INVALID_SHAPE
    text = metrics.render().decode()
    assert 'hotserve_request_failures_total{api="kserve",model="m",version="2",version_label="canary"} 1.0' in text
    await env.close()


@aio
async def test_a_label_whose_new_version_retires_goes_back_to_its_available_previous_one(env: Env) -> None:
    """The run loading version 5 read a file that retires version 4; an edit during the compile moves `stable` to
    4 (AVAILABLE, so at once) and keeps 4. When that run then retires 4, `stable` must not point at a retired
    version while 3, the one it left, is AVAILABLE: it goes back to 3 until the next run has 4 AVAILABLE again."""
    for v in (3, 4, 5):
        env.version("m", v)
    env.model("m", model_version_policy={"specific": {"versions": [3, 4]}}, version_labels={"stable": 3})
    assert (await env.reload()).ok
    first = env.gates.arm("compile", "m", 5)
    env.model("m", model_version_policy={"specific": {"versions": [3, 5]}}, version_labels={"stable": 3})
    env.write()
    loading = env.reconciler.trigger(force=True)
    await first.reached()
    env.model("m", model_version_policy={"specific": {"versions": [3, 4, 5]}}, version_labels={"stable": 4})
    env.write()
    edit = env.reconciler.trigger(force=True)  # forced: the next run loads version 4 again without a quiet wait
    model = env.registry.models["m"]
    await env.until(lambda: model.routes.labels == {"stable": 4}, "the label edit while version 5 compiles")
    again = env.gates.arm("compile", "m", 4)  # the next run reloads version 4: hold it
    first.release()
    assert (await loading).ok
    await again.reached()
    assert env.state("m", 4) == State.LOADING, "the first run retired version 4; the next one loads it again"
    assert model.routes.labels == {"stable": 3} and model.routes.pending == {"stable": 4}
    assert await by_label(env, "stable") == 3
    again.release()
    assert (await edit).ok
    assert model.routes.labels == {"stable": 4} and await by_label(env, "stable") == 4
    await env.close()


def test_a_label_goes_back_to_the_version_it_left_while_its_own_is_not_available() -> None:
    moved, _ = resolve("m", Routing({"stable": 4}, ()), {3, 4}, resolve("m", Routing({"stable": 3}, ()), {3, 4},
                                                                       NO_ROUTES)[0])  # fmt: skip
    assert moved.labels == {"stable": 4}
    back, said = resolve("m", Routing({"stable": 4}, ()), {3}, moved)
    assert back.labels == {"stable": 3} and back.pending == {"stable": 4}
    assert said == ["Version label stable of model m now points at version 3 (was 4)",
                    "Version label stable of model m stays on version 3 until version 4 is AVAILABLE"]  # fmt: skip
    again, _ = resolve("m", Routing({"stable": 4}, ()), {3, 4}, back)
    assert again.labels == {"stable": 4} and again.pending == {}
    assert resolve("m", Routing({"stable": 4}, ()), set(), back)[0].labels == {"stable": 4}, "nothing to go back to"


@aio
async def test_a_run_that_read_the_file_before_an_edit_does_not_undo_it_while_it_compiles(env: Env) -> None:
    """The run read the file, then the weights were edited: the run applies the routing it read, and the edit must
    be applied again after that, not before (it would be undone until the run's compiles end)."""
    for v in (1, 2):
        env.version("m", v)
    env.model("m", model_version_policy={"all": {}}, traffic={"1": 100})
    assert (await env.reload()).ok
    env.version("m", 3)
    compiling = env.gates.arm("compile", "m", 3)
    read, go_on = threading.Event(), threading.Event()
    source = env.reconciler._source

    def held_once() -> Any:  # the run's read of models.json returns, then waits for the test
        config = source()
        if not read.is_set():
            read.set()
            assert go_on.wait(30)
        return config

    env.reconciler._source = held_once
    loading = env.reconciler.trigger(force=True)
    assert await asyncio.to_thread(read.wait, 30)
    env.model("m", model_version_policy={"all": {}}, traffic={"2": 100})
    env.write()
    edit = env.reconciler.trigger()
    if env.reconciler._router is not None:  # a router started before the run's routing: let it finish first
        await env.reconciler._router
    go_on.set()
    await compiling.reached()
    model = env.registry.models["m"]
    await env.until(lambda: model.routes.drawn == ((2, 100),), "the edit applied after the run's own routing")
    assert not loading.done()
    compiling.release()
    assert (await loading).ok and (await edit).ok and model.routes.drawn == ((2, 100),)
    await env.close()
