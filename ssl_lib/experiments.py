"""The writeup's experiment grid, the profiles that scale it, and runs cached by config hash.

The grid is one YAML per experiment under ``configs/`` (Experiment 1: M in 0, 50, 5000, 40000,
50000; Experiment 2: three loss-weight settings at M = 20000). A *profile*
(``configs/profiles/<name>.yaml``) scales the same grid to a budget: ``full`` is the writeup's
setting, ``quick`` a CIFAR-10 subset for a 2-core CPU, ``smoke`` synthetic data for tests.

A resolved config is built in this order (later wins)::

    experiment YAML  <  data source (arguments, else SSL_LIB_* environment)  <  profile ``set``

then the profile sets the epochs, and M is rescaled to the number of training images the profile
uses (:func:`scale_unlabeled`). Runs live in ``<runs root>/<name>-<config digest>/``; a finished
run (``summary.json``) is loaded, never retrained.

Command line (used by ``make reports``)::

    python -m ssl_lib.experiments list  PROFILE              # experiments, resolved M, run dirs
    python -m ssl_lib.experiments show  PROFILE EXPERIMENT   # the resolved config as YAML
    python -m ssl_lib.experiments data  PROFILE [--out F]    # decode/cache the data, describe it
    python -m ssl_lib.experiments train PROFILE EXPERIMENT... [--pointer F]

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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Config, ConfigError, make_config

# --------------------------------------------------------------------------------- the grid

#: Train-set size the writeup's M values refer to (CIFAR-10's training split).
REFERENCE_TRAIN_SIZE = 50_000

#: The eight runs, in report order. ``configs/<name>.yaml`` must exist for each.
EXPERIMENTS = ("exp1-m0", "exp1-m50", "exp1-m5000", "exp1-m40000", "exp1-m50000",
               "exp2-wk0.025", "exp2-wk0.25", "exp2-wk100")
EXPERIMENT_1 = EXPERIMENTS[:5]
EXPERIMENT_2 = EXPERIMENTS[5:]

#: Environment variables naming the data source (``make reports DATASET=... DATA_ROOT=...`` sets them).
DATA_ENV = {"dataset": "SSL_LIB_DATASET", "data_root": "SSL_LIB_DATA_ROOT", "cache_dir": "SSL_LIB_CACHE_DIR"}
#: Environment variable for the root under which ``<profile>/<run>`` directories go (default: runs/).
RUNS_ENV = "SSL_LIB_RUNS"
#: Environment variable overriding the folder of experiment YAMLs (default: the project's configs/).
CONFIGS_ENV = "SSL_LIB_CONFIGS"


@dataclass(frozen=True)
class WriteupFigures:
    """What the writeup reports for one run (CIFAR-10 test accuracy, its CPU's seconds per epoch)."""

    epochs: int
    best_acc: float
    final_acc: float
    seconds_per_epoch: float


#: The writeup's reported figures (see ../shared/seed/README.md), keyed by experiment name.
WRITEUP = {
    "exp1-m0": WriteupFigures(35, 0.4551, 0.4551, 62.6),
    "exp1-m50": WriteupFigures(31, 0.4504, 0.4479, 60.3),
    "exp1-m5000": WriteupFigures(58, 0.5177, 0.5177, 67.2),
    "exp1-m40000": WriteupFigures(54, 0.4809, 0.4809, 109.2),
    "exp1-m50000": WriteupFigures(36, 0.1003, 0.1000, 201.4),
    "exp2-wk0.025": WriteupFigures(35, 0.4567, 0.4567, 86.1),
    "exp2-wk0.25": WriteupFigures(35, 0.4577, 0.4577, 86.3),
    "exp2-wk100": WriteupFigures(35, 0.4754, 0.4754, 83.3),
}


def project_root() -> Path:
    """The checkout this package lives in (relative data and run paths are taken from here)."""
    return Path(__file__).resolve().parent.parent


def configs_dir() -> Path:
    return Path(os.environ.get(CONFIGS_ENV) or project_root() / "configs")


def experiment_values(name: str) -> dict:
    """The key: value mapping of ``configs/<name>.yaml`` (unresolved)."""
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(EXPERIMENTS)
        raise ConfigError(f"no experiment config {path} (experiments: {known})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value")
    return values


# ------------------------------------------------------------------------------------ profiles

@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    epochs_scale: float | None = None  # epochs = max(1, round(writeup epochs * scale))
    epochs: int | None = None  # or a fixed number of epochs for every run
    settings: dict = field(default_factory=dict)  # config fields applied to every run

    def scale_epochs(self, epochs: int) -> int:
        if self.epochs is not None:
            return self.epochs
        if self.epochs_scale is not None:
            return max(1, round(epochs * self.epochs_scale))
        return epochs


def profile_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "profiles").glob("*.yaml"))


def load_profile(name: str) -> Profile:
    path = configs_dir() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; profiles: {', '.join(profile_names())}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"description", "epochs_scale", "epochs", "set"}
    if unknown:
        raise ConfigError(f"{path}: unknown profile key(s) {sorted(unknown)}; "
                          "expected description, epochs_scale or epochs, set")
    if raw.get("epochs") is not None and raw.get("epochs_scale") is not None:
        raise ConfigError(f"{path}: give epochs or epochs_scale, not both")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of config fields")
    make_config(settings, {"num_unlabeled": 0})  # reject unknown or invalid fields now, naming them
    epochs = raw.get("epochs")
    scale = raw.get("epochs_scale")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"{path}: epochs must be an integer >= 1, got {epochs!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
        raise ConfigError(f"{path}: epochs_scale must be > 0, got {scale!r}")
    return Profile(name, str(raw.get("description", "")), None if scale is None else float(scale),
                   epochs, dict(settings))


# ----------------------------------------------------------------------------------- resolving

def scale_unlabeled(m: int, n_train: int, reference: int = REFERENCE_TRAIN_SIZE) -> int:
    """M for ``n_train`` training images that keeps the fraction M / ``reference``.

    M = 0 stays 0 (supervised only) and M >= reference becomes ``n_train`` (no labels); any other
    M is rounded to the same fraction but kept in [1, n_train - 1], so a small unlabeled set stays
    non-empty and a partial split keeps at least one label.
    """
    if m < 0 or n_train < 1 or reference < 1:
        raise ValueError(f"need m >= 0, n_train >= 1, reference >= 1; got {m}, {n_train}, {reference}")
    if n_train == reference or m == 0:
        return min(m, n_train)
    if m >= reference:
        return n_train
    if n_train < 2:
        raise ValueError(f"cannot keep M={m} strictly between 0 and {n_train} training images")
    return min(max(1, round(m * n_train / reference)), n_train - 1)


def train_size(cfg: Config) -> int:
    """Training images a config will see: synthetic_train, else train_subset, else CIFAR-10's 50,000.

    An image folder of another size needs ``train_subset`` (or the full profile's literal M values).
    """
    if cfg.dataset == "synthetic":
        return cfg.synthetic_train
    if cfg.train_subset:
        return min(cfg.train_subset, REFERENCE_TRAIN_SIZE) if cfg.dataset == "cifar10" else cfg.train_subset
    return REFERENCE_TRAIN_SIZE


def data_source(dataset: str | None = None, data_root: str | None = None, cache_dir: str | None = None,
                environ: dict | None = None) -> dict:
    """Data-source config fields: arguments that are set, else the SSL_LIB_* environment, else none.

    Relative ``data_root``/``cache_dir`` are taken from the project root and ``~`` is expanded, so a
    notebook (run from notebooks/) and ``make`` (run from the root) resolve the same config.
    """
    environ = os.environ if environ is None else environ
    given = {"dataset": dataset, "data_root": data_root, "cache_dir": cache_dir}
    out = {}
    for key, value in given.items():
        value = value or environ.get(DATA_ENV[key], "")
        if value:
            out[key] = value
    return out


def _absolute(path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (project_root() / p).resolve())


def resolve(experiment: str, profile: str | Profile, source: dict | None = None) -> Config:
    """The exact config ``experiment`` runs with under ``profile`` (see the module docstring)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    values = experiment_values(experiment)
    writeup_m = values.get("num_unlabeled")
    merged = {**values, **(source if source is not None else data_source()), **prof.settings}
    for key in ("data_root", "cache_dir"):
        if merged.get(key):
            merged[key] = _absolute(str(merged[key]))
    cfg = make_config(merged)
    changes: dict = {"epochs": prof.scale_epochs(cfg.epochs)}
    if writeup_m is not None and cfg.num_labeled is None:
        changes["num_unlabeled"] = scale_unlabeled(cfg.num_unlabeled, train_size(cfg))
    return make_config(cfg.to_dict(), changes)


def grid(profile: str | Profile, source: dict | None = None, names=EXPERIMENTS) -> dict[str, Config]:
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    return {name: resolve(name, prof, source) for name in names}


def writeup_m(experiment: str) -> int:
    """The experiment's M as the writeup gives it (out of 50,000)."""
    return int(experiment_values(experiment)["num_unlabeled"])


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
    from .config import load_config

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
                from .train import train

                train(cfg, run_dir, resume=True, quiet=quiet, data=data)
    return load_run(run_dir, cfg.name)


def load_data(cfg: Config, quiet: bool = True):
    """The dataset of a resolved config (train/test subsets applied), through the decoded cache."""
    from .train import load_data as _load

    return _load(cfg, quiet=quiet)


def ensure_grid(profile: str, runs_dir: str | Path | None = None, source: dict | None = None, *,
                names=EXPERIMENTS, quiet: bool = True) -> dict[str, Run]:
    """Every run of the grid under ``profile``, training the missing ones (data loaded once)."""
    cfgs = grid(profile, source, names)
    root = runs_root(profile, runs_dir)
    data = None
    runs = {}
    for name, cfg in cfgs.items():
        if data is None and not is_finished(run_dir_for(cfg, root), cfg):
            data = load_data(cfg, quiet=quiet)  # every run of a profile shares the data settings
        runs[name] = ensure_run(cfg, root, quiet=quiet, data=data)
    return runs


def split_counts(cfg: Config, data) -> dict:
    """The labeled/unlabeled split a run of ``cfg`` trains on (the same seeded partition), with
    per-class counts: {"labeled": idx, "unlabeled": idx, "rows": [{class, labeled, unlabeled}, ...]}."""
    import numpy as np

    from .train import split_indices

    labeled, unlabeled = split_indices(cfg, data.train.labels)
    labels = data.train.labels.numpy()
    k = data.num_classes
    lab = np.bincount(labels[labeled], minlength=k)
    unl = np.bincount(labels[unlabeled], minlength=k)
    rows = [{"class": c, "labeled": int(a), "unlabeled": int(b), "total": int(a + b)}
            for c, a, b in zip(data.classes, lab, unl)]
    return {"labeled": labeled, "unlabeled": unlabeled, "rows": rows}


def describe_data(data) -> dict:
    """A JSON-able description of a loaded dataset (which copy, sizes, classes, statistics)."""
    return {"source": data.source, "description": data.description, "n_train": len(data.train),
            "n_test": len(data.test), "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std)}


# ------------------------------------------------------------------------------ command line

def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it (so Make sees no change)."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def _pointer(name: str, profile: str, run: Run) -> str:
    digest = hashlib.sha1((run.run_dir / "summary.json").read_bytes()).hexdigest()
    return json.dumps({"experiment": name, "profile": profile, "run_dir": str(run.run_dir),
                       "config_digest": run.config.digest(), "summary_sha1": digest}, indent=1) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib.experiments",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
            cfg = resolve(EXPERIMENTS[0], args.profile, source)
            text = json.dumps({"profile": args.profile, **describe_data(load_data(cfg, quiet=False))},
                              indent=1) + "\n"
            if args.out:
                write_if_changed(args.out, text)
            else:
                print(text, end="")
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
    except ValueError as err:
        if not _bad_input(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _bad_input(err: Exception) -> bool:
    """A config, data or run-directory problem (reported in one line), not a bug."""
    if isinstance(err, ConfigError):
        return True
    data, train = sys.modules.get("ssl_lib.data"), sys.modules.get("ssl_lib.train")
    return bool((data and isinstance(err, data.DataError)) or (train and isinstance(err, train.RunDirError)))


if __name__ == "__main__":
    sys.exit(main())
