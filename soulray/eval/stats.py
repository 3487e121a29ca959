"""Means with percentile-bootstrap 95 % confidence intervals, and the paired difference the
promotion gate reads. Seeded, so a report is reproducible to the last digit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RESAMPLES = 1000


def bootstrap_ci(
    values: Sequence[float],
    seed: int = 0,
    resamples: int = RESAMPLES,
    statistic: Callable[[np.ndarray], float] | None = None,
) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of `statistic` (the mean by default) over resamples."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    if statistic is None:
        stats = data[picks].mean(axis=1)
    else:
        stats = np.array([statistic(data[p]) for p in picks])
    low, high = np.percentile(stats, [2.5, 97.5])
    return (float(low), float(high))


def summarize(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """{n, mean, ci: [low, high]} of per-sample values (NaN-free: unscored samples are left out
    by the caller and counted apart)."""
    if not values:
        return {"n": 0, "mean": None, "ci": [None, None]}
    low, high = bootstrap_ci(values, seed)
    return {"n": len(values), "mean": float(np.mean(values)), "ci": [low, high]}


def bootstrap_statistic_ci(
    samples: Sequence[Any], statistic: Callable[[Sequence[Any]], float], seed: int = 0
) -> tuple[float, float]:
    """CI of a statistic of the whole set (Distinct-n of a model's replies), by resampling items."""
    if not samples:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(RESAMPLES // 5):  # Distinct over every resample is the slow one: 200 suffice
        picks = rng.integers(0, len(samples), size=len(samples))
        stats.append(statistic([samples[i] for i in picks]))
    low, high = np.percentile(stats, [2.5, 97.5])
    return (float(low), float(high))


def paired_difference(
    candidate: Sequence[float], baseline: Sequence[float], seed: int = 0
) -> dict[str, Any]:
    """Mean of candidate - baseline over the same contexts, with its bootstrap CI."""
    if len(candidate) != len(baseline):
        raise AssertionError("paired samples must be aligned")
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return summarize(diff.tolist(), seed)
