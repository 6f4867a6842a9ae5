"""The k-means refit sees the features the loss pulls, and the k-means term's size is recorded
without changing the run (``kmeans_bn``, :mod:`ssl_lib.method.diagnostics`)."""

import math

import pytest
import torch

from ssl_lib.config import make_config
from ssl_lib.data import load_data
from ssl_lib.engine.train import KMeansDiagnostics, build_trainer, train, training_split
from ssl_lib.method.diagnostics import loss_gradients, refit_scale, shares, spread
from ssl_lib.method.step import features, refit_centroids
from conftest import run_metrics

# A Wide ResNet-28-2 (BatchNorm, FixMatch's momentum 0.001) on small synthetic images: seconds on 2 cores.
WRN = {"dataset": "synthetic", "synthetic_train": 96, "synthetic_test": 24, "image_size": 8, "crop_padding": 1,
       "model": "wrn28_2", "strong_view": "randaugment", "num_labeled": 16, "unlabeled_includes_labeled": True,
       "batch_size": 4, "unlabeled_batch_size": 12, "w_augment": 1.0, "w_kmeans": 0.25, "optimizer": "sgd",
       "lr": 0.03, "eval_batch_size": 48, "kmeans_n_init": 1, "log_every": 2}


@pytest.fixture(scope="module")
def wrn_data():
    return load_data(make_config(WRN), quiet=True)


def _setup(wrn_data, **changes):
    cfg = make_config(WRN, changes)
    split = training_split(cfg, wrn_data, torch.device("cpu"))
    return cfg, split.train_set, build_trainer(cfg, wrn_data, torch.device("cpu"))


def _step_z_norm(trainer, ts, centroids, gen):
    """One real training step; the mean norm of the weak unlabeled views' z inside it."""
    seen = {}
    n_l, n_u = trainer.cfg.batch_size, trainer.cfg.unlabeled_batch_size
    hook = trainer.net.register_forward_hook(lambda m, i, out: seen.update(z=out[1][n_l:n_l + n_u].detach()))
    lab, unl = ts.batches(trainer.cfg, 1, gen)
    trainer.step(ts.images[lab[0]], ts.labels[lab[0]], ts.images[unl[0]], ts.labels[unl[0]], centroids)
    hook.remove()
    return float(seen["z"].norm(dim=1).mean())


@pytest.mark.parametrize("kmeans_bn, agrees", [("batch", True), ("running", False)])
def test_the_refit_sees_the_scale_of_the_z_the_step_pulls(wrn_data, kmeans_bn, agrees):
    # The measurement: eval-mode features of an untrained WRN are ~10x the train-mode z
    # (running statistics near their initial values); refit on batch statistics, the two agree.
    cfg, ts, trainer = _setup(wrn_data, kmeans_bn=kmeans_bn)
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for step in range(4):  # at step 0, and after a few steps
        feats = features(trainer, ts.images, ts.unlabeled, cfg.eval_batch_size)
        centroids = feats[:10].clone()
        ratios.append(float(feats.norm(dim=1).mean()) / _step_z_norm(trainer, ts, centroids, gen))
    if agrees:
        assert all(abs(r - 1) < 0.10 for r in ratios), ratios
    else:
        assert all(r > 2 for r in ratios), ratios


def test_the_refit_changes_no_batchnorm_buffer_and_no_random_stream(wrn_data):
    cfg, ts, trainer = _setup(wrn_data)
    trainer.net.train()
    buffers = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    rng = torch.get_rng_state()
    centroids, inertia, scale = refit_centroids(trainer, ts.images, ts.unlabeled, 10, seed=0)
    assert all(torch.equal(buffers[k], v) for k, v in trainer.net.state_dict().items())  # num_batches_tracked too
    assert torch.equal(rng, torch.get_rng_state())
    assert trainer.net.training and all(m.track_running_stats for m in trainer.net.modules() if hasattr(m, "track_running_stats"))
    assert centroids.shape == (10, trainer.net.feature_dim) and inertia > 0
    assert scale["feature_norm_refit"] > 0 and 0 < scale["centroid_to_feature_spread"] < 1


def test_near_equal_batches_on_batch_statistics(wrn_data):
    # 90 images at most 40 a batch: 30 + 30 + 30, not 40 + 40 + 10 (a small batch's statistics are noisy).
    cfg, ts, trainer = _setup(wrn_data)
    sizes = []
    hook = trainer.net.register_forward_hook(lambda m, i, out: sizes.append(len(out[1])) and None)
    features(trainer, ts.images, torch.arange(90), 40)
    hook.remove()
    assert sizes == [30, 30, 30]


def test_spread_and_shares_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert spread(x) == pytest.approx(math.sqrt(2.0))  # every row at distance sqrt(2) from (1, 1)
    s = refit_scale(x, torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
    assert s["centroid_spread"] == pytest.approx(1.0) and s["centroid_to_feature_spread"] == pytest.approx(1 / math.sqrt(2))
    grads = {"sup": torch.tensor([3.0, 0.0]), "kmeans": torch.tensor([0.0, 1.0])}
    out = shares(grads, {"sup": 1.0, "fixmatch": 1.0, "kmeans": 4.0})  # total (3, 4): norm 5
    assert out == {"grad_share_sup": pytest.approx(0.6), "grad_share_fixmatch": 0.0, "grad_share_kmeans": pytest.approx(0.8)}
    assert shares({}, {"sup": 1.0})["grad_share_sup"] is None


def test_the_loss_gradients_add_up_to_the_steps_gradient(wrn_data):
    # sum_i w_i g_i from loss_gradients equals what backward() of the weighted loss accumulates.
    cfg, ts, trainer = _setup(wrn_data, w_kmeans=3.0)
    centroids = features(trainer, ts.images, ts.unlabeled, cfg.eval_batch_size)[:10].clone()
    lab, unl = ts.batches(cfg, 1, torch.Generator().manual_seed(1))
    x, n_l, n_u = trainer.inputs(ts.images[lab[0]], ts.images[unl[0]], centroids)
    y_l, y_u = ts.labels[lab[0]], ts.labels[unl[0]]
    grads, _ = loss_gradients(trainer, x, y_l, y_u, n_l, n_u, centroids)
    assert set(grads) == {"sup", "fixmatch", "kmeans"}
    from ssl_lib.method.modes import step_normalisation

    with step_normalisation(trainer.net, dropout=True):
        (sup, aug, km), _ = trainer.losses(trainer.net, x, y_l, y_u, n_l, n_u, centroids)
        (sup + aug + 3.0 * km).backward()
    expected = torch.cat([p.grad.flatten() for p in trainer.net.parameters()])
    torch.testing.assert_close(grads["sup"] + grads["fixmatch"] + 3.0 * grads["kmeans"], expected, rtol=1e-4, atol=1e-6)


def test_the_diagnostics_change_nothing_in_the_run(wrn_data, tmp_path, monkeypatch):
    cfg = make_config(WRN, {"epochs": 2, "max_iters_per_epoch": 3, "ema_decay": 0.9})
    with_diag = train(cfg, tmp_path / "with", quiet=True, data=wrn_data)
    monkeypatch.setattr(KMeansDiagnostics, "on_evaluate", lambda self, state: None)
    without = train(cfg, tmp_path / "without", quiet=True, data=wrn_data)
    a, b = (run_metrics(tmp_path / d) for d in ("with", "without"))
    assert a["iteration"] == b["iteration"]
    for key, values in b["epoch"].items():
        if not key.endswith(("seconds", "images_per_sec")):
            assert a["epoch"][key] == values, key
    assert with_diag["final_acc"] == without["final_acc"]
    shares_k = a["epoch"]["grad_share_kmeans"]
    assert len(shares_k) == 2 and all(0 < s < 1 for s in shares_k)  # recorded at every evaluation
    assert all(abs(r / s - 1) < 0.10 for r, s in zip(a["epoch"]["feature_norm_refit"], a["epoch"]["feature_norm_step"]))
    assert "grad_share_kmeans" not in b["epoch"]


def test_kmeans_bn_is_a_checked_choice():
    from ssl_lib.config import ConfigError

    with pytest.raises(ConfigError, match="kmeans_bn"):
        make_config({"kmeans_bn": "eval"})
    # a field added after the first release: runs of earlier versions keep their hash at the default
    assert make_config({}).digest() == make_config({"kmeans_bn": "batch"}).digest() != make_config({"kmeans_bn": "running"}).digest()


# ------------------------------------------------------------------- python -m ssl_lib kmeans-share

def test_kmeans_share_grows_with_the_weight_towards_all_of_the_gradient(wrn_data):
    from ssl_lib.tools.kmeans_share import format_table, measure

    result = measure(make_config(WRN), [0.25, 4.0, 1e6], [0, 2], data=wrn_data, quiet=True)
    assert [r["step"] for r in result["rows"]] == [0, 2]
    for row in result["rows"]:
        share = [row["kmeans_share"][w] for w in (0.25, 4.0, 1e6)]
        # ||w g_k|| / ||g_sup + g_aug + w g_k||: small at the writeup's weight, -> 1 as w grows
        assert 0 < share[0] < share[1] < share[2] and share[2] == pytest.approx(1, abs=1e-3), share
        assert set(row["gradient_norms"]) == {"sup", "fixmatch", "kmeans"}
        # the refit's features and the step's z on one scale (batch statistics, the default kmeans_bn)
        assert abs(row["feature_norm_refit"] / row["feature_norm_step"] - 1) < 0.10, row
    table = format_table(result).splitlines()
    assert len(table) == 4 and table[2].split()[0] == "0" and table[3].split()[0] == "2"


@pytest.mark.parametrize("args, fragment", [
    (["--set", "w_kmeans=0"], "config field 'w_kmeans' must be > 0"),
    (["--weights", "0", "1"], "--weights must be numbers > 0"),
    (["--steps", "-1"], "--steps must be step counts >= 0"),
])
def test_kmeans_share_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, fragment):
    from ssl_lib.cli import main

    out = tmp_path / "share.json"
    sets = [a for k, v in WRN.items() for a in ("--set", f"{k}={v}")]
    assert main(["kmeans-share", *sets, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not out.exists()
