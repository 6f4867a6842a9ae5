"""How many seed pairs the protocol's comparison needs: the power of a two-sided paired t test, and
the protocol's power table (07-protocol, docs/protocol.md).

With n pairs whose differences have mean ``delta`` and standard deviation ``sd_diff``, the paired t
statistic follows a noncentral t distribution with n - 1 degrees of freedom and noncentrality
delta * sqrt(n) / sd_diff; the test rejects when |t| exceeds the t quantile 1 - alpha / 2.

The spread of the paired differences comes from the literature until the profile's own runs give
one: the paper's standard deviation of a run over 5 folds (:data:`protocol.PAPER`), turned into the
spread of a difference of two runs under a stated correlation rho of the runs of one pair,
sigma_d = sigma * sqrt(2 (1 - rho)): rho = 0 (independent runs, sigma * sqrt(2)) and rho = 0.5
(sigma_d = sigma). Runs of one seed share the labeled split, the initialisation and the batch order,
which makes rho > 0 likely, but nothing measured here says how large; the table gives both.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from scipy import stats

from . import protocol

#: the difference the protocol's test should see: 1 point of test accuracy
ONE_POINT = 0.01
#: the power the plan asks for
TARGET_POWER = 0.8
#: seed pairs at a label count from which their own spread replaces the literature's
MIN_MEASURED_PAIRS = 3
#: the correlations of the two runs of a pair assumed while no spread is measured, and their names
ASSUMED_CORRELATIONS = {0.0: "independent runs (σ_d = σ·√2)", 0.5: "correlation 0.5 (σ_d = σ)"}


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def _real(name: str, value) -> float:
    _check(name, value, isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value),
           "must be a finite number")
    return float(value)


def _arguments(delta, sd_diff, alpha) -> tuple[float, float, float]:
    delta, sd_diff, alpha = _real("delta", delta), _real("sd_diff", sd_diff), _real("alpha", alpha)
    _check("sd_diff", sd_diff, sd_diff >= 0, "must be >= 0")
    _check("alpha", alpha, 0 < alpha < 1, "must be between 0 and 1")
    return delta, sd_diff, alpha


def paired_t_power(n: int, delta: float, sd_diff: float, alpha: float = 0.05) -> float:
    """The probability that a two-sided paired t test at level ``alpha`` on ``n`` pairs rejects "no
    difference" when the differences have mean ``delta`` and standard deviation ``sd_diff``.

    Fewer than 2 pairs give no test (no spread to divide by): 0. With ``sd_diff`` 0 every difference
    is ``delta``: the statistic is infinite (power 1) unless ``delta`` is 0 (then it is 0 / 0 and
    the test does not reject: 0)."""
    _check("n", n, isinstance(n, Integral) and not isinstance(n, bool) and n >= 0, "must be an integer >= 0")
    delta, sd_diff, alpha = _arguments(delta, sd_diff, alpha)
    if n < 2:
        return 0.0
    if sd_diff == 0:
        return 1.0 if delta != 0 else 0.0
    df, nc = n - 1, abs(delta) * math.sqrt(n) / sd_diff
    crit = stats.t.ppf(1 - alpha / 2, df)
    lower = stats.nct.cdf(-crit, df, nc)
    if not math.isfinite(lower):  # scipy loses this far tail at large nc (nan); it lies below P(t < 0) = Phi(-nc)
        lower = stats.norm.cdf(-nc)
    return float(min(1.0, stats.nct.sf(crit, df, nc) + lower))


def pairs_needed(delta: float, sd_diff: float, alpha: float = 0.05, power: float = TARGET_POWER,
                 max_pairs: int = 1_000_000) -> int:
    """The smallest number of pairs (>= 2) whose paired t test reaches ``power``.

    The power grows with n, so a bisection between 2 and the first power of two that reaches it."""
    delta, sd_diff, alpha = _arguments(delta, sd_diff, alpha)
    power = _real("power", power)
    _check("power", power, alpha < power < 1, f"must be between alpha ({alpha}) and 1")
    _check("delta", delta, delta != 0, "must not be 0 (no number of pairs detects no difference)")
    low, high = 1, 2  # power(low) < target <= power(high) once the loop ends
    while paired_t_power(high, delta, sd_diff, alpha) < power:
        low, high = high, high * 2
        if high > max_pairs:
            raise ValueError(f"max_pairs {max_pairs} is too few: delta {delta} at sd_diff {sd_diff} needs more pairs")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if paired_t_power(mid, delta, sd_diff, alpha) >= power else (mid, high)
    return high


def measured_sd_diff(runs: dict, labels: int, metric: str = "median_last20_acc") -> tuple[float, list[int]] | None:
    """The standard deviation of the seed-paired differences fixmatch-kmeans-<labels> minus
    fixmatch-<labels> among ``runs`` ({(run, seed): Run}) and their seeds, when there are at least
    :data:`MIN_MEASURED_PAIRS`; else None."""
    a = {seed: r.summary[metric] for (name, seed), r in runs.items() if name == f"fixmatch-kmeans-{labels}"}
    b = {seed: r.summary[metric] for (name, seed), r in runs.items() if name == f"fixmatch-{labels}"}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < MIN_MEASURED_PAIRS:
        return None
    return float(stats.tstd([a[s] - b[s] for s in seeds])), seeds


def paired_seeds(prof: protocol.ProtocolProfile, labels: int) -> list[int]:
    """The seeds a profile trains both fixmatch-<labels> and fixmatch-kmeans-<labels> with."""
    return sorted(set(prof.seeds(f"fixmatch-{labels}")) & set(prof.seeds(f"fixmatch-kmeans-{labels}")))


def power_rows(plan: str | protocol.ProtocolProfile = "full", runs: dict | None = None,
               seconds_per_step: float = protocol.ASSUMED_GPU_SECONDS_PER_STEP, delta: float = ONE_POINT,
               alpha: float = 0.05, power: float = TARGET_POWER) -> list[dict]:
    """The power table of ``plan``'s FixMatch + k-means against FixMatch at 40, 250 and 4,000 labels:
    per label count and spread, the pairs needed for ``power`` at a difference ``delta``, the
    GPU-hours of those pairs (both runs of each, at ``seconds_per_step``), and the power of the
    plan's own pairs. The spread is the seed-paired differences' of ``runs`` where they have at
    least :data:`MIN_MEASURED_PAIRS` pairs at that label count (one row), else the paper's sd under
    each of :data:`ASSUMED_CORRELATIONS` (one row each). Accuracies are fractions; the table's
    spreads are in points."""
    prof = plan if isinstance(plan, protocol.ProtocolProfile) else protocol.load_protocol_profile(plan)
    per_run = {r["run"]: r["GPU-hours per run"] for r in protocol.gpu_hours(prof, seconds_per_step)}
    out = []
    for labels, (_, sigma) in protocol.PAPER.items():
        pair_hours = [per_run.get(f"{side}-{labels}") for side in ("fixmatch", "fixmatch-kmeans")]
        hours = None if None in pair_hours else sum(pair_hours)
        own = len(paired_seeds(prof, labels))
        measured = measured_sd_diff(runs or {}, labels)
        if measured is not None:
            sd, seeds = measured
            spreads = [(sd, f"measured: sd of {len(seeds)} seed-paired differences (seeds "
                            f"{', '.join(map(str, seeds))})")]
        else:
            spreads = [(sigma * math.sqrt(2 * (1 - rho)), f"the paper's σ {sigma * 100:.2f}, {name}")
                       for rho, name in ASSUMED_CORRELATIONS.items()]
        for sd, source in spreads:
            n = pairs_needed(delta, sd, alpha, power)
            out.append({"labels": labels, "σ_d from": source, "σ_d (points)": sd * 100,
                        f"pairs for {power:.0%} power": n, "GPU-hours of those pairs": None if hours is None else n * hours,
                        "pairs in the plan": own, "power of the plan's pairs": paired_t_power(own, delta, sd, alpha)})
    return out


def weight_study_seed(study: str = "study") -> int:
    """The seed the protocol study's trials train with (``make tune-protocol``: the 250-label config
    under the study profile, which sets no seed): a main test on it would test the weight on the
    seed it was chosen on."""
    return protocol.resolve_file(protocol.protocol_dir() / "fixmatch-kmeans-250.yaml", study, source={}).seed


def _percent(p: float) -> str:
    return f"{p:.0%}" if p < 0.995 else f"{p:.1%}"


def plan_summary(plan: protocol.ProtocolProfile, table: list[dict], delta: float = ONE_POINT) -> str:
    """What ``plan`` tests and with what power, from its :func:`power_rows` (Markdown): the main test,
    the label counts reported without a verdict, and what was tuned."""
    lines = []
    for labels in protocol.PAPER:
        rows = [r for r in table if r["labels"] == labels]
        seeds = paired_seeds(plan, labels)
        if not rows or not seeds:
            continue
        powers = [_percent(r["power of the plan's pairs"]) for r in rows]
        power = (f"{powers[0]} (measured σ_d)" if len(rows) == 1 else
                 f"{powers[0] if len(set(powers)) == 1 else ' to '.join(powers)} (the paper's σ, from "
                 f"{' to '.join(ASSUMED_CORRELATIONS.values())})")
        what = f"{len(seeds)} seed pair{'s' * (len(seeds) > 1)} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"
        if labels == plan.main_test:
            lines.append(f"- **Main test, pre-registered: {labels:,} labels**, FixMatch + k-means against FixMatch on "
                         f"{what}: power {power} to see a {delta * 100:g}-point difference (two-sided paired t "
                         f"test at 5%).")
        elif len(seeds) < 2:
            lines.append(f"- {labels:,} labels: {what}: no test, the accuracies only.")
        else:
            lines.append(f"- {labels:,} labels: {what}, power {power}: reported as mean ± sd, **no verdict**.")
    study = weight_study_seed()
    used = sorted({s for labels in protocol.PAPER for s in paired_seeds(plan, labels)} & {study})
    lines.append(f"- The weight study (`make tune-protocol`) trained with seed {study}: "
                 + ("the plan does not use it." if not used else f"**the plan uses it too** ({plan.name})."))
    lines.append("- Only the k-means side was tuned (its weight, by the protocol study); FixMatch's "
                 "hyperparameters are the paper's.")
    return "\n".join(lines)
