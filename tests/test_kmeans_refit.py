"""The k-means refit sees the features the loss pulls, and the k-means term's size is recorded
without changing the run (``kmeans_bn``, :mod:`ssl_lib.method.diagnostics`)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from ssl_lib.config import make_config
from ssl_lib.data import load_data
from ssl_lib.augment.augmenter import to_unit
from ssl_lib.engine.loop import TrainSet
from ssl_lib.engine.train import KMeansDiagnostics, build_trainer, train, training_split
from ssl_lib.method.diagnostics import loss_gradients, refit_scale, shares, spread
from ssl_lib.method.kmeans import fit_centroids
from ssl_lib.method.modes import step_normalisation
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
        feats = features(trainer, ts.images, ts.unlabeled, cfg.eval_batch_size, ts.labeled)
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
    # 90 clean images at most 40 a batch: 30 + 30 + 30, not 40 + 40 + 10 (a small batch's statistics are noisy).
    cfg, ts, trainer = _setup(wrn_data, kmeans_refit="clean")
    sizes = []
    hook = trainer.net.register_forward_hook(lambda m, i, out: sizes.append(len(out[1])) and None)
    features(trainer, ts.images, torch.arange(90), 40)
    hook.remove()
    assert sizes == [30, 30, 30]


def test_the_step_view_refit_runs_batches_shaped_like_the_steps(wrn_data):
    # 30 images, 12 a step: 3 batches of [4 labeled | 12 weak | 12 strong]; every image's z exactly
    # once (the last batch filled up from the start of the order), the same z as in that batch alone.
    cfg, ts, trainer = _setup(wrn_data)
    inputs = []
    hook = trainer.net.register_forward_hook(lambda m, i, out: inputs.append(i[0].clone()) and None)
    z = features(trainer, ts.images, ts.unlabeled[:30], 1000, ts.labeled, seed=3)
    hook.remove()
    assert [len(x) for x in inputs] == [28, 28, 28] and torch.isfinite(z).all()
    with step_normalisation(trainer.net):
        z_first = trainer.net(inputs[0])[1][4:16]  # the first batch's weak views, again
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z[order[:12]], z_first)
    again = features(trainer, ts.images, ts.unlabeled[:30], 7, ts.labeled, seed=3)  # the step's batches, whatever
    assert torch.equal(z, again) and not torch.equal(z, features(trainer, ts.images, ts.unlabeled[:30], 1000,
                                                                 ts.labeled, seed=4))


# --------------------------------------------------------- the refit's data order and context

def _colour_classes(per_class: int, k: int = 10):
    """Images of 8 x 8 pixels whose class is their colour (plus noise), in class order."""
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (k, 3, 1, 1), generator=g).float()
    labels = torch.arange(k).repeat_interleave(per_class)
    images = (colours[labels] + 30 * torch.randn(len(labels), 3, 8, 8, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels, torch.randperm(len(labels), generator=g)


def test_the_refit_does_not_depend_on_the_data_order(wrn_data, monkeypatch):
    # The same 240 images stored class by class (an image folder) and shuffled: refit batches in the
    # stored order would each hold one class, and BatchNorm would remove what tells the classes apart.
    # The refit draws its batches in a seeded random order: the two refits agree. (At ee33eec the refit
    # took the stored order: clustering accuracy 0.17 in class order against 0.63 shuffled, the
    # unexplained variance 0.84 against 0.51, the spread 3.10 against 3.69.)
    from ssl_lib.evaluate import cluster_accuracy, confusion_matrix
    from ssl_lib.method import step
    from ssl_lib.method.losses import kmeans_loss

    cfg, ts, trainer = _setup(wrn_data, kmeans_n_init=5, eval_batch_size=12)
    images, labels, shuffle = _colour_classes(24)
    fitted = {}
    monkeypatch.setattr(step, "fit_centroids", lambda f, *a, **kw: (fitted.update(f=f), fit_centroids(f, *a, **kw))[1])
    out = {}
    for name, order in (("class order", torch.arange(len(labels))), ("shuffled", shuffle)):
        centroids, inertia, scale = refit_centroids(trainer, images[order], torch.arange(len(labels)), 10, seed=0,
                                                    labeled=torch.arange(16))
        assignment = kmeans_loss(fitted["f"], centroids)[1]
        out[name] = {"acc": cluster_accuracy(confusion_matrix(labels[order], assignment, 10)),
                     "unexplained": inertia / (len(labels) * scale["feature_spread"] ** 2),
                     "spread": scale["feature_spread"], "ratio": scale["centroid_to_feature_spread"]}
    a, b = out["class order"], out["shuffled"]
    assert abs(a["acc"] - b["acc"]) < 0.15 and b["acc"] > 0.4, out
    assert abs(a["unexplained"] - b["unexplained"]) < 0.1, out
    assert abs(a["spread"] / b["spread"] - 1) < 0.1 and abs(a["ratio"] - b["ratio"]) < 0.15, out


def _class_sorted_batches(trainer, images, size):
    """The refit before kmeans_refit on class-ordered images: clean batches in the stored order."""
    with torch.no_grad(), step_normalisation(trainer.net):
        return torch.cat([trainer.net(trainer.normalize(to_unit(images[i:i + size])))[1] for i in range(0, len(images), size)])


@pytest.fixture(scope="module")
def step_context(wrn_data):
    """The z of the unlabeled weak views in 20 real steps on colour-class images (learning rate 0: the
    model stays as it is), with the trainer, the images and the labeled ones."""
    cfg, _, trainer = _setup(wrn_data)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    images, labels, _ = _colour_classes(24)
    labeled = torch.arange(0, len(labels), 12)  # 2 a class
    ts = TrainSet(images, labels, labeled, torch.arange(len(labels)), use_unlabeled=True)
    n_l, n_u = cfg.batch_size, cfg.unlabeled_batch_size
    seen = []
    hook = trainer.net.register_forward_hook(lambda m, i, out: seen.append(out[1][n_l:n_l + n_u].detach()))
    lab, unl = ts.batches(cfg, 20, torch.Generator().manual_seed(1))
    for i in range(len(lab)):
        trainer.step(images[lab[i]], labels[lab[i]], images[unl[i]], labels[unl[i]], torch.zeros(10, 128))
    hook.remove()
    return trainer, images, labeled, torch.cat(seen)


@pytest.mark.parametrize("refit, agrees", [("refit", True), ("running", False), ("class-sorted", False),
                                           ("clean", False)])
def test_the_refit_sees_each_channel_as_the_step_does(step_context, refit, agrees):
    # The refit's features of the images against the step's z: per-channel means and standard
    # deviations, their distance relative to the step z's spread. The default refit (weak views in
    # step-shaped batches) agrees within 0.1 (measured 0.04 and 0.06); the eval-mode refit
    # (kmeans_bn running) is off by 8 and 4, class-sorted clean batches (the refit at ee33eec on
    # class-ordered images) by 0.13 and 0.27, clean shuffled batches by 0.13 in the mean.
    trainer, images, labeled, z = step_context
    cfg = trainer.cfg
    if refit == "class-sorted":
        f = _class_sorted_batches(trainer, images, cfg.unlabeled_batch_size)
    else:
        trainer.cfg = replace(cfg, kmeans_bn="running" if refit == "running" else "batch",
                              kmeans_refit="clean" if refit == "clean" else "auto")
        f = features(trainer, images, torch.arange(len(images)), cfg.unlabeled_batch_size, labeled)
        trainer.cfg = cfg
    s = spread(z)
    mean_shift, sd_shift = float((f.mean(0) - z.mean(0)).norm()) / s, float((f.std(0) - z.std(0)).norm()) / s
    assert (mean_shift < 0.1 and sd_shift < 0.1) == agrees, (mean_shift, sd_shift)


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


def test_the_refits_scale_has_one_value_per_evaluation(wrn_data, tmp_path):
    # a refit every 2 epochs: the epochs between record the last refit's scale (their lists line up
    # with the steps for the plots), and kmeans_seconds says which epochs refit
    cfg = make_config(WRN, {"epochs": 3, "max_iters_per_epoch": 1, "kmeans_every": 2})
    train(cfg, tmp_path / "run", quiet=True, data=wrn_data)
    ep = json.loads((tmp_path / "run" / "metrics.json").read_text())["epoch"]
    spreads = ep["feature_spread"]
    assert len(spreads) == len(ep["step"]) == 3 and spreads[0] == spreads[1] != spreads[2]
    assert [s > 0 for s in ep["kmeans_seconds"]] == [True, False, True]


def test_kmeans_bn_refit_and_loss_are_checked_choices():
    from ssl_lib.config import ConfigError

    for key in ("kmeans_bn", "kmeans_refit", "kmeans_loss"):
        with pytest.raises(ConfigError, match=key):
            make_config({key: "eval"})
    with pytest.raises(ConfigError, match="kmeans_refit"):  # the step's view on running statistics is no step's
        make_config({"kmeans_refit": "step", "kmeans_bn": "running"})


def test_the_hash_is_the_refit():
    # Digests at ee33eec, before kmeans_refit: what refits as it did keeps its hash (and its run
    # directories); a BatchNorm model's k-means run on batch statistics, whose refit changed, does not.
    assert make_config({}).digest() == "8efac576ff47" and make_config({"w_kmeans": 100.0}).digest() == "cb195629b425"
    assert make_config(WRN, {"w_kmeans": 0}).digest() == "67d38d175575"  # no k-means term
    assert make_config(WRN, {"kmeans_bn": "running"}).digest() == "78a0a7d250a9"  # the eval-mode refit
    assert make_config(WRN).digest() != "9b795609f6e2"
    # every refit and loss choice is its own run; eval_batch_size is not the refit's batch
    choices = ({}, {"kmeans_refit": "clean"}, {"kmeans_refit": "step"}, {"kmeans_loss": "standardised"},
               {"kmeans_bn": "running"}, {"unlabeled_batch_size": 24})
    assert len({make_config(WRN, c).digest() for c in choices}) == len(choices) - 1  # auto is step here
    assert make_config(WRN, {"kmeans_refit": "step"}).digest() == make_config(WRN).digest()
    assert make_config(WRN, {"eval_batch_size": 7}).digest() == make_config(WRN).digest()
    assert make_config({"kmeans_refit": "clean"}).digest() == make_config({}).digest()  # auto's choice for the CNN
    # the models whose hash the refit leaves alone are those without BatchNorm
    from ssl_lib.config import MODELS_WITHOUT_BATCHNORM
    from ssl_lib.method.modes import has_batchnorm
    from ssl_lib.models import MODELS, build_model

    assert {m for m in MODELS if not has_batchnorm(build_model(make_config({"model": m}), 10))} == MODELS_WITHOUT_BATCHNORM


def test_non_finite_features_stop_the_run_with_one_line_before_the_fit(wrn_data, tmp_path, monkeypatch):
    from ssl_lib.engine.loop import TrainingDiverged
    from ssl_lib.method import step

    def nan_features(trainer, images, indices, *a, **kw):
        return torch.full((len(indices), trainer.net.feature_dim), float("nan"))

    monkeypatch.setattr(step, "features", nan_features)
    monkeypatch.setattr(step, "fit_centroids", lambda *a, **kw: pytest.fail("k-means ran on NaN features"))
    with pytest.raises(TrainingDiverged) as err:
        train(make_config(WRN, {"epochs": 1, "max_iters_per_epoch": 1}), tmp_path / "run", quiet=True, data=wrn_data)
    message = str(err.value)
    assert message.startswith("the k-means refit's features are NaN or infinite for 96 of 96 images at step 0")
    assert "\n" not in message and not (tmp_path / "run").exists()


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


def test_kmeans_share_follows_the_runs_refit_cadence_and_measures_plain_fixmatch(wrn_data):
    from ssl_lib.tools.kmeans_share import measure

    # epochs of 2 steps, a refit every 2 epochs (steps 0 and 4): the centroids' scale changes only there
    cfg = make_config(WRN, {"eval_every": 2, "steps": 6, "kmeans_every": 2})
    rows = measure(cfg, [1.0], [0, 3, 5], data=wrn_data, quiet=True)["rows"]
    refit_norms = [r["feature_norm_refit"] for r in rows]
    assert refit_norms[0] == refit_norms[1] != refit_norms[2]
    assert all(r["feature_spread_step"] > 0 for r in rows)
    # plain FixMatch (w_kmeans 0) trains without the term; the share a weight would have is measured
    plain = measure(make_config(WRN, {"w_kmeans": 0.0}), [1.0], [0, 1], data=wrn_data, quiet=True)["rows"]
    assert all(0 < r["kmeans_share"][1.0] < 1 and r["feature_spread"] > 0 for r in plain)


@pytest.mark.parametrize("args, fragment", [
    (["--set", "w_kmeans=0", "--set", "w_augment=0"], "config fields 'w_kmeans' and 'w_augment' must not both be 0"),
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
