"""Typed experiment configuration: one flat dataclass, loaded from YAML with ``key=value`` overrides.

Every field is validated up front so that a bad config fails before any data is read or any run
directory is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .errors import ConfigError
from .files import atomic_write


def _f(default, help: str):
    """A config field: its default and the one line ``train --help`` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- identity ---
    name: str = _f("run", "run name: the run directory is runs/<name>-<config hash>")
    seed: int = _f(0, "seed of the subsets, the split, the initialisation, the views and the batch order")
    data_seed: int | None = _f(None, "seed of the data alone (the subsets, the synthetic images, the validation "
                                     "hold-out) when it should stay fixed while seed varies; null = seed")

    # --- data ---
    dataset: str = _f("cifar10", "cifar10 | imagefolder | synthetic")
    data_root: str = _f("data", "cifar10: torchvision's download folder; imagefolder: ROOT of ROOT/{train,test}/<class>/*")
    cache_dir: str = _f("", "folder of the decoded-tensor cache ('' = inside data_root)")
    download: bool = _f(True, "cifar10 only: download through torchvision when missing")
    image_size: int = _f(32, "images are resized to image_size x image_size")
    train_subset: int = _f(0, "0 = the whole train split; else a seeded class-stratified subset of this size")
    test_subset: int = _f(0, "0 = the whole test split; else a seeded class-stratified subset of this size")
    synthetic_train: int = _f(1000, "synthetic only: training images")
    synthetic_test: int = _f(500, "synthetic only: test images")
    synthetic_classes: int = _f(10, "synthetic only: classes")

    # --- labeled / unlabeled split ---
    num_unlabeled: int | None = _f(20000, "M: training images whose label is hidden (the writeup's M)")
    num_labeled: int | None = _f(None, "the label budget, instead of M (setting one clears the other)")
    balanced: bool = _f(False, "labeled set with equal counts per class (the FixMatch protocol)")
    label_noise: float = _f(0.0, "fraction of the labeled images whose label is replaced by another class, "
                                 "drawn at random (seeded; the test set is never touched)")
    unlabeled_includes_labeled: bool = _f(False, "draw the unlabeled batches from every training image, the "
                                                 "labeled ones too (their labels unused), as FixMatch does")
    val_size: int = _f(0, "training images held out for validation (seeded, class-stratified, in neither set); "
                          "when > 0 the run is scored on them and the test split is not read")

    # --- augmentation ---
    labeled_view: str = _f("weak", "weak | none: the view of the labeled batch")
    strong_view: str = _f("writeup", "writeup: colour jitter, grayscale, blur | randaugment: FixMatch's RandAugment "
                                     "(2 of 14 operations per image) + Cutout; either after the weak flip and crop")
    crop_padding: int = _f(4, "weak view: reflect padding of the random crop, in pixels")
    brightness: float = _f(0.4, "strong view: brightness jitter, factor in [1 - b, 1 + b]")
    contrast: float = _f(0.4, "strong view: contrast jitter, factor in [1 - c, 1 + c]")
    saturation: float = _f(0.4, "strong view: saturation jitter, factor in [1 - s, 1 + s]")
    hue: float = _f(0.1, "strong view: hue shift in [-h, h] turns")
    grayscale_p: float = _f(0.2, "strong view: probability of grayscale")
    blur_p: float = _f(0.2, "strong view: probability of a 3x3 Gaussian blur (sigma in [0.1, 2])")

    # --- losses ---
    w_labeled: float = _f(1.0, "weight of the supervised cross-entropy")
    w_augment: float = _f(0.25, "weight of the FixMatch consistency loss (0 = off)")
    w_kmeans: float = _f(0.25, "weight of the k-means loss (0 = off)")
    tau: float = _f(0.95, "FixMatch confidence threshold of the pseudo-label mask")
    kmeans_every: int = _f(1, "refit the k-means centroids every this many epochs")
    kmeans_n_init: int = _f(3, "k-means restarts per refit (the best inertia is kept)")
    kmeans_backend: str = _f("auto", "auto | sklearn | torch (auto: sklearn on the CPU, torch on GPUs)")
    kmeans_bn: str = _f("batch", "BatchNorm in the refit's feature pass: batch = on each batch's statistics, as the "
                                 "step normalises the z the loss pulls (running statistics untouched) | running = "
                                 "on the running statistics (eval mode; what versions before 0.2 did)")
    kmeans_refit: str = _f("auto", "the refit's images: step = the unlabeled images' weak views in batches shaped like "
                                   "the step's [labeled | unlabeled weak | strong], so BatchNorm sees what it sees in "
                                   "a step | clean = un-augmented, alone (batches of unlabeled_batch_size on batch "
                                   "statistics, else eval_batch_size) | auto = step for a model with BatchNorm (all but "
                                   "simple_cnn) and kmeans_bn batch, else clean; on batch statistics in a seeded random order")

    kmeans_loss: str = _f("distance", "distance = mean squared distance of z to its centroid (the writeup's) | "
                                      "standardised = the same after z (by its batch's mean and spread) and the "
                                      "centroids (by the refit's) are standardised: the term cannot shrink the features")

    # --- model and optimisation ---
    model: str = _f("simple_cnn", "simple_cnn: the writeup's CNN | wrn28_2: Wide ResNet-28-2 (the FixMatch protocol)")
    bn_momentum: float = _f(0.001, "wrn28_2 only: BatchNorm momentum (FixMatch's 0.001 suits 2^20 steps; "
                                   "a short run needs a faster average, e.g. 0.1)")
    optimizer: str = _f("adam", "adam | sgd (Nesterov; no weight decay on biases and norm parameters)")
    schedule: str = _f("constant", "constant | cosine (lr cos(7 pi k / 16 K) over the K steps of the run)")
    momentum: float = _f(0.9, "sgd only: momentum")
    ema_decay: float = _f(0.0, "0 = off; else evaluate and save the moving average of the weights with this decay "
                               "(0.999 in the FixMatch protocol); the raw weights' accuracy is recorded too")
    epochs: int = _f(35, "training epochs")
    batch_size: int = _f(64, "labeled images per step")
    unlabeled_batch_size: int = _f(64, "unlabeled images per step")
    lr: float = _f(1e-3, "learning rate")
    weight_decay: float = _f(0.0, "weight decay")
    max_iters_per_epoch: int = _f(0, "0 = an epoch is one pass over the larger of the two sets; else at most this many steps")
    eval_every: int = _f(0, "0 = epochs as above; else an epoch is exactly this many steps (one evaluation, "
                            "checkpoint and k-means refit each)")
    steps: int = _f(0, "0 = train `epochs` epochs; else train this many steps (a multiple of the steps per epoch)")

    # --- runtime ---
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, then mps, then cpu)")
    precision: str = _f("fp32", "fp32 | bf16 (autocast)")
    compile: bool = _f(False, "torch.compile the model and the views (one process; refused under DDP until measured there)")
    channels_last: str = _f("auto", "auto (on for CUDA and CPU) | on | off")
    sync_bn: bool = _f(True, "several processes (torchrun, srun): BatchNorm on the statistics of the whole global "
                             "batch, so K processes compute what one does; false is refused with several processes "
                             "(their BatchNorm statistics would drift apart)")
    eval_batch_size: int = _f(1000, "batch size of evaluation and of the k-means feature pass")
    log_every: int = _f(50, "steps between host reads of the losses (progress bar, divergence check)")

    def validate(self) -> "Config":
        """Raise ConfigError naming the first field that breaks its rule; return self."""

        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{key}' {rule}, got {getattr(self, key)!r}")

        for key, kind in FIELD_TYPES.items():  # NaN and infinities pass comparisons like >= 0
            if kind is float:
                need(math.isfinite(getattr(self, key)), key, "must be a finite number")

        choices = {
            "dataset": ("cifar10", "imagefolder", "synthetic"),
            "labeled_view": ("weak", "none"),
            "kmeans_backend": ("auto", "sklearn", "torch"),
            "kmeans_bn": ("batch", "running"),
            "kmeans_refit": ("auto", "step", "clean"),
            "kmeans_loss": ("distance", "standardised"),
            "precision": ("fp32", "bf16"),
            "channels_last": ("auto", "on", "off"),
        }
        for key, allowed in choices.items():
            need(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        dev = self.device
        need(dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
             "device", "must be auto, cpu, mps, cuda or cuda:N")
        for key in ("w_labeled", "w_augment", "w_kmeans", "weight_decay", "train_subset", "test_subset",
                    "max_iters_per_epoch", "val_size", "eval_every", "steps", "crop_padding", "brightness", "contrast", "saturation", "epochs"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("tau", "grayscale_p", "blur_p", "label_noise"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        need(0.0 <= self.hue <= 0.5, "hue", "must be in [0, 0.5]")
        for key in ("batch_size", "unlabeled_batch_size", "eval_batch_size", "log_every", "kmeans_every",
                    "kmeans_n_init", "synthetic_train", "synthetic_test", "image_size"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.synthetic_classes >= 2, "synthetic_classes", "must be >= 2")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.data_seed is None or self.data_seed >= 0, "data_seed", "must be >= 0 or null")
        need(self.crop_padding < self.image_size, "crop_padding", f"must be smaller than image_size ({self.image_size})")
        need(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(0.0 < self.bn_momentum <= 1.0, "bn_momentum", "must be in (0, 1]")
        need(self.lr > 0, "lr", "must be > 0")
        if (self.num_unlabeled is None) == (self.num_labeled is None):
            raise ConfigError("set exactly one of 'num_unlabeled' (M) and 'num_labeled' "
                              f"(got num_unlabeled={self.num_unlabeled!r}, num_labeled={self.num_labeled!r})")
        for key in ("num_unlabeled", "num_labeled"):
            need(getattr(self, key) is None or getattr(self, key) >= 0, key, "must be >= 0")
        need(self.kmeans_refit != "step" or self.kmeans_bn == "batch", "kmeans_refit",
             "'step' normalises as the step does: it needs kmeans_bn batch")
        need(self.w_labeled + self.w_augment + self.w_kmeans > 0, "w_labeled",
             "and w_augment, w_kmeans must not all be 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of every field that can change what a run computes (not its name or logging).

        A field added after the first release counts only when it differs from its default, so the
        runs of earlier versions keep their hash (and their cached run directories)."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in _NOT_HASHED and not (k in _ADDED_LATER and v == _DEFAULTS[k])}
        if d.get("kmeans_refit") == replace(self, kmeans_refit="auto").kmeans_refit_view():
            del d["kmeans_refit"]  # what auto means here, said explicitly
        if self.w_kmeans > 0 and self.kmeans_bn == "batch" and self.model not in MODELS_WITHOUT_BATCHNORM:
            # The refit on batch statistics changed its numbers (seeded random order, the step's
            # batches): runs refit the older way must not be taken for these.
            d["kmeans_refit_version"] = KMEANS_REFIT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def kmeans_refit_view(self) -> str:
        """``kmeans_refit`` with ``auto`` resolved: ``step`` for a model with BatchNorm on batch
        statistics (where the batches change the features), else ``clean`` (the writeup's refit)."""
        if self.kmeans_refit != "auto":
            return self.kmeans_refit
        return "step" if self.kmeans_bn == "batch" and self.model not in MODELS_WITHOUT_BATCHNORM else "clean"

    def run_name(self) -> str:
        return f"{self.name}-{self.digest()}"


#: The refit on batch statistics: 1 = the images in their stored order, batches of eval_batch_size
#: (before kmeans_refit); 2 = a seeded random order, the step's batches (kmeans_refit).
KMEANS_REFIT_VERSION = 2
#: Models whose refit does not depend on the batches (no BatchNorm): their k-means runs keep their hash.
MODELS_WITHOUT_BATCHNORM = {"simple_cnn"}
_NOT_HASHED = {"name", "log_every", "cache_dir", "eval_batch_size"}
_ADDED_LATER = {"strong_view", "model", "optimizer", "schedule", "momentum", "val_size", "ema_decay",
                "unlabeled_includes_labeled", "eval_every", "steps", "label_noise", "bn_momentum",
                "kmeans_bn", "sync_bn", "data_seed", "kmeans_refit", "kmeans_loss"}
FIELD_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
FIELD_HELP = {f.name: f.metadata.get("help", "") for f in fields(Config)}
_DEFAULTS = {f.name: f.default for f in fields(Config)}


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
            try:
                over[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"override '{item}': {yaml_error(err)}") from None
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
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
            values = yaml.safe_load(text) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: {yaml_error(err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return make_config(values, overrides)


def yaml_error(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (1-based line and column)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {what}"


def save_config(cfg: Config, path: Path) -> None:
    """The config as YAML, written atomically (``load_config`` reads it back to the same config)."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
