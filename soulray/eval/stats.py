"""Means with percentile-bootstrap 95 % confidence intervals, and the paired difference the
promotion gate reads. Seeded, so a report is reproducible to the last digit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RESAMPLES = 1000


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES
) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean over resamples."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return (float(low), float(high))


def summarize(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """{n, mean, ci: [low, high]} of per-sample values (NaN-free: unscored samples are left out
    by the caller and counted apart)."""
    if not values:
        return {"n": 0, "mean": None, "ci": [None, None]}
    low, high = bootstrap_ci(values, seed)
    return {"n": len(values), "mean": float(np.mean(values)), "ci": [low, high]}


def paired_difference(
    candidate: Sequence[float], baseline: Sequence[float], seed: int = 0
) -> dict[str, Any]:
    """Mean of candidate - baseline over the same contexts, with its bootstrap CI."""
    if len(candidate) != len(baseline):
        raise AssertionError("paired samples must be aligned")
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return summarize(diff.tolist(), seed)
