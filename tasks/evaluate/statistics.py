"""Metrics with their 95% confidence intervals, and how a metric's value is written.

A metric is a JSON-able dict ``{"value", "ci95", "ci_method", "n"}``: Wilson score interval for
proportions (acc, exact match); percentile bootstrap over items (2,000 resamples, seed 0) for
means and ratios (F1, ROUGE-L, seconds, bits per byte, perplexity).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2_000
BOOTSTRAP_CHUNK = 1 << 20  # indices drawn at once: 8 MiB of them, and as much again for the values they pick


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; unlike the normal approximation it stays in
    [0, 1] and is honest at 0 or n successes and small n."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(n: int, statistic: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval over n items resampled with replacement: statistic takes
    the (resamples, n) item indices, one resample a row, and returns the statistic of each row.

    Resamples are drawn many at a time, up to BOOTSTRAP_CHUNK indices: the same indices as
    drawing them one resample at a time (a seeded Generator fills an array in the same order), so
    the same interval, without a Python call per resample."""
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK // n)
    values = np.concatenate([statistic(rng.integers(0, n, (min(rows, BOOTSTRAP_RESAMPLES - start), n))) for start in range(0, BOOTSTRAP_RESAMPLES, rows)])
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def proportion(hits: Sequence[bool]) -> dict:
    k, n = int(sum(hits)), len(hits)
    return {"value": k / n if n else math.nan, "ci95": list(wilson_interval(k, n)), "ci_method": "wilson", "n": n}


def mean(values: Sequence[float]) -> dict:
    x = np.asarray(values, dtype=float)
    ci = bootstrap_interval(len(x), lambda idx: x[idx].mean(axis=1))
    return {"value": float(x.mean()) if len(x) else math.nan, "ci95": list(ci), "ci_method": "bootstrap", "n": len(x)}


def ratio(numerators: Sequence[float], denominators: Sequence[float], transform: Callable[[float], float] = lambda r: r) -> dict:
    """transform(sum(num) / sum(den)), resampling items (documents) as wholes."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)

    def stat(idx: np.ndarray) -> np.ndarray:  # (resamples, n) indices -> each resample's value
        return np.array([transform(float(r)) for r in num[idx].sum(axis=1) / den[idx].sum(axis=1)])

    ci = bootstrap_interval(len(num), stat)
    return {"value": float(stat(np.arange(len(num))[None])[0]), "ci95": list(ci), "ci_method": "bootstrap", "n": len(num)}


def format_value(metric: str, value: float) -> str:
    """A metric's value as the reports write it: shares as percentages, bits per byte to 3 places."""
    if math.isnan(value):
        return "–"
    if metric in ("acc", "acc_norm", "exact_match", "f1", "rougeL"):
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if metric == "bits_per_byte" else f"{value:.2f}"
