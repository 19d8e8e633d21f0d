"""OpenVINO: read (files or loader buffers) → reshape → compile (with or without cache) → a served version."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from . import batching, versions
from . import cache as cache_rules
from .config import AUTO, ModelConfig
from .plaintext import owned_copy
from .served import ServedVersion

log = logging.getLogger("hotserve.modelmanager")


RESHAPE_FAILED = "Model could not be reshaped with requested shape"
WITHHELD = "OpenVINO's message is withheld for a custom-loader model (it may quote the decrypted model)"


class LoadError(Exception):
    """A version could not be loaded; the message is the real reason, shown in status."""


@dataclass(frozen=True)
class Source:
    """Where a version's model comes from: files on disk, or buffers handed over by a custom loader."""

    version_dir: Path
    loaded: object | None = None  # engine.loader_bridge.LoadedModel when a custom loader is used


def _dimension(text: str) -> ov.Dimension:
    if text == "-1":
        return ov.Dimension()
    if ":" in text:
        lo, hi = text.split(":")
        return ov.Dimension(int(lo), int(hi))
    return ov.Dimension(int(text))


def _batch_index(layout: str | None) -> int:
    """The batch axis: the N of the model-side layout, else the first axis (OVMS's default layout N...)."""
    if layout:
        model_side = layout.split(":")[-1]
        if "N" in model_side and "..." not in model_side.split("N")[0]:
            return model_side.index("N")
    return 0


def _layout_for(model: ModelConfig, name: str, only_input: bool) -> str | None:
    if not model.layout:
        return None
    if name in model.layout:
        return model.layout[name]
    return model.layout.get(None) if only_input else None


def _apply_layout(ov_model: ov.Model, model: ModelConfig) -> ov.Model:
    if not model.layout:
        return ov_model
    ppp = ov.preprocess.PrePostProcessor(ov_model)
    single = len(ov_model.inputs) == 1
    for port in ov_model.inputs:
        layout = _layout_for(model, port.any_name, single)
        if layout is None:
            continue
        request_side, _, model_side = layout.partition(":")
        if model_side:
            ppp.input(port.any_name).tensor().set_layout(ov.Layout(request_side))
            ppp.input(port.any_name).model().set_layout(ov.Layout(model_side))
        else:
            ppp.input(port.any_name).model().set_layout(ov.Layout(request_side))
    for port in ov_model.outputs:
        layout = model.layout.get(port.any_name)
        if layout is None:
            continue
        model_side, _, request_side = layout.partition(":")
        ppp.output(port.any_name).model().set_layout(ov.Layout(model_side))
        if request_side:
            ppp.output(port.any_name).tensor().set_layout(ov.Layout(request_side))
    return ppp.build()


def _reshape(ov_model: ov.Model, model: ModelConfig, requested: Mapping[str, tuple[int, ...]] | None) -> None:
    """Apply the configured shape or batch; `requested` (auto mode) overrides with a request's shapes."""
    names = [p.any_name for p in ov_model.inputs]
    shapes: dict[str, ov.PartialShape] = {}
    if model.shape:
        for key, value in model.shape.items():
            if key is None and len(names) != 1:
                raise LoadError(f"shape without an input name needs a single-input model; inputs: {', '.join(names)}")
            name = names[0] if key is None else key
            if name not in names:
                raise LoadError(
                    f"shape given for input {name!r}, which the model does not have; inputs: {', '.join(names)}"
                )
            if value != AUTO:
                shapes[name] = ov.PartialShape([_dimension(d) for d in value])
    elif model.batch_size not in (None, AUTO):
        for port in ov_model.inputs:
            shape = port.get_partial_shape()
            if shape.rank.is_dynamic or len(shape) == 0:
                continue
            index = _batch_index(_layout_for(model, port.any_name, len(names) == 1))
            dims = list(shape)
            dims[index] = _dimension(str(model.batch_size))
            shapes[port.any_name] = ov.PartialShape(dims)
    for name, dims in (requested or {}).items():
        shapes[name] = ov.PartialShape(list(dims))
    if shapes:
        try:
            ov_model.reshape(shapes)
        except RuntimeError as exc:
            raise LoadError(f"{RESHAPE_FAILED}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """OpenVINO's messages start with a C++ file location; the last line is the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _compile_key(model: ModelConfig, requested: Mapping[str, tuple[int, ...]] | None) -> str:
    shape = dict(model.shape or {})
    return repr(
        (
            model.target_device,
            sorted(shape.items(), key=str),
            model.batch_size,
            sorted((model.layout or {}).items(), key=str),
            sorted((requested or {}).items()),
        )
    )


def _plugin_config(model: ModelConfig, device: str, replica: bool) -> dict[str, object]:
    config: dict[str, object] = {k: v for k, v in model.plugin_config.items()}
    if "NUM_STREAMS" not in config and "PERFORMANCE_HINT" not in config:
        config["PERFORMANCE_HINT"] = "LATENCY"  # OVMS's default
    if replica and device == "CPU" and "ENABLE_CPU_PINNING" not in config:
        # OpenVINO pins the thread running an inference (an inline model's: the event loop) to a core, the same
        # core in every worker: N workers then share one core (measured: 2 workers 0.5-0.7x one, 1.3-1.4x without)
        config["ENABLE_CPU_PINNING"] = False
    return config


class Runtime:
    """Owns the one shared ov.Core. Never sets CACHE_DIR on it: the cache is passed per compile (cache.py)."""

    def __init__(
        self, cache: cache_rules.ModelCache | None, device_override: str | None = None, replica: bool = False
    ) -> None:
        self.core = ov.Core()
        self.replica = replica  # one of `--grpc_workers N` processes sharing this machine's cores
        self.cache = cache
        self.device_override = device_override
        self.batch_observer: batching.BatchObserver | None = None  # metrics of the batchers made here

    def load(
        self, model: ModelConfig, version: int, source: Source, requested: Mapping[str, tuple[int, ...]] | None = None
    ) -> ServedVersion:
        """Compile one version (runs in a worker thread). Raises LoadError with the real reason.

        Every LoadError is raised outside the handler that made it: the failed frames (and a loader model's
        weights in their locals) are freed, and the weights wiped, before the caller sees the error.
        """
        decision = cache_rules.decide(model, self.cache)
        compiled, from_cache = self._compiled(model, version, source, requested, decision)
        try:
            return self._served(model, version, compiled, from_cache, decision, requested)
        except LoadError as exc:
            error = LoadError(str(exc))
        except RuntimeError as exc:  # e.g. create_infer_request
            reason = _first_line(exc) if source.loaded is None else WITHHELD
            error = LoadError(f"Cannot create inference requests: {reason}")
        del compiled  # freed now (a loader model's weights wiped), not when the caller drops the error
        raise error

    def _compiled(
        self,
        model: ModelConfig,
        version: int,
        source: Source,
        requested: Mapping[str, tuple[int, ...]] | None,
        decision: cache_rules.CacheDecision,
    ) -> tuple[ov.CompiledModel, bool]:
        device = self.device_override or model.target_device
        try:
            return self._compile(model, version, source, requested, decision, device)
        except LoadError as exc:
            withheld = source.loaded is not None and str(exc).startswith(RESHAPE_FAILED)
            error = LoadError(f"{RESHAPE_FAILED}: {WITHHELD}" if withheld else str(exc))
        except versions.ModelFilesError as exc:
            error = LoadError(str(exc))
        except RuntimeError as exc:
            reason = _first_line(exc) if source.loaded is None else WITHHELD
            error = LoadError(f"Cannot compile model into target device {device}: {reason}")
        finally:
            if source.loaded is not None:
                source.loaded.release()  # type: ignore[attr-defined]  # the loader wipes the plaintext now
        raise error

    def _compile(
        self,
        model: ModelConfig,
        version: int,
        source: Source,
        requested: Mapping[str, tuple[int, ...]] | None,
        decision: cache_rules.CacheDecision,
        device: str,
    ) -> tuple[ov.CompiledModel, bool]:
        plaintext = None  # a loader model's weights: the compiled model points into them (plaintext.py)
        if source.loaded is not None:
            ov_model, plaintext = self._read_loaded(source.loaded)
            source.loaded.release()  # type: ignore[attr-defined]  # the loader wipes the plaintext right away
            files: list[Path] = []
        else:
            found = versions.model_files(source.version_dir)
            files = list(found.paths)
            ov_model = None
            if model.shape or model.batch_size is not None or model.layout or requested:
                ov_model = self.core.read_model(found.model)
        log.info(
            "Loading model: %s, version: %d, from path: %s, with target device: %s ...",
            model.name,
            version,
            source.version_dir,
            device,
        )
        if ov_model is not None:
            _reshape(ov_model, model, requested)
            ov_model = _apply_layout(ov_model, model)
        cache_dir = None
        if decision.use and self.cache is not None and files:
            cache_dir = self._cache_dir(model, files, requested)
        target = ov_model if ov_model is not None else found.model
        config = _plugin_config(model, device, self.replica)
        compiled, from_cache = cache_rules.compile_model(self.core, target, device, config, cache_dir)
        if plaintext is not None:
            compiled.plaintext_weights = plaintext  # lives (and is wiped) with the compiled model
        if cache_dir is not None and self.cache is not None:
            try:
                self.cache.enforce_limit(keep=cache_dir.path)
            except OSError as exc:  # e.g. another process evicting the same folders: the load still stands
                log.warning("Model cache %s: size limit not enforced: %s", self.cache.root, exc)
        return compiled, from_cache

    def _served(
        self,
        model: ModelConfig,
        version: int,
        compiled: ov.CompiledModel,
        from_cache: bool,
        decision: cache_rules.CacheDecision,
        requested: Mapping[str, tuple[int, ...]] | None,
    ) -> ServedVersion:
        nireq = model.nireq or _optimal_requests(compiled)
        single = len(compiled.inputs) == 1
        names = [p.any_name for p in compiled.inputs]
        batch_index = {p.any_name: _batch_index(_layout_for(model, p.any_name, single)) for p in compiled.inputs}
        auto_inputs = frozenset(
            (names[0] if key is None else key) for key, value in (model.shape or {}).items() if value == AUTO
        )
        auto_batch = model.batch_size == AUTO
        if auto_batch and any(len(p.get_partial_shape()) == 0 for p in compiled.inputs):
            raise LoadError("Batching set to AUTO but model contains scalar tensor")
        served = ServedVersion(
            model.name,
            version,
            compiled,
            nireq,
            from_cache,
            decision.reason,
            batch_index,
            requested,
            auto_inputs,
            auto_batch,
        )
        if model.dynamic_batching is not None:
            settings = model.dynamic_batching
            why = batching.problem(model.name, served.inputs, served.outputs, settings.max_batch_size)
            if why is not None:
                served.close()
                raise LoadError(f"dynamic_batching: {why}")
            served.batcher = batching.Batcher(served, settings, self.batch_observer)
        log.info(
            "Loaded model %s; version: %d; batch size: %s; No of InferRequests: %d; cache: %s; loaded from cache: %s",
            model.name,
            version,
            model.batch_size if model.batch_size is not None else "none",
            nireq,
            decision.reason,
            from_cache,
        )
        return served

    def _cache_dir(
        self, model: ModelConfig, files: list[Path], requested: Mapping[str, tuple[int, ...]] | None
    ) -> cache_rules.CacheFolder | None:
        """The cache folder for this compile, or None (compile without the cache) when it cannot be made."""
        assert self.cache is not None
        try:
            return self.cache.dir_for(model.name, files, _compile_key(model, requested))
        except OSError as exc:  # cache dir deleted, unwritable or full: the model still loads, uncached
            log.warning("Model %s: cache folder not usable (%s); compiling without the cache", model.name, exc)
            return None

    def _read_loaded(self, loaded: object) -> tuple[ov.Model, np.ndarray | None]:
        kind = loaded.kind  # type: ignore[attr-defined]
        try:
            if kind == "IR":
                xml, weights = loaded.ir_inputs()  # type: ignore[attr-defined]
                # OpenVINO does not copy shared weights, nor keep them alive: the caller keeps this copy (wiped on free)
                plaintext = owned_copy(weights)
                return self.core.read_model(xml, ov.Tensor(plaintext, shared_memory=True)), plaintext
            empty = ov.Tensor(np.empty(0, np.uint8))
            return self.core.read_model(loaded.onnx_input(), empty), None  # type: ignore[attr-defined]
        except (RuntimeError, TypeError):
            # OpenVINO's text may quote the model; say only what kind of failure it was.
            raise LoadError(f"the custom loader returned a model OpenVINO cannot read ({kind})") from None


def _optimal_requests(compiled: ov.CompiledModel) -> int:
    try:
        return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    except RuntimeError:
        return 1
