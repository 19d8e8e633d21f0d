"""A cache folder's blobs, vouched for: which of them this server (or one sharing the dir) wrote whole.

OpenVINO (2026.4, CPU) recompiles a truncated or random blob, but imports one with changed constant bytes and
serves wrong outputs: it has no checksum. So each folder's `.manifest.json` records every blob's SHA-256 once it is
complete (and its stat identity, once settled, so a warm start need not re-read it), and a blob it does not vouch
for is removed before OpenVINO may import it. A compile in a folder holds its `.lock` (flock), so two servers
sharing the dir never take each other's half-written blob for a bad one, and eviction skips a folder in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hotserve.modelmanager")

CHUNK = 1 << 20
MANIFEST = ".manifest.json"  # in each folder: blob name → {"sha256", "stat"}, written once the blob is complete
LOCK = ".lock"  # in each folder: flock held for a compile with the folder
LOCK_WAIT = 600.0  # seconds; a process stuck mid-compile must not stall our loads for good
RACY_NS = 2_000_000_000  # a stat taken this soon after the file's last change may miss a change in the same tick

StatKey = tuple[int, ...]


def stat_key(st: os.stat_result) -> StatKey:
    """What changes whenever the file's bytes do: no user-level call sets ctime back."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class CacheFolder:
    """One compile's subfolder of the cache, and the model files' identities when their content was hashed."""

    path: Path
    sources: tuple[tuple[Path, StatKey], ...] = ()
    fresh: tuple[tuple[Path, str], ...] = ()  # (file, digest) of those changed < RACY_NS before: hashed again after


@contextlib.contextmanager
def held(folder: Path) -> Iterator[None]:
    with open(folder / LOCK, "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {folder / LOCK} for {LOCK_WAIT:g} s") from None
                time.sleep(0.05)  # in a load thread: another process is compiling this same model
        if not _same_file(lock.fileno(), folder / LOCK):  # evicted while we waited: a new lock may be held beside
            fcntl.flock(lock, fcntl.LOCK_UN)
            raise FileNotFoundError(f"{folder} was evicted while this compile waited for its lock")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def idle(folder: Path) -> Iterator[bool]:
    """True, with the folder's lock held, when no compile holds it; False at once otherwise."""
    try:
        lock = open(folder / LOCK, "a")  # noqa: SIM115 — closed below, which releases the lock
    except OSError:  # the folder is gone already
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, at = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (at.st_dev, at.st_ino)


def blobs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _read_manifest(folder: Path) -> dict[str, dict[str, object]]:
    try:
        found = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):  # none yet, or damaged: then it vouches for nothing
        return {}
    return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def _write_manifest(folder: Path, entries: Mapping[str, Mapping[str, object]]) -> None:
    tmp = folder / f"{MANIFEST}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(entries, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def settled(st: os.stat_result) -> bool:
    """A stat taken just after a write may miss a second write in the same timestamp tick (git's racy clean)."""
    return time.time_ns() - st.st_ctime_ns > RACY_NS


def _entry(blob: Path, st: os.stat_result, digest: str) -> dict[str, object]:
    """The blob's stat is recorded only once settled: until then the next admit hashes it."""
    return {"sha256": digest, "stat": list(stat_key(st)) if settled(st) else None}


def admit(folder: Path) -> None:
    """Remove every blob the manifest does not vouch for, before OpenVINO may import it."""
    for tmp in folder.glob(f"{MANIFEST}.*"):  # a writer that died mid-write (writers hold the lock, as we do now)
        with contextlib.suppress(OSError):
            tmp.unlink()
    manifest = _read_manifest(folder)
    kept = {}
    for blob in blobs(folder):
        entry = manifest.get(blob.name)
        st = blob.stat()
        if entry is not None and entry.get("stat") == list(stat_key(st)):
            kept[blob.name] = entry
            continue
        if entry is not None and (digest := sha256(blob)) == entry.get("sha256"):
            kept[blob.name] = _entry(blob, st, digest)  # the same bytes (a copied cache, a restored backup)
            continue
        why = "was never recorded as complete" if entry is None else "was modified after it was written"
        log.warning("Cache blob %s %s; removed, the model compiles from its files", blob, why)
        blob.unlink()
    if kept != manifest:
        try:
            _write_manifest(folder, kept)
        except OSError as exc:  # e.g. the disk full: what is kept was checked; only the record of it is lost
            log.debug("Model cache folder %s: manifest not updated (%s)", folder, exc)


def vouch(folder: CacheFolder) -> bool:
    """After a compile that wrote a blob: record it, unless a model file changed since it was hashed (the blob may
    hold the new bytes under the old content's folder, and would come back when the old bytes did). True when a
    model file had changed, so no blob is kept on purpose."""
    changed = [path for path, key in folder.sources if not _same(path, key)]
    changed += [path for path, digest in folder.fresh if path not in changed and _rehash(path) != digest]
    manifest = _read_manifest(folder.path)
    for blob in blobs(folder.path):
        if (entry := manifest.get(blob.name)) is not None and entry.get("stat") == list(stat_key(blob.stat())):
            continue  # vouched for before, and unchanged since
        if changed:
            log.warning("Model file %s changed while it was being compiled; its cache blob %s is not kept", changed[0],
                        blob)  # fmt: skip
            blob.unlink()
            continue
        manifest[blob.name] = _entry(blob, blob.stat(), sha256(blob))
    _write_manifest(folder.path, manifest)
    return bool(changed)


def _rehash(path: Path) -> str | None:
    try:
        return sha256(path)
    except OSError:
        return None


def _same(path: Path, key: StatKey) -> bool:
    try:
        return stat_key(path.stat()) == key
    except OSError:
        return False


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
