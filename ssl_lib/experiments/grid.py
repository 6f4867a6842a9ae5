"""The writeup's experiment grid and the profiles that scale it: experiment name + profile -> Config.

The grid is one YAML per experiment under ``configs/`` (Experiment 1: M in 0, 50, 5000, 40000,
50000; Experiment 2: three loss-weight settings at M = 20000). A *profile*
(``configs/profiles/<name>.yaml``) scales the same grid to a budget: ``full`` is the writeup's
setting, ``quick`` a CIFAR-10 subset for a 2-core CPU, ``smoke`` synthetic data for tests.

A resolved config is built in this order (later wins)::

    experiment YAML  <  data source (arguments, else SSL_LIB_* environment)  <  profile ``set``

then the profile sets the epochs, and M is rescaled to the number of training images the profile
uses (:func:`scale_unlabeled`). Runs live in ``<runs root>/<name>-<config digest>/``; a finished
run (``summary.json``) is loaded, never retrained (:mod:`.runs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import Config, ConfigError, make_config, yaml_error

# --------------------------------------------------------------------------------- the grid

#: Train-set size the writeup's M values refer to (CIFAR-10's training split).
REFERENCE_TRAIN_SIZE = 50_000

#: The eight runs, in report order. ``configs/<name>.yaml`` must exist for each.
EXPERIMENTS = ("exp1-m0", "exp1-m50", "exp1-m5000", "exp1-m40000", "exp1-m50000",
               "exp2-wk0.025", "exp2-wk0.25", "exp2-wk100")
EXPERIMENT_1 = EXPERIMENTS[:5]
EXPERIMENT_2 = EXPERIMENTS[5:]
#: Experiment 3, which the writeup lists among its tools but never runs: label noise 0, 0.2, 0.4, 0.6 at
#: Experiment 2's M, with the three losses and with the supervised loss alone (no writeup figures).
LABEL_NOISE = (0.0, 0.2, 0.4, 0.6)
EXPERIMENT_3 = tuple(f"exp3-noise{n:g}" for n in LABEL_NOISE) + tuple(f"exp3-sup-noise{n:g}" for n in LABEL_NOISE)
#: Every experiment of ``configs/exp*.yaml``.
ALL_EXPERIMENTS = EXPERIMENTS + EXPERIMENT_3

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
    return Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    return Path(os.environ.get(CONFIGS_ENV) or project_root() / "configs")


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {yaml_error(err)}") from None


def experiment_values(name: str) -> dict:
    """The key: value mapping of ``configs/<name>.yaml`` (unresolved)."""
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(ALL_EXPERIMENTS)
        raise ConfigError(f"no experiment config {path} (experiments: {known})")
    values = _read_yaml(path)
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
    tune_trials: int | None = None  # finished trials per tuning study (make tune, make reports)
    tune_headline_k: int | None = None  # 06-tuning's verdict: the expected best of this many trials
    tune_epochs: int | None = None  # epochs of every tuning run (trials, pools, the untuned pair); None: scaled
    exp3_seeds: tuple[int, ...] = (0,)  # Experiment 3 trains each noise level once per seed (its verdict needs >= 2)

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
    raw = _read_yaml(path)
    keys = ("description", "epochs_scale", "epochs", "set", "tune_trials", "tune_headline_k", "tune_epochs",
            "exp3_seeds")
    unknown = set(raw) - set(keys)
    if unknown:
        raise ConfigError(f"{path}: unknown profile key(s) {sorted(unknown)}; expected {', '.join(keys)}")
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
    trials = raw.get("tune_trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise ConfigError(f"{path}: tune_trials must be an integer >= 1, got {trials!r}")
    k = raw.get("tune_headline_k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1 or (trials is not None and k > trials)):
        raise ConfigError(f"{path}: tune_headline_k must be an integer from 1 to tune_trials ({trials}), got {k!r}")
    tune_epochs = raw.get("tune_epochs")
    if tune_epochs is not None and (not isinstance(tune_epochs, int) or isinstance(tune_epochs, bool) or tune_epochs < 1):
        raise ConfigError(f"{path}: tune_epochs must be an integer >= 1, got {tune_epochs!r}")
    seeds = raw.get("exp3_seeds", [0])
    if (not isinstance(seeds, list) or not seeds or 0 not in seeds or len(set(seeds)) < len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ConfigError(f"{path}: exp3_seeds must be a list of distinct integers >= 0 that holds 0 (the grid's "
                          f"own run), got {seeds!r}")
    return Profile(name, str(raw.get("description", "")), None if scale is None else float(scale),
                   epochs, dict(settings), trials, k, tune_epochs, tuple(sorted(seeds)))


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


def seeded(profile: str | Profile, source: dict | None = None, names=EXPERIMENT_3) -> dict[tuple[str, int], Config]:
    """``{(name, seed): Config}``: each experiment of ``names`` that the profile repeats over seeds
    (Experiment 3: ``exp3_seeds``) once per seed; seed 0 is the grid's own run."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    out = {}
    for name in names:
        cfg = resolve(name, prof, source)
        seeds = prof.exp3_seeds if name in EXPERIMENT_3 else (cfg.seed,)
        out.update({(name, s): cfg if s == cfg.seed else make_config(cfg.to_dict(), {"seed": s}) for s in seeds})
    return out


def writeup_m(experiment: str) -> int:
    """The experiment's M as the writeup gives it (out of 50,000)."""
    return int(experiment_values(experiment)["num_unlabeled"])


