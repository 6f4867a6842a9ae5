"""Typed experiment configuration: one flat dataclass, loaded from YAML with ``key=value`` overrides.

Every field is validated up front so that a bad config fails before any data is read or any run
directory is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the field and the rule."""


@dataclass(frozen=True)
class Config:
    # --- identity ---
    name: str = "run"
    seed: int = 0

    # --- data ---
    dataset: str = "cifar10"  # cifar10 | imagefolder | synthetic
    data_root: str = "data"  # torchvision download folder, or ROOT of ROOT/{train,test}/<class>/*
    cache_dir: str = ""  # decoded-tensor cache; "" = inside data_root
    download: bool = True  # cifar10 only: fetch through torchvision when missing
    image_size: int = 32
    train_subset: int = 0  # 0 = whole train split; else a seeded class-stratified subset
    test_subset: int = 0
    synthetic_train: int = 1000
    synthetic_test: int = 500
    synthetic_classes: int = 10

    # --- labeled / unlabeled split ---
    num_unlabeled: int | None = 20000  # the writeup's M
    num_labeled: int | None = None  # alternative to M: the label budget
    balanced: bool = False  # labeled set with equal counts per class (FixMatch protocol)

    # --- augmentation ---
    labeled_view: str = "weak"  # weak | none: view used for the supervised batch
    crop_padding: int = 4
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.2

    # --- losses ---
    w_labeled: float = 1.0
    w_augment: float = 0.25
    w_kmeans: float = 0.25
    tau: float = 0.95
    kmeans_every: int = 1  # refit centroids every this many epochs
    kmeans_n_init: int = 3
    kmeans_backend: str = "auto"  # auto | sklearn | torch  (auto: torch on GPUs, sklearn on CPU)

    # --- optimisation ---
    epochs: int = 35
    batch_size: int = 64  # labeled images per iteration
    unlabeled_batch_size: int = 64  # unlabeled images per iteration
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_iters_per_epoch: int = 0  # 0 = one pass over the larger of the two sets

    # --- runtime ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    channels_last: str = "auto"  # auto (on for CUDA and CPU) | on | off
    eval_batch_size: int = 1000
    log_every: int = 50  # iterations between host reads of the metrics (progress bar, NaN check)

    def validate(self) -> "Config":
        """Raise ConfigError naming the first field that breaks its rule; return self."""

        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{field}' {rule}, got {getattr(self, field)!r}")

        choices = {
            "dataset": ("cifar10", "imagefolder", "synthetic"),
            "labeled_view": ("weak", "none"),
            "kmeans_backend": ("auto", "sklearn", "torch"),
            "precision": ("fp32", "bf16"),
            "channels_last": ("auto", "on", "off"),
        }
        for key, allowed in choices.items():
            need(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        dev = self.device
        need(dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
             "device", "must be auto, cpu, mps, cuda or cuda:N")
        for key in ("w_labeled", "w_augment", "w_kmeans", "weight_decay", "train_subset", "test_subset",
                    "max_iters_per_epoch", "crop_padding", "brightness", "contrast", "saturation", "epochs"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("tau", "grayscale_p", "blur_p"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        need(0.0 <= self.hue <= 0.5, "hue", "must be in [0, 0.5]")
        for key in ("batch_size", "unlabeled_batch_size", "eval_batch_size", "log_every", "kmeans_every",
                    "kmeans_n_init", "synthetic_train", "synthetic_test", "image_size"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.synthetic_classes >= 2, "synthetic_classes", "must be >= 2")
        need(self.image_size % 4 == 0, "image_size", "must be a multiple of 4 (two 2x2 poolings)")
        need(self.lr > 0, "lr", "must be > 0")
        if (self.num_unlabeled is None) == (self.num_labeled is None):
            raise ConfigError("set exactly one of 'num_unlabeled' (M) and 'num_labeled' "
                              f"(got num_unlabeled={self.num_unlabeled!r}, num_labeled={self.num_labeled!r})")
        for key in ("num_unlabeled", "num_labeled"):
            need(getattr(self, key) is None or getattr(self, key) >= 0, key, "must be >= 0")
        need(self.w_labeled + self.w_augment + self.w_kmeans > 0, "w_labeled",
             "and w_augment, w_kmeans must not all be 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of every field that can change what a run computes (not its name or logging)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        return f"{self.name}-{self.digest()}"


_NOT_HASHED = {"name", "log_every", "cache_dir", "eval_batch_size"}
FIELD_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}


def _coerce(key: str, value):
    """Convert a YAML or command-line value to the field's declared type, or raise ConfigError."""
    kind = FIELD_TYPES[key]
    optional = typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{key}' must not be null")
    # "none" on the command line is null only where null is allowed: labeled_view=none is a value
    if optional and isinstance(value, str) and value.lower() in ("null", "none", "~"):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{key}' must be {base.__name__}, got {value!r}") from None


def _check_keys(keys) -> None:
    for key in keys:
        if key not in FIELD_TYPES:
            close = difflib.get_close_matches(key, FIELD_TYPES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")


def make_config(values: dict | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build and validate a Config from a mapping plus ``key=value`` overrides (later wins)."""
    merged = dict(values or {})
    if isinstance(overrides, dict):
        over = dict(overrides)
    else:
        over = {}
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value")
            key, raw = item.split("=", 1)
            over[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    _check_keys(merged)
    _check_keys(over)
    # M and the label budget are two ways to say one thing: setting one clears the other, unless
    # the same layer (file or overrides) sets both, which validate() then rejects.
    for layer in (merged, over):
        for given, other in (("num_labeled", "num_unlabeled"), ("num_unlabeled", "num_labeled")):
            if layer.get(given) is not None and other not in layer:
                merged[other] = None
    merged.update(over)
    return Config(**{k: _coerce(k, v) for k, v in merged.items()}).validate()


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (``None``: the defaults) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return make_config(values, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
