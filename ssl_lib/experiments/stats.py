"""Seed-paired comparisons, as the tuning and protocol pages report them: a mean over seeds with its
standard deviation, and the mean of paired differences with a Student-t interval."""

from __future__ import annotations

import math


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None from a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """Mean of a - b paired by seed, with a Student-t interval (none from a single pair)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def verdict(diff: dict, what: str) -> str:
    """One sentence: does the interval of ``what`` exclude zero?"""
    if diff["low"] == diff["high"] == diff["mean"] == 0:
        return f"{what}: no difference: both sides trained the same config (the untuned one won its study)."
    if diff["low"] is None:
        return f"{what}: {diff['mean']:+.4f} from a single seed, no interval: undecided."
    ci = f"{diff['mean']:+.4f} (95% CI {diff['low']:+.4f} to {diff['high']:+.4f}, {diff['n']} seeds)"
    if diff["low"] > 0:
        return f"{what}: yes, {ci}."
    if diff["high"] < 0:
        return f"{what}: no, it hurts, {ci}."
    return f"{what}: not shown at this budget, {ci}: the interval includes 0."
