"""A tuning study: workers that ask Optuna for trials until N are finished, then ``best.yaml`` and
one training of it on the full training split, tested once.

A trial is one :func:`~ssl_lib.engine.train.train` run of the base config with the sampled values,
scored on the validation split (``val_size``) after every epoch; the pruner may stop it there. Its
run directory is ``<study dir>/trials/trial-NNNN`` (the trial's ``run_dir`` attribute). A trial is
*finished* when it is COMPLETE or PRUNED; FAIL (an interrupted or dead worker, bad input) does not
count, so rerunning the same command continues until N trials are finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, ConfigError, load_config, make_config
from ..errors import BadInput
from ..files import atomic_write, remove_stale_temporaries, write_json
from . import storage as st
from .space import Space

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
#: Seconds an idle worker waits before looking again at a study whose last trials run elsewhere
#: (one of them may fail, and then a replacement is needed).
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class TuneSpec:
    """Everything a worker needs (picklable: worker processes receive it)."""

    base: Config  # val_size > 0: trials never read the test split
    space: Space
    trials: int  # finished (COMPLETE or PRUNED) trials wanted
    study_name: str
    study_dir: Path
    storage: str | None = None  # None: the embedded journal file in study_dir
    pruner: str = "median"
    workers: int = 1
    final: bool = True  # train best.yaml on the full training split and test it once
    quiet: bool = False
    sampler: str = "tpe"  # random: each value drawn uniformly, seeded by the trial number and the parameter
    seed_per_trial: bool = False  # trial i trains with seed base.seed + i (its data kept: data_seed fixed)

    def check(self) -> "TuneSpec":
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.base.val_size < 1:
            raise ConfigError("the base config needs val_size > 0: trials are scored on held-out training "
                              "images, never on the test set")
        st.check_url(self.storage)
        return self


# ------------------------------------------------------------------------------- the study

def make_sampler(spec: TuneSpec):
    """The spec's sampler: trial-seeded TPE (:func:`tpe_sampler`) or random search (:func:`random_sampler`)."""
    return random_sampler(spec) if spec.sampler == "random" else tpe_sampler(spec)


def random_sampler(spec: TuneSpec):
    """Random search whose draw of a parameter at trial i depends on the base seed, i and the
    parameter's name alone: two studies over spaces that share a parameter (with and without the
    k-means term) draw the same value of it at the same trial, so their trials pair up (common
    random numbers), and a rerun, on any worker, draws the same trials."""
    return _trial_seeded_random()(seed=spec.base.seed)


@functools.cache
def _trial_seeded_random():
    import zlib

    import optuna

    class TrialSeededRandom(optuna.samplers.RandomSampler):
        def __init__(self, seed: int):
            super().__init__(seed=seed)
            self._base_seed = seed

        def sample_independent(self, study, trial, param_name, param_distribution):
            # crc32, not hash(): the same on every process (str hashes are salted per interpreter)
            self._rng.rng.seed([self._base_seed, trial.number, zlib.crc32(param_name.encode())])
            return super().sample_independent(study, trial, param_name, param_distribution)

    return TrialSeededRandom


def tpe_sampler(spec: TuneSpec):
    """TPE whose random draws for a trial are seeded by the base seed and the trial's number.

    The storage gives every trial a distinct number, on any machine, so two workers that ask at the
    same moment (the same finished trials) still propose different values; and a study run again
    from scratch by one worker proposes the same trials, since each trial then sees the same
    history and the same seed. The constant liar lets TPE treat the trials running elsewhere as
    bad results, so that parallel workers spread out rather than sample beside each other (with
    one worker no other trial is running: nothing changes)."""
    return _trial_seeded_tpe()(seed=spec.base.seed, n_startup_trials=min(10, max(2, spec.trials // 3)),
                               constant_liar=True)


@functools.cache
def _trial_seeded_tpe():
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        """TPESampler reseeded before each trial (its random startup draws and its candidates)."""

        def __init__(self, seed: int, **kwargs):
            super().__init__(seed=seed, **kwargs)
            self._base_seed = seed

        def before_trial(self, study, trial) -> None:
            seed = (self._base_seed * 100_003 + trial.number) % 2**32
            self._rng.rng.seed(seed)  # TPE's candidates
            self._random_sampler._rng.rng.seed(seed)  # the startup trials' uniform draws
            super().before_trial(study, trial)

    return TrialSeededTPE


def make_pruner(spec: TuneSpec):
    import optuna

    if spec.pruner == "median":  # prune a trial whose best so far is below the median of finished ones,
        # once a few have finished (half the budget, at most Optuna's default 5): a median of two
        # finished trials prunes nearly everything after them
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, spec.trials // 2)))
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, spec.base.epochs))
    return optuna.pruners.NopPruner()


def open_study(spec: TuneSpec, create: bool = False):
    """Load (or, with ``create``, create) the study; refuse one made from another config or space.

    Creating happens under the study's setup lock (see :func:`.storage.setup_lock`), so commands
    started together, on one machine or several, find one study, recorded and enqueued once."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines instead
    identity = {"base_digest": spec.base.digest(), "space": spec.space.to_dict()}
    if (spec.sampler, spec.seed_per_trial) != ("tpe", False):  # TPE studies made before keep their identity
        identity["design"] = {"sampler": spec.sampler, "seed_per_trial": spec.seed_per_trial}
    with st.setup_lock(spec.storage, spec.study_dir, spec.study_name) if create else contextlib.nullcontext():
        storage = st.open_storage(spec.storage, spec.study_dir)
        study = optuna.create_study(storage=storage, study_name=spec.study_name, direction="maximize",
                                    sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True)
        recorded = study.user_attrs.get("ssl_lib")
        if recorded is None and create:
            study.set_user_attr("ssl_lib", identity)
            study.set_user_attr("base_config", spec.base.to_dict())
            # e.g. the writeup's hand-set weights, tried first; not in a random pool, whose trials must
            # be exchangeable draws for the order statistics of the expected best of k
            for values in spec.space.enqueue if spec.sampler == "tpe" else ():
                study.enqueue_trial(values, skip_if_exists=True)
    if recorded is not None and recorded != identity:
        what = ("base config" if recorded["base_digest"] != identity["base_digest"] else "search space"
                if recorded["space"] != identity["space"] else "sampler or seeding (--sampler, --seed-per-trial)")
        raise ConfigError(f"study {spec.study_name!r} in {st.redact(spec.storage or str(spec.study_dir))} was "
                          f"made with another {what}; give another --study (or --out), or the same files")
    return study


def counts(study) -> dict:
    c = {s: 0 for s in ("complete", "pruned", "fail", "running", "waiting")}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name.lower()] = c.get(t.state.name.lower(), 0) + 1
    c["finished"] = c["complete"] + c["pruned"]
    return c


def fail_dead_trials(study, spec: TuneSpec) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone: by its lock file for workers of this study
    directory, by Optuna's heartbeat for the others (RDB storages)."""
    import optuna
    from optuna.trial import TrialState

    here = str(spec.study_dir.resolve())
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, folder = t.user_attrs.get("worker"), t.user_attrs.get("study_dir")
        if worker is None and st.is_local(spec.storage):
            dead = True  # asked and named happen under one lock: unnamed means it died in between
        elif worker is not None and folder == here:
            dead = not st.worker_alive(spec.study_dir, worker)
        else:
            continue
        if dead:
            study._storage.set_trial_user_attr(t._trial_id, "failed_because", "its worker stopped")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            run_dir = t.user_attrs.get("run_dir")
            if run_dir and Path(run_dir).is_dir():  # kept for a look, less what was half-written
                remove_stale_temporaries(run_dir)
    if not st.is_local(spec.storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


# ---------------------------------------------------------------------------------- a trial

class ReportEpoch:
    """Epoch end of a trial's training: report the validation accuracy; stop the run if the pruner says so."""

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, state) -> None:
        import optuna

        acc = state.record["val_acc"]
        self.trial.report(acc, state.epoch)
        if state.epoch < state.epochs and self.trial.should_prune():  # the last epoch is the result anyway
            raise optuna.TrialPruned(f"at epoch {state.epoch}, val acc {acc:.4f}")


def trial_run(spec: TuneSpec, number: int, values: dict) -> tuple[Config, Path]:
    """Trial ``number``'s config (the base with ``values``) and run directory."""
    from ..data import data_seed

    run = {"name": f"{spec.study_name}-trial{number}"}
    if spec.seed_per_trial:  # the trial's own training seed; the data (subsets, validation) stays the base's
        run.update(seed=spec.base.seed + number, data_seed=data_seed(spec.base))
    return make_config(spec.base.to_dict(), {**values, **run}), spec.study_dir / "trials" / f"trial-{number:04d}"


def record_summary(trial, cfg: Config, summary: dict) -> None:
    """What a finished trial keeps of its run, beside its value."""
    trial.set_user_attr("best_val_acc", summary["best_acc"])
    trial.set_user_attr("train_seconds", summary["train_seconds"])
    trial.set_user_attr("grad_share_kmeans", summary.get("grad_share_kmeans"))  # the k-means term's size
    trial.set_user_attr("seed", cfg.seed)


def objective(trial, spec: TuneSpec, data) -> float:
    """Train the base config with this trial's values; its value is the final validation accuracy
    (what training ``best.yaml`` for the same epochs gives, not a lucky epoch)."""
    from ..engine.train import train

    cfg, run_dir = trial_run(spec, trial.number, spec.space.suggest(trial))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    summary = train(cfg, run_dir, quiet=True, data=data, callbacks=[ReportEpoch(trial)])
    record_summary(trial, cfg, summary)
    return summary["final_acc"]


def run_trial(study, trial, spec: TuneSpec, data) -> None:
    """One trial, told to the study whatever happens: COMPLETE, PRUNED (the pruner, or a diverged run:
    a result of its values), FAIL (bad input; an interrupt, which is then raised again)."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses

    from ..engine.loop import TrainingDiverged

    t0 = time.perf_counter()
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial, spec, data)
            study.tell(trial, value)
        except optuna.TrialPruned as err:
            trial.set_user_attr("pruned_because", str(err))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except TrainingDiverged as err:
            trial.set_user_attr("pruned_because", f"diverged: {err}")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except BadInput as err:
            trial.set_user_attr("failed_because", str(err))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except BaseException as err:  # Ctrl-C, a bug: the trial is lost, the study is not
            trial.set_user_attr("failed_because", f"{type(err).__name__}: {err}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    if not spec.quiet:
        print(progress_line(study, spec, trial.number, time.perf_counter() - t0), flush=True)


def progress_line(study, spec: TuneSpec, number: int, seconds: float) -> str:
    t = study.get_trials(deepcopy=False)[number]
    what = {"COMPLETE": lambda: f"val acc {t.value:.4f}", "PRUNED": lambda: t.user_attrs.get("pruned_because", "pruned"),
            "FAIL": lambda: t.user_attrs.get("failed_because", "failed")}.get(t.state.name, lambda: t.state.name)()
    c = counts(study)
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    return (f"[{spec.study_name}] trial {number} {t.state.name.lower()} in {seconds:.0f} s: {what} | "
            f"finished {c['finished']}/{spec.trials} ({c['pruned']} pruned, {c['fail']} failed, "
            f"{c['running']} running) | {best}")


# ---------------------------------------------------------------------------------- workers

def work(spec: TuneSpec, data=None) -> None:
    """One worker: ask for trials until the study has ``spec.trials`` finished ones.

    Asking happens under a lock of the study directory, after failing the trials of dead workers
    and counting, so the workers of one machine never start more trials than are missing. A worker
    with nothing to start waits while trials run elsewhere: one of them may still fail.
    """
    import torch

    if spec.workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores, don't fight for them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.workers))
    study = open_study(spec)
    here = str(spec.study_dir.resolve())
    with st.worker_identity(spec.study_dir) as me:
        while True:
            with st.exclusive(spec.study_dir / "workers" / ".ask.lock"):
                fail_dead_trials(study, spec)
                c = counts(study)
                if c["finished"] >= spec.trials:
                    return
                trial = None
                if c["finished"] + c["running"] < spec.trials:
                    with warnings.catch_warnings():  # we run the heartbeat ourselves (run_trial)
                        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
                        trial = study.ask()
                    for key, value in (("worker", me), ("study_dir", here), ("host", socket.gethostname())):
                        trial.set_user_attr(key, value)
            if trial is None:
                time.sleep(POLL_SECONDS)
                continue
            if data is None:  # loaded once per worker, and only when there is a trial to run
                from ..data import load_data

                data = load_data(spec.base)  # val_size > 0: the test split is not read
            run_trial(study, trial, spec, data)


def _work_in_process(spec: TuneSpec, index: int) -> None:
    """Worker ``index`` of ``--workers K``: on a machine with several GPUs it sees only GPU ``index``
    (round robin past the last), set before CUDA starts in this process, so nothing of it (k-means,
    the default device) lands on another worker's GPU."""
    from ..experiments.executor import visible_gpus

    gpus = visible_gpus()
    if len(gpus) > 1 and spec.base.device in ("auto", "cuda"):  # a cuda:N config names its GPU itself
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    try:
        work(spec)
    except KeyboardInterrupt:  # the parent reports the interrupt; the trial was told FAIL
        raise SystemExit(130) from None


def run_workers(spec: TuneSpec) -> None:
    """``spec.workers`` worker processes against the study (this process when there is one)."""
    if spec.workers == 1:
        work(spec)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch threads
    procs = [ctx.Process(target=_work_in_process, args=(spec, i), name=f"tune-worker-{i}")
             for i in range(spec.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: let them tell their trials
        for p in procs:
            p.join(timeout=30)
        raise
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        print(f"[{spec.study_name}] {len(bad)} worker(s) stopped with exit codes {bad}; "
              "their trials in progress are failed", flush=True)


# ---------------------------------------------------------------------------------- results

def best_config(spec: TuneSpec, study) -> Config:
    """The base config with the best trial's values, scored on the test split (val_size 0)."""
    best = study.best_trial
    return make_config(spec.base.to_dict(), {**dict(spec.space.fixed), **best.params, "val_size": 0,
                                              "name": f"{spec.study_name}-best"})


def write_best(spec: TuneSpec, study) -> Path:
    cfg = best_config(spec, study)
    best = study.best_trial
    head = (f"# best of study {spec.study_name!r}: trial {best.number}, final val acc {best.value:.4f} on "
            f"{spec.base.val_size} held-out training images\n# tuned: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
            + "\n# val_size is 0 here: this config trains on the full training split and is scored on the test set\n")
    path = spec.study_dir / "best.yaml"
    atomic_write(path, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    load_config(path)  # what we wrote is a config train accepts
    return path


def summarize_study(spec: TuneSpec, study, wall_seconds: float, final: dict | None) -> dict:
    c = counts(study)
    best = study.best_trial
    return {
        "study": spec.study_name, "storage": st.redact(spec.storage) if spec.storage else st.EMBEDDED,
        "trials_requested": spec.trials, **{f"trials_{k}": v for k, v in c.items()},
        "best_trial": best.number, "best_params": best.params, "best_val_acc_final": best.value,
        "best_val_acc_best_epoch": best.user_attrs.get("best_val_acc"), "val_size": spec.base.val_size,
        "wall_seconds_this_session": wall_seconds,
        "final": final,
        "trials": [{"trial": t.number, "state": t.state.name.lower(), "val_acc_final": t.value, **t.params,
                    "grad_share_kmeans": t.user_attrs.get("grad_share_kmeans")} for t in study.get_trials(deepcopy=False)],
    }


def tune(spec: TuneSpec) -> dict:
    """Run (or continue) the study to ``spec.trials`` finished trials; then best.yaml and the final run.

    Returns the study summary (also written to ``<study dir>/study.json``)."""
    spec.check()
    t0 = time.perf_counter()
    if spec.storage is not None and not st.is_local(spec.storage):
        st.open_storage(spec.storage, spec.study_dir)  # an unreachable database fails before any file is made
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, create=True)
    c = counts(study)
    if not spec.quiet:
        print(f"[{spec.study_name}] {st.redact(spec.storage) if spec.storage else spec.study_dir / st.EMBEDDED}: "
              f"{c['finished']}/{spec.trials} finished ({c['pruned']} pruned, {c['fail']} failed); "
              f"{spec.workers} worker(s); tuning " + ", ".join(p.describe() for p in spec.space.params), flush=True)
    run_workers(spec)
    c = counts(study)
    if c["finished"] < spec.trials:
        raise StudyUnfinished(f"study {spec.study_name!r}: {c['finished']} of {spec.trials} trials finished; "
                              "run the same command again to continue")
    if c["complete"] == 0:
        raise StudyUnfinished(f"study {spec.study_name!r}: every trial was pruned or failed, no best config")
    best_path = write_best(spec, study)
    final = None
    if spec.final:
        from ..engine.train import train

        cfg = load_config(best_path)
        run_dir = spec.study_dir / f"final-{cfg.digest()}"
        # one training however many commands finish the study here at once; the others then read it
        with st.exclusive(spec.study_dir / "workers" / ".final.lock"):
            s = train(cfg, run_dir, resume=run_dir.is_dir(), quiet=spec.quiet)
        final = {"run_dir": str(run_dir), "test_acc_final": s["final_acc"], "scored_on": s["scored_on"],
                 "train_seconds": s["train_seconds"]}
    summary = summarize_study(spec, study, time.perf_counter() - t0, final)
    earlier = spec.study_dir / "study.json"
    if final is None and earlier.is_file():  # --no-final on a study whose best was already tested: keep it
        before = json.loads(earlier.read_text())
        if before.get("best_trial") == summary["best_trial"]:
            summary["final"] = before.get("final")
    write_json(earlier, summary)
    if not spec.quiet:
        print(f"[{spec.study_name}] done: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed; "
              f"best trial {summary['best_trial']} val acc {summary['best_val_acc_final']:.4f} "
              f"{summary['best_params']}; {best_path}"
              + (f"; test acc {final['test_acc_final']:.4f} ({final['run_dir']})" if final else ""), flush=True)
    return summary


class StudyUnfinished(RuntimeError):
    """The study has fewer finished trials than asked (workers stopped); rerunning continues it."""
