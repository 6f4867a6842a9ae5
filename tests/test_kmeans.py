from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from ssl_lib.data import load_data
from ssl_lib.method.kmeans import fit_centroids


def _relu_features(n=4000, d=100, seed=0):
    """Features shaped like the model's z: a random two-layer ReLU map of clustered inputs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 32, generator=g) * 3  # separated enough for one optimum
    x = centres[torch.randint(10, (n,), generator=g)] + torch.randn(n, 32, generator=g)
    w1, w2 = torch.randn(32, 256, generator=g) / 32 ** 0.5, torch.randn(256, d, generator=g) / 16
    return torch.relu(torch.relu(x @ w1) @ w2)


def _inertia(x, c):
    return float(torch.cdist(x.double(), c.double()).pow(2).min(1).values.sum())


def _model_features(small_data):
    """z of a freshly initialised SimpleCNN on the synthetic train images (what the trainer clusters)."""
    from ssl_lib.augment.augmenter import Normalize
    from ssl_lib.evaluate import predict
    from ssl_lib.models.simple_cnn import SimpleCNN

    torch.manual_seed(0)
    net = SimpleCNN(small_data.num_classes).eval()
    return predict(net, small_data.train.images, Normalize(small_data.mean, small_data.std))[1]


@pytest.mark.parametrize("seed", [0, 1, 2, "model"])
def test_torch_kmeans_inertia_within_one_percent_of_sklearn_on_the_same_features(seed, small_cfg):
    if seed == "model":  # CIFAR-10's 32 px, as the writeup's runs cluster them
        feats = _model_features(load_data(replace(small_cfg, image_size=32)))
    else:
        feats = _relu_features(seed=seed)
    seed = 0 if seed == "model" else seed
    c_sk, i_sk = fit_centroids(feats, 10, n_init=3, seed=seed, backend="sklearn")
    c_t, i_t = fit_centroids(feats, 10, n_init=3, seed=seed, backend="torch")
    assert abs(i_t - i_sk) / i_sk < 0.01
    # the reported inertia is the sum of squared distances to the nearest returned centroid
    assert i_t == pytest.approx(_inertia(feats, c_t), rel=1e-4)
    assert i_sk == pytest.approx(_inertia(feats, c_sk), rel=1e-4)


def test_torch_kmeans_recovers_separated_blobs_like_sklearn():
    x, _, centres = make_blobs(3000, n_features=20, centers=6, cluster_std=0.5, random_state=0,
                               return_centers=True)
    x = torch.tensor(x, dtype=torch.float32)
    c_t, i_t = fit_centroids(x, 6, n_init=3, seed=0, backend="torch")
    c_sk, i_sk = fit_centroids(x, 6, n_init=3, seed=0, backend="sklearn")
    assert i_t == pytest.approx(i_sk, rel=1e-3)
    # every true centre has a fitted centroid next to it
    d = torch.cdist(torch.tensor(centres, dtype=torch.float32), c_t)
    assert d.min(1).values.max() < 0.3  # sampling error of a mean of 500 points: ~0.1


def test_result_shape_dtype_device_and_seed_determinism():
    feats = _relu_features(n=1000)
    for backend in ("sklearn", "torch"):
        c, inertia = fit_centroids(feats, 10, n_init=2, seed=3, backend=backend)
        assert c.shape == (10, 100) and c.dtype == torch.float32 and c.device == feats.device
        assert np.isfinite(inertia) and inertia > 0
        c2, inertia2 = fit_centroids(feats, 10, n_init=2, seed=3, backend=backend)
        assert torch.equal(c, c2) and inertia == inertia2


def test_auto_uses_sklearn_on_cpu():
    feats = _relu_features(n=500)
    assert torch.equal(fit_centroids(feats, 10, 1, seed=0, backend="auto")[0],
                       fit_centroids(feats, 10, 1, seed=0, backend="sklearn")[0])


def test_degenerate_inputs():
    # fewer distinct points than k (dead ReLU features are all zero): no NaN, inertia 0
    x = torch.zeros(20, 100)
    x[:5, 0] = 1.0
    c, inertia = fit_centroids(x, 10, n_init=2, seed=0, backend="torch")
    assert torch.isfinite(c).all() and inertia == 0.0
    with pytest.raises(ValueError, match="at least k=10"):
        fit_centroids(torch.zeros(5, 3), 10)
    with pytest.raises(ValueError, match="unknown k-means backend"):
        fit_centroids(torch.zeros(20, 3), 2, backend="faiss")
