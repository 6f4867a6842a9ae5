"""The statistics the pages report, on ``scipy.stats``.

* :func:`paired_t`: the mean of seed-paired differences with its Student-t interval and p-value
  (``scipy.stats.ttest_rel``), for comparisons where nothing was selected (the untuned pair, the
  protocol's seeds, Experiment 3's noise levels).
* :func:`expected_best_of_k` / :func:`best_of_k`: the expected test accuracy of the
  validation-best of k trials drawn from a pool of N (Dodge et al. 2019, "Show Your Work"), for two
  pools paired by trial index, with a paired BCa bootstrap interval over trial index
  (``scipy.stats.bootstrap``) and the probability that one pair of k-trial studies shows a positive
  difference. This is the tuned comparison: its interval includes which config a study happens to pick.
* :func:`holm` / :func:`judge`: the verdicts of one page corrected together (Holm's step-down).

Every comparison pairs by key (the seed, the trial index): a key present on one side only is an
:class:`UnpairedError` naming it, never a silently dropped value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

from ..errors import BadInput

ALPHA = 0.05  # the family-wise error rate of one page's verdicts


class UnpairedError(BadInput):
    """Two sides of a paired comparison do not have the same keys; the message names the missing ones."""


def mean_sd(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None from a single value)."""
    x = np.asarray(list(values), dtype=float)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def paired(a: Mapping, b: Mapping, names: tuple[str, str] = ("a", "b"), key: str = "seed") -> tuple[list, np.ndarray, np.ndarray]:
    """``(keys, a values, b values)`` in key order; a key on one side only raises :class:`UnpairedError`."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        missing = [f"{key} {k} has {names[0]} but not {names[1]}" for k in only_a]
        missing += [f"{key} {k} has {names[1]} but not {names[0]}" for k in only_b]
        raise UnpairedError(f"unpaired comparison of {names[0]} and {names[1]}: " + "; ".join(missing))
    if not a:
        raise UnpairedError(f"no {key} to pair {names[0]} and {names[1]} on")
    keys = sorted(a)
    return keys, np.array([a[k] for k in keys], dtype=float), np.array([b[k] for k in keys], dtype=float)


def paired_t(a: Mapping, b: Mapping, level: float = 0.95, names: tuple[str, str] = ("a", "b"),
             key: str = "seed") -> dict:
    """Mean of ``a - b`` paired by key, its Student-t interval at ``level`` and the two-sided p-value
    of ``scipy.stats.ttest_rel``; no interval or p from a single pair or when every difference is the
    same (no spread to estimate the noise from)."""
    from scipy import stats

    _check_level(level)
    keys, x, y = paired(a, b, names, key)
    d = x - y
    out = {"method": "paired t", "n": len(d), "unit": f"{key}s", "keys": keys, "mean": float(d.mean()),
           "low": None, "high": None, "p": None, "level": level, "spread": mean_sd(d)[1]}
    if len(d) > 1 and np.ptp(d) > 0:
        res = stats.ttest_rel(x, y)
        ci = res.confidence_interval(level)
        out.update(low=float(ci.low), high=float(ci.high), p=float(res.pvalue))
    return out


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be between 0 and 1, got {level}")


# ------------------------------------------------------------------ expected best of k trials

def selection_weights(val, k: int, replace: bool = False) -> np.ndarray:
    """Probability that each trial of the pool is the validation-best of k trials drawn at random:
    without ``replace``, a k-subset (rank i of N, ascending, wins with C(i-1, k-1) / C(N, k)); with
    it, k independent draws (((i/N)^k - ((i-1)/N)^k)). Trials tied on validation share their tie
    group's probability equally (a random tie-break)."""
    v = np.asarray(val, dtype=float)
    n = len(v)
    if not 1 <= k <= (math.inf if replace else n):
        raise ValueError(f"k must be between 1 and the pool's {n} trials, got {k}")
    order = np.argsort(v, kind="stable")
    i = np.arange(1, n + 1)
    if replace:
        pos = (i / n) ** k - ((i - 1) / n) ** k
    else:
        total = math.comb(n, k)
        pos = np.array([math.comb(r - 1, k - 1) / total for r in i])
    sorted_v = v[order]
    group = np.concatenate([[0], np.cumsum(sorted_v[1:] != sorted_v[:-1])])  # tie blocks, ascending
    pos = (np.bincount(group, pos) / np.bincount(group))[group]
    w = np.empty(n)
    w[order] = pos
    return w


def expected_best_of_k(val, test, k: int, replace: bool = False) -> float:
    """E[test accuracy of the validation-best of k trials] over the pool ``(val[i], test[i])``:
    sum_i P(trial i is the validation-best of k) * test[i] (Dodge et al. 2019 give it for the
    validation score itself; the test score of the selected trial is what a study delivers)."""
    return float(selection_weights(val, k, replace) @ np.asarray(test, dtype=float))


def expected_curve(val, test, replace: bool = False) -> np.ndarray:
    """:func:`expected_best_of_k` for k = 1 .. N."""
    return np.array([expected_best_of_k(val, test, k, replace) for k in range(1, len(val) + 1)])


def prob_first_wins(va, ta, vb, tb, k: int, draws: int = 20_000, seed: int = 0) -> float:
    """Probability that one pair of k-trial studies (the same k trial indices on both sides, drawn
    without replacement; validation ties broken at random) gives side a the higher test accuracy;
    equal test accuracies count one half. Exact over every k-subset when there are at most ``draws``
    of them and no validation ties, else estimated from ``draws`` seeded draws."""
    va, ta, vb, tb = (np.asarray(x, dtype=float) for x in (va, ta, vb, tb))
    n = len(va)
    rng = np.random.default_rng(seed)
    ties = len(np.unique(va)) < n or len(np.unique(vb)) < n
    if math.comb(n, k) <= draws and not ties:
        from itertools import combinations

        subsets = np.array(list(combinations(range(n), k)))
        jitter_a = jitter_b = np.zeros((len(subsets), n))
    else:
        subsets = np.argsort(rng.random((draws, n)), axis=1)[:, :k]
        jitter_a, jitter_b = rng.random((draws, n)), rng.random((draws, n))
    diff = ta[_argbest(subsets, va, jitter_a)] - tb[_argbest(subsets, vb, jitter_b)]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _argbest(subsets: np.ndarray, val: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """The validation-best trial of each row of ``subsets``, ties broken by ``jitter`` (one draw per trial)."""
    v = val[subsets]
    best = v == v.max(axis=1, keepdims=True)
    j = np.where(best, np.take_along_axis(jitter, subsets, axis=1), -1.0)
    return subsets[np.arange(len(subsets)), np.argmax(j, axis=1)]


def best_of_k(a: Mapping, b: Mapping, k: int, level: float = 0.95, names: tuple[str, str] = ("a", "b"),
              n_resamples: int = 9999, seed: int = 0) -> dict:
    """The tuned comparison: two pools of trials paired by trial index (``{trial: (val acc, test acc)}``),
    the difference of their expected best-of-k test accuracies (:func:`expected_best_of_k`), a
    paired BCa bootstrap interval over trial index at ``level`` with its p-value (the smallest
    1 - level whose interval excludes 0, found on the same resamples), the probability that one pair
    of k-trial studies shows a > b, and both expected curves for k = 1 .. N."""
    from scipy import stats

    _check_level(level)
    keys, _, _ = paired({t: 0 for t in a}, {t: 0 for t in b}, names, key="trial")
    va, ta = (np.array([a[t][i] for t in keys], dtype=float) for i in (0, 1))
    vb, tb = (np.array([b[t][i] for t in keys], dtype=float) for i in (0, 1))
    n = len(keys)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the pools' {n} paired trials, got {k}")
    curve_a, curve_b = expected_curve(va, ta), expected_curve(vb, tb)
    delta = float(curve_a[k - 1] - curve_b[k - 1])
    out = {"method": f"expected best of {k}, paired bootstrap (BCa) over trial index", "k": k, "n": n,
           "unit": "trial pairs", "keys": keys, "mean": delta, "low": None, "high": None, "p": None, "level": level,
           "expected_a": curve_a.tolist(), "expected_b": curve_b.tolist(),
           "prob_a_wins": prob_first_wins(va, ta, vb, tb, k, seed=seed)}
    if n < 3:
        return out

    def statistic(va, ta, vb, tb):
        m = len(va)
        kk = min(k, m)  # the jackknife leaves one trial out: at k = N, the best of the N - 1 left
        return expected_best_of_k(va, ta, kk) - expected_best_of_k(vb, tb, kk)

    def run(level, previous=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate distribution: nan ends, handled below
            return stats.bootstrap((va, ta, vb, tb), statistic, paired=True, vectorized=False, method="BCa",
                                   confidence_level=level, n_resamples=0 if previous else n_resamples,
                                   bootstrap_result=previous, rng=np.random.default_rng(seed))

    res = run(level)
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        return out
    out.update(low=float(low), high=float(high), p=_bootstrap_p(lambda lv: run(lv, res).confidence_interval))
    return out


def _bootstrap_p(interval, tol: float = 1e-4) -> float:
    """The two-sided p-value of a bootstrap interval: the smallest alpha whose (1 - alpha) interval
    excludes 0 (intervals narrow as alpha grows), by bisection on the same resamples."""
    def excludes(alpha):
        lo, hi = interval(1 - alpha)
        return not (lo <= 0 <= hi)

    lo, hi = tol, 1 - tol
    if excludes(lo):
        return lo
    if not excludes(hi):
        return 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if excludes(mid) else (mid, hi)
    return hi


# ------------------------------------------------------------------ verdicts of one page

def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (controls the family-wise error rate; written here because
    scipy.stats offers only false-discovery-rate control): the i-th smallest p times (m - i + 1),
    made non-decreasing, capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def judge(comparisons: Mapping[str, dict], alpha: float = ALPHA) -> dict[str, dict]:
    """Each comparison (``question -> paired_t / best_of_k result``) with its Holm-adjusted p-value
    over the page's comparisons that have one, and a one-sentence verdict that says the level of its
    interval as computed and the correction."""
    tested = [q for q, c in comparisons.items() if c.get("p") is not None]
    adjusted = dict(zip(tested, holm([comparisons[q]["p"] for q in tested]))) if tested else {}
    m = len(tested)
    out = {}
    for question, c in comparisons.items():
        c = {**c, "p_holm": adjusted.get(question), "family": m}
        c["verdict"] = verdict(question, c, alpha)
        out[question] = c
    return out


def verdict(question: str, c: dict, alpha: float = ALPHA) -> str:
    """One sentence: the estimate, its interval at the level computed, the p-value after Holm's
    correction over the page's ``family`` verdicts, and the answer at ``alpha``."""
    n, unit = c["n"], c.get("unit", "pairs")
    if c["low"] is None:
        why = (f"all {n} differences are {c['mean']:+.4f}, no spread to measure the noise by"
               if n > 1 and not c.get("spread") else f"{n} {unit}, too few for an interval")
        return f"{question}: {c['mean']:+.4f}, undecided ({why})."
    ci = f"{c['mean']:+.4f} ({c['level']:.0%} CI {c['low']:+.4f} to {c['high']:+.4f}, {n} {unit}"
    p_holm, m = c.get("p_holm", c["p"]), c.get("family", 1)
    ci += f"; p = {c['p']:.3g}" + (f", {p_holm:.3g} after Holm's correction over {m} verdicts)" if m > 1 else ")")
    if p_holm is not None and p_holm < alpha:
        return f"{question}: {'yes' if c['mean'] > 0 else 'no, it hurts'}, {ci}."
    return f"{question}: not shown at this budget, {ci}."
