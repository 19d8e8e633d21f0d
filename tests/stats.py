"""Bounds for tests that count random outcomes: chosen so that a correct server fails them with a known, tiny chance."""

from __future__ import annotations

import math
import os

import numpy as np


def random_keys(n: int) -> list[str]:
    return [os.urandom(12).hex() for _ in range(n)]  # fresh every run: nothing seeded to pass


def binomial_bound(n: int, p: float, tail: float = 1e-6) -> int:
    """The smallest k with P(|X - np| > k) < tail for X ~ Binomial(n, p): a bound that fails by chance < `tail`."""
    lg = math.lgamma
    pmf = np.exp([lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
                  for i in range(n + 1)])  # fmt: skip
    distance = np.abs(np.arange(n + 1) - n * p)
    for k in range(n + 1):
        if pmf[distance > k].sum() < tail:
            return k
    return n
