"""Test-set evaluation: mean loss, accuracy, confusion matrix and clustering accuracy."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .augment import to_unit


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


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, normalize: Callable, batch_size: int = 1000,
            autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features of uint8 ``images`` (on the model's device), in batches, no augmentation."""
    logits, feats = [], []
    device_type = images.device.type
    for start in range(0, len(images), batch_size):
        x = normalize(to_unit(images[start:start + batch_size]))
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out, z = model(x)
        logits.append(out.float())
        feats.append(z.float())
    return torch.cat(logits), torch.cat(feats)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
             num_classes: int, batch_size: int = 1000, autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean cross-entropy, accuracy, confusion matrix and clustering accuracy on a labeled split."""
    logits, _ = predict(model, images, normalize, batch_size, autocast_dtype)
    labels = labels.to(logits.device)
    pred = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu().numpy()
    return {
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_acc": float((pred == labels).float().mean()),
        "cluster_acc": cluster_accuracy(confusion),
        "confusion": confusion,
    }


def evaluate_run(run_dir) -> dict:
    """Reload a finished run's config, data and ``model.pt`` and evaluate it on the test split."""
    from pathlib import Path

    from .augment import Normalize
    from .config import load_config
    from .models import SimpleCNN
    from .train import RunDirError, load_data, resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a finished run directory (no model.pt and config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    model = SimpleCNN(data.num_classes, cfg.image_size).to(device)
    try:
        model.load_state_dict(torch.load(run_dir / "model.pt", map_location=device, weights_only=True))
    except (RuntimeError, OSError) as err:
        raise RunDirError(f"{run_dir / 'model.pt'} cannot be loaded: {err}") from None
    model.eval()
    result = evaluate(model, data.test.images.to(device), data.test.labels, Normalize(data.mean, data.std, device),
                      data.num_classes, cfg.eval_batch_size)
    result["confusion"] = result["confusion"].tolist()
    return {"run_dir": str(run_dir), "device": str(device), **result}
