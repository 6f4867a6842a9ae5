"""The tuned runs of the report (``make reports``) and what the 06-tuning page computes from them.

Both studies of ``configs/tuning/`` run under the report's profile (``kmeans.yaml``: the method's
knobs with the k-means term; ``no-kmeans.yaml``: the same budget with it off), into
``<runs>/tuning/exp2-<study>-<profile>/`` (where ``make tune`` puts them too). Their two ``best.yaml``
are then trained as the experiments "tuned" and "tuned-no-kmeans", and the untuned writeup setting
(exp2-wk0.25, the studies' first trial) beside them, once per seed, each tested once: the seeds
make the tuned-vs-untuned and with-vs-without-k-means differences come with their uncertainty.

    python -m ssl_lib.tuning.report train PROFILE [--trials N] [--runs DIR] [--pointer FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from ..config import load_config, make_config
from ..errors import BadInput
from ..experiments.grid import RUNS_ENV, _absolute, configs_dir, project_root, resolve
from ..experiments.executor import RunsFailed, settings_from_env, threads_of
from ..experiments.runs import Run, is_finished, load_run, run_dir_for, runs_root, train_missing
from ..experiments.stats import mean_sd, paired_difference, verdict  # noqa: F401 (part of this module's interface)

#: experiment name -> the space file (configs/tuning/<name>.yaml) of the study it comes from
STUDIES = {"tuned": "kmeans", "tuned-no-kmeans": "no-kmeans"}
LABELS = {"tuned": "tuned", "tuned-no-kmeans": "tuned without k-means", "untuned": "untuned (exp2-wk0.25)",
          "untuned-no-kmeans": "untuned without k-means (exp2-wk0)"}
UNTUNED = "exp2-wk0.25"  # the writeup's setting the studies start from (their enqueued first trial)
UNTUNED_NO_KMEANS = "exp2-wk0"  # the same with w_kmeans = 0: the no-k-means study's first trial
#: seeds per tuned config, by profile (the trials per study are the profile's tune_trials); five on
#: the quick profile, where a run takes seconds: a paired t interval over 3 seeds is about twice as wide
SEEDS = {"smoke": (0, 1), "quick": (0, 1, 2, 3, 4), "full": (0, 1, 2)}


def tuning_dir() -> Path:
    return configs_dir() / "tuning"


def study_dir(profile: str, space: str, runs_dir: str | Path | None = None) -> Path:
    """``<runs>/tuning/exp2-<space>-<profile>``: <runs> is ``runs_dir``, else $SSL_LIB_RUNS, else runs/."""
    if runs_dir:
        root = Path(runs_dir).expanduser().resolve()
    else:
        root = Path(_absolute(os.environ[RUNS_ENV])) if os.environ.get(RUNS_ENV) else project_root() / "runs"
    return root / "tuning" / f"exp2-{space}-{profile}"


def study_spec(profile: str, space: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
               quiet: bool = True):
    from .command import resolve_base, trials_wanted
    from .space import load_space
    from .study import TuneSpec

    base = resolve_base(tuning_dir() / "base.yaml", [], profile, source)
    return TuneSpec(base=base, space=load_space(tuning_dir() / f"{space}.yaml", base),
                    trials=trials_wanted(trials, profile), study_name=f"exp2-{space}-{profile}",
                    study_dir=study_dir(profile, space, runs_dir), final=False, quiet=quiet).check()


def ensure_studies(profile: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
                   quiet: bool = True) -> dict:
    """Both studies, run (or continued) to their trials; experiment name -> (spec, optuna study)."""
    from .study import open_study, tune

    out = {}
    for name, space in STUDIES.items():
        spec = study_spec(profile, space, runs_dir, source, trials, quiet)
        tune(spec)  # returns at once when the study is finished (best.yaml is rewritten as is)
        out[name] = (spec, open_study(spec))
    return out


def configs(profile: str, runs_dir=None, source: dict | None = None, seeds=None) -> dict[str, list]:
    """Experiment name -> its config per seed: the two best.yaml and the untuned setting with and
    without the k-means term (each study's first trial), so the k-means term is compared both ways."""
    seeds = SEEDS.get(profile, (0, 1, 2)) if seeds is None else seeds
    out = {}
    for name, space in STUDIES.items():
        best = load_config(study_dir(profile, space, runs_dir) / "best.yaml")
        out[name] = [make_config(best.to_dict(), {"name": name, "seed": s}) for s in seeds]
    untuned = resolve(UNTUNED, profile, source)
    out["untuned"] = [make_config(untuned.to_dict(), {"seed": s}) for s in seeds]
    out["untuned-no-kmeans"] = [make_config(untuned.to_dict(), {"name": UNTUNED_NO_KMEANS, "w_kmeans": 0.0, "seed": s})
                                for s in seeds]
    return out


def ensure_runs(profile: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
                seeds=None, quiet: bool = True) -> dict[str, list[Run]]:
    """The studies, then every tuned and untuned run (the missing ones trained together, through the
    executor: SLOTS at a time, or on Ray): name -> runs by seed."""
    ensure_studies(profile, runs_dir, source, trials, quiet)
    root = runs_root(profile, runs_dir)
    cfgs = configs(profile, runs_dir, source, seeds)
    train_missing([cfg for name, by_seed in cfgs.items() for cfg in by_seed
                   if final_run(cfg, name, profile, runs_dir) is None], root)
    return {name: [final_run(cfg, name, profile, runs_dir) or load_run(run_dir_for(cfg, root), cfg.name)
                   for cfg in by_seed] for name, by_seed in cfgs.items()}


def final_run(cfg, name: str, profile: str, runs_dir=None) -> Run | None:
    """The study's own training of best.yaml (``make tune``'s final-<hash>/) when ``cfg`` is that
    config (same seed, same digest), so the report does not train it a second time; else None."""
    if name not in STUDIES:
        return None
    run_dir = study_dir(profile, STUDIES[name], runs_dir) / f"final-{cfg.digest()}"
    return load_run(run_dir, name) if is_finished(run_dir, cfg) else None


# ------------------------------------------------------------------------------------ analysis

def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, value, epochs reached, its parameters, why it stopped."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val acc (final)": t.value,
                     "epochs": len(t.intermediate_values),
                     **{k: v for k, v in t.params.items()},
                     "note": t.user_attrs.get("pruned_because") or t.user_attrs.get("failed_because") or ""})
    return rows


def accuracy_rows(runs: dict[str, list[Run]]) -> list[dict]:
    rows = []
    for name, by_seed in runs.items():
        accs = [r.summary["final_acc"] for r in by_seed]
        mean, sd = mean_sd(accs)
        c = by_seed[0].config
        rows.append({"experiment": LABELS[name], "seeds": len(accs), "test acc (final, mean)": mean,
                     "test acc sd": sd, "per seed": ", ".join(f"{x:.4f}" for x in accs),
                     "w_augment": c.w_augment, "w_kmeans": c.w_kmeans, "tau": c.tau, "lr": c.lr,
                     "kmeans_every": c.kmeans_every})
    return rows


def answers(runs: dict[str, list[Run]]) -> dict:
    """The seed-paired differences: the k-means term at equal tuning effort (the question), the same
    at the untuned setting, and tuning itself."""
    acc = {n: [r.summary["final_acc"] for r in rs] for n, rs in runs.items()}
    kmeans = paired_difference(acc["tuned"], acc["tuned-no-kmeans"])
    untuned = paired_difference(acc["untuned"], acc["untuned-no-kmeans"])
    tuning = paired_difference(acc["tuned"], acc["untuned"])
    return {"kmeans_helps": kmeans, "kmeans_helps_untuned": untuned, "tuning_helps": tuning,
            "kmeans_verdict": verdict(kmeans, "Does the k-means term help (tuned minus tuned without k-means)"),
            "kmeans_untuned_verdict": verdict(untuned, "Does it help untuned (untuned minus untuned without k-means)"),
            "tuning_verdict": verdict(tuning, "Does tuning help (tuned minus untuned)")}


# -------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib.tuning.report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run both studies, then the tuned and untuned runs over the seeds")
    p.add_argument("profile")
    p.add_argument("--trials", type=int, help="finished trials per study (default: by profile)")
    p.add_argument("--runs", help="runs root (default: $SSL_LIB_RUNS, else runs/)")
    p.add_argument("--pointer", type=Path, help="JSON naming every run (rewritten only when one changes)")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_env()  # SLOTS, THREADS, EXECUTOR checked before anything runs
        with threads_of(settings.threads):  # the trials train here, at the runs' threads
            runs = ensure_runs(args.profile, args.runs, trials=args.trials, quiet=False)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    listing = {name: [{"run_dir": str(r.run_dir), "config_digest": r.config.digest(),
                       "summary_sha1": hashlib.sha1((r.run_dir / "summary.json").read_bytes()).hexdigest()}
                      for r in rs] for name, rs in runs.items()}
    text = json.dumps({"profile": args.profile, "runs": listing}, indent=1) + "\n"
    if args.pointer:
        from ..files import write_if_changed

        write_if_changed(args.pointer, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
