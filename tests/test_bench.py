"""The benchmark's code path on tiny sizes (no timing assertions: the benchmark reports speed, tests
check correctness), and the GPU settings exercised on the CPU."""

import contextlib
import json

import pytest
import torch

from ssl_lib.augment.augmenter import Augmenter, Normalize
from ssl_lib.tools.bench import format_table, run_bench, torchvision_transforms, worker_split
from ssl_lib.config import ConfigError, make_config
from ssl_lib.models.simple_cnn import SimpleCNN
from ssl_lib.engine.train import train
from ssl_lib.method.step import Trainer
from conftest import run_metrics

TINY = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "num_unlabeled": 150,
        "batch_size": 16, "unlabeled_batch_size": 16, "kmeans_n_init": 1, "eval_batch_size": 100, "log_every": 2,
        "device": "cpu"}


def test_bench_smoke_writes_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench" / "bench.json"
    result = run_bench(make_config(TINY), out, repeats=1, quick=True)
    saved = json.loads(out.read_text())
    assert saved["ratio_full_over_model_only"] == pytest.approx(result["ratio_full_over_model_only"])
    for name in ("model_only", "full", "comparator"):
        assert saved[name]["ms_per_iter"] > 0 and saved[name]["images_per_s"] > 0
    assert saved["images_per_iteration"] == 32 and saved["views_per_iteration"] == 48
    spread = saved["ratio_per_repeat"]
    assert len(spread["full_over_model_only"]) == len(spread["comparator_over_full"]) == 1
    assert spread["full_over_model_only"][0] == pytest.approx(saved["ratio_full_over_model_only"])  # 1 repeat
    km = saved["kmeans"]
    assert km["rows"] == 300 and km["dim"] == 100 and km["k"] == 10 and km["fit_s"] > 0
    assert {km["backend"], km["other_backend"]} == {"sklearn", "torch"}
    assert [m["M"] for m in saved["memory"]] == [30, 300]
    assert all(m["max_rss_mb"] > 0 for m in saved["memory"])
    assert set(saved["targets"]) == {"full_over_model_only_le_1.15", "full_ge_2x_comparator",
                                     "memory_M50000_within_10pct_of_M5000"}
    table = capsys.readouterr().out
    assert "full / model-only" in table and "comparator / full" in table and "k-means" in table
    assert format_table(saved).splitlines()[2].startswith("1. model-only")


def test_worker_cpu_ticks_read_from_proc():
    import os

    from ssl_lib.tools.bench import _cpu_ticks

    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc")
    before = _cpu_ticks([os.getpid()])
    sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU: at least one 10 ms tick
    assert _cpu_ticks([os.getpid()]) > before >= 0
    assert _cpu_ticks([os.getpid(), 2**22 + 12345]) is None  # a process that does not exist


def test_bench_refuses_a_split_without_both_sets(tmp_path):
    with pytest.raises(ConfigError, match="labeled and unlabeled"):
        run_bench(make_config({**TINY, "num_unlabeled": 0}), tmp_path / "b.json", repeats=1, quick=True)


def test_comparator_transforms_are_the_augmenters_views():
    from PIL import Image

    cfg = make_config(TINY)
    weak, strong = torchvision_transforms(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    names = [type(t).__name__ for t in strong.transforms]
    assert names == ["RandomHorizontalFlip", "RandomCrop", "ColorJitter", "RandomGrayscale", "RandomApply",
                     "ToTensor", "Normalize"]
    assert strong.transforms[1].padding_mode == "reflect" and strong.transforms[4].p == cfg.blur_p
    img = Image.new("RGB", (32, 32), (128, 64, 32))
    assert weak(img).shape == strong(img).shape == (3, 32, 32)
    assert worker_split(2) == (1, 1) and worker_split(16) == (4, 12) and worker_split(1) == (1, 1)


def test_training_step_needs_no_host_sync(monkeypatch):
    # On the meta device tensors have no values, so .item(), bool(tensor), nonzero() and
    # value-dependent shapes raise: a step that runs there never makes a CUDA step wait for the GPU.
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no meta autocast
    dev = torch.device("meta")
    cfg = make_config(TINY)
    net = SimpleCNN().to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)  # fused has no meta kernel
    trainer = Trainer(cfg, net, net, optimizer, Augmenter(), Normalize((0.5,) * 3, (0.25,) * 3, dev), dev)
    x = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device=dev)
    y = torch.empty(16, dtype=torch.long, device=dev)
    rows = trainer.step(x, y, x, y, torch.empty(10, 100, device=dev))
    assert rows.shape == (7,) and rows.device == dev


def test_gpu_settings_train_on_the_cpu(tmp_path, monkeypatch):
    # bf16 autocast, channels_last and the torch k-means: the CUDA configuration, device as a parameter
    import sklearn.cluster

    def no_sklearn(*args, **kwargs):
        raise AssertionError("kmeans_backend=torch, yet scikit-learn's k-means was called")

    monkeypatch.setattr(sklearn.cluster, "KMeans", no_sklearn)
    from ssl_lib.engine.train import KMeansDiagnostics

    monkeypatch.setattr(KMeansDiagnostics, "on_evaluate", lambda self, state: None)  # its forward is not a step's
    cfg = make_config({**TINY, "epochs": 1, "max_iters_per_epoch": 3, "precision": "bf16", "channels_last": "on",
                       "kmeans_backend": "torch"})
    steps = []  # per training forward: channels_last input, bf16 autocast on, bf16 logits

    class Watch:
        def on_epoch_start(self, state):
            def hook(module, inputs, output):
                if module.training:
                    steps.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                                  torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"), output[0].dtype))
            state.components["model"].register_forward_hook(hook)

    summary = train(cfg, tmp_path / "r", quiet=True, callbacks=[Watch()])
    assert steps == [(True, torch.bfloat16, torch.bfloat16)] * 3, steps  # each of the 3 steps, as configured
    metrics = run_metrics(tmp_path / "r")
    assert all(v is not None for v in metrics["iteration"]["loss_total"]) and summary["final_acc"] is not None
    assert metrics["epoch"]["kmeans_inertia"][0] > 0  # the torch k-means fitted (scikit-learn would have raised)


def test_comparator_strong_view_follows_the_configured_strong_view():
    from PIL import Image

    cfg = make_config({**TINY, "strong_view": "randaugment"})
    _, strong = torchvision_transforms(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert type(strong.transforms[2]).__name__ == "PilRandAugment" and strong.transforms[2].cutout == 16
    img = Image.new("RGB", (32, 32), (200, 100, 50))
    out = strong(img)
    assert out.shape == (3, 32, 32)
    gray = (0.498 - 0.5) / 0.25  # Cutout's 127 normalised
    assert ((out - gray).abs() < 1e-3).all(0).sum() >= 64  # a gray square of at least 8 x 8 (clipped at a corner)
