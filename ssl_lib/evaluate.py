"""Evaluation of a model on a labeled split: mean loss, accuracy, confusion matrix, clustering accuracy."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .augment.augmenter import to_unit
from .distributed import SINGLE, Dist, all_reduce_sum, slices


def cluster_accuracy(confusion: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of predicted to true classes.

    ``confusion[t, p]`` counts images of true class t predicted as p. The matching maximises the
    matched counts (Hungarian algorithm), which is the accuracy a label-free model can claim.
    """
    confusion = np.asarray(confusion)
    total = confusion.sum()
    if total == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return float(confusion[rows, cols].sum() / total)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """``confusion[t, p]``: how many images of true class t are predicted (or assigned to cluster) p."""
    counts = torch.bincount(labels.to(predicted.device) * num_classes + predicted, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes).cpu().numpy()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, normalize: Callable, batch_size: int = 1000,
            autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features of uint8 ``images`` (on the model's device), in batches, no augmentation.

    The model runs in eval mode (BatchNorm with its running statistics, no dropout, nothing
    updated) and is put back in the mode it was in."""
    logits, feats = [], []
    device_type = images.device.type
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(to_unit(images[start:start + batch_size]))
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out, z = model(x)
            logits.append(out.float())
            feats.append(z.float())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(feats)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
             num_classes: int, batch_size: int = 1000, autocast_dtype: torch.dtype | None = None,
             dist: Dist = SINGLE) -> dict:
    """Mean cross-entropy, accuracy, confusion matrix and clustering accuracy on a labeled split.

    Of several processes (torchrun), each evaluates its share of the split and the sums are added up."""
    if dist.on:
        start, end = slices(len(images), dist)
        logits, _ = predict(model, images[start:end], normalize, batch_size, autocast_dtype)
        labels = labels[start:end].to(logits.device)
        pred = logits.argmax(1)
        counts = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).double()
        sums = all_reduce_sum(torch.cat([F.cross_entropy(logits, labels, reduction="sum").double().reshape(1),
                                         counts]), dist)
        confusion = sums[1:].round().long().view(num_classes, num_classes).cpu().numpy()
        correct = int(confusion.trace())
        acc = torch.tensor(correct, dtype=torch.float32) / len(images)  # as the one-process float32 mean rounds it
        return {"test_loss": float(sums[0] / len(images)), "test_acc": float(acc),
                "cluster_acc": cluster_accuracy(confusion), "confusion": confusion}
    logits, _ = predict(model, images, normalize, batch_size, autocast_dtype)
    labels = labels.to(logits.device)
    pred = logits.argmax(1)
    confusion = confusion_matrix(labels, pred, num_classes)
    return {
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_acc": float((pred == labels).float().mean()),
        "cluster_acc": cluster_accuracy(confusion),
        "confusion": confusion,
    }


def kmeans_cluster_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
                            num_classes: int, batch_size: int = 1000, seed: int = 0, n_init: int = 3,
                            backend: str = "auto") -> float:
    """How well the features z separate the classes without the classifier: k-means (k = classes)
    on the features of ``images`` (model in eval mode), clusters matched one-to-one to the classes
    by the Hungarian method (:func:`cluster_accuracy`)."""
    from .method.kmeans import fit_centroids

    z = predict(model, images, normalize, batch_size)[1]
    centroids, _ = fit_centroids(z, num_classes, n_init, seed=seed, backend=backend)
    assignment = torch.cdist(z, centroids.to(z.dtype)).argmin(1)
    return cluster_accuracy(confusion_matrix(labels, assignment, num_classes))
