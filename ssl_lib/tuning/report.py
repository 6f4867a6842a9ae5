"""The tuned comparison of the report (``make reports``) and what the 06-tuning page computes from it.

The question is whether the k-means term helps at equal tuning effort, and the answer must include
which config a study happens to pick. So each side is a **pool** of N random-search trials over its
space (``configs/tuning/kmeans.yaml`` with the term, ``no-kmeans.yaml`` without; N is the profile's
``tune_trials``), trial i trained with seed i on both sides on the same data (``data_seed``) and
drawing the same values of the parameters both spaces share, so the two pools pair up by trial. Each
trial is scored on the validation hold-out (what selects) and, after the pools are done, once on
the test set (never used to select). The headline is the difference of the expected test accuracy
of the validation-best of k trials (:func:`~ssl_lib.experiments.stats.best_of_k`), k declared by the
profile (``tune_headline_k``), with a paired bootstrap interval over trial index. Beside it, the
writeup's untuned setting with and without the term over the profile's seeds (nothing selected
there: a paired t interval). The pools live in ``<runs>/tuning/exp2-<space>-pool-<profile>/``.
``make tune`` (TPE) stays the tool for finding a good config.

    python -m ssl_lib.tuning.report train PROFILE [--trials N] [--runs DIR] [--pointer FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

from ..config import make_config
from ..errors import BadInput
from ..experiments.grid import RUNS_ENV, _absolute, configs_dir, load_profile, project_root, resolve
from ..experiments.executor import RunsFailed, settings_from_env, threads_of
from ..experiments.runs import Run, load_run, run_dir_for, runs_root, train_missing
from ..experiments.stats import best_of_k, judge, mean_sd, paired_t
from ..files import write_json

#: pool name -> the space file (configs/tuning/<name>.yaml) it draws from
POOLS = {"kmeans": "kmeans", "no-kmeans": "no-kmeans"}
LABELS = {"kmeans": "random search with k-means", "no-kmeans": "random search without k-means",
          "untuned": "untuned (exp2-wk0.25)", "untuned-no-kmeans": "untuned without k-means (exp2-wk0)"}
UNTUNED = "exp2-wk0.25"  # the writeup's setting
UNTUNED_NO_KMEANS = "exp2-wk0"  # the same with w_kmeans = 0
#: seeds of the untuned pair, by profile; five on the quick profile, where a run takes seconds: a paired
#: t interval over 3 seeds is about twice as wide
SEEDS = {"smoke": (0, 1), "quick": (0, 1, 2, 3, 4), "full": (0, 1, 2)}
TEST_FILE = "test.json"  # a pool trial's one test score, beside its run


def tuning_dir() -> Path:
    return configs_dir() / "tuning"


def study_dir(profile: str, space: str, runs_dir: str | Path | None = None) -> Path:
    """``<runs>/tuning/exp2-<space>-pool-<profile>``: <runs> is ``runs_dir``, else $SSL_LIB_RUNS, else runs/."""
    if runs_dir:
        root = Path(runs_dir).expanduser().resolve()
    else:
        root = Path(_absolute(os.environ[RUNS_ENV])) if os.environ.get(RUNS_ENV) else project_root() / "runs"
    return root / "tuning" / f"exp2-{space}-pool-{profile}"


def pool_spec(profile: str, space: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
              quiet: bool = True):
    """Random search (seeded per trial and parameter), no pruner, trial i on seed i, no final run.

    No pruner: a pruner stops a trial by comparing it with the trials before it, so the pool's
    trials would no longer be exchangeable draws, which the order statistics of the expected best
    of k assume; every trial trains its whole budget."""
    from .command import resolve_base, trials_wanted
    from .space import load_space
    from .study import TuneSpec

    # its choice fields are checked before a trial is trained (ensure_pools), not here: the page of
    # a finished pool then starts no torch
    base = resolve_base(tuning_dir() / "base.yaml", [], profile, source, check=False)
    return TuneSpec(base=base, space=load_space(tuning_dir() / f"{space}.yaml", base),
                    trials=trials_wanted(trials, profile), study_name=f"exp2-{space}-pool-{profile}",
                    study_dir=study_dir(profile, space, runs_dir), final=False, quiet=quiet,
                    sampler="random", pruner="none", seed_per_trial=True).check()


def headline_k(profile: str, trials: int) -> int:
    """The k the page's verdict is about: the profile's ``tune_headline_k``, declared before any
    trial runs (at most the pools' size), else half the trials."""
    k = load_profile(profile).tune_headline_k
    return min(k, trials) if k else max(1, trials // 2)


def ensure_pools(profile: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
                 quiet: bool = True) -> dict:
    """Both pools, run (or continued) to their trials and each complete trial scored once on the
    test set; pool name -> (spec, optuna study, {trial: (val acc, test acc)})."""
    from .storage import EMBEDDED, exclusive
    from .study import counts, open_study

    out = {}
    for name, space in POOLS.items():
        spec = pool_spec(profile, space, runs_dir, source, trials, quiet)
        # one process runs a pool at a time (two pages or reports at once would draw trials past N,
        # and trial i must be seed i); the next finds it finished. Scored under the same hold, as
        # each score is written once.
        with exclusive(spec.study_dir.parent / f".{spec.study_dir.name}.lock"):
            study = open_study(spec) if (spec.study_dir / EMBEDDED).is_file() else None
            if study is None or counts(study)["finished"] < spec.trials:
                from ..engine.train import check_choices

                check_choices(spec.base)  # before the study is made or a trial drawn
                train_pool(spec)
                study = open_study(spec)
            out[name] = (spec, study, scores(spec, study))
    return out


def train_pool(spec, settings=None) -> None:
    """The pool's missing trials, trained as runs of the executor (``SLOTS`` at a time, Ray or SLURM
    jobs: ``settings``, default the environment's), the study kept here.

    Its trials are independent draws (random search seeded by trial and name, no pruner), so all the
    missing ones are asked for at once, trained together, then told: the final validation accuracy
    of a finished run (its epochs reported, as a trial trained by ``tune`` reports them); PRUNED for
    a run whose loss diverged (an outcome of its values: it stays in the pool); FAIL for any other
    failure (a rerun replaces it). A trial left running by a driver that stopped is trained again
    from its run's last checkpoint, with the values it was given."""
    from optuna.trial import FixedTrial, Trial, TrialState

    from ..engine.rundir import EPOCHS, read_metrics, read_summary
    from ..experiments.executor import DIVERGED, Job, run_jobs
    from .study import open_study, record_summary, trial_run

    study = open_study(spec, create=True)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # each trial's values: a running one's as it was given them, a new one's as drawn now
    values = {t.number: spec.space.suggest(FixedTrial(t.params, t.number))
              for t in trials if t.state == TrialState.RUNNING}
    for _ in range(max(0, spec.trials - finished - len(values))):
        trial = study.ask()
        values[trial.number] = spec.space.suggest(trial)
    if not values:
        return
    ids = {t.number: t._trial_id for t in study.get_trials(deepcopy=False)}
    runs = {n: trial_run(spec, n, v) for n, v in values.items()}
    for n, (cfg, run_dir) in runs.items():
        Trial(study, ids[n]).set_user_attr("run_dir", str(run_dir.resolve()))
    error = None
    try:
        run_jobs([Job(cfg, run_dir, keep_diverged=True) for cfg, run_dir in runs.values()], settings)
    except (Exception, KeyboardInterrupt) as err:  # the runs that finished are still told
        error = err
    for n, (cfg, run_dir) in runs.items():
        trial = Trial(study, ids[n])
        if (run_dir / EPOCHS).is_file():  # the epochs it finished, as tune's trials report them
            for epoch, acc in enumerate(read_metrics(run_dir)["epoch"].get("val_acc", []), 1):
                trial.report(acc, epoch)
        if (run_dir / "summary.json").is_file():
            summary = read_summary(run_dir)
            record_summary(trial, cfg, summary)
            study.tell(n, summary["final_acc"])
        elif (run_dir / DIVERGED).is_file():
            trial.set_user_attr("pruned_because", "diverged: " + json.loads((run_dir / DIVERGED).read_text())["error"])
            study.tell(n, state=TrialState.PRUNED)
        elif error is not None and not isinstance(error, KeyboardInterrupt):
            trial.set_user_attr("failed_because", f"{type(error).__name__}: {error}")
            study.tell(n, state=TrialState.FAIL)
    if error is not None:
        raise error


def scores(spec, study) -> dict[int, tuple[float, float]]:
    """``{trial: (final val acc, test acc)}`` of every finished trial. A trial stopped because its
    loss diverged is a real outcome of its values: it is kept, never selected while another trial is
    drawn beside it (val -inf), and scores chance on the test set. Failed trials (bad input, a dead
    worker) are not in the pool: rerunning the study replaces them."""
    from optuna.trial import TrialState

    out, data = {}, None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        path = Path(t.user_attrs["run_dir"]) / TEST_FILE
        if data is None and (t.state == TrialState.PRUNED or not path.is_file()):
            from ..data import data_seed, load_data  # the pools' data with its test split (trials never load it)

            data = load_data(make_config(spec.base.to_dict(), {"val_size": 0, "data_seed": data_seed(spec.base)}))
        if t.state == TrialState.PRUNED:
            out[t.number] = (-math.inf, 1 / data.num_classes)
            continue
        if not path.is_file():
            from ..engine.train import evaluate_run

            result = evaluate_run(path.parent, data)
            write_json(path, {"test_acc": result["test_acc"], "test_images": len(data.test.labels)})
        out[t.number] = (t.value, json.loads(path.read_text())["test_acc"])
    return out


def untuned_configs(profile: str, source: dict | None = None, seeds=None) -> dict[str, list]:
    """The writeup's untuned setting with and without the k-means term, per seed (for the profile's
    ``tune_epochs`` when it sets them)."""
    seeds = SEEDS.get(profile, (0, 1, 2)) if seeds is None else seeds
    untuned = resolve(UNTUNED, profile, source)
    tune_epochs = load_profile(profile).tune_epochs
    if tune_epochs:  # trained as long as the pools' trials, which they stand beside
        untuned = make_config(untuned.to_dict(), {"epochs": tune_epochs})
    return {"untuned": [make_config(untuned.to_dict(), {"seed": s}) for s in seeds],
            "untuned-no-kmeans": [make_config(untuned.to_dict(), {"name": UNTUNED_NO_KMEANS, "w_kmeans": 0.0, "seed": s})
                                  for s in seeds]}


def ensure_runs(profile: str, runs_dir=None, source: dict | None = None, trials: int | None = None,
                seeds=None, quiet: bool = True) -> tuple[dict, dict[str, list[Run]]]:
    """The pools, then the untuned pair's runs (the missing ones trained together, through the
    executor: SLOTS at a time, or on Ray): ``(pools, name -> runs by seed)``."""
    pools = ensure_pools(profile, runs_dir, source, trials, quiet)
    root = runs_root(profile, runs_dir)
    cfgs = untuned_configs(profile, source, seeds)
    train_missing([cfg for by_seed in cfgs.values() for cfg in by_seed], root)
    return pools, {name: [load_run(run_dir_for(cfg, root), cfg.name) for cfg in by_seed] for name, by_seed in cfgs.items()}


# ------------------------------------------------------------------------------------ analysis

def trial_rows(study, pool: dict[int, tuple[float, float]]) -> list[dict]:
    """One row per trial: number, seed, state, validation and test accuracy, its parameters, why it stopped."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        val, test = pool.get(t.number, (t.value, None))
        rows.append({"trial": t.number, "seed": t.user_attrs.get("seed"), "state": t.state.name.lower(),
                     "val acc (final)": None if val is None or math.isinf(val) else val, "test acc": test,
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


QUESTIONS = {"tuned": "Does the k-means term help at equal tuning effort (expected test accuracy of the "
                      "validation-best of {k} random-search trials, with minus without)",
             "untuned": "Does it help at the writeup's hand-set weights (exp2-wk0.25 minus exp2-wk0, paired by seed)"}


def answers(pools: dict, runs: dict[str, list[Run]], k: int, level: float = 0.95, n_resamples: int = 9999) -> dict:
    """The page's two verdicts, corrected together (Holm): the k-means term at equal tuning effort
    (expected best of ``k``, paired bootstrap over trial index) and at the untuned setting (paired t
    over seeds)."""
    acc = {n: {r.config.seed: r.summary["final_acc"] for r in rs} for n, rs in runs.items()}
    tuned = best_of_k(pools["kmeans"][2], pools["no-kmeans"][2], k, level, names=("with k-means", "without"),
                      n_resamples=n_resamples)
    untuned = paired_t(acc["untuned"], acc["untuned-no-kmeans"], level, names=("exp2-wk0.25", "exp2-wk0"))
    judged = judge({QUESTIONS["tuned"].format(k=k): tuned, QUESTIONS["untuned"]: untuned})
    tuned, untuned = judged.values()
    return {"kmeans_tuned": tuned, "kmeans_untuned": untuned,
            "kmeans_verdict": tuned["verdict"], "kmeans_untuned_verdict": untuned["verdict"],
            "prob_kmeans_study_wins": tuned["prob_a_wins"], "k": k}


# -------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib.tuning.report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run both pools, score their trials on the test set, then the untuned pair over the seeds")
    p.add_argument("profile")
    p.add_argument("--trials", type=int, help="finished trials per pool (default: by profile)")
    p.add_argument("--runs", help="runs root (default: $SSL_LIB_RUNS, else runs/)")
    p.add_argument("--pointer", type=Path, help="JSON naming every run (rewritten only when one changes)")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_env()  # SLOTS, THREADS, EXECUTOR checked before anything runs
        with threads_of(settings.threads):  # the trials train here, at the runs' threads
            pools, runs = ensure_runs(args.profile, args.runs, trials=args.trials, quiet=False)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    listing = {name: [{"run_dir": str(r.run_dir), "config_digest": r.config.digest(),
                       "summary_sha1": hashlib.sha1((r.run_dir / "summary.json").read_bytes()).hexdigest()}
                      for r in rs] for name, rs in runs.items()}
    listing["pools"] = {name: {str(t): list(v) for t, v in pool.items()} for name, (_, _, pool) in pools.items()}
    text = json.dumps({"profile": args.profile, "runs": listing}, indent=1) + "\n"
    if args.pointer:
        from ..files import write_if_changed

        write_if_changed(args.pointer, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
