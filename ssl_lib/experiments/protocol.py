"""The standard FixMatch protocol beside the writeup's grid: ``configs/protocol/<run>.yaml`` (40, 250
and 4,000 labels; FixMatch, FixMatch with the k-means term, and a supervised-only twin), run under
a protocol profile ``configs/protocol/profiles/<name>.yaml``:

    description   one line for the report
    runs          which of the runs the profile trains
    seeds         the seeds each run is trained with
    set           config fields applied on top of every run (the budget: steps, batch sizes, ...)

A resolved config is: the run's YAML < the data source (as for the grid) < the profile's ``set``
< the seed. Runs are cached by config hash under ``<runs root>/protocol-<profile>/``, like the grid's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, make_config
from .grid import _absolute, _read_yaml, configs_dir, data_source

#: FixMatch (RandAugment) test accuracy on CIFAR-10 in the paper (Sohn et al. 2020, Table 2):
#: mean and standard deviation over 5 folds, by label count.
PAPER = {40: (0.8619, 0.0337), 250: (0.9493, 0.0065), 4000: (0.9574, 0.0005)}
#: The range the best public reimplementations report (TorchSSL; kekmodel/FixMatch-pytorch), by label count.
REIMPLEMENTATIONS = {40: (0.925, 0.936), 250: (0.951, 0.953), 4000: (0.958, 0.958)}
#: The protocol's full schedule, in steps.
FULL_STEPS = 2 ** 20


@dataclass(frozen=True)
class ProtocolProfile:
    name: str
    description: str
    runs: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: dict = field(default_factory=dict)


def protocol_dir() -> Path:
    return configs_dir() / "protocol"


def protocol_runs() -> list[str]:
    return sorted(p.stem for p in protocol_dir().glob("*.yaml"))


def load_protocol_profile(name: str) -> ProtocolProfile:
    path = protocol_dir() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (protocol_dir() / "profiles").glob("*.yaml")))
        raise ConfigError(f"unknown protocol profile {name!r}; profiles: {known}")
    raw = _read_yaml(path)
    unknown = set(raw) - {"description", "runs", "seeds", "set"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected description, runs, seeds, set")
    runs, seeds, settings = raw.get("runs") or [], raw.get("seeds") or [0], raw.get("set") or {}
    missing = [r for r in runs if r not in protocol_runs()]
    if missing or not runs:
        raise ConfigError(f"{path}: 'runs' must list runs of {protocol_dir()} (unknown: {missing})")
    if not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be integers >= 0, got {seeds!r}")
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of config fields")
    make_config(settings)  # unknown or invalid fields named now
    return ProtocolProfile(name, str(raw.get("description", "")), tuple(runs), tuple(seeds), dict(settings))


def resolve_protocol(run: str, profile: str | ProtocolProfile, seed: int = 0, source: dict | None = None) -> Config:
    """The exact config of protocol ``run`` under ``profile`` with ``seed``."""
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    path = protocol_dir() / f"{run}.yaml"
    if not path.is_file():
        raise ConfigError(f"no protocol config {path} (runs: {', '.join(protocol_runs())})")
    merged = {**_read_yaml(path), **(source if source is not None else data_source()), **prof.settings, "seed": seed}
    for key in ("data_root", "cache_dir"):
        if merged.get(key):
            merged[key] = _absolute(str(merged[key]))
    return make_config(merged)


def protocol_grid(profile: str | ProtocolProfile, source: dict | None = None) -> dict[tuple[str, int], Config]:
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    return {(run, seed): resolve_protocol(run, prof, seed, source) for run in prof.runs for seed in prof.seeds}


def labels_of(cfg: Config) -> int:
    return int(cfg.num_labeled or 0)


def variant(cfg: Config) -> str:
    if cfg.w_augment == 0 and cfg.w_kmeans == 0:
        return "supervised only"
    return "FixMatch + k-means" if cfg.w_kmeans > 0 else "FixMatch"


def rows(runs: dict) -> list[dict]:
    """One row per finished run (``{(run, seed): Run}``): our accuracies, the budget they came
    from, and the paper's and the reimplementations' figures at the same label count."""
    out = []
    for (name, seed), run in runs.items():
        cfg, s = run.config, run.summary
        steps = s["epochs"] * cfg.eval_every if cfg.eval_every else None
        labels = labels_of(cfg)
        paper = PAPER.get(labels)
        lo, hi = REIMPLEMENTATIONS.get(labels, (None, None))
        out.append({
            "run": name, "labels": labels, "variant": variant(cfg), "seed": seed,
            "steps": steps, "of the schedule": None if steps is None else steps / FULL_STEPS,
            "batch (labeled + unlabeled)": f"{cfg.batch_size} + {cfg.unlabeled_batch_size}",
            "best acc": s["best_acc"], "median of last 20": s.get("median_last20_acc"), "final acc": s["final_acc"],
            "final acc (raw weights)": run.epoch("test_acc_raw")[-1] if len(run.epoch("test_acc_raw")) else None,
            "paper (FixMatch RA)": None if paper is None else paper[0],
            "reimplementations": None if lo is None else (f"{lo:.3f}" if lo == hi else f"{lo:.3f}-{hi:.3f}"),
        })
    return out
