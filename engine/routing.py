"""Version labels and traffic weights resolved against what is AVAILABLE: the table a request is routed by.

Pure and small: the registry rebuilds a model's `Routes` whenever the configured `Routing` or the availability of a
version changes (both are written only by the lifecycle), so a request pays a dict lookup, a random draw or a hash.

Labels are availability-first: a label moved to a version that is not AVAILABLE stays on its previous version
while that one is AVAILABLE, and switches in the same registry write that makes the new one AVAILABLE; a label whose
version stops being AVAILABLE goes back to the version it left, while that one is AVAILABLE.

Weights are drawn among the AVAILABLE versions they name (a weight whose version is not AVAILABLE goes to the
others, in proportion). A routing key picks by weighted rendezvous hashing (highest random weight: score
w / -ln(u), u = splitmix64(BLAKE2b-64(key) ^ a seed per version number) in (0, 1)): the same key and weights give
the same version in every process, and a weight change moves only the keys it must (raising one version's weight
only moves keys to it; a version that stops being AVAILABLE only gives up its own keys).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b

from .config import Routing

_M64 = (1 << 64) - 1
_UNIT = 2.0**-53


def _hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Routes:
    """One model's resolved routing. `routed`: traffic is configured, so a request without a version is drawn."""

    labels: Mapping[str, int] = field(default_factory=dict)  # label → the version it serves now
    pending: Mapping[str, int] = field(default_factory=dict)  # label → its configured version, not AVAILABLE yet
    left: Mapping[str, int] = field(default_factory=dict)  # label → the version it served before its last move
    routed: bool = False
    drawn: tuple[tuple[int, int], ...] = ()  # (version, weight) of the AVAILABLE versions with weight > 0
    idle: tuple[int, ...] = ()  # versions with a weight that are not AVAILABLE (their share goes to the others)
    names: Mapping[int, str] = field(default_factory=dict)  # version → its labels, sorted, joined by ","
    main: int | None = None  # the most weighted AVAILABLE version: metadata and readiness without a version
    _cumulative: tuple[int, ...] = ()
    _seeded: tuple[tuple[int, float, int], ...] = ()  # (version, weight, seed) for rendezvous hashing

    def draw(self) -> int | None:
        """A version drawn by weight, or None when no weighted version is AVAILABLE."""
        drawn = self.drawn
        if len(drawn) == 1:
            return drawn[0][0]
        if not drawn:
            return None
        return drawn[bisect_right(self._cumulative, random.randrange(self._cumulative[-1]))][0]

    def route(self, key: str) -> int | None:
        """The version `key` lands on for these weights (weighted rendezvous hashing), or None."""
        h = int.from_bytes(blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        best, top, log = None, -1.0, math.log
        for version, weight, seed in self._seeded:  # splitmix64 finaliser inlined: this runs per request
            x = h ^ seed
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
            score = weight / -log((((x ^ (x >> 31)) >> 11) + 0.5) * _UNIT)  # u in (0, 1)
            if score > top:
                best, top = version, score
        return best

    def labels_of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(label for label, v in self.labels.items() if v == version))

    def pending_for(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(label for label, v in self.pending.items() if v == version))


NO_ROUTES = Routes()


def resolve(model: str, routing: Routing, available: Iterable[int], before: Routes) -> tuple[Routes, list[str]]:
    """The routes for `routing` given the AVAILABLE versions and the routes before; and what to log (transitions)."""
    ready = frozenset(available)
    said: list[str] = []
    labels: dict[str, int] = {}
    pending: dict[str, int] = {}
    left: dict[str, int] = {}
    for label, target in routing.labels.items():
        previous, back = before.labels.get(label), before.left.get(label)
        if target in ready:
            labels[label] = target
        elif previous is not None and previous in ready:
            labels[label] = previous  # availability first: stay until the new version is AVAILABLE
        elif back is not None and back in ready:
            labels[label] = back  # its new version stopped being AVAILABLE: back to the one it left, meanwhile
        else:
            labels[label] = target  # a new label, or nothing to stay on: requests meet the version as it is
        if labels[label] != target:
            pending[label] = target
        if previous is not None and previous != labels[label]:
            left[label] = previous
        elif back is not None:
            left[label] = back
        if previous is not None and previous != labels[label]:
            said.append(f"Version label {label} of model {model} now points at version {labels[label]} "
                        f"(was {previous})")  # fmt: skip
        if label in pending and before.pending.get(label) != target:
            said.append(f"Version label {label} of model {model} stays on version {labels[label]} until version "
                        f"{target} is AVAILABLE")  # fmt: skip
    weights: dict[int, int] = {}
    for key, weight in routing.traffic:
        version = key if isinstance(key, int) else labels[key]
        weights[version] = weights.get(version, 0) + weight  # a label and a number for one version add up
    drawn = tuple((v, w) for v, w in sorted(weights.items()) if w > 0 and v in ready)
    idle = tuple(v for v, w in sorted(weights.items()) if w > 0 and v not in ready)
    cumulative, total = [], 0
    for _, weight in drawn:
        total += weight
        cumulative.append(total)
    routed = bool(routing.traffic)
    if routed and (drawn, idle) != (before.drawn, before.idle):
        waiting = ", ".join(map(str, idle))
        if not drawn:
            line = f"no version it weighs is AVAILABLE ({waiting}): requests without a version are NOT_FOUND"
        else:
            line = ", ".join(f"version {v} {100 * w / total:.3g} %" for v, w in drawn)
            if idle:
                line += f" (not AVAILABLE, their weight goes to the others: {waiting})"
        said.append(f"Traffic of model {model}: {line}")
    elif before.routed and not routed:
        said.append(f"Traffic of model {model}: none configured; requests without a version get the default version")
    if not routing:
        return NO_ROUTES, said
    names: dict[int, list[str]] = {}
    for label, version in sorted(labels.items()):
        names.setdefault(version, []).append(label)
    routes = Routes(
        labels=labels,
        pending=pending,
        left=left,
        routed=routed,
        drawn=drawn,
        idle=idle,
        names={v: ",".join(ls) for v, ls in names.items()},
        main=max(drawn, key=lambda vw: (vw[1], vw[0]))[0] if drawn else None,
        _cumulative=tuple(cumulative),
        _seeded=tuple((v, float(w), _hash64(b"hotserve-version:%d" % v)) for v, w in drawn),
    )
    return routes, said
