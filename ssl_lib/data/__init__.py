"""Image data: the sources (:mod:`.sources`) and the seeded subsets and partitions (:mod:`.split`),
put together for a config by :func:`load_data` and :func:`split_indices`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..config import Config, ConfigError
from .sources import SOURCES, DataError, ImageDataset, Split, load_dataset
from .split import flip_labels, num_unlabeled_for, partition, stratified, subset, validation_split

__all__ = ["SOURCES", "DataError", "flip_labels", "ImageDataset", "Split", "load_data", "load_dataset", "num_unlabeled_for",
           "partition", "split_indices", "stratified", "subset", "describe_data", "data_key",
           "validation_indices", "validation_split"]


def load_data(cfg: Config, quiet: bool = True) -> ImageDataset:
    """The dataset named by the config, with the configured train/test subsets applied.

    A config with a validation set (``val_size`` > 0) is scored on it: its test split is not read
    (an empty split stands in its place), so nothing tuned on it can look at the test images."""
    data = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size,
                        cache_dir=cfg.cache_dir or None, download=cfg.download, seed=data_seed(cfg),
                        synthetic_train=cfg.synthetic_train, synthetic_test=cfg.synthetic_test,
                        synthetic_classes=cfg.synthetic_classes, quiet=quiet, with_test=cfg.val_size == 0,
                        min_classes=2)
    if cfg.train_subset or cfg.test_subset:
        data = replace(data,
                       train=subset(data.train, cfg.train_subset, data_seed(cfg)) if cfg.train_subset else data.train,
                       test=subset(data.test, cfg.test_subset, data_seed(cfg)) if cfg.test_subset else data.test)
    return data


def data_seed(cfg: Config) -> int:
    """The seed of the data (subsets, synthetic images, validation hold-out): ``data_seed``, else ``seed``."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def data_key(cfg: Config) -> tuple:
    """What :func:`load_data` returns depends on these fields alone: two configs with the same key
    get the same data (a worker keeps one loaded copy for consecutive runs that share it)."""
    return (cfg.dataset, cfg.data_root, cfg.image_size, cfg.cache_dir, cfg.download, data_seed(cfg),
            cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes, cfg.train_subset, cfg.test_subset,
            cfg.val_size == 0)


def validation_indices(cfg: Config, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(val_idx, rest_idx)`` of the training split for the config's ``val_size`` (val empty for 0)."""
    try:
        return validation_split(labels.numpy(), cfg.val_size, data_seed(cfg))
    except ValueError as err:
        raise ConfigError(f"config field 'val_size': {err}") from None


def split_indices(cfg: Config, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labeled and unlabeled train indices for the config's M (or label budget), taken from the
    training images left after the validation set (all of them when ``val_size`` is 0)."""
    _, rest = validation_indices(cfg, labels)
    labels = labels.numpy()[rest]
    try:
        m = cfg.num_unlabeled if cfg.num_labeled is None else num_unlabeled_for(labels, cfg.num_labeled)
        labeled, unlabeled = partition(labels, m, cfg.seed, balanced=cfg.balanced)
    except ValueError as err:
        field = "num_labeled" if cfg.num_labeled is not None else "num_unlabeled"
        raise ConfigError(f"config field '{field}': {err}") from None
    return rest[labeled], rest[unlabeled]


def describe_data(data) -> dict:
    """A JSON-able description of a loaded dataset (which copy, sizes, classes, statistics)."""
    return {"source": data.source, "description": data.description, "n_train": len(data.train),
            "n_test": len(data.test), "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std)}
