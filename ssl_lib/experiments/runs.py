"""Runs of the grid: where they live, training the missing ones (one at a time), loading finished ones,
and the command line ``python -m ssl_lib experiments``::

    python -m ssl_lib experiments list  PROFILE              # experiments, resolved M, run dirs
    python -m ssl_lib experiments show  PROFILE EXPERIMENT   # the resolved config as YAML
    python -m ssl_lib experiments data  PROFILE [--out F]    # decode/cache the data, describe it
    python -m ssl_lib experiments train PROFILE EXPERIMENT... [--pointer F]

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
from .grid import (EXPERIMENTS, RUNS_ENV, WRITEUP, WriteupFigures, _absolute, data_source, grid, project_root,
                   resolve)

# ---------------------------------------------------------------------------------------- runs

def runs_root(profile: str, runs_dir: str | Path | None = None) -> Path:
    """Where a profile's runs go: ``runs_dir`` if given (relative to the current directory), else
    $SSL_LIB_RUNS/<profile> (relative to the project root), else the project's runs/<profile>."""
    if runs_dir:
        return Path(runs_dir).expanduser().resolve()
    base = os.environ.get(RUNS_ENV)
    return Path(_absolute(base) if base else project_root() / "runs") / profile


def run_dir_for(cfg: Config, root: str | Path) -> Path:
    return Path(root) / cfg.run_name()


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
    metrics: dict  # {"iteration": {col: list}, "epoch": {col: list}}

    def iteration(self, column: str):
        import numpy as np

        values = self.metrics["iteration"].get(column, [])
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
    cfg = load_config(run_dir / "config.yaml")
    return Run(name or cfg.name, cfg, run_dir, json.loads((run_dir / "summary.json").read_text()),
               json.loads((run_dir / "metrics.json").read_text()))


@contextlib.contextmanager
def _training_lock(root: Path):
    """One training at a time per runs root: ``make -j`` then trains runs one after another, with
    the same thread count each, instead of several runs fighting for the same cores."""
    from ..engine.rundir import check_creatable

    check_creatable(root, "the runs root (RUNS=, --runs or $SSL_LIB_RUNS)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".train.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_run(cfg: Config, root: str | Path, *, quiet: bool = True, data=None) -> Run:
    """Load the finished run of ``cfg`` under ``root``, training it first if there is none.

    An interrupted run (checkpoint, no summary) is resumed from its last epoch.
    """
    run_dir = run_dir_for(cfg, root)
    if not is_finished(run_dir, cfg):
        with _training_lock(Path(root)):
            if not is_finished(run_dir, cfg):  # another process may have finished it meanwhile
                from ..engine.train import train

                train(cfg, run_dir, resume=True, quiet=quiet, data=data)
    return load_run(run_dir, cfg.name)


def ensure_grid(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                names=EXPERIMENTS, quiet: bool = True) -> dict[str, Run]:
    """Every run of the grid under ``profile``, training the missing ones (data loaded once)."""
    cfgs = grid(profile, source, names)
    root = runs_root(profile, runs_dir)
    data = None
    runs = {}
    for name, cfg in cfgs.items():
        if data is None and not is_finished(run_dir_for(cfg, root), cfg):
            from ..data import load_data

            data = load_data(cfg, quiet=quiet)  # every run of a profile shares the data settings
        runs[name] = ensure_run(cfg, root, quiet=quiet, data=data)
    return runs


# ------------------------------------------------------------------------------ command line

def _pointer(name: str, profile: str, run: Run) -> str:
    digest = hashlib.sha1((run.run_dir / "summary.json").read_bytes()).hexdigest()
    return json.dumps({"experiment": name, "profile": profile, "run_dir": str(run.run_dir),
                       "config_digest": run.config.digest(), "summary_sha1": digest}, indent=1) + "\n"


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
            p.add_argument("--pointer", type=Path,
                           help="write a small JSON naming the run (rewritten only when it changes)")
            p.add_argument("--verbose", action="store_true", help="progress bars while training")
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
    return parser


def ensure_protocol(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                    quiet: bool = True) -> dict:
    """Every run of a protocol profile (``{(run, seed): Run}``), training the missing ones; a profile
    that shows another's runs (``same_runs_as``) finds them under that profile's runs root."""
    from .protocol import protocol_grid, runs_profile

    root = runs_root(f"protocol-{runs_profile(profile)}", runs_dir)
    return {key: ensure_run(cfg, root, quiet=quiet) for key, cfg in protocol_grid(profile, source).items()}


def main(argv: list[str] | None = None, prog: str = "python -m ssl_lib.experiments.runs") -> int:
    args = _parser(prog).parse_args(argv)
    source = data_source(args.dataset, args.data_root, args.cache_dir)
    try:
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
            if args.pointer:
                write_if_changed(args.pointer, json.dumps(
                    {"profile": args.profile, "runs": {f"{n}@{seed}": str(r.run_dir) for (n, seed), r in runs.items()},
                     "summary_sha1": {f"{n}@{seed}": hashlib.sha1((r.run_dir / "summary.json").read_bytes()).hexdigest()
                                      for (n, seed), r in runs.items()}}, indent=1) + "\n")
        elif args.command == "train":
            if args.pointer and len(args.experiments) != 1:
                raise ConfigError("--pointer needs exactly one experiment")
            for name in args.experiments:
                cfg = resolve(name, args.profile, source)
                cached = is_finished(run_dir_for(cfg, root), cfg)
                if not cached:
                    print(f"[ssl_lib.experiments] training {args.profile}/{cfg.run_name()}", file=sys.stderr,
                          flush=True)
                run = ensure_run(cfg, root, quiet=not args.verbose)
                s = run.summary
                print(f"{run.run_dir}: {'cached' if cached else 'trained'}; best acc {s['best_acc']:.4f} "
                      f"(epoch {s['best_epoch']}), final acc {s['final_acc']:.4f}", file=sys.stderr)
                if args.pointer:
                    write_if_changed(args.pointer, _pointer(name, args.profile, run))
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
