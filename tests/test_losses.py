import math

import pytest
import torch

from ssl_lib.method.losses import fixmatch_loss, kmeans_loss, supervised_loss


def test_supervised_loss_is_mean_cross_entropy():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    # p(y=0|x1) = 3/4, p(y=1|x2) = 1/2
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert supervised_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_fixmatch_uses_argmax_class_and_divides_by_batch_size():
    # Sample 1: weak softmax (0.05, 0.05, 0.9) -> pseudo-label 2 (not the mask value 1), confident.
    # Sample 2: uniform weak softmax -> below tau, masked out but still counted in the mean.
    weak = torch.tensor([[0.0, 0.0, math.log(18.0)], [0.0, 0.0, 0.0]])
    strong = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    loss, mask, pseudo = fixmatch_loss(weak, strong, tau=0.85)
    assert pseudo.tolist() == [2, 0]
    assert mask.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx(math.log(3.0) / 2, rel=1e-6)


def test_fixmatch_all_masked_is_zero_and_all_confident_is_mean_ce():
    weak = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    strong = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    loss, mask, _ = fixmatch_loss(weak, strong, tau=1.0)
    assert mask.sum().item() == 0 and loss.item() == 0.0
    loss, mask, pseudo = fixmatch_loss(weak, strong, tau=0.0)
    assert mask.tolist() == [1.0, 1.0] and pseudo.tolist() == [0, 1]
    ce = lambda logits, y: -torch.log_softmax(logits, 0)[y].item()  # noqa: E731
    assert loss.item() == pytest.approx((ce(strong[0], 0) + ce(strong[1], 1)) / 2, rel=1e-6)


def test_fixmatch_gradient_flows_only_through_strong_view():
    weak = torch.randn(4, 3, requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    loss, _, _ = fixmatch_loss(weak, strong, tau=0.0)
    loss.backward()
    assert weak.grad is None
    assert strong.grad is not None and strong.grad.abs().sum() > 0


def test_kmeans_loss_nearest_centroid_mean_over_batch_and_dims():
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 3.0]], requires_grad=True)
    centroids = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    loss, assignment = kmeans_loss(z, centroids)
    assert assignment.tolist() == [0, 1, 1]
    # squared distances to the nearest centroid: 0, 2, 1 -> sum 3 over B*D = 6
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
    loss.backward()
    # d/dz mean((z - C)^2) = 2 (z - C) / (B * D)
    expected = 2 * (z.detach() - centroids[assignment]) / 6
    assert torch.allclose(z.grad, expected)


def test_kmeans_loss_is_zero_on_the_centroids():
    centroids = torch.randn(5, 100)
    loss, assignment = kmeans_loss(centroids[[3, 1, 1]], centroids)
    assert assignment.tolist() == [3, 1, 1]
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_standardise_by_hand_and_the_standardised_kmeans_loss_cannot_shrink_the_features():
    from ssl_lib.method.losses import standardise

    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # mean (1, 1), per-dimension RMS 1
    torch.testing.assert_close(standardise(x), x - 1.0)
    torch.testing.assert_close(standardise(x, torch.zeros(2), torch.tensor(2.0)), x / 2)
    # the distance loss pulls z's scale towards the centroids'; on standardised z, a common scale and
    # shift of the features has no gradient: the term can move features only relative to each other
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    centroids = standardise(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)))
    a, b = torch.tensor(1.3, requires_grad=True), torch.tensor(0.4, requires_grad=True)
    kmeans_loss(standardise(a * z + b), centroids)[0].backward()
    assert abs(float(a.grad)) < 1e-5 and abs(float(b.grad)) < 1e-5
    a.grad = None
    kmeans_loss(a * z, centroids)[0].backward()
    assert abs(float(a.grad)) > 0.1
