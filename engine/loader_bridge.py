"""cffi binding to a custom loader library (loaders/hotserve_loader.h): dlopen, calls, buffers in memory, wipe.

Knows nothing about gRPC, the registry or OpenVINO. Plaintext stays in the loader's memory: callers get zero-copy
views, and the only Python copies (the model text, which OpenVINO's read_model takes as bytes-like) are bytearrays
that release() wipes before the loader wipes and frees its own buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import threading
import weakref
from collections.abc import Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from cffi import FFI

ABI_VERSION = 1
DEFAULT_MAX_BUFFER_BYTES = 4 << 30

# The declarations of loaders/hotserve_loader.h (a test checks they match the header). The version is declared
# without `const` because cffi reads only non-const globals from a dlopen'ed library (it is never written).
CDEF = """
typedef struct hs_buffer { uint8_t *data; size_t size; } hs_buffer;
extern uint32_t hs_loader_abi_version;
int hs_loader_init(const char *loader_config_file, void **handle);
int hs_loader_load_model(void *handle, const char *model_name, const char *base_path, int64_t version,
                         const char *options_json, hs_buffer *model, hs_buffer *weights);
void hs_loader_release(void *handle, hs_buffer *buf);
int hs_loader_blacklist_status(void *handle, const char *model_name, int64_t version);
void hs_loader_unload_model(void *handle, const char *model_name, int64_t version);
void hs_loader_retire_model(void *handle, const char *model_name);
void hs_loader_deinit(void *handle);
const char *hs_loader_last_error(void *handle);
"""

REQUIRED_SYMBOLS = (
    "hs_loader_abi_version",
    "hs_loader_init",
    "hs_loader_load_model",
    "hs_loader_release",
    "hs_loader_blacklist_status",
    "hs_loader_unload_model",
    "hs_loader_retire_model",
    "hs_loader_deinit",
    "hs_loader_last_error",
)

ffi = FFI()
ffi.cdef(CDEF)


class Status(IntEnum):
    """The HS_* status codes of the header."""

    OK = 0
    MODEL_TYPE_IR = 1
    MODEL_TYPE_ONNX = 2
    MODEL_LOAD_ERROR = 3
    MODEL_BLACKLISTED = 4
    INTERNAL_ERROR = 5


def status_name(status: int) -> str:
    try:
        return f"HS_{Status(status).name}"
    except ValueError:
        return f"unknown status {status}"


def error_for(status: int | None) -> str:
    """OVMS's version error for a failed load: MODEL_LOAD_ERROR is FILE_INVALID, everything else INTERNAL_ERROR."""
    return "File not found or cannot open" if status == Status.MODEL_LOAD_ERROR else "Internal server error"


class LoaderError(Exception):
    """A loader could not be opened or failed a call; the text names the loader, its library and the reason."""

    def __init__(self, loader: str, library: Path, reason: str, status: int | None = None) -> None:
        self.loader = loader
        self.library = library
        self.reason = reason
        self.status = status  # the HS_* code when the loader returned one
        super().__init__(f"custom loader {loader} ({library}): {reason}")

    @property
    def version_error(self) -> str:
        """The OVMS error text for the version this failure leaves in LOADING."""
        return error_for(self.status)


def _text(ptr: Any) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode("utf-8", "replace")


def _c_string(value: str | os.PathLike[str], what: str) -> bytes:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL character")
    return raw


def _wipe(buf: bytearray) -> None:
    if buf:
        ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))


class Loader:
    """One initialised loader handle. Every call into it is serialised by one lock (the ABI's promise)."""

    def __init__(self, name: str, library: Path, lib: Any, handle: Any, max_buffer_bytes: int) -> None:
        self.name = name
        self.library = library
        self.max_buffer_bytes = max_buffer_bytes
        self._lib = lib
        self._handle: Any = handle
        self._closed = False  # no new loads; hs_loader_deinit runs once nothing loaded through it is live
        self._deinited = False
        self._lock = threading.RLock()  # re-entrant: a LoadedModel finalised by GC may release while we hold it
        # loads not yet unloaded: their buffers may still be read (read_model), or their version still serves
        self._live: weakref.WeakSet[LoadedModel] = weakref.WeakSet()

    @classmethod
    def open(
        cls,
        name: str,
        library_path: Path | str,
        config_file: Path | str | None,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    ) -> Loader:
        """dlopen the library, check its symbols and ABI version, and run hs_loader_init."""
        library = Path(library_path)
        if not library.is_file():
            raise LoaderError(name, library, "library not found" if not library.exists() else "library is not a file")
        lib = _dlopen(name, library)
        missing = [symbol for symbol in REQUIRED_SYMBOLS if not _has_symbol(lib, symbol)]
        if missing:
            raise LoaderError(name, library, f"missing symbols: {', '.join(missing)}")
        abi = int(lib.hs_loader_abi_version)
        if abi != ABI_VERSION:
            raise LoaderError(name, library, f"hs_loader_abi_version is {abi}, this server needs {ABI_VERSION}")
        config = ffi.NULL
        if config_file is not None:
            if not Path(config_file).is_file():
                raise LoaderError(name, library, f"loader_config_file {config_file} not found")
            try:
                config = _c_string(config_file, "loader_config_file")
            except ValueError as exc:
                raise LoaderError(name, library, str(exc)) from None
        handle = ffi.new("void **")
        status = lib.hs_loader_init(config, handle)
        if status != Status.OK:
            reason = _text(lib.hs_loader_last_error(ffi.NULL)) or "no reason given"
            raise LoaderError(name, library, f"init failed ({status_name(status)}): {reason}", status)
        return cls(name, library, lib, handle[0], max_buffer_bytes)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def deinited(self) -> bool:
        return self._deinited

    def __repr__(self) -> str:
        return f"Loader({self.name!r}, {str(self.library)!r}{', closed' if self._closed else ''})"

    def _error(self, reason: str, status: int | None = None) -> LoaderError:
        return LoaderError(self.name, self.library, reason, status)

    def _check_open(self) -> None:
        if self._closed:
            raise self._error("the loader was closed")

    def load(self, model_name: str, base_path: Path | str, version: int, options: Mapping[str, Any]) -> LoadedModel:
        """hs_loader_load_model. options: the model's custom_loader_options, passed as compact JSON in their order."""
        where = f"model {model_name} version {version}"
        try:
            name_c = _c_string(model_name, "model name")
            base_c = _c_string(base_path, "base_path")
            options_c = json.dumps(dict(options), separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise self._error(f"{where}: custom_loader_options: {exc}", Status.MODEL_LOAD_ERROR) from None
        model = ffi.new("hs_buffer *")
        weights = ffi.new("hs_buffer *")
        with self._lock:
            self._check_open()
            status = self._lib.hs_loader_load_model(self._handle, name_c, base_c, version, options_c, model, weights)
            if status in (Status.MODEL_TYPE_IR, Status.MODEL_TYPE_ONNX):
                problem = self._check_buffers(Status(status), model, weights)
                failure = Status.INTERNAL_ERROR
            else:
                reason = _text(self._lib.hs_loader_last_error(self._handle)) or "no reason given"
                problem = f"{status_name(status)}: {reason}"
                known = status in (Status.MODEL_LOAD_ERROR, Status.MODEL_BLACKLISTED)
                failure = Status(status) if known else Status.INTERNAL_ERROR
            if problem is not None:
                self._release_buffer(model)
                self._release_buffer(weights)
                raise self._error(f"{where}: {problem}", failure)
            if status == Status.MODEL_TYPE_ONNX:
                self._release_buffer(weights)  # unused for ONNX; give it back now
            kind = "IR" if status == Status.MODEL_TYPE_IR else "ONNX"
            loaded = LoadedModel(self, kind, model, weights, where, name_c, version)
            self._live.add(loaded)
            return loaded

    def _check_buffers(self, kind: Status, model: Any, weights: Any) -> str | None:
        limit = self.max_buffer_bytes
        if model.data == ffi.NULL:
            return f"{status_name(kind)} with a NULL model buffer"
        if model.size == 0:
            return f"{status_name(kind)} with an empty model buffer"
        if model.size > limit:
            return f"model buffer of {model.size} bytes is above the limit of {limit} bytes"
        if weights.data == ffi.NULL and weights.size != 0:
            return f"NULL weights buffer with size {weights.size}"
        if weights.size > limit:
            return f"weights buffer of {weights.size} bytes is above the limit of {limit} bytes"
        return None

    def _release_buffer(self, buf: Any) -> None:
        """hs_loader_release for one non-NULL buffer; the caller holds the lock."""
        if buf.data != ffi.NULL and not self._deinited:
            self._lib.hs_loader_release(self._handle, buf)
        buf.data = ffi.NULL
        buf.size = 0

    def _release(self, model: Any, weights: Any) -> None:
        with self._lock:
            self._release_buffer(model)
            self._release_buffer(weights)

    def _unload(self, loaded: LoadedModel, name_c: bytes, version: int) -> None:
        """hs_loader_unload_model for one load; the last one of a closed loader runs hs_loader_deinit."""
        with self._lock:
            if not self._deinited:
                self._lib.hs_loader_unload_model(self._handle, name_c, version)
            self._live.discard(loaded)
            if self._closed and not self._live:
                self._deinit()

    def is_blacklisted(self, model_name: str, version: int) -> bool:
        """hs_loader_blacklist_status: True when the loader says this version must not be served now."""
        name_c = _c_string(model_name, "model name")
        with self._lock:
            self._check_open()
            return bool(self._lib.hs_loader_blacklist_status(self._handle, name_c, version) == Status.MODEL_BLACKLISTED)

    def unload_model(self, model_name: str, version: int) -> None:
        """Tell the loader a version was freed (a no-op once deinitialised). The server uses LoadedModel.unload()."""
        name_c = _c_string(model_name, "model name")
        with self._lock:
            if not self._deinited:
                self._lib.hs_loader_unload_model(self._handle, name_c, version)

    def retire_model(self, model_name: str) -> None:
        """Tell the loader a model left the config (a no-op once deinitialised)."""
        name_c = _c_string(model_name, "model name")
        with self._lock:
            if not self._deinited:
                self._lib.hs_loader_retire_model(self._handle, name_c)

    def close(self, force: bool = False) -> None:
        """No new loads; hs_loader_deinit once every load is unloaded (now, if none is live). Idempotent.

        A load still live may have buffers OpenVINO is reading in another thread, so they are never released
        from under it; `force` (shutdown, after every compile thread has finished) releases and unloads them
        first. The library stays loaded (as OVMS).
        """
        with self._lock:
            self._closed = True
            if force:
                for loaded in list(self._live):
                    loaded.unload()
            if not self._live:
                self._deinit()

    def _deinit(self) -> None:
        if not self._deinited:
            self._deinited = True
            self._lib.hs_loader_deinit(self._handle)
            self._handle = ffi.NULL

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing sensible is left to do
            self.close(force=True)


_LIBRARIES: dict[str, Any] = {}  # never dlclose'd, as in OVMS: a loader's threads or TLS may outlive its deinit
_LIBRARIES_LOCK = threading.Lock()


def _dlopen(name: str, library: Path) -> Any:
    path = str(library.resolve())
    with _LIBRARIES_LOCK:
        if path not in _LIBRARIES:
            try:  # RTLD_NOW: an unresolved dependency fails here with dlerror, not later mid-call
                _LIBRARIES[path] = ffi.dlopen(path, ffi.RTLD_NOW | ffi.RTLD_LOCAL)
            except OSError as exc:
                reason = re.sub(r"^cannot load library '.*?': ", "", re.split(r"\.\s+Additionally,", str(exc))[0])
                raise LoaderError(name, library, f"cannot open library: {reason}") from None
        return _LIBRARIES[path]


def _has_symbol(lib: Any, symbol: str) -> bool:
    try:
        getattr(lib, symbol)
    except AttributeError:
        return False
    return True


class LoadedModel:
    """One load of a model version from a loader: its buffers, then the version compiled from them.

    release() (or `with`) wipes our copies and hands the buffers back (the loader wipes and frees them); views
    returned by the accessors point into the loader's memory and are invalid afterwards. unload() — once the
    server holds nothing compiled from this load any more — sends hs_loader_unload_model, exactly once.
    """

    def __init__(
        self, loader: Loader, kind: str, model: Any, weights: Any, where: str, name_c: bytes = b"", version: int = 0
    ) -> None:
        self.kind = kind  # "IR" | "ONNX"
        self.where = where
        self.model_size = int(model.size)
        self.weights_size = int(weights.size)
        self._loader: Loader | None = loader
        self._owner: Loader | None = loader  # until unload()
        self._name_c = name_c
        self._version = version
        self._model = model
        self._weights = weights
        self._copies: list[bytearray] = []

    @property
    def released(self) -> bool:
        return self._loader is None

    def __repr__(self) -> str:
        state = "released" if self.released else f"{self.model_size}+{self.weights_size} bytes"
        return f"LoadedModel({self.kind}, {self.where}, {state})"

    def _view(self, buf: Any) -> np.ndarray:
        if self._loader is None:
            raise ValueError(f"{self.where}: the loaded model was released")
        if buf.data == ffi.NULL:
            return np.empty(0, np.uint8)
        return np.frombuffer(ffi.buffer(buf.data, buf.size), np.uint8)

    def model_view(self) -> np.ndarray:
        """Zero-copy uint8 view of the model buffer (XML text or ONNX file)."""
        return self._view(self._model)

    def weights_view(self) -> np.ndarray:
        """Zero-copy uint8 view of the IR weights (empty for ONNX)."""
        return self._view(self._weights)

    def _model_copy(self) -> bytearray:
        # read_model takes the model as str/bytes/bytearray only; a bytearray is the one copy we can wipe.
        copy = bytearray(self.model_view())
        self._copies.append(copy)
        return copy

    def ir_inputs(self) -> tuple[bytearray, np.ndarray]:
        """(XML as a wipeable bytearray, zero-copy weights view) for core.read_model(xml, ov.Tensor(weights))."""
        if self.kind != "IR":
            raise ValueError(f"{self.where}: not an IR model ({self.kind})")
        return self._model_copy(), self.weights_view()

    def onnx_input(self) -> bytearray:
        """The ONNX model as a wipeable bytearray for core.read_model(onnx, ov.Tensor(np.empty(0, np.uint8)))."""
        if self.kind != "ONNX":
            raise ValueError(f"{self.where}: not an ONNX model ({self.kind})")
        return self._model_copy()

    def release(self) -> None:
        """Wipe our copies and hand the buffers back (the loader wipes and frees them). Idempotent."""
        loader, self._loader = self._loader, None
        for copy in self._copies:
            _wipe(copy)
        self._copies.clear()
        if loader is not None:
            loader._release(self._model, self._weights)

    @property
    def unloaded(self) -> bool:
        return self._owner is None

    def unload(self) -> None:
        """Release the buffers if still out, then hs_loader_unload_model for this load. Idempotent."""
        self.release()
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._unload(self, self._name_c, self._version)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing sensible is left to do
            self.unload()
