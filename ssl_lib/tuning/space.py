"""The search space: a YAML file mapping config fields to distributions, checked before any trial.

    # configs/tuning/space.yaml
    w_augment: {low: 0.01, high: 10, log: true}     # a float range (the field is a float)
    kmeans_every: {low: 1, high: 5}                 # an int range (the field is an int); step: 2 allowed
    tau: {low: 0.7, high: 0.99, step: 0.01}         # a float range on a grid
    optimizer: {choices: [adam, sgd]}               # a categorical choice
    w_kmeans: 0                                     # a plain value: fixed for every trial of this study
    enqueue:                                        # optional: trials to run first, as given
      - {w_augment: 0.25, kmeans_every: 1, tau: 0.95, optimizer: adam}

Everything else comes from the base config. Each bound and choice must be a value the field itself
accepts (checked by building a config with it), so a study never starts only to fail in trial 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import FIELD_TYPES, Config, ConfigError, _check_keys, make_config, yaml_error

#: Fields that make no sense to tune: they choose the data, the split, the budget (the profile's
#: job), where things go, or the hardware; tuning them would compare trials on different problems.
NOT_TUNABLE = {
    "name": "names the run", "seed": "chooses the data split and the initialisation",
    "dataset": "is the data source", "data_root": "is a path", "cache_dir": "is a path",
    "download": "is the data source", "image_size": "is the data source",
    "train_subset": "is the data source", "test_subset": "is the data source",
    "synthetic_train": "is the data source", "synthetic_test": "is the data source",
    "synthetic_classes": "is the data source", "num_unlabeled": "is the split (M)",
    "num_labeled": "is the split", "balanced": "is the split", "val_size": "is the validation split",
    "epochs": "is the run length of the profile", "max_iters_per_epoch": "is the run length of the profile",
    "steps": "is the run length of the profile", "eval_every": "is the run length of the profile",
    "device": "is the hardware", "precision": "is the hardware", "compile": "is the hardware",
    "channels_last": "is the hardware", "kmeans_backend": "is the hardware",
    "eval_batch_size": "is the hardware", "log_every": "is logging",
}
ENQUEUE = "enqueue"


@dataclass(frozen=True)
class Param:
    """One tuned field: a range ``[low, high]`` (``log``, ``step``) or a list of ``choices``."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if FIELD_TYPES[self.name] is int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        extra = (" log" if self.log else "") + (f" step {self.step}" if self.step else "")
        return f"{self.name} in [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    enqueue: tuple[dict, ...] = ()
    fixed: tuple[tuple[str, object], ...] = ()  # (field, value): the same in every trial

    def suggest(self, trial) -> dict:
        """The trial's config values: the fixed ones and one suggestion per tuned field."""
        return {**dict(self.fixed), **{p.name: p.suggest(trial) for p in self.params}}

    def to_dict(self) -> dict:
        """A plain mapping (stored with the study, so a rerun with another space is caught)."""
        out: dict = {}
        for p in self.params:
            out[p.name] = ({"choices": list(p.choices)} if p.choices is not None else
                           {"low": p.low, "high": p.high, "log": p.log, "step": p.step})
        out.update(self.fixed)
        if self.enqueue:
            out[ENQUEUE] = [dict(t) for t in self.enqueue]
        return out


def load_space(path: str | Path, base: Config) -> Space:
    """Read and check a space file against the base config; raise ConfigError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} does not exist" if not path.exists() else f"space file {path} is not a file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"space file {path} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"space file {path}: {yaml_error(err)}") from None
    try:
        return parse_space(raw, base)
    except ConfigError as err:
        raise ConfigError(f"space file {path}: {err}") from None


def parse_space(raw, base: Config) -> Space:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("must map config fields to distributions ({low, high} or {choices: [...]})")
    _check_keys(k for k in raw if k != ENQUEUE)  # unknown field: the closest-key hint
    fixed = {k: v for k, v in raw.items() if k != ENQUEUE and not isinstance(v, (dict, list))}
    fields = {k: v for k, v in raw.items() if k != ENQUEUE and k not in fixed}
    if not fields:
        raise ConfigError("names no field to tune")
    for name in fixed:
        if name in NOT_TUNABLE:
            raise ConfigError(f"field '{name}' cannot be set here: it {NOT_TUNABLE[name]} (set it in the base "
                              "config or the profile)")
    fixed_cfg = _valid_value(base, fixed, "fixed values")
    fixed = {k: getattr(fixed_cfg, k) for k in fixed}
    base = fixed_cfg  # ranges and choices are checked together with the fixed values
    params = tuple(_param(name, spec, base) for name, spec in fields.items())
    enqueue = raw.get(ENQUEUE) or []
    if not isinstance(enqueue, list) or not all(isinstance(t, dict) for t in enqueue):
        raise ConfigError(f"'{ENQUEUE}' must be a list of mappings field: value")
    for i, trial in enumerate(enqueue, 1):
        if set(trial) != set(fields):
            raise ConfigError(f"{ENQUEUE} entry {i} must set exactly the tuned fields ({', '.join(fields)})")
        _valid_value(base, trial, f"{ENQUEUE} entry {i}")
    return Space(params, tuple(enqueue), tuple(fixed.items()))


def _valid_value(base: Config, values: dict, where: str) -> Config:
    """Build the base config with ``values``: the field's own rule (type, range) applies."""
    try:
        return make_config(base.to_dict(), values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _param(name: str, spec, base: Config) -> Param:
    if name in NOT_TUNABLE:
        raise ConfigError(f"field '{name}' cannot be tuned: it {NOT_TUNABLE[name]} (set it in the base config "
                          "or the profile)")
    kind = FIELD_TYPES[name]
    if not isinstance(spec, dict):
        raise ConfigError(f"field '{name}': expected {{low, high}} or {{choices: [...]}}, got {spec!r}")
    allowed = {"choices"} if "choices" in spec else {"low", "high", "log", "step"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"field '{name}': unknown key(s) {', '.join(unknown)} (expected "
                          f"{'choices alone' if 'choices' in spec else 'low, high, log, step'})")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"field '{name}': choices must be a non-empty list")
        coerced = [getattr(_valid_value(base, {name: c}, f"field '{name}' choice {c!r}"), name) for c in choices]
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"field '{name}': choices repeat a value")
        if name in ("model", "optimizer", "schedule", "strong_view"):
            from ..engine.train import check_choices  # the tables live with the engine (imports torch)

            for c in coerced:
                check_choices(make_config(base.to_dict(), {name: c}))
        return Param(name, choices=tuple(coerced))

    if kind not in (int, float):
        raise ConfigError(f"field '{name}' is {getattr(kind, '__name__', kind)}: give {{choices: [...]}}, not a range")
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"field '{name}': range needs '{key}'")
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"field '{name}': {key} must be a finite number, got {value!r}")
        if kind is int and not float(value).is_integer():
            raise ConfigError(f"field '{name}' is an int: {key} must be a whole number, got {value!r}")
    low, high = (kind(spec["low"]), kind(spec["high"]))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"field '{name}': log must be true or false, got {log!r}")
    step = spec.get("step")
    if low >= high:
        raise ConfigError(f"field '{name}': empty or inverted range, low {low} >= high {high}")
    if log and low <= 0:
        raise ConfigError(f"field '{name}': a log range needs low > 0, got low {low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ConfigError(f"field '{name}': step must be a number > 0, got {step!r}")
        if kind is int and not float(step).is_integer():
            raise ConfigError(f"field '{name}' is an int: step must be a whole number, got {step!r}")
        if log and not (kind is int and step == 1):
            raise ConfigError(f"field '{name}': log and step cannot be combined")
        if step > high - low:
            raise ConfigError(f"field '{name}': step {step} is larger than the range [{low}, {high}]")
        step = kind(step)
    for key, value in (("low", low), ("high", high)):  # the field's own rule, e.g. tau in [0, 1], lr > 0
        _valid_value(base, {name: value}, f"field '{name}' {key} {value}")
    return Param(name, low, high, log, step)
