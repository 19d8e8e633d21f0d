"""The shared metrics dir of `--grpc_workers N`: prometheus_client's multiprocess files, owned by the supervisor.

- Its life is a shared flock on the dir that the supervisor and each worker hold until they exit; a later supervisor
  removes any dir it can lock exclusively (all of them are gone, however they died: a worker left draining by a
  killed supervisor keeps its dir), never one judged by a pid that may have been reused. An older
  hotserve's dir (`hotserve-metrics-<pid>-…`, never locked) is kept while that pid runs: a leak, never a live loss.
- A dead worker's counters, histograms and summaries are folded into one `<type>_archive.db` per type and its own
  files deleted: sums stay right and monotonic, and a worker in a crash loop does not pile up files that every
  scrape must read.
- Scrapes (in the workers) hold a shared lock on `.scrape`; folding holds it exclusively, so no scrape sees a value
  twice, misses one, or reads a file being deleted. A fold never waits for it: the supervisor tries again later.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("hotserve.supervisor")

PREFIX = "hotserve-metrics-"
SCRAPE_LOCK = ".scrape"
FOLDED = ("counter", "histogram", "summary")  # the types whose values outlive their process (live gauges do not)


def _locked(path: Path, shared: bool = False) -> int | None:
    """A flock on `path` (a dir), never waiting: shared (a user) or exclusive (nobody uses it). → its fd, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # no symlink swapped in after the checks
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale(parent: Path | None = None) -> list[Path]:
    """Remove the metrics dirs (this user's) of supervisors that are gone: → the dirs removed."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.is_symlink() or path.lstat().st_uid != os.getuid():
                continue
        older = re.match(r"(\d+)-", path.name.removeprefix(PREFIX))  # mkdtemp's own names have no "-"
        if older is not None and _running(int(older[1])):
            continue  # an older hotserve's dir, named after its supervisor and never locked: kept while that lives
        fd = _locked(path)
        if fd is None:
            continue  # alive (or already gone)
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _allocate(path: Path, keys: Iterable[str]) -> None:
    """Every byte MmapedDict will write to `path`, on disk first: a full tmp fails here (ENOSPC), not with a SIGBUS
    when a write through its mmap finds no room. Its layout: an 8-byte header, then per key a 4-byte length, the
    UTF-8 key padded to 8 bytes, and two doubles."""
    size = 8 + sum(4 + n + (8 - (n + 4) % 8) + 16 for n in (len(key.encode()) for key in keys))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


class MetricsDir:
    """Created locked: made under a name `clean_stale` ignores, locked, then renamed into place."""

    def __init__(self, parent: Path | None = None) -> None:
        base = Path(parent or tempfile.gettempdir())
        making = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=base))
        self.path = base / making.name[1:]
        fd = _locked(making, shared=True)
        try:
            if fd is None:
                raise OSError(f"cannot lock the new metrics dir {making}")
            (making / SCRAPE_LOCK).touch()
            making.rename(self.path)  # the lock is on the inode: it moves along
        except OSError:  # a full tmp, say: nothing is left behind
            if fd is not None:
                os.close(fd)
            shutil.rmtree(making, ignore_errors=True)
            raise
        self._fd = fd

    def fold(self, pid: int) -> int | None:
        """A worker exited: its live gauges go, its other values join the archive. → how many files it left; None:
        a scrape is reading (it may be in a hung worker the caller has yet to kill), so try again later."""
        from prometheus_client import multiprocess
        from prometheus_client.mmap_dict import MmapedDict

        with contextlib.ExitStack() as held:
            try:
                held.enter_context(scrape_lock(self.path, exclusive=True))
            except BlockingIOError:
                return None
            multiprocess.mark_process_dead(pid, str(self.path))
            dead = [self.path / f"{kind}_{pid}.db" for kind in FOLDED]
            dead = [f for f in dead if f.exists()]
            for kind in sorted({f.name.split("_", 1)[0] for f in dead}):
                archive = self.path / f"{kind}_archive.db"
                sums: dict[str, float] = defaultdict(float)
                for source in (archive, self.path / f"{kind}_{pid}.db"):
                    if source.exists():
                        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(source)):
                            sums[key] += value
                fresh = archive.with_name(f"{archive.name}.new")  # not `*.db`: no scrape reads it half-written
                fresh.unlink(missing_ok=True)
                _allocate(fresh, sums)
                written = MmapedDict(str(fresh))
                try:
                    for key, value in sums.items():
                        written.write_value(key, value, 0.0)
                finally:
                    written.close()
                os.replace(fresh, archive)
                (self.path / f"{kind}_{pid}.db").unlink()  # at once: if the next kind fails, none counts twice
            return len(dead)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def hold(path: Path) -> int:
    """A worker's share of the dir's life (its fd, open until the process exits): see the module's docstring."""
    fd = _locked(path, shared=True)
    if fd is None:
        raise OSError(f"cannot hold the metrics dir {path}: gone, or being removed")
    return fd


@contextlib.contextmanager
def scrape_lock(path: Path, exclusive: bool = False) -> Iterator[None]:
    """Shared while a scrape reads the files (waits); exclusive while the supervisor folds a dead worker's (never
    waits: BlockingIOError)."""
    with open(path / SCRAPE_LOCK, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        yield  # closing the file releases the lock
