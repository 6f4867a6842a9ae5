"""The engine's seams: eval mode for evaluation and the feature pass, callbacks, schedules, checkpoints."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ssl_lib.augment.augmenter import Normalize
from ssl_lib.config import make_config
from ssl_lib.engine import rundir, steplog
from ssl_lib.engine.train import build_trainer, train
from ssl_lib.evaluate import evaluate
from ssl_lib.method.step import features
from ssl_lib.models import MODELS
from conftest import run_metrics


class TinyBN(nn.Module):
    """A model with BatchNorm and dropout: its outputs depend on train/eval mode."""

    feature_dim = 8

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        z = self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        return self.fc(z), z


@pytest.fixture
def tiny_bn(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny_bn", lambda cfg, num_classes: TinyBN(num_classes))
    return "tiny_bn"


def test_evaluation_and_the_running_statistics_feature_pass_run_in_eval_mode(small_cfg, small_data, tiny_bn):
    # In train mode BatchNorm would normalise with each batch's statistics and update its running
    # ones, and dropout would zero features: results would depend on the batch size and change the model.
    # (The refit's default feature pass, kmeans_bn=batch, is tested in test_kmeans_refit.py.)
    cfg = replace(small_cfg, model=tiny_bn, kmeans_bn="running")
    trainer = build_trainer(cfg, small_data, torch.device("cpu"))
    with torch.no_grad():
        trainer.net.bn.running_mean.uniform_(-1, 1)
        trainer.net.bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.net.train()
    images, labels = small_data.test.images, small_data.test.labels
    norm = Normalize(small_data.mean, small_data.std)
    small = evaluate(trainer.net, images, labels, norm, 10, batch_size=7)
    large = evaluate(trainer.net, images, labels, norm, 10, batch_size=300)
    assert small["test_loss"] == pytest.approx(large["test_loss"], rel=1e-5)
    assert (small["confusion"] == large["confusion"]).all()
    idx = torch.arange(100)
    z_small, z_large = features(trainer, small_data.train.images, idx, 9), features(trainer, small_data.train.images, idx, 100)
    torch.testing.assert_close(z_small, z_large, rtol=1e-5, atol=1e-5)
    after = trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics untouched
    assert trainer.net.training  # and the mode it was in is restored


def test_steps_run_in_train_mode_after_an_evaluation(small_cfg, small_data, tiny_bn, tmp_path):
    cfg = replace(small_cfg, model=tiny_bn, epochs=2)
    seen = []

    class Spy:
        def on_step_end(self, state):
            seen.append(state.components["model"].training)

    summary = train(cfg, tmp_path / "r", quiet=True, data=small_data, callbacks=[Spy()])
    assert seen and all(seen) and len(seen) == 2 * 5  # 5 steps an epoch; the second epoch too, after the first evaluation
    state = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert state["bn.num_batches_tracked"].item() == 10  # BatchNorm updated by the steps, and only by them
    assert summary["epochs"] == 2


def test_a_callback_sees_each_epoch_and_can_stop_the_run(small_cfg, small_data, tmp_path):
    cfg = replace(small_cfg, epochs=5)
    records = []

    class StopAfterTwo:
        def on_epoch_end(self, state):
            records.append(dict(state.record))
            state.stop = state.epoch == 2

    summary = train(cfg, tmp_path / "r", quiet=True, data=small_data, callbacks=[StopAfterTwo()])
    assert [r["epoch"] for r in records] == [1, 2] and summary["epochs"] == 2
    assert all(0 <= r["test_acc"] <= 1 and r["step"] == 5 * r["epoch"] for r in records)
    ckpt = rundir.load_checkpoint(tmp_path / "r", torch.device("cpu"))
    assert ckpt["epoch"] == 2 and set(ckpt["components"]) == {"model", "optimizer", "scheduler"}


def test_cosine_schedule_is_logged_per_step(small_cfg, small_data, tmp_path):
    cfg = replace(small_cfg, schedule="cosine", optimizer="sgd", lr=0.03, weight_decay=5e-4, epochs=2)
    train(cfg, tmp_path / "r", quiet=True, data=small_data)
    lrs = run_metrics(tmp_path / "r")["iteration"]["lr"]
    total = 2 * 5  # 300 labeled and 300 unlabeled images in batches of 64: 5 steps an epoch
    assert lrs == pytest.approx([0.03 * math.cos(7 * math.pi * k / (16 * total)) for k in range(total)])


def test_sgd_decays_weights_but_not_biases(small_cfg, small_data):
    cfg = replace(small_cfg, optimizer="sgd", lr=0.1, weight_decay=0.5, momentum=0.0)
    trainer = build_trainer(cfg, small_data, torch.device("cpu"))
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert groups[0]["nesterov"] is False  # no momentum: plain SGD


@pytest.mark.parametrize("ema_decay, crash_in", [(0.0, "on_epoch_end"), (0.9, "on_log")])
def test_resume_is_bit_identical_to_an_uninterrupted_run(small_cfg, small_data, tmp_path, ema_decay, crash_in):
    cfg = replace(small_cfg, epochs=3, schedule="cosine", ema_decay=ema_decay)
    full = train(cfg, tmp_path / "full", quiet=True, data=small_data)

    class Crash:  # after epoch 2's checkpoint, or 3 steps into epoch 3 (logged past the checkpoint)
        def on_epoch_end(self, state):
            if state.epoch == 2 and crash_in == "on_epoch_end":
                raise KeyboardInterrupt

        def on_log(self, state, steps, rows, lrs):
            if state.epoch == 2 and crash_in == "on_log":
                assert steplog.rows_on_disk(tmp_path / "part" / rundir.STEPS) == steps.stop > state.step
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "part", quiet=True, data=small_data, callbacks=[Crash()])
    assert not (tmp_path / "part" / "summary.json").exists()
    _plant_temporaries(tmp_path / "part")
    with open(tmp_path / "part" / rundir.EPOCHS, "a") as f:  # killed after appending epoch 3's record, and mid-line
        f.write('{"epoch": 3, "test_acc": 1.0}\n{"epoch": 4, "te')
    resumed = train(cfg, tmp_path / "part", resume=True, quiet=True, data=small_data)
    assert _temporaries(tmp_path / "part") == KEPT  # what a killed writer left is swept when the run resumes
    a, b = (run_metrics(tmp_path / d) for d in ("full", "part"))
    for section in ("iteration", "epoch"):
        for key, values in a[section].items():
            if "seconds" not in key and key != "images_per_sec":
                assert b[section][key] == values, key
    assert resumed["final_acc"] == full["final_acc"]
    assert (tmp_path / "full" / "steps.npy").read_bytes() == (tmp_path / "part" / "steps.npy").read_bytes()


STALE = (".checkpoint.pt.a1b2c3d4.tmp", ".metrics.json.x_9y8z7w.tmp")  # atomic_write's, of a killed writer
KEPT = [".checkpoint.pt.tmp", ".model.pt.too_long_9.tmp", ".x.abcdefgh.tmp.keep", "notes.a1b2c3d4.tmp", "notes.tmp"]


def _plant_temporaries(run_dir):
    for name in (*STALE, *KEPT):  # KEPT: near the writer's pattern but not it (no random part, no dot, ...)
        (run_dir / name).write_bytes(b"half")


def _temporaries(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp" in p.name)


def test_the_atomic_writers_temporaries_match_what_a_sweep_removes(tmp_path):
    import os
    import tempfile

    from ssl_lib.files import atomic_write, remove_stale_temporaries

    _plant_temporaries(tmp_path)
    (tmp_path / STALE[0]).unlink()
    (tmp_path / STALE[0]).mkdir()  # a folder of that name is not a temporary file
    real = [tempfile.mkstemp(dir=tmp_path, prefix=".model.pt.", suffix=".tmp") for _ in range(20)]  # as atomic_write
    for fd, _ in real:
        os.close(fd)
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted([STALE[1]] + [os.path.basename(n) for _, n in real])
    assert _temporaries(tmp_path) == sorted([STALE[0], *KEPT])
    atomic_write(tmp_path / "a.json", "{}")
    assert _temporaries(tmp_path) == sorted([STALE[0], *KEPT])  # a finished write leaves none


def test_an_unfinished_run_started_again_from_scratch_is_swept(small_cfg, tmp_path):
    rundir.create(tmp_path / "r", small_cfg)  # killed before its first checkpoint: config.yaml only
    _plant_temporaries(tmp_path / "r")
    assert rundir.check(tmp_path / "r", small_cfg, resume=True) == "new"
    rundir.create(tmp_path / "r", small_cfg)
    assert _temporaries(tmp_path / "r") == KEPT


def test_choice_fields_are_checked_before_anything_is_created(small_cfg, tmp_path):
    from ssl_lib.errors import ConfigError

    for key in ("model", "optimizer", "schedule", "strong_view"):
        cfg = make_config({**small_cfg.to_dict(), key: "nope"})
        with pytest.raises(ConfigError, match=f"config field '{key}' must be one of"):
            train(cfg, tmp_path / key, quiet=True)
        assert not (tmp_path / key).exists()


def test_ema_averages_parameters_and_copies_buffers():
    from ssl_lib.engine.ema import EMA

    net = TinyBN(3)
    ema = EMA(net, decay=0.75)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.bn.running_mean.fill_(2.0)
        net.bn.num_batches_tracked.fill_(5)
    ema.update()
    avg = ema.model.state_dict()
    torch.testing.assert_close(avg["conv.weight"], 0.75 * start["conv.weight"] + 0.25 * (start["conv.weight"] + 1))
    torch.testing.assert_close(avg["fc.bias"], start["fc.bias"] + 0.25)
    assert torch.equal(avg["bn.running_mean"], torch.full((8,), 2.0)) and avg["bn.num_batches_tracked"].item() == 5
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_an_ema_run_scores_and_saves_the_average_and_records_the_raw_weights(small_cfg, small_data, tmp_path, capsys):
    from ssl_lib.engine.train import evaluate_run

    cfg = replace(small_cfg, ema_decay=0.9, epochs=2)
    summary = train(cfg, tmp_path / "r", quiet=True, data=small_data)
    epochs = run_metrics(tmp_path / "r")["epoch"]
    assert len(epochs["test_acc"]) == len(epochs["test_acc_raw"]) == 2 and "cluster_acc_raw" in epochs
    assert epochs["test_acc"] != epochs["test_acc_raw"]  # two different models were scored
    assert "ema" in rundir.load_checkpoint(tmp_path / "r", torch.device("cpu"))["components"]
    assert evaluate_run(tmp_path / "r")["test_acc"] == pytest.approx(summary["final_acc"])  # model.pt is the average


def test_a_run_in_steps_with_an_evaluation_every_k_steps(small_cfg, small_data, tmp_path):
    from ssl_lib.errors import ConfigError

    cfg = replace(small_cfg, steps=12, eval_every=4, schedule="cosine")
    summary = train(cfg, tmp_path / "r", quiet=True, data=small_data)
    metrics = run_metrics(tmp_path / "r")
    assert metrics["epoch"]["step"] == [4, 8, 12] and len(metrics["iteration"]["lr"]) == 12
    assert metrics["iteration"]["lr"][-1] == pytest.approx(1e-3 * math.cos(7 * math.pi * 11 / (16 * 12)))
    acc = metrics["epoch"]["test_acc"]
    assert summary["epochs"] == 3 and summary["median_last20_acc"] == pytest.approx(sorted(acc)[1])
    with pytest.raises(ConfigError, match="'steps' \\(10\\) must be a multiple of the 4 steps per epoch"):
        train(replace(cfg, steps=10), tmp_path / "bad", quiet=True, data=small_data)
    assert not (tmp_path / "bad").exists()


def test_the_unlabeled_set_may_include_the_labeled_images(small_cfg, small_data, tmp_path, monkeypatch):
    from ssl_lib.engine.loop import TrainSet

    seen, real = [], TrainSet.batches

    def spy(self, cfg, iters, sampler, *args):
        seen.append(set(self.unlabeled.tolist()))
        return real(self, cfg, iters, sampler, *args)

    monkeypatch.setattr(TrainSet, "batches", spy)
    summary = train(replace(small_cfg, unlabeled_includes_labeled=True, epochs=1), tmp_path / "r", quiet=True,
                    data=small_data)
    assert seen and all(s == set(range(600)) for s in seen)  # all 600 training images are drawn as unlabeled
    # (once for the epoch, once for the k-means diagnostics' batch)
    assert (summary["num_labeled"], summary["num_unlabeled"]) == (300, 300)  # the split as configured


def test_flip_labels_changes_the_drawn_fraction_to_other_classes():
    import numpy as np

    from ssl_lib.data import flip_labels

    labels = np.arange(100) % 10
    labeled = np.arange(0, 100, 2)  # 50 labeled images
    noisy, flipped = flip_labels(labels, labeled, 0.4, 10, seed=3)
    assert len(flipped) == 20 and set(flipped) <= set(labeled)
    assert (noisy[flipped] != labels[flipped]).all()  # always another class
    untouched = np.setdiff1d(np.arange(100), flipped)
    assert (noisy[untouched] == labels[untouched]).all()
    again, same = flip_labels(labels, labeled, 0.4, 10, seed=3)
    assert (again == noisy).all() and (same == flipped).all()  # seeded
    # the new class is uniform over the other nine
    big = np.zeros(90_000, dtype=np.int64)
    new, idx = flip_labels(big, np.arange(90_000), 1.0, 10, seed=0)
    counts = np.bincount(new, minlength=10)
    assert counts[0] == 0 and all(abs(c - 10_000) < 400 for c in counts[1:])


def test_label_noise_flips_only_labeled_training_images(small_cfg, small_data, tmp_path, monkeypatch):
    import numpy as np

    from ssl_lib.engine import train as train_module

    true = small_data.train.labels.clone()
    splits, real = [], train_module.training_split
    monkeypatch.setattr(train_module, "training_split", lambda *a: splits.append(real(*a)) or splits[-1])
    summary = train(replace(small_cfg, label_noise=0.2, epochs=1), tmp_path / "r", quiet=True, data=small_data)
    ts = splits[0].train_set  # what train() trained on
    flipped = np.flatnonzero((ts.labels.cpu() != true).numpy())
    assert summary["labels_flipped"] == len(flipped) == 60  # 20% of the 300 labeled images...
    assert set(flipped) <= set(ts.labeled.tolist())  # ...and only labeled ones: unlabeled and validation keep theirs
    assert torch.equal(small_data.train.labels, true) and len(ts.unlabeled) == 300  # the data itself is not changed
    clean = train(replace(small_cfg, epochs=1), tmp_path / "c", quiet=True, data=small_data)
    assert clean["labels_flipped"] == 0 and torch.equal(splits[1].train_set.labels.cpu(), true)
    assert summary["config_digest"] != clean["config_digest"]


def test_feature_clustering_scores_features_without_the_classifier():
    from ssl_lib.evaluate import kmeans_cluster_accuracy

    class MeanColour(nn.Module):  # z = the mean colour: separates classes that differ in colour
        feature_dim = 3

        def forward(self, x):
            z = x.mean((2, 3))
            return torch.zeros(len(x), 3), z

    colours = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250]], dtype=torch.uint8)
    labels = torch.arange(30) % 3
    images = colours[labels].view(30, 3, 1, 1).expand(30, 3, 4, 4).contiguous()
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    assert kmeans_cluster_accuracy(MeanColour(), images, labels, norm, 3, n_init=1) == 1.0
    shuffled = labels[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    assert kmeans_cluster_accuracy(MeanColour(), images, shuffled, norm, 3, n_init=1) < 0.8


def test_every_run_reports_feature_clustering_beside_a_random_network(small_cfg, small_data, tmp_path):
    cfg = replace(small_cfg, num_unlabeled=600, epochs=1)  # no labels at all
    summary = train(cfg, tmp_path / "r", quiet=True, data=small_data)
    assert 0 <= summary["feature_cluster_acc"] <= 1 and 0 <= summary["feature_cluster_acc_random_net"] <= 1
    again = train(cfg, tmp_path / "again", quiet=True, data=small_data)
    assert again["feature_cluster_acc"] == summary["feature_cluster_acc"]  # deterministic
    assert again["feature_cluster_acc_random_net"] == summary["feature_cluster_acc_random_net"]


def test_the_random_network_leaves_trainings_random_state_untouched(small_cfg, small_data):
    from ssl_lib.engine.train import feature_clustering

    trainer = build_trainer(small_cfg, small_data, torch.device("cpu"))
    images, labels = small_data.test.images[:100], small_data.test.labels[:100]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = feature_clustering(trainer, trainer.net, images, labels, 10)
    assert torch.equal(torch.get_rng_state(), before)  # the random network came from a generator of its own
    torch.manual_seed(456)
    assert feature_clustering(trainer, trainer.net, images, labels, 10) == first  # and from the run's seed alone
