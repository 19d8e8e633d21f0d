"""The version lifecycle under chosen interleavings (issue 9): real OpenVINO, real C test loader, in-process.

Each test pauses a compile, a loader hand-over, a drain or a free with a gate and releases it at the moment the
race needs, so the interleaving happens on every run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cffi import FFI
from lifecycle_env import Env, X, aio, loader_options

from engine.errors import ServingError
from engine.frontend.dataplane import Tensor
from engine.status import State

SPECIFIC_2 = {"specific": {"versions": [2]}}  # with only version 1 on disk: version 1 retires


@pytest.fixture
def gate_lib(build: Path, counters: Any) -> Any:
    """The test loader's gate: hs_loader_load_model blocks at its start while closed."""
    ffi = FFI()
    ffi.cdef("void hs_test_gate_close(void); void hs_test_gate_open(void); int hs_test_gate_waiting(void);")
    lib = ffi.dlopen(str(build / "libtestloader.so"))
    yield lib
    lib.hs_test_gate_open()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# ---- 1. reshape against retire and reload ----
@aio
async def test_retire_during_a_reshape_compile_frees_it_and_ends(env: Env) -> None:
    env.version("m", 1)
    env.model("m", shape="auto")
    assert (await env.reload()).ok
    gate = env.gates.arm("compile", "m", 1)
    request = asyncio.create_task(env.infer("m", x=np.ones((1, 12), np.float32)))  # another shape: reshape
    await gate.reached()
    env.model("m", shape="auto", model_version_policy=SPECIFIC_2)
    assert (await env.reload()).changed
    assert env.state("m", 1) == State.UNLOADING
    gate.release()
    with pytest.raises(ServingError, match="retired"):
        await request
    await env.reconciler.settle()
    assert env.state("m", 1) == State.END
    assert env.gates.balanced("m", 1, serving=0), "the reshape's compile must be freed, not leaked"
    await env.close()


@aio
async def test_a_reload_during_a_reshape_wins_and_the_request_is_reshaped_on_the_new_config(env: Env) -> None:
    env.version("m", 1)
    env.model("m", shape="auto", nireq=1)
    assert (await env.reload()).ok
    gate = env.gates.arm("compile", "m", 1)
    x = np.ones((1, 12), np.float32)
    request = asyncio.create_task(env.infer("m", x=x))
    await gate.reached()
    env.model("m", shape="auto", nireq=3)  # a reload: the new config must not be overwritten by the stale reshape
    assert (await env.reload()).ok
    assert env.served("m", 1).nireq == 3
    gate.release()
    version, out = await request
    assert version == 1
    np.testing.assert_allclose(out, x + 1.0)
    served = env.served("m", 1)
    assert (served.nireq, served.inputs[0].shape) == (3, (1, 12)), "reshaped again, from the new config"
    assert env.lifecycle.get("m", 1).applied.model.nireq == 3
    await env.reconciler.settle()
    assert env.gates.balanced("m", 1, serving=1)
    await env.close()


# ---- 2. any exception in a load is a failed version, retried by the backoff ----
@aio
async def test_any_exception_in_a_load_fails_the_version_with_its_error_and_backs_off(env: Env) -> None:
    env.version("m", 1)
    env.model("m")
    env.gates.arm("compiled", "m", 1, error=RuntimeError("infer requests could not be created"))
    result = await env.reload()
    assert not result.ok
    status = env.status("m", 1)
    assert status.failed and "RuntimeError: infer requests could not be created" in status.error_message
    assert (await env.reconciler.trigger()).errors == result.errors, "held by the backoff, reported again"
    assert env.gates.passed[("compile", "m", 1)] == 1, "no recompile on every poll"
    assert (await env.reload()).ok  # an operator's reload retries now
    assert env.state("m", 1) == State.AVAILABLE
    await env.close()


@aio
async def test_a_failed_reload_keeps_the_old_compile_serving(env: Env) -> None:
    env.version("m", 1)
    env.model("m", nireq=1)
    assert (await env.reload()).ok
    env.gates.arm("compiled", "m", 1, error=OSError(5, "Input/output error"))
    env.model("m", nireq=2)
    assert not (await env.reload()).ok
    assert env.state("m", 1) == State.AVAILABLE and env.served("m", 1).nireq == 1
    assert (await env.infer("m"))[0] == 1
    await env.close()


@aio
async def test_an_unusable_cache_folder_compiles_without_the_cache(tmp_path: Path, caplog: Any) -> None:
    env = Env(tmp_path, cache=True)
    env.version("m", 1)
    env.model("m")
    gate = env.gates.arm("compile", "m", 1)
    load = asyncio.create_task(env.reload())
    await gate.reached()
    for child in env.cache_dir.iterdir():  # the cache folder is deleted and a file takes its place
        child.unlink() if child.is_file() else subprocess.run(["rm", "-rf", str(child)], check=True)
    env.cache_dir.rmdir()
    env.cache_dir.write_text("not a folder")
    with caplog.at_level(logging.WARNING, "hotserve.modelmanager"):
        gate.release()
        assert (await load).ok
    assert env.state("m", 1) == State.AVAILABLE
    assert "compiling without the cache" in caplog.text
    np.testing.assert_allclose((await env.infer("m"))[1], X + 1.0)
    await env.close()


def test_a_full_disk_during_the_blob_write_still_serves(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(cache)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        filler = cache / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # leave no room for a blob
        try:
            while os.write(fd, b"\0" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)

        @aio
        async def scenario() -> None:
            env = Env(tmp_path, cache=True)
            env.version("m", 1, shape=(1, 4096))
            env.model("m")
            assert (await env.reload()).ok
            assert env.state("m", 1) == State.AVAILABLE and not env.status("m", 1).loaded_from_cache
            x = np.ones((1, 4096), np.float32)
            np.testing.assert_allclose((await env.infer("m", x=x))[1], x + 1.0)
            await env.close()

        scenario()
        assert not list(cache.rglob("*.blob")), "no room: OpenVINO wrote no blob"
    finally:
        subprocess.run(["umount", str(cache)], check=True)


# ---- 3. loader calls never block the event loop ----
@aio
async def test_a_decrypt_holding_the_loader_lock_does_not_freeze_serving(env: Env, gate_lib: Any) -> None:
    env.loader()
    env.version("plain", 1)
    env.model("plain")
    env.version("enc", 1)
    env.model("enc", shape="auto", custom_loader_options=loader_options())
    assert (await env.reload()).ok
    gate_lib.hs_test_gate_close()
    watchdog = threading.Timer(20, gate_lib.hs_test_gate_open)  # a frozen loop must fail the test, not hang it
    watchdog.start()
    x = np.ones((1, 12), np.float32)
    reshape = asyncio.create_task(env.infer("enc", x=x))  # its load_model blocks in the loader, lock held
    await env.until(lambda: gate_lib.hs_test_gate_waiting() == 1, "the load to block in the loader")
    poll = env.reconciler.trigger()  # a poll: its blacklist check waits for that lock...
    await asyncio.sleep(0.05)  # let it get there (the assertion below holds however far it got)
    for _ in range(3):
        assert (await env.infer("plain"))[0] == 1  # ...while the loop serves
    assert gate_lib.hs_test_gate_waiting() == 1, "served while the loader call was still blocked"
    env.lifecycle.life("plain", 1).retire()  # a plain model's free does not queue behind the blocked loader thread
    await env.until(lambda: env.state("plain", 1) == State.END, "the plain model to be freed")
    assert gate_lib.hs_test_gate_waiting() == 1
    watchdog.cancel()
    gate_lib.hs_test_gate_open()
    np.testing.assert_allclose((await reshape)[1], x + 1.0)
    assert (await poll).ok
    await env.close()


# ---- 4. shutdown in order; a closed loader is never used; buffers outlive OpenVINO's read ----
@aio
async def test_shutdown_during_a_loader_models_compile_waits_then_frees_then_deinits(env: Env, counters: Any) -> None:
    counters.reset()
    env.loader()
    env.version("enc", 1)
    env.model("enc", custom_loader_options=loader_options())
    env.write()
    gate = env.gates.arm("loaded", "enc", 1)
    start = env.reconciler.trigger()
    await gate.reached()  # the loader's buffers are out; OpenVINO is about to read them
    closing = asyncio.create_task(env.close())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done()
    assert (counters["deinit"], counters["live_buffers"]) == (0, 2), "nothing freed under the reader"
    gate.release()
    await closing
    await start
    assert (counters["load_model"], counters["release"], counters["live_buffers"]) == (1, 2, 0)
    assert (counters["unload_model"], counters["deinit"]) == (1, 1), "the discarded compile is unloaded, then deinit"
    assert env.state("enc", 1) == State.END


@aio
async def test_loader_entry_changed_during_a_reshape_keeps_the_old_handle_until_its_versions_are_freed(
    env: Env, counters: Any
) -> None:
    counters.reset()
    env.loader(cfg="")
    env.version("enc", 1)
    env.model("enc", shape="auto", custom_loader_options=loader_options())
    assert (await env.reload()).ok
    gate = env.gates.arm("loaded", "enc", 1)
    x = np.ones((1, 12), np.float32)
    request = asyncio.create_task(env.infer("enc", x=x))
    await gate.reached()
    env.loader(cfg="\n")  # a changed loader entry: re-init; the model reloads through the new handle
    assert (await env.reload()).ok
    assert (counters["init"], counters["deinit"]) == (2, 0), "the old handle's buffers are still being read"
    gate.release()
    np.testing.assert_allclose((await request)[1], x + 1.0)
    await env.reconciler.settle()
    assert (counters["deinit"], counters["live_buffers"]) == (1, 0), "old handle deinit once its loads unloaded"
    assert counters["unload_model"] == counters["load_model"] - 1, "all but the serving load unloaded"
    assert counters["release"] == 2 * counters["load_model"]
    await env.close()
    assert (counters["unload_model"], counters["deinit"]) == (counters["load_model"], 2)


@aio
async def test_loader_entry_removed_while_a_version_drains(env: Env, counters: Any) -> None:
    counters.reset()
    env.loader()
    env.version("enc", 1)
    env.model("enc", custom_loader_options=loader_options())
    assert (await env.reload()).ok
    async with env.registry.lease("enc", 1):  # an in-flight request
        del env.loaders["t"], env.models["enc"]
        await env.reload()
        assert env.state("enc", 1) == State.UNLOADING
        assert (counters["unload_model"], counters["deinit"]) == (0, 0)
    await env.reconciler.settle()
    assert env.state("enc", 1) == State.END
    # the loader itself left the config: its last load unloaded, then deinit (no retire_model for a going handle)
    assert (counters["unload_model"], counters["deinit"]) == (1, 1)
    await env.close()


@aio
async def test_shutdown_during_a_drain_waits_for_the_request(env: Env) -> None:
    env.version("m", 1)
    env.model("m")
    assert (await env.reload()).ok
    lease = env.registry.lease("m", 1)
    await lease.__aenter__()
    closing = asyncio.create_task(env.close())
    await env.until(lambda: env.state("m", 1) == State.UNLOADING, "shutdown to retire the version")
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done() and env.gates.passed[("free", "m", 1)] == 0
    await lease.__aexit__(None, None, None)
    await closing
    assert env.state("m", 1) == State.END and env.gates.balanced("m", 1, serving=0)


@aio
async def test_shutdown_during_a_compile_discards_it(env: Env) -> None:
    env.version("m", 1)
    env.model("m")
    env.write()
    gate = env.gates.arm("compile", "m", 1)
    start = env.reconciler.trigger()
    await gate.reached()
    closing = asyncio.create_task(env.close())
    await env.until(lambda: env.reconciler.closing, "shutdown to begin")
    assert (await env.reconciler.trigger()).errors == ("the server is shutting down",)
    gate.release()
    await closing
    await start
    assert env.state("m", 1) == State.END and env.gates.balanced("m", 1, serving=0)


# ---- 5. retire S1 → reload S2 → retire S2 ----
@aio
async def test_an_older_drain_never_ends_a_newer_compile(env: Env, counters: Any) -> None:
    counters.reset()
    env.loader()
    env.version("enc", 1)
    options = loader_options()
    env.model("enc", custom_loader_options=options)
    assert (await env.reload()).ok
    first = env.registry.lease("enc", 1)
    await first.__aenter__()  # S1 in flight
    env.model("enc", custom_loader_options=options, model_version_policy=SPECIFIC_2)
    await env.reload()  # retire S1
    env.model("enc", custom_loader_options=options)
    assert (await env.reload()).ok  # reload: S2
    second = env.registry.lease("enc", 1)
    await second.__aenter__()  # S2 in flight
    env.model("enc", custom_loader_options=options, model_version_policy=SPECIFIC_2)
    await env.reload()  # retire S2
    await first.__aexit__(None, None, None)
    life = env.lifecycle.get("enc", 1)
    await env.until(lambda: counters["unload_model"] == 1 and life.busy_count == 1, "S1 to be freed")
    assert env.state("enc", 1) == State.UNLOADING, "S2 still drains: no END"
    await second.__aexit__(None, None, None)
    await env.reconciler.settle()
    assert env.state("enc", 1) == State.END
    assert (counters["load_model"], counters["unload_model"]) == (2, 2)
    await env.close()


# ---- 6. a replaced loader version is unloaded ----
@aio
async def test_reload_and_reshape_of_a_loader_model_unload_the_replaced_compile(env: Env, counters: Any) -> None:
    counters.reset()
    env.loader()
    env.version("enc", 1)
    env.model("enc", shape="auto", nireq=1, custom_loader_options=loader_options())
    assert (await env.reload()).ok
    env.model("enc", shape="auto", nireq=2, custom_loader_options=loader_options())
    assert (await env.reload()).ok
    await env.reconciler.settle()
    assert (counters["load_model"], counters["unload_model"]) == (2, 1)
    await env.infer("enc", x=np.ones((1, 12), np.float32))  # reshape
    await env.reconciler.settle()
    assert (counters["load_model"], counters["unload_model"]) == (3, 2)
    await env.close()
    assert (counters["unload_model"], counters["live_buffers"], counters["deinit"]) == (3, 0, 1)


# ---- 7. a cancelled request keeps its version until OpenVINO is done ----
@aio
async def test_a_cancelled_request_holds_the_version_until_openvino_returns(env: Env) -> None:
    folder = env.root / "models" / "conv" / "1"
    import modelgen

    modelgen.conv(folder)
    env.model("conv", nireq=1)
    assert (await env.reload()).ok
    served = env.served("conv", 1)
    idle_at_free: list[int] = []
    original = env.gates.thread

    def record(point: str, name: str, version: int) -> None:
        if point == "free":
            idle_at_free.append(served._idle.qsize() if served._idle is not None else served.nireq)
        original(point, name, version)

    env.gates.thread = record  # type: ignore[method-assign]
    x = np.ones((1, 3, 224, 224), np.float32)
    request = asyncio.create_task(env.plane.infer("conv", None, [Tensor("input", "FP32", x.shape, x)]))
    await env.until(lambda: served._idle is not None and served._idle.qsize() == 0, "OpenVINO to start")
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    env.lifecycle.life("conv", 1).retire()  # at once, while OpenVINO still runs the cancelled request (~100 ms)
    await env.reconciler.settle()
    assert idle_at_free == [1], "freed only after OpenVINO handed the infer request back"
    assert env.state("conv", 1) == State.END
    await env.close()


@aio
async def test_a_cancel_that_meets_openvinos_completion_gives_the_infer_request_back(env: Env) -> None:
    """The cancel lands after OpenVINO's completion was queued but before the task ran: nothing runs any more, so
    the infer request must go back to the pool (it was lost, and with nireq 1 the version hung for good)."""
    env.version("m", 1)
    env.model("m", nireq=1)
    assert (await env.reload()).ok
    served = env.served("m", 1)
    finished = threading.Event()
    held: list[Any] = []

    def completion(call: Any) -> None:  # OpenVINO's thread: hold the first completion, pass the others on
        if not held:
            held.append(call)
            finished.set()
        else:
            served._loop.call_soon_threadsafe(served._complete, call)

    served._callback = completion  # type: ignore[method-assign]  # before the first inference sets the callbacks
    request = asyncio.create_task(env.infer("m"))
    assert await asyncio.to_thread(finished.wait, 30), "OpenVINO never finished"
    request.cancel()  # the task's wake-up is queued now ...
    served._complete(held[0])  # ... behind OpenVINO's completion, which the loop runs first
    with pytest.raises(asyncio.CancelledError):
        await request
    assert served._idle.qsize() == 1 and served.inflight == 0, "the infer request is back and the version not held"
    assert (await asyncio.wait_for(env.infer("m"), 30))[0] == 1
    await env.close()


@aio
async def test_a_cancel_arriving_after_openvino_finished_gives_the_infer_request_back(env: Env) -> None:
    """The cancel reaches the task after OpenVINO's callback was queued on the loop: nothing is left to wait for.
    (h2load ending 64 streams at once hit this: the only infer request leaked and the server stopped answering.)"""
    import modelgen

    modelgen.conv(env.root / "models" / "conv" / "1")
    env.model("conv", nireq=1)
    assert (await env.reload()).ok
    served = env.served("conv", 1)
    x = np.ones((1, 3, 224, 224), np.float32)
    request = asyncio.create_task(env.plane.infer("conv", None, [Tensor("input", "FP32", x.shape, x)]))
    await env.until(lambda: served._idle is not None and served._idle.qsize() == 0, "OpenVINO to start")
    served._requests[0].wait()  # blocks the loop until OpenVINO is done: its callback has queued the completion
    request.cancel()  # ...so the completion runs before the task sees its cancel
    with pytest.raises(asyncio.CancelledError):
        await request
    assert served._idle is not None and served._idle.qsize() == 1 and served.inflight == 0
    (output,) = (await env.plane.infer("conv", None, [Tensor("input", "FP32", x.shape, x)]))[1]
    assert output.data.shape[0] == 1
    await env.close()


# ---- 9. an invalid entry at start-up fails that model only ----
@aio
async def test_a_semantically_invalid_entry_at_start_up_is_listed_with_its_error(env: Env) -> None:
    env.loader()
    env.version("good", 1)
    env.version("bad", 1)
    env.model("good")
    env.model("bad", allow_cache=True, custom_loader_options=loader_options())
    result = await env.reload()
    assert not result.ok and any("allow_cache" in e for e in result.errors)
    assert env.state("good", 1) == State.AVAILABLE
    assert "allow_cache" in (env.registry.models["bad"].error or "")
    await env.close()


# ---- more interleavings ----
@aio
async def test_retire_during_the_first_load_ends_once_the_compile_returns(env: Env) -> None:
    env.version("m", 1)
    env.model("m")
    gate = env.gates.arm("compile", "m", 1)
    first = asyncio.create_task(env.reload())
    await gate.reached()
    assert env.state("m", 1) == State.LOADING
    assert env.lifecycle.life("m", 1).retire()  # e.g. its loader blacklisted it: retired while it compiles
    assert env.state("m", 1) == State.UNLOADING
    gate.release()
    await first  # the reconcile still wants version 1: it loads it again once the retired compile is freed
    await env.reconciler.settle()
    states = [state for name, _, state in env.history if name == "m"]
    after = states[states.index(State.UNLOADING) :]
    assert after[-3:] == [State.START, State.LOADING, State.AVAILABLE], states  # END in between only if freed first
    assert env.gates.passed[("compile", "m", 1)] == 2 and env.gates.balanced("m", 1, serving=1)
    assert env.violations == []
    await env.close()


@aio
async def test_shutdown_starts_no_further_compile_nor_reconcile(env: Env) -> None:
    for version in (1, 2, 3):
        env.version("m", version)
    env.model("m", model_version_policy={"all": {}})
    env.write()
    gate = env.gates.arm("compile", "m", 1)
    start = env.reconciler.trigger()
    await gate.reached()
    queued = env.reconciler.trigger()  # would coalesce into one more run
    closing = asyncio.create_task(env.close())
    await env.until(lambda: env.reconciler.closing, "shutdown to begin")
    gate.release()
    await closing
    await start
    assert (await queued).errors == ("the server is shutting down",)
    assert [env.gates.passed[("compile", "m", v)] for v in (1, 2, 3)] == [1, 0, 0]
    assert env.reconciler.runs == 1


@aio
async def test_a_cancelled_reshape_request_does_not_leave_its_compile_queued(env: Env) -> None:
    env.version("m", 1)
    env.model("m", shape="auto")
    assert (await env.reload()).ok
    gate = env.gates.arm("compile", "m", 1)
    first = asyncio.create_task(env.infer("m", x=np.ones((1, 11), np.float32)))
    await gate.reached()  # its compile holds one pool thread...
    blocker = env.lifecycle._compile_pool.submit(gate.released.wait)  # ...and the other thread is busy too
    first.cancel()  # the client gives up while its compile runs: that compile is freed when it returns
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(env.infer("m", x=np.ones((1, 12), np.float32)))
    await env.until(lambda: len(env.lifecycle._compiling) == 2, "the second reshape to be queued")
    second.cancel()  # gives up while its compile still waits for a thread: it must never run
    await asyncio.gather(second, return_exceptions=True)
    gate.release()
    blocker.result(timeout=30)
    await env.reconciler.settle()
    assert env.gates.passed[("compile", "m", 1)] == 2, "only the load and the running reshape ever compiled"
    assert env.gates.balanced("m", 1, serving=1) and env.served("m", 1).inputs[0].shape == (1, 10)
    await env.close()


@aio
async def test_an_invalid_entry_removed_from_the_config_leaves_no_ghost(env: Env) -> None:
    env.loader()
    env.version("good", 1)
    env.version("bad", 1)
    env.model("good")
    env.model("bad", allow_cache=True, custom_loader_options=loader_options())
    await env.reload()
    assert env.registry.models["bad"].error
    del env.models["bad"]
    assert (await env.reload()).ok
    assert "bad" not in env.registry.models
    await env.close()


@aio
async def test_loader_removed_during_a_reshape_compile_is_deinitialised_after_it(env: Env, counters: Any) -> None:
    counters.reset()
    env.loader()
    env.version("enc", 1)
    env.version("plain", 1)
    env.model("enc", shape="auto", custom_loader_options=loader_options())
    env.model("plain")
    assert (await env.reload()).ok
    gate = env.gates.arm("loaded", "enc", 1)
    request = asyncio.create_task(env.infer("enc", x=np.ones((1, 12), np.float32)))
    await gate.reached()  # the reshape's buffers are out
    del env.loaders["t"], env.models["enc"]
    await env.reload()
    assert (counters["deinit"], counters["live_buffers"]) == (0, 2), "buffers being read outlive the removal"
    gate.release()
    with pytest.raises(ServingError):
        await request
    await env.reconciler.settle()
    assert env.state("enc", 1) == State.END
    assert (counters["load_model"], counters["unload_model"], counters["live_buffers"], counters["deinit"]) == (
        2, 2, 0, 1)  # fmt: skip
    await env.close()
