"""The compiled-model cache: may this model use it (and why not), a content-keyed layout, robust compiles.

Rules (OVMS's, research ovms.md §4): a custom-loader model never touches the cache; an `auto` shape or batch skips
it unless `allow_cache`; otherwise it is used when a cache dir is set. The dir is passed per compile and never set
on the shared ov.Core — OpenVINO caches models compiled from memory too, so a Core-wide setting would write a
blob of a decrypted model.

OpenVINO keys a path-compiled blob by the path, so weights rewritten in place would come back stale. Each load
therefore gets a subfolder named by a hash of the model files' content, the compile options that change the
compiled graph and OpenVINO's version.

A blob is imported only when its folder's manifest vouches for it (cache_manifest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import openvino as ov

from .cache_manifest import MANIFEST, CacheFolder, StatKey, admit, blobs, held, idle, settled, sha256, stat_key, vouch
from .config import ModelConfig

log = logging.getLogger("hotserve.modelmanager")

DEFAULT_DIR = Path("/opt/cache")


@dataclass(frozen=True)
class CacheDecision:
    use: bool
    reason: str


def decide(model: ModelConfig, cache: ModelCache | None) -> CacheDecision:
    """The one place that says whether a model's load may use the cache."""
    if model.custom_loader_options is not None:
        decision = CacheDecision(False, "custom loader: never cached")
    elif cache is None:
        decision = CacheDecision(False, "no cache dir")
    elif model.has_auto and not model.allow_cache:
        decision = CacheDecision(False, "auto shape/batch without allow_cache")
    elif model.has_auto:
        decision = CacheDecision(True, "enabled (allow_cache with auto shape/batch)")
    else:
        decision = CacheDecision(True, "enabled")
    if cache is not None:
        if decision.use:
            log.debug("Model: %s has enabled caching", model.name)
        else:
            log.debug("Model: %s has disabled caching (%s)", model.name, decision.reason)
    return decision


def parse_size(text: str) -> int:
    """'512M' → bytes (K, M, G, T are powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", text.upper())
    if not found:
        raise ValueError(f"invalid size {text!r}: expected bytes, optionally with K, M, G or T (e.g. 10G)")
    return int(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " ")


class CacheEscape(OSError):
    """A cache path resolves outside the cache dir: that load compiles uncached, that folder is never evicted."""


class ModelCache:
    def __init__(self, root: Path, size_limit: int | None = None) -> None:
        self.root = root
        self.size_limit = size_limit
        self._digests: dict[tuple[int, ...], str] = {}
        self._lock = threading.Lock()
        self._index = root / ".fingerprints.json"
        self._load_index()
        self._stats = (0, 0)
        self.refresh_stats()

    @classmethod
    def open(
        cls, cache_dir: Path | None, size_limit: int | None = None, default: Path = DEFAULT_DIR
    ) -> ModelCache | None:
        """The cache the server runs with, or None; warns (and runs without) when the dir is unusable."""
        if cache_dir is None:
            if not default.is_dir():
                return None
            cache_dir = default
        cache_dir = cache_dir.absolute()
        if not cache_dir.exists():
            try:
                cache_dir.mkdir(parents=True)
            except OSError as exc:
                log.warning(
                    "Cache directory %s is not writable: %s; running without model cache", cache_dir, exc.strerror
                )
                return None
            log.warning("Cache directory %s did not exist, created", cache_dir)
        probe = cache_dir / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            log.warning("Cache directory %s is not writable: %s; running without model cache", cache_dir, exc.strerror)
            return None
        logging.getLogger("hotserve.modelmanager").info("Model cache is enabled: %s", cache_dir)
        return cls(cache_dir, size_limit)

    # ---- content identity ----
    def _load_index(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            for key, digest in json.loads(self._index.read_text()).items():
                self._digests[tuple(int(x) for x in key.split(":"))] = str(digest)

    def _save_index(self) -> None:
        tmp = self._index.with_name(f"{self._index.name}.{os.getpid()}.{threading.get_ident()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({":".join(map(str, k)): v for k, v in self._digests.items()}))
            os.replace(tmp, self._index)

    def digest(self, path: Path) -> str:
        """sha256 of a file's bytes, memoised by (dev, inode, size, mtime, ctime): a rewrite always changes ctime."""
        return self._digest(path)[1]

    def _digest(self, path: Path) -> tuple[StatKey, str, bool]:
        """(stat identity, sha256, fresh): a fresh file's stat may miss a rewrite in the same tick, so its digest is
        not memoised (it is taken again next time)."""
        st = path.stat()
        key = stat_key(st)
        with self._lock:
            found = self._digests.get(key)
        if found is not None:
            return key, found, False
        digest = sha256(path)
        if settled(st):
            with self._lock:
                self._digests[key] = digest
                self._save_index()
            return key, digest, False
        return key, digest, True

    def dir_for(self, model_name: str, files: Sequence[Path], compile_key: str) -> CacheFolder:
        """The subfolder for this content, these compile options and this OpenVINO (created, marked as just used)."""
        h = hashlib.sha256(f"{ov.get_version()}\0{compile_key}".encode())
        sources, fresh = [], []
        for path in files:
            key, digest, is_fresh = self._digest(path)
            h.update(digest.encode())
            sources.append((path, key))
            if is_fresh:
                fresh.append((path, digest))
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
        folder = self.inside(self.root / safe / h.hexdigest()[:24])
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)
        return CacheFolder(folder, tuple(sources), tuple(fresh))

    def inside(self, path: Path) -> Path:
        """`path`, checked to be a strict descendant of the cache dir (model names are validated; this is the net)."""
        resolved = path.resolve()
        if resolved == self.root.resolve() or not resolved.is_relative_to(self.root.resolve()):
            raise CacheEscape(f"cache path {path} is outside the cache dir {self.root}")
        return path

    # ---- size limit ----
    def stats(self) -> tuple[int, int]:
        """(total bytes of blobs, blob count) as of the last load: /metrics reads this, never the disk."""
        return self._stats

    def refresh_stats(self) -> None:
        """Walk the cache dir (slow on NFS): called from the load threads, never from the event loop."""
        with contextlib.suppress(OSError):
            sizes = [p.stat().st_size for p in self.root.rglob("*.blob") if p.is_file()]
            self._stats = (sum(sizes), len(sizes))

    def enforce_limit(self, keep: Path | None = None) -> None:
        try:
            self._evict(keep)
        finally:
            self.refresh_stats()

    def _evict(self, keep: Path | None) -> None:
        if self.size_limit is None:
            return
        folders = [d for m in self.root.iterdir() if m.is_dir() for d in m.iterdir() if d.is_dir()]
        sizes = {d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders}
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda d: d.stat().st_mtime):
            if total <= self.size_limit:
                break
            if keep is not None and folder == keep:
                continue
            with idle(folder) as free:
                if not free:  # a compile (here or in a server sharing the dir) is writing its blob there
                    log.info("Cache size limit: not evicting %s now, a compile is using it", folder)
                    continue
                try:
                    shutil.rmtree(self.inside(folder), ignore_errors=True)
                except CacheEscape as exc:  # e.g. a symlink to elsewhere: never delete outside the cache dir
                    log.warning("Model cache: not evicting %s", exc)
                    continue
            total -= sizes[folder]
            log.info(
                "Cache size limit %d bytes exceeded: evicted %s (%d bytes)", self.size_limit, folder, sizes[folder]
            )


def compile_model(
    core: ov.Core, source: ov.Model | Path, device: str, config: Mapping[str, object], folder: CacheFolder | None
) -> tuple[ov.CompiledModel, bool]:
    """Compile, with CACHE_DIR in this call's config only. A bad blob or a full disk never fails the load, and a
    blob the folder's manifest does not vouch for is never imported."""
    if folder is None:
        return core.compile_model(_source(source), device, dict(config)), False
    cache_dir = folder.path
    try:
        with held(cache_dir):
            admit(cache_dir)
            try:
                compiled = core.compile_model(_source(source), device, {**config, "CACHE_DIR": str(cache_dir)})
            except RuntimeError as exc:
                _clear(cache_dir, exc)  # under the lock: another server's fresh blob is not ours to remove later
                raise _Uncached from None
            from_cache = _loaded_from_cache(compiled)
            if not from_cache:
                dropped = False
                try:
                    dropped = vouch(folder)
                except OSError as exc:  # e.g. the disk full: unrecorded, the blob is compiled afresh next time
                    log.warning("Model cache folder %s: blob not recorded (%s)", cache_dir, exc)
                if not dropped and _exports(core, device):  # a plugin that cannot export never writes a blob
                    _check_blob_written(cache_dir)
            return compiled, from_cache
    except _Uncached:
        pass
    except (OSError, TimeoutError) as exc:  # the folder gone (evicted, deleted), unreadable, or its lock held
        log.warning("Model cache folder %s not usable (%s); compiling without the cache", cache_dir, exc)
    compiled = core.compile_model(_source(source), device, dict(config))
    return compiled, False


class _Uncached(Exception):
    """Compiling with the cache failed (a blob OpenVINO choked on): the folder is cleared, compile without it."""


def _clear(folder: Path, exc: RuntimeError) -> None:
    log.warning("Compiling with the cache in %s failed (%s); clearing it and compiling without", folder,
                str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)  # fmt: skip
    for blob in [*blobs(folder), folder / MANIFEST]:  # not the lock: another process may wait on it
        with contextlib.suppress(OSError):
            blob.unlink()


def _exports(core: ov.Core, device: str) -> bool:
    try:
        return "EXPORT_IMPORT" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:  # AUTO, MULTI, HETERO: no such property; not knowing, say nothing
        return False


_no_blob_said: set[Path] = set()  # cache roots already warned about: said once, again only after it worked


def _check_blob_written(cache_dir: Path) -> None:
    """OpenVINO writes no blob, silently, when the disk is full: notice it, say it once with the free space."""
    root = cache_dir.parent.parent
    if any(cache_dir.glob("*.blob")):
        _no_blob_said.discard(root)
        return
    if root in _no_blob_said:
        return
    _no_blob_said.add(root)
    try:
        free = f"{shutil.disk_usage(cache_dir).free / (1 << 20):.1f} MiB free"
    except OSError as exc:
        free = f"free space unknown: {exc.strerror}"
    log.warning(
        "Model cache in %s is not working: OpenVINO wrote no compiled blob into %s (%s; is the disk full?). "
        "Models still load, compiled afresh every time",
        root, cache_dir, free,
    )  # fmt: skip


def _source(source: ov.Model | Path) -> ov.Model | str:
    return source if isinstance(source, ov.Model) else str(source)


def _loaded_from_cache(compiled: ov.CompiledModel) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except RuntimeError:
        return False
