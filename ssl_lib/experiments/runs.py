"""Runs of the grid: where they live, training the missing ones (together, through the executor of
:mod:`.executor`: SLOTS at a time, or on Ray), loading finished ones, and the command line
``python -m ssl_lib experiments``::

    python -m ssl_lib experiments list  PROFILE              # experiments, resolved M, run dirs
    python -m ssl_lib experiments show  PROFILE EXPERIMENT   # the resolved config as YAML
    python -m ssl_lib experiments data  PROFILE [--out F]    # decode/cache the data, describe it
    python -m ssl_lib experiments train PROFILE EXPERIMENT... [--pointer F | --pointer-dir D]
    python -m ssl_lib experiments protocol PROFILE [--pointer F]

This module imports torch only when it has to load data or train, so cached checks are cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, ConfigError, load_config
from ..errors import BadInput
from ..files import write_if_changed
from .executor import Job, RunsFailed, Settings, run_jobs, settings_from_env
from .grid import (EXPERIMENT_3, EXPERIMENTS, RUNS_ENV, WRITEUP, WriteupFigures, _absolute, data_source, grid,
                   project_root, resolve, seeded)

# ---------------------------------------------------------------------------------------- runs

def runs_root(profile: str, runs_dir: str | Path | None = None) -> Path:
    """Where a profile's runs go: ``runs_dir`` if given (relative to the current directory), else
    $SSL_LIB_RUNS/<profile> (relative to the project root), else the project's runs/<profile>."""
    if runs_dir:
        return Path(runs_dir).expanduser().resolve()
    base = os.environ.get(RUNS_ENV)
    return Path(_absolute(base) if base else project_root() / "runs") / profile


def run_dir_for(cfg: Config, root: str | Path) -> Path:
    """``<root>/<name>-<config hash>``; or, if that run is not finished, a finished run of the same
    config under another name (names are not hashed: exp3-noise0 is exp2-wk0.25, the same computation),
    so that the same run is never trained twice."""
    own = Path(root) / cfg.run_name()
    if not is_finished(own, cfg):
        for other in sorted(Path(root).glob(f"*-{cfg.digest()}")):
            if other != own and is_finished(other, cfg):
                return other
    return own


def is_finished(run_dir: Path, cfg: Config | None = None) -> bool:
    """A finished run: summary.json present (and, if ``cfg`` is given, recorded for that config)."""
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        return False
    if cfg is None:
        return True
    try:
        return json.loads(summary.read_text()).get("config_digest") == cfg.digest()
    except (OSError, ValueError):
        return False


@dataclass
class Run:
    """One finished run as the report pages use it."""

    name: str
    config: Config
    run_dir: Path
    summary: dict
    metrics: dict  # {"iteration": {col: array or list}, "epoch": {col: list}} (engine.rundir.read_metrics)

    def iteration(self, column: str):
        import numpy as np

        values = self.metrics["iteration"].get(column, [])
        if isinstance(values, np.ndarray):
            return values.astype(float)
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    def epoch(self, column: str):
        import numpy as np

        values = self.metrics["epoch"].get(column, [])
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    @property
    def writeup(self) -> WriteupFigures | None:
        return WRITEUP.get(self.name)


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    run_dir = Path(run_dir)
    if not is_finished(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a finished run (no summary.json)")
    from ..engine.rundir import read_metrics

    cfg = load_config(run_dir / "config.yaml")
    return Run(name or cfg.name, cfg, run_dir, json.loads((run_dir / "summary.json").read_text()),
               read_metrics(run_dir))


#: The runs root's training lock (``<root>/.train.lock``): held exclusively by a batch of training.
TRAIN_LOCK = ".train.lock"


@contextlib.contextmanager
def _training_lock(root: Path):
    """One batch of training at a time per runs root: ``make -j`` then trains the grid and the tuned
    runs one batch after another, each with the cores or GPUs its executor divides, instead of two
    batches fighting for them; and no run is trained by two batches at once."""
    from ..engine.rundir import check_creatable

    check_creatable(root, "the runs root (RUNS=, --runs or $SSL_LIB_RUNS)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / TRAIN_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _missing(cfgs, root: Path) -> list[Config]:
    """The configs without a finished run, one per config hash (the others then find its run)."""
    todo = {}
    for cfg in cfgs:
        if not is_finished(run_dir_for(cfg, root), cfg):
            todo.setdefault(cfg.digest(), cfg)
    return list(todo.values())


def train_missing(cfgs, root: str | Path, settings: Settings | None = None, *, quiet: bool = True) -> list[Config]:
    """Train, through the executor of ``settings`` (default: the environment's, see
    :mod:`.executor`), every config of ``cfgs`` that has no finished run under ``root``; return those.

    An interrupted run (checkpoint, no summary) resumes from its last epoch."""
    root = Path(root)
    todo = _missing(cfgs, root)
    if todo:
        settings = settings_from_env() if settings is None else settings
        with _training_lock(root):
            todo = _missing(todo, root)  # another process may have trained some meanwhile
            run_jobs([Job(cfg, run_dir_for(cfg, root)) for cfg in todo], settings, quiet=quiet)
    return todo


def ensure_run(cfg: Config, root: str | Path, *, quiet: bool = True) -> Run:
    """Load the finished run of ``cfg`` under ``root``, training it first if there is none."""
    train_missing([cfg], root, quiet=quiet)
    return load_run(run_dir_for(cfg, root), cfg.name)


def ensure_configs(cfgs: dict, root: str | Path, *, quiet: bool = True, settings: Settings | None = None) -> dict:
    """``{key: Run}`` for ``{key: Config}``, training the missing ones together (one batch)."""
    train_missing(cfgs.values(), root, settings, quiet=quiet)
    return {key: load_run(run_dir_for(cfg, root), cfg.name) for key, cfg in cfgs.items()}


def ensure_grid(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                names=EXPERIMENTS, quiet: bool = True) -> dict[str, Run]:
    """Every run of the grid under ``profile``, training the missing ones."""
    return ensure_configs(grid(profile, source, names), runs_root(profile, runs_dir), quiet=quiet)


def ensure_seeded(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                  quiet: bool = True) -> dict[tuple[str, int], Run]:
    """Experiment 3's runs over the profile's ``exp3_seeds`` (``{(name, seed): Run}``), training the missing ones."""
    return ensure_configs(seeded(profile, source), runs_root(profile, runs_dir), quiet=quiet)


# ------------------------------------------------------------------------------ command line

def _pointer(name: str, profile: str, run: Run, other_seeds: dict[int, Run] | None = None) -> str:
    def sha1(r: Run) -> str:
        return hashlib.sha1((r.run_dir / "summary.json").read_bytes()).hexdigest()

    seeds = {str(s): sha1(r) for s, r in (other_seeds or {}).items()}
    return json.dumps({"experiment": name, "profile": profile, "run_dir": str(run.run_dir),
                       "config_digest": run.config.digest(), "summary_sha1": sha1(run),
                       **({"other_seeds_summary_sha1": seeds} if seeds else {})}, indent=1) + "\n"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="The writeup's experiment grid under a profile.")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, text in (("list", "list the experiments with their resolved M, epochs and run dirs"),
                      ("show", "print an experiment's resolved config"),
                      ("data", "load (decode and cache) the profile's data and describe it"),
                      ("train", "train the experiments that have no finished run")):
        p = sub.add_parser(cmd, help=text, description=text)
        p.add_argument("profile")
        if cmd in ("show", "train"):
            p.add_argument("experiments", nargs="+" if cmd == "train" else 1, metavar="EXPERIMENT")
        p.add_argument("--runs", help="runs root for this profile (default: $SSL_LIB_RUNS/PROFILE or runs/PROFILE)")
        p.add_argument("--dataset", help="cifar10 | imagefolder | synthetic (default: $SSL_LIB_DATASET)")
        p.add_argument("--data-root", help="data folder (default: $SSL_LIB_DATA_ROOT)")
        p.add_argument("--cache-dir", help="decoded-data cache (default: $SSL_LIB_CACHE_DIR)")
        if cmd == "train":
            pointers = p.add_mutually_exclusive_group()
            pointers.add_argument("--pointer", type=Path,
                                  help="write a small JSON naming the run (rewritten only when it changes)")
            pointers.add_argument("--pointer-dir", type=Path,
                                  help="write DIR/<experiment>.run.json for each experiment (each rewritten "
                                       "only when it changes)")
            p.add_argument("--verbose", action="store_true", help="progress bars while training (SLOTS=1)")
        if cmd == "data":
            p.add_argument("--out", type=Path, help="write the description here (only when it changes)")
    text = "train the FixMatch-protocol runs of a protocol profile that have no finished run (configs/protocol/)"
    p = sub.add_parser("protocol", help=text, description=text)
    p.add_argument("profile", help="a profile of configs/protocol/profiles/ (full, quick, smoke)")
    p.add_argument("--runs", help="runs root (default: $SSL_LIB_RUNS/protocol-PROFILE or runs/protocol-PROFILE)")
    p.add_argument("--dataset")
    p.add_argument("--data-root")
    p.add_argument("--cache-dir")
    p.add_argument("--pointer", type=Path, help="write a small JSON naming the runs (rewritten only when it changes)")
    p.add_argument("--verbose", action="store_true", help="progress bars while training")
    p.add_argument("--epochs", action="store_true",
                   help="print each run's epochs: seconds, images/s, test acc, mask rate, k-means share, spread")
    return parser


def ensure_protocol(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                    quiet: bool = True) -> dict:
    """Every run of a protocol profile (``{(run, seed): Run}``), training the missing ones; a profile
    that shows another's runs (``same_runs_as``) finds them under that profile's runs root."""
    from .protocol import protocol_grid, runs_profile

    return ensure_configs(protocol_grid(profile, source), runs_root(f"protocol-{runs_profile(profile)}", runs_dir),
                          quiet=quiet)


def main(argv: list[str] | None = None, prog: str = "python -m ssl_lib.experiments.runs") -> int:
    args = _parser(prog).parse_args(argv)
    source = data_source(args.dataset, args.data_root, args.cache_dir)
    try:
        if args.command in ("data", "train", "protocol"):
            settings_from_env()  # SLOTS, THREADS, EXECUTOR checked before anything runs
        root = runs_root(args.profile, args.runs)
        if args.command == "list":
            for name, cfg in grid(args.profile, source).items():
                state = "finished" if is_finished(run_dir_for(cfg, root), cfg) else "to train"
                print(f"{name:14s} M={cfg.num_unlabeled!s:>6} epochs={cfg.epochs:<3} "
                      f"{run_dir_for(cfg, root)} ({state})")
        elif args.command == "show":
            print(yaml.safe_dump(resolve(args.experiments[0], args.profile, source).to_dict(), sort_keys=False),
                  end="")
        elif args.command == "data":
            from ..data import describe_data, load_data

            cfg = resolve(EXPERIMENTS[0], args.profile, source)
            text = json.dumps({"profile": args.profile, **describe_data(load_data(cfg, quiet=False))},
                              indent=1) + "\n"
            if args.out:
                write_if_changed(args.out, text)
            else:
                print(text, end="")
        elif args.command == "protocol":
            runs = ensure_protocol(args.profile, args.runs, source, quiet=not args.verbose)
            for (name, seed), run in runs.items():
                print(f"{run.run_dir}: {name} seed {seed}: best acc {run.summary['best_acc']:.4f}, "
                      f"median of the last 20 {run.summary.get('median_last20_acc') or float('nan'):.4f}",
                      file=sys.stderr)
            if args.epochs:
                from .protocol import epoch_table

                for (name, seed), run in runs.items():
                    device = run.summary["environment"]["device_name"]
                    print(f"{name} seed {seed} ({run.run_dir.name}; {device})\n{epoch_table(run.run_dir)}")
            if args.pointer:
                write_if_changed(args.pointer, json.dumps(
                    {"profile": args.profile, "runs": {f"{n}@{seed}": str(r.run_dir) for (n, seed), r in runs.items()},
                     "summary_sha1": {f"{n}@{seed}": hashlib.sha1((r.run_dir / "summary.json").read_bytes()).hexdigest()
                                      for (n, seed), r in runs.items()}}, indent=1) + "\n")
        elif args.command == "train":
            if args.pointer and len(args.experiments) != 1:
                raise ConfigError("--pointer needs exactly one experiment (--pointer-dir for several)")
            cfgs = {name: resolve(name, args.profile, source) for name in args.experiments}
            # Experiment 3's other seeds (the profile's exp3_seeds) train in the same batch
            others = {key: cfg for key, cfg in seeded(args.profile, source, [n for n in cfgs if n in EXPERIMENT_3]).items()
                      if cfg.seed != cfgs[key[0]].seed}
            trained = {cfg.run_name() for cfg in train_missing([*cfgs.values(), *others.values()], root,
                                                               quiet=not args.verbose)}
            for name, cfg in cfgs.items():
                run = load_run(run_dir_for(cfg, root), cfg.name)
                s = run.summary
                print(f"{run.run_dir}: {'trained' if cfg.run_name() in trained else 'cached'}; best acc "
                      f"{s['best_acc']:.4f} (epoch {s['best_epoch']}), final acc {s['final_acc']:.4f}", file=sys.stderr)
                pointer = args.pointer or (args.pointer_dir / f"{name}.run.json" if args.pointer_dir else None)
                if pointer:
                    other = {seed: load_run(run_dir_for(c, root), name) for (n, seed), c in others.items() if n == name}
                    write_if_changed(pointer, _pointer(name, args.profile, run, other))
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
