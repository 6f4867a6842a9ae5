"""Subsets and labeled/unlabeled partitions of a split, all seeded."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from .sources import Split



def _labels_array(labels: Any) -> np.ndarray:
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def stratified(labels: Any, n: int, seed) -> np.ndarray:
    """Sorted indices of a seeded class-stratified sample of n of ``labels`` (all of them if n >= len).

    Per-class counts are proportional to the labels' (largest-remainder rounding, ties by class
    order), so a sample keeps the class mix."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    labels = _labels_array(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / total
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def subset(split: Split, n: int, seed: int) -> Split:
    """Seeded class-stratified subset of n samples (n >= len -> the split itself). For quick profiles.
    Kept samples stay in their original order."""
    if operator.index(n) >= len(split):
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return split
    idx = torch.from_numpy(stratified(split.labels, n, seed))
    return Split(split.images[idx].contiguous(), split.labels[idx])


def validation_split(labels: Any, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(val_idx, rest_idx)``: a seeded class-stratified validation set of ``val_size`` training
    images and the rest, both sorted. Its own random stream (not the partition's), so the
    labeled/unlabeled split of the rest is drawn as it would be without it."""
    labels = _labels_array(labels)
    if not 0 <= val_size < len(labels):
        raise ValueError(f"val_size must be in [0, {len(labels) - 1}], got {val_size}")
    val = stratified(labels, val_size, [seed, 7919])
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return val, np.flatnonzero(mask).astype(np.int64)


def partition(
    labels: Any, num_unlabeled: int, seed: int, balanced: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """labeled_idx, unlabeled_idx: int64, each SORTED ascending; disjoint, covering all indices.

    Exactly ``num_unlabeled`` (M) indices are unlabeled and L = N - M labeled. With
    ``balanced`` every class gets L / num_classes labels (L must divide evenly). For a
    fixed seed the labeled sets are nested as L grows (the first L of one fixed
    permutation, per class when balanced), so label-budget sweeps are comparable.
    """
    y = _labels_array(labels)
    n = len(y)
    m = operator.index(num_unlabeled)
    if not 0 <= m <= n:
        raise ValueError(f"num_unlabeled must be in [0, {n}], got {m}")
    n_labeled = n - m
    rng = np.random.default_rng(seed)
    if not balanced:
        labeled = rng.permutation(n)[:n_labeled]
    else:
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) == 0:
            labeled = np.empty(0, dtype=np.int64)
        else:
            if n_labeled % len(classes):
                raise ValueError(
                    f"balanced partition needs the labeled count N - num_unlabeled = {n_labeled} "
                    f"to be divisible by the {len(classes)} classes"
                )
            per_class = n_labeled // len(classes)
            short = [f"{c} ({k})" for c, k in zip(classes.tolist(), counts.tolist()) if k < per_class]
            if short:
                raise ValueError(
                    f"balanced partition needs {per_class} images per class; "
                    f"too few in class(es) {', '.join(short)}"
                )
            labeled = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])
    mask = np.zeros(n, dtype=bool)
    mask[labeled] = True
    return np.flatnonzero(mask).astype(np.int64), np.flatnonzero(~mask).astype(np.int64)


def num_unlabeled_for(labels: Any, num_labeled: int) -> int:
    """M that leaves exactly num_labeled labeled images.

    The config may give the label budget instead of M.
    """
    n = len(_labels_array(labels))
    k = operator.index(num_labeled)
    if not 0 <= k <= n:
        raise ValueError(f"num_labeled must be in [0, {n}], got {k}")
    return n - k


def flip_labels(labels: Any, indices: np.ndarray, fraction: float, num_classes: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Label noise: ``round(fraction * len(indices))`` of ``indices`` (drawn with the seed) get a
    different class, drawn uniformly from the other ``num_classes - 1``. Returns the new labels (a
    copy) and the sorted indices that were flipped."""
    labels = _labels_array(labels).copy()
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise must be in [0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 104729])
    flipped = np.sort(rng.permutation(np.asarray(indices))[: int(round(fraction * len(indices)))])
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return labels, flipped.astype(np.int64)
