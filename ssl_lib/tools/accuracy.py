"""Did a change move accuracy? ``python -m ssl_lib accuracy`` (and ``make accuracy``).

Trains one config once per seed and records each run's final and best test accuracy, with their
mean and standard deviation. Given ``--compare`` (the JSON of an earlier check: another commit, or
another setting such as ``precision=bf16``), it pairs the runs seed by seed and reports the mean
difference with its standard error: the seed fixes the subset, the split, the initialisation and
the views alike on both sides, so the paired difference is far less noisy than the two means.

To check an optimisation, run the same command at the commit before it and at the commit after::

    git switch --detach BEFORE && python -m ssl_lib accuracy --out bench/accuracy-before.json ...
    git switch -                && python -m ssl_lib accuracy --compare bench/accuracy-before.json ...
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from ..config import _DEFAULTS, Config, ConfigError, make_config
from ..engine.env import environment, resolve_device
from ..engine.train import train
from ..files import write_json

METRICS = ("final_acc", "best_acc")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired(after: dict, before: dict, metric: str = "final_acc") -> dict:
    """Seed-by-seed differences after - before of ``metric``, on the seeds both checks ran."""
    a = {r["seed"]: r[metric] for r in after["runs"]}
    b = {r["seed"]: r[metric] for r in before["runs"]}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ConfigError("--compare: the two checks have no seed in common")
    diffs = [a[s] - b[s] for s in seeds]
    mean, sd = _mean_sd(diffs)
    return {"metric": metric, "seeds": seeds, "differences": diffs, "mean": mean,
            "standard_error": sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")}


def run_seeds(cfg: Config, seeds: list[int], out_path: str | Path, compare: str | Path | None = None,
              quiet: bool = True) -> dict:
    """Train ``cfg`` once per seed, write the summary (and the paired comparison) as JSON; return it."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    cfg.validate()
    before = None
    if compare is not None:
        try:
            before = json.loads(Path(compare).read_text())
            before["runs"]  # noqa: B018 - fail here, not after an hour of training
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--compare {compare}: not an accuracy check ({err})") from None
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        run_cfg = make_config(cfg.to_dict(), {"seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(run_cfg, Path(tmp) / "run", quiet=quiet)
        runs.append({"seed": seed, "final_acc": summary["final_acc"], "best_acc": summary["best_acc"],
                     "seconds_per_epoch": summary["seconds_per_epoch"]})
        print(f"seed {seed}: final acc {summary['final_acc']:.4f}, best {summary['best_acc']:.4f}, "
              f"{summary['seconds_per_epoch']:.1f} s/epoch", flush=True)
    result = {"config": {k: v for k, v in cfg.to_dict().items() if k != "seed"}, "runs": runs,
              "environment": environment(resolve_device(cfg.device)),
              "seconds": time.perf_counter() - started}
    for metric in METRICS:
        mean, sd = _mean_sd([r[metric] for r in runs])
        result[metric] = {"mean": mean, "sd": sd}
    if before is not None:
        result["compared_with"] = {"path": str(compare), "git_commit": before.get("environment", {}).get("git_commit"),
                                   "config_differences": _config_differences(before["config"], result["config"]),
                                   **{m: paired(result, before, m) for m in METRICS}}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    print(format_summary(result))
    print(f"written {out_path}")
    return result


def _config_differences(before: dict, after: dict) -> dict:
    """Fields that differ, as [before, after]; a field the earlier check predates counts as its default."""
    return {k: [before.get(k, _DEFAULTS.get(k)), v] for k, v in after.items() if before.get(k, _DEFAULTS.get(k)) != v}


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def format_summary(r: dict) -> str:
    lines = [f"{len(r['runs'])} seeds, commit {r['environment']['git_commit']}, {r['environment']['device']}:"]
    for metric in METRICS:
        lines.append(f"  {metric}: {_points(r[metric]['mean'])} +- {_points(r[metric]['sd'])}% (mean +- sd)")
    c = r.get("compared_with")
    if c:
        diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in c["config_differences"].items()) or "none"
        lines.append(f"  against {c['path']} (commit {c['git_commit']}; config differences: {diff}):")
        for metric in METRICS:
            p = c[metric]
            lines.append(f"    {metric}: {'+' if p['mean'] >= 0 else ''}{_points(p['mean'])} +- "
                         f"{_points(p['standard_error'])} points (paired over seeds {p['seeds']}, +- s.e.)")
    return "\n".join(lines)
