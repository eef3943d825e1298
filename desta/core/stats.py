"""Uncertainty: bootstrap intervals for mean scores and relative differences, stratified and paired.

Items are resampled with replacement within each stratum (an eval category), and the same resample
is used for every system (paired), so a difference between two systems carries the item noise once.
An overall score is the mean of the category means (each category counts once), resampled the same
way. Intervals are percentile intervals of the resampled statistic (2000 resamples, 95 %), seeded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean ignoring NaN (unscored items); NaN, without a warning, where nothing is scored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def relative_change(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray | float:
    """(a - b) / b, NaN where b is 0: the forgetting rate of a system a against a reference b.

    >>> relative_change(0.5, 1.0), float(relative_change(0.3, 0.0))
    (-0.5, nan)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(b == 0, np.nan, (a - b) / np.where(b == 0, 1.0, b))
    return float(out) if out.ndim == 0 else out


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of resampled statistics (NaN resamples left out); None if all are NaN."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of one sample of scores.

    >>> mean, low, high = mean_interval([1, 1, 1, 0, 1, 0, 1, 1, 0, 1])
    >>> mean, round(low, 1), round(high, 1)
    (0.7, 0.4, 1.0)
    """
    values = np.asarray(values, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    found = interval(values[rows].mean(axis=1), level)
    return float(values.mean()), *(found or (np.nan, np.nan))


def stratified_rows(strata: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """For each stratum, a (resamples, items in it) matrix of item indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    strata = np.asarray(strata)
    rows = {}
    for stratum in sorted(set(strata.tolist())):
        members = np.flatnonzero(strata == stratum)
        rows[stratum] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return rows


def bootstrap_table(strata: Sequence[str], series: dict[str, Sequence[float | None]],
                    ratios: dict[str, tuple[str, str]] | None = None, resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> dict[str, dict]:
    """Per stratum and "overall": each series' mean and interval, and each ratio's relative change.

    `series` maps a name to one score per item (None: unscored); `ratios` maps a name to (a, b):
    (mean a - mean b) / mean b. Returns {stratum: {"n": items, "values": {name: value},
    "ci": {name: [low, high] or None}}}.
    """
    ratios = ratios or {}
    data = {name: np.array([np.nan if v is None else v for v in values], dtype=float)
            for name, values in series.items()}
    rows = stratified_rows(strata, resamples, seed)
    table: dict[str, dict] = {}
    resampled: dict[str, dict[str, np.ndarray]] = {}
    for stratum, matrix in rows.items():
        members = np.flatnonzero(np.asarray(strata) == stratum)
        points = {name: nanmean(values[members]) for name, values in data.items()}
        draws = {name: nanmean(values[matrix], axis=1) for name, values in data.items()}  # (resamples,)
        table[stratum] = _row(len(members), points, draws, ratios, level)
        resampled[stratum] = draws
    overall_points = {name: nanmean(np.array([table[s]["values"][name] for s in rows], dtype=float))
                      for name in data}
    overall_draws = {name: nanmean(np.stack([resampled[s][name] for s in rows]), axis=0) for name in data}
    table["overall"] = _row(len(strata), overall_points, overall_draws, ratios, level)
    return table


def _row(count: int, points: dict[str, float], draws: dict[str, np.ndarray], ratios: dict[str, tuple[str, str]],
         level: float) -> dict:
    values = {name: None if np.isnan(v) else float(v) for name, v in points.items()}
    ci = {name: interval(d, level) for name, d in draws.items()}
    for name, (a, b) in ratios.items():
        value = relative_change(points[a], points[b])
        values[name] = None if np.isnan(value) else float(value)
        ci[name] = interval(relative_change(draws[a], draws[b]), level) if values[name] is not None else None
    return {"n": count, "values": values, "ci": {k: list(v) if v else None for k, v in ci.items()}}
