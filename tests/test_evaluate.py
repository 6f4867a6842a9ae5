import numpy as np
import pytest
import torch

from ssl_lib.augment.augmenter import Normalize
from ssl_lib.evaluate import cluster_accuracy, evaluate


def test_cluster_accuracy_finds_the_best_permutation():
    # predictions are a perfect relabelling except one image
    confusion = np.array([[0, 5, 0], [0, 0, 4], [3, 1, 0]])
    assert cluster_accuracy(confusion) == pytest.approx(12 / 13)
    assert cluster_accuracy(np.eye(4) * 2) == 1.0
    assert np.isnan(cluster_accuracy(np.zeros((2, 2))))


class _Fixed(torch.nn.Module):
    """Predicts class = mean pixel value bucket, to check evaluate's bookkeeping."""

    def forward(self, x):
        level = x.mean(dim=(1, 2, 3))
        logits = torch.stack([-(level - c).abs() * 10 for c in (0.0, 0.5, 1.0)], 1)
        return logits, torch.zeros(len(x), 100)


def test_evaluate_counts_correct_predictions_over_images_not_batches():
    values = torch.tensor([0, 0, 128, 255, 255, 128, 0], dtype=torch.uint8)
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    labels = torch.tensor([0, 0, 1, 2, 1, 1, 2])  # two deliberate mistakes
    out = evaluate(_Fixed(), images, labels, Normalize((0, 0, 0), (1, 1, 1)), num_classes=3, batch_size=3)
    assert out["test_acc"] == pytest.approx(5 / 7)
    assert out["confusion"].sum() == 7 and out["confusion"][1, 2] == 1 and out["confusion"][2, 0] == 1
    assert out["test_loss"] > 0
