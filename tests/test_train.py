from dataclasses import replace

import pytest
import torch

from ssl_lib.config import make_config
from ssl_lib.data import split_indices
from ssl_lib.engine.loop import TrainingDiverged, index_batches
from ssl_lib.engine.train import iterations_per_epoch, train
from ssl_lib.errors import RunDirError
from conftest import run_metrics


def _cfg(small_cfg, **changes):
    return replace(small_cfg, **changes).validate()


def test_index_batches_cover_every_index_each_pass_and_cycle():
    idx = torch.arange(10, 20)
    gen = torch.Generator().manual_seed(0)
    batches = index_batches(idx, batch_size=4, iters=5, gen=gen)  # 20 draws = two full passes
    assert batches.shape == (5, 4)
    flat = batches.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10, 20))
    assert sorted(flat[10:].tolist()) == list(range(10, 20))
    small = index_batches(torch.tensor([7, 8]), batch_size=3, iters=2, gen=gen)  # smaller than a batch
    assert set(small.flatten().tolist()) == {7, 8}


def test_iterations_are_one_pass_over_the_larger_set(small_cfg):
    cfg = _cfg(small_cfg, max_iters_per_epoch=0, batch_size=64, unlabeled_batch_size=32)
    assert iterations_per_epoch(cfg, n_labeled=640, n_unlabeled=100) == 10
    assert iterations_per_epoch(cfg, n_labeled=100, n_unlabeled=640) == 20
    assert iterations_per_epoch(_cfg(cfg, max_iters_per_epoch=3), 640, 640) == 3


def test_end_to_end_beats_chance_and_writes_the_run_dir(small_cfg, small_data, tmp_path):
    cfg = _cfg(small_cfg, epochs=3, max_iters_per_epoch=0, image_size=32)  # 32 px: enough detail to learn
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["final_acc"] > 0.5  # chance is 0.1
    assert summary["num_unlabeled"] == 300 and summary["num_labeled"] == 300
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "checkpoint.pt", "metrics.json", "model.pt", "summary.json"} <= names
    metrics = run_metrics(tmp_path / "run")
    # 300 labeled / 64 -> 5 iterations per epoch, 3 epochs
    assert len(metrics["iteration"]["loss_sup"]) == 15 and metrics["iteration"]["step"][-1] == 14
    assert len(metrics["epoch"]["test_acc"]) == 3
    assert all(0 <= m <= 1 for m in metrics["iteration"]["mask_rate"])
    assert all(v is not None and v > 0 for v in metrics["epoch"]["kmeans_inertia"])
    assert summary["environment"]["device"] == "cpu"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 15


def test_same_config_same_metrics(small_cfg, small_data, tmp_path):
    a = train(small_cfg, tmp_path / "a", quiet=True, data=small_data)
    b = train(small_cfg, tmp_path / "b", quiet=True, data=small_data)
    ma = run_metrics(tmp_path / "a")
    mb = run_metrics(tmp_path / "b")
    assert ma["iteration"] == mb["iteration"]
    assert a["final_acc"] == b["final_acc"]
    train(_cfg(small_cfg, seed=1), tmp_path / "c", quiet=True, data=small_data)
    mc = run_metrics(tmp_path / "c")
    assert mc["iteration"]["loss_total"] != ma["iteration"]["loss_total"]


def test_resume_gives_identical_weights(small_cfg, small_data, tmp_path):
    cfg = _cfg(small_cfg, kmeans_every=2)  # centroids from epoch 1 must survive the restart
    train(cfg, tmp_path / "full", quiet=True, data=small_data)
    train(_cfg(cfg, epochs=1), tmp_path / "part", quiet=True, data=small_data)
    # turn the finished 1-epoch run into an interrupted 2-epoch run, then resume it
    (tmp_path / "part" / "summary.json").unlink()
    (tmp_path / "part" / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg, tmp_path / "part", quiet=True, data=small_data)
    train(cfg, tmp_path / "part", resume=True, quiet=True, data=small_data)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.equal(full[k], part[k]) for k in full)
    mf = run_metrics(tmp_path / "full")
    mp = run_metrics(tmp_path / "part")
    assert mf["iteration"] == mp["iteration"]


def test_finished_run_is_not_retrained_and_other_config_is_refused(small_cfg, small_data, tmp_path):
    first = train(small_cfg, tmp_path / "r", quiet=True, data=small_data)
    mtime = (tmp_path / "r" / "model.pt").stat().st_mtime_ns
    assert train(small_cfg, tmp_path / "r", quiet=True, data=small_data) == first
    assert (tmp_path / "r" / "model.pt").stat().st_mtime_ns == mtime
    with pytest.raises(RunDirError, match="different config"):
        train(_cfg(small_cfg, tau=0.5), tmp_path / "r", quiet=True, data=small_data)


@pytest.mark.parametrize("m", [0, 600])
def test_fully_labeled_and_fully_unlabeled_runs(small_cfg, small_data, tmp_path, m):
    summary = train(_cfg(small_cfg, num_unlabeled=m), tmp_path / "r", quiet=True, data=small_data)
    metrics = run_metrics(tmp_path / "r")["iteration"]
    if m == 0:  # supervised only: no unlabeled losses, no mask
        assert all(v == 0 for v in metrics["loss_aug"] + metrics["loss_kmeans"])
        assert all(v is None for v in metrics["mask_rate"])
    else:  # no labels: the supervised term is absent, clustering accuracy is reported
        assert all(v == 0 for v in metrics["loss_sup"])
        assert any(v > 0 for v in metrics["loss_kmeans"])
        assert 0 < summary["final_cluster_acc"] <= 1
    assert summary["num_unlabeled"] == m


def test_label_budget_balanced_split(small_cfg, small_data):
    cfg = make_config({**small_cfg.to_dict(), "num_unlabeled": None, "num_labeled": 50, "balanced": True})
    labeled, unlabeled = split_indices(cfg, small_data.train.labels)
    assert len(labeled) == 50 and len(unlabeled) == 550
    assert torch.bincount(small_data.train.labels[labeled]).tolist() == [5] * 10


def test_diverged_loss_stops_with_name_and_step_keeping_last_checkpoint(small_cfg, small_data, tmp_path,
                                                                        monkeypatch):
    import ssl_lib.method.step as train_module

    real = train_module.kmeans_loss
    steps = {"done": 0}

    class CountSteps:
        def on_step_end(self, state):
            steps["done"] += 1

    def poisoned(z, c):
        loss, k = real(z, c)
        return (loss * float("nan") if steps["done"] >= 8 else loss), k  # from step 8: epoch 2, its 3rd step

    monkeypatch.setattr(train_module, "kmeans_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss 'loss_kmeans' became nan at step 8"):
        train(small_cfg, tmp_path / "r", quiet=True, data=small_data, callbacks=[CountSteps()])
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert not (tmp_path / "r" / "summary.json").exists()


def test_no_autograd_graph_outlives_a_step(small_cfg, small_data):
    from ssl_lib.engine.train import build_trainer

    trainer = build_trainer(small_cfg, small_data, torch.device("cpu"))
    x, y = small_data.train.images[:8], small_data.train.labels[:8]
    row = trainer.step(x, y, x, y, torch.zeros(10, 100))
    assert not row.requires_grad and row.grad_fn is None
    assert row.shape == (7,)


def test_nothing_to_train_is_a_config_error(small_cfg, small_data, tmp_path):
    from ssl_lib.config import ConfigError

    cfg = _cfg(small_cfg, num_unlabeled=600, w_augment=0.0, w_kmeans=0.0)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(cfg, tmp_path / "r", quiet=True, data=small_data)
    assert not (tmp_path / "r").exists()


def test_a_validation_run_is_scored_on_held_out_training_images_and_never_reads_the_test_split(tmp_path):
    from PIL import Image

    from ssl_lib.data import split_indices, validation_indices
    from ssl_lib.errors import DataError

    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):  # a train split only: no test folder
        folder = tmp_path / "img" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), tuple(c + i for c in colour)).save(folder / f"{i}.png")
    base = {"dataset": "imagefolder", "data_root": str(tmp_path / "img"), "image_size": 8, "crop_padding": 1,
            "num_unlabeled": 10, "epochs": 1, "max_iters_per_epoch": 2, "batch_size": 8, "unlabeled_batch_size": 8,
            "kmeans_n_init": 1}
    with pytest.raises(DataError, match="test"):
        train(make_config(base), tmp_path / "scored-on-test", quiet=True)
    cfg = make_config({**base, "val_size": 10})
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["scored_on"] == "val" and sum(map(sum, summary["confusion"])) == 10
    assert summary["num_labeled"] + summary["num_unlabeled"] == 30 and summary["num_unlabeled"] == 10
    labels = torch.tensor([0] * 20 + [1] * 20)
    val, rest = validation_indices(cfg, labels)
    labeled, unlabeled = split_indices(cfg, labels)
    assert torch.bincount(labels[val]).tolist() == [5, 5]  # class-stratified
    assert set(val).isdisjoint(set(labeled) | set(unlabeled)) and len(set(labeled) | set(unlabeled)) == 30
    metrics = run_metrics(tmp_path / "run")
    assert "val_acc" in metrics["epoch"] and "test_acc" not in metrics["epoch"]
