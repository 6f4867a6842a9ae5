import pytest

from ssl_lib.config import make_config
from ssl_lib.data import load_data

# Small enough that a few epochs take seconds on 2 CPU cores, large enough to learn.
SMALL = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 300, "num_unlabeled": 300,
         "epochs": 2, "max_iters_per_epoch": 6, "kmeans_n_init": 1, "eval_batch_size": 300, "log_every": 3}


@pytest.fixture(scope="session")
def small_cfg():
    return make_config(SMALL)


@pytest.fixture(scope="session")
def small_data(small_cfg):
    return load_data(small_cfg)


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory):
    """Every experiment of the smoke profile trained once per test session: (runs root, {name: Run})."""
    from ssl_lib import experiments as ex

    root = tmp_path_factory.mktemp("smoke-runs")
    return root, ex.ensure_grid("smoke", root, source={}, names=ex.ALL_EXPERIMENTS)
