"""The GPU check: ``python -m ssl_lib gpu-check`` (and ``make gpu-check``).

One command for a machine with an NVIDIA GPU that checks the GPU code path and measures it, so that
a person with a GPU (and no pytest or notebook tools) can tell whether this package runs correctly
and fast there:

1. CUDA checks, plain functions that return a result dict or raise :class:`GpuCheckFailed` (the
   test suite calls the same functions in ``tests/test_gpu_check.py``):

   * :func:`check_no_host_sync`: after a warm-up step, three bf16 training steps under
     ``torch.cuda.set_sync_debug_mode("error")``: nothing in a step makes the host wait for the GPU
     (the host reads the losses only every ``log_every`` steps);
   * :func:`check_compiled_step`: bf16 + ``torch.compile`` steps give finite losses, and the first
     one matches the eager step on the same weights and views;
   * :func:`check_eval_matches_cpu`: evaluation on the device (fp32, and bf16 autocast as a bf16
     run evaluates) agrees with the CPU's for the same weights, within tolerances that allow
     TF32 convolutions and bf16 rounding but not a wrong layout, normalisation or mode;
   * :func:`check_kmeans`: the torch k-means on the device against scikit-learn on 50,000 x 100
     features (the trained model's when data is given, else random clustered ones): the torch
     inertia, averaged over 5 seeds, at most 1% above scikit-learn's, and both timings.

2. ``bench`` (:func:`ssl_lib.tools.bench.run_bench`) with ``device=cuda precision=bf16 compile=true``
   and with fp32 (compile off): full / model-only, comparator / full and peak memory. On the CPU
   (the test suite's flow) only the fp32 pass runs, without the memory probes.
3. A full-data training of the writeup's ``exp1-m40000`` (the config ``make reports`` trains,
   on the GPU, with ``--epochs`` epochs): seconds per epoch, images per second, test accuracy.
4. On a machine with 2+ GPUs, the protocol's step (``fixmatch-kmeans-250``: WRN-28-2, 64 + 448
   images, bf16, compile off as DDP requires) on one GPU and on all of them, one run each
   (:mod:`.scaling`): steps per second, speedup and scaling efficiency. Skipped with one GPU.

Everything goes into one JSON and a printed table. A failing check or section is recorded and the
rest still runs; the JSON is written, then :class:`GpuCheckFailed` names what failed. Without
``--data-root`` the bench and the k-means check use synthetic data of CIFAR-10's shape and the
training is skipped (it needs the real images to mean anything).

Budget (the whole command within :data:`BUDGET_S` on one H100-class GPU): the bench runs 3
repeats instead of ``make bench``'s 7 (a median and a spread per variant, twice, including the
memory probes' fresh processes and the compile of each process); the training is 3 epochs by
default: the first carries the warm-up (cuDNN algorithm search, the first k-means refit), the
others show the steady rate. ``quick`` shrinks every budget for a smoke run.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..augment.augmenter import Normalize
from ..config import Config, ConfigError, load_config, make_config
from ..data import ImageDataset, load_data
from ..engine import rundir
from ..engine.env import environment, memory_format, resolve_device
from ..engine.train import build_trainer, train
from ..errors import BadInput
from ..evaluate import evaluate, predict
from ..experiments import resolve
from ..experiments.protocol import protocol_dir
from ..files import write_json
from ..method.kmeans import fit_centroids
from ..method.columns import LOSS_COLUMNS
from ..models import build_model
from .bench import run_bench
from .scaling import measure_scaling

EXPERIMENT = "exp1-m40000"
BUDGET_S = 480
BENCH_REPEATS = 3
KMEANS_ROWS = 50_000
FEATURE_DIM = 100
#: A small synthetic config for the step checks (the batch composition of training).
SMALL = {"dataset": "synthetic", "synthetic_train": 1000, "synthetic_test": 500, "num_unlabeled": 500,
         "kmeans_n_init": 1, "eval_batch_size": 500}
#: Synthetic data of CIFAR-10's shape for the bench when no data is given.
SYNTHETIC_FULL = {"dataset": "synthetic", "synthetic_train": 50_000, "synthetic_test": 10_000}
SYNTHETIC_QUICK = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 300, "num_unlabeled": 300,
                   "kmeans_n_init": 1, "eval_batch_size": 300}
#: Batches of the flow on the CPU (the test suite's run): there it checks only the plumbing, and bf16 is
#: emulated on most CPUs (many times slower than fp32), so small batches keep it to seconds.
CPU_BATCHES = {"batch_size": 8, "unlabeled_batch_size": 8}
#: The scaling runs: the protocol's 250-label k-means config on synthetic images of CIFAR-10's shape
#: (the speed, not the accuracy), 3 epochs of 100 steps (the first is the warm-up, not counted).
SCALING_CONFIG = "fixmatch-kmeans-250"
SCALING = {"dataset": "synthetic", "synthetic_train": 50_000, "synthetic_test": 1_000, "steps": 300,
           "eval_every": 100, "precision": "bf16", "compile": False, "device": "cuda"}
SCALING_QUICK = {**SCALING, "synthetic_train": 5_000, "steps": 40, "eval_every": 20}


class GpuCheckFailed(RuntimeError):
    """A check found the GPU path wrong; the message says which check and by how much."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise GpuCheckFailed(message)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _small_trainer(device: torch.device, **changes):
    cfg = make_config({**SMALL, **(CPU_BATCHES if device.type == "cpu" else {}), "device": str(device), **changes})
    data = load_data(cfg)
    return build_trainer(cfg, data, device), data


def _batch(data: ImageDataset, device: torch.device, n: int, offset: int = 0):
    x = data.train.images[offset:offset + n].to(device)
    y = data.train.labels[offset:offset + n].to(device)
    return x, y


def _random_steps(trainer, data: ImageDataset, steps: int, centroids: torch.Tensor | None = None, seed: int = 1):
    """``steps`` training steps on random labeled and unlabeled batches; their rows and seconds."""
    device = trainer.device
    xs, ys = data.train.images.to(device), data.train.labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    n = trainer.cfg.batch_size
    rows, seconds = [], []
    for _ in range(steps):
        il, iu = (torch.randint(len(ys), (n,), generator=gen).to(device) for _ in range(2))
        row, s = _timed(lambda: trainer.step(xs.index_select(0, il), ys.index_select(0, il),
                                             xs.index_select(0, iu), ys.index_select(0, iu), centroids), device)
        rows.append(row)
        seconds.append(s)
    return rows, seconds


# ---------------------------------------------------------------------------------- the checks

def check_no_host_sync(device: str | torch.device = "cuda", steps: int = 3) -> dict:
    """bf16 training steps that never synchronise with the host (CUDA's sync debug mode "error").

    On another device the steps run without the sync check (``sync_debug`` is then None); the
    meta-device test in tests/test_bench.py covers the same property on the CPU."""
    device = torch.device(device)
    trainer, data = _small_trainer(device, precision="bf16")
    n = trainer.cfg.batch_size
    x_l, y_l = _batch(data, device, n)
    x_u, y_u = _batch(data, device, n, offset=n)
    centroids = torch.randn(data.num_classes, trainer.net.feature_dim, device=device)
    trainer.step(x_l, y_l, x_u, y_u, centroids)  # first step: lazy initialisation (cuBLAS, optimizer state)
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        rows = [trainer.step(x_l, y_l, x_u, y_u, centroids) for _ in range(steps)]
    except RuntimeError as err:
        raise GpuCheckFailed(f"no host sync: a bf16 training step synchronised with the host ({err})") from None
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
    losses = torch.stack(rows)[:, : len(LOSS_COLUMNS)].cpu()
    _need(bool(torch.isfinite(losses).all()), f"no host sync: non-finite losses {losses.tolist()}")
    return {"ok": True, "steps": steps, "sync_debug": "error" if cuda else None, "precision": "bf16",
            "loss_total": losses[:, 3].tolist()}


def check_compiled_step(device: str | torch.device = "cuda", steps: int = 10, compile: bool = True,
                        rtol: float = 5e-2) -> dict:
    """bf16 (+ ``torch.compile``) training steps give finite losses; the first step's total loss
    is within ``rtol`` of the eager step's from the same seed (same weights, same views)."""
    device = torch.device(device)
    eager, data = _small_trainer(device, precision="bf16", compile=False)
    n = eager.cfg.batch_size
    x_l, y_l = _batch(data, device, n)
    x_u, y_u = _batch(data, device, n, offset=n)
    centroids = torch.randn(data.num_classes, eager.net.feature_dim, generator=torch.Generator().manual_seed(0))
    centroids = centroids.to(device)
    eager_first = eager.step(x_l, y_l, x_u, y_u, centroids).cpu()
    # build_trainer reseeds torch: the compiled trainer starts from the same weights and draws the same views
    compiled = build_trainer(make_config({**eager.cfg.to_dict(), "compile": compile}), data, device)
    first, first_s = _timed(lambda: compiled.step(x_l, y_l, x_u, y_u, centroids), device)
    rows, seconds = _random_steps(compiled, data, steps, centroids)
    losses = torch.stack([first, *rows])[:, : len(LOSS_COLUMNS)].cpu()
    _need(bool(torch.isfinite(losses).all()),
          f"compiled step: non-finite losses in {int((~torch.isfinite(losses)).any(1).sum())} of {len(losses)} steps")
    ref, got = float(eager_first[3]), float(losses[0, 3])
    rel = abs(got - ref) / abs(ref)
    _need(rel <= rtol, f"compiled step: first total loss {got:.5f} vs eager {ref:.5f} (relative difference "
                       f"{rel:.2e} > {rtol:g})")
    return {"ok": True, "compile": compile, "precision": "bf16", "steps": steps + 1,
            "first_step_s": first_s, "step_ms_median": 1e3 * statistics.median(seconds) if seconds else None,
            "loss_total_first": got, "loss_total_eager": ref, "loss_rel_diff": rel,
            "loss_total_last": float(losses[-1, 3])}


@dataclass(frozen=True)
class EvalTolerance:
    """How far the device's evaluation may be from the CPU's: relative test loss, absolute test
    accuracy, and the share of test images whose predicted class may differ."""

    loss_rel: float
    acc_abs: float
    disagree: float


#: fp32 on CUDA may use TF32 convolutions (10-bit mantissa), as training does; bf16 autocast
#: rounds activations to 8 bits. A wrong layout, normalisation or train/eval mode is far outside both.
EVAL_TOLERANCE = {"fp32": EvalTolerance(1e-2, 5e-3, 1e-2), "bf16": EvalTolerance(5e-2, 2e-2, 5e-2)}


def check_eval_matches_cpu(device: str | torch.device = "cuda", net: torch.nn.Module | None = None,
                           data: ImageDataset | None = None, batch_size: int = 1000) -> dict:
    """Evaluation of the same weights on ``device`` (in training's memory format; fp32 and bf16
    autocast) and on the CPU (fp32): test loss, accuracy and predicted classes agree within
    :data:`EVAL_TOLERANCE`. Without ``net`` and ``data``: a SimpleCNN trained for a few steps on
    small synthetic data (an untrained model's near-tied logits would make bf16 rounding flip
    predictions for no fault of the device)."""
    device = torch.device(device)
    if (net is None) != (data is None):
        raise ValueError("give both net and data, or neither")
    cfg = make_config({**SMALL, "device": str(device)})
    if net is None:
        trainer, data = _small_trainer(device)
        _random_steps(trainer, data, 12)
        net = trainer.net
    cpu = torch.device("cpu")
    images, labels = data.test.images, data.test.labels

    def run(on: torch.device, fmt: torch.memory_format, dtype: torch.dtype | None):
        model = copy.deepcopy(net).to(on, memory_format=fmt)
        normalize = Normalize(data.mean, data.std, on)
        x = images.to(on)
        metrics = evaluate(model, x, labels.to(on), normalize, data.num_classes, batch_size, dtype)
        pred = predict(model, x, normalize, batch_size, dtype)[0].argmax(1).cpu()
        return metrics, pred

    ref, ref_pred = run(cpu, torch.contiguous_format, None)
    result = {"ok": True, "images": len(labels), "cpu": {"test_loss": ref["test_loss"], "test_acc": ref["test_acc"]}}
    failures = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        got, pred = run(device, memory_format(cfg, device), dtype)
        tol = EVAL_TOLERANCE[name]
        row = {"test_loss": got["test_loss"], "test_acc": got["test_acc"],
               "loss_rel_diff": abs(got["test_loss"] - ref["test_loss"]) / max(abs(ref["test_loss"]), 1e-12),
               "acc_diff": abs(got["test_acc"] - ref["test_acc"]),
               "disagree": float((pred != ref_pred).float().mean()), "tolerance": tol.__dict__}
        result[name] = row
        for key, limit in (("loss_rel_diff", tol.loss_rel), ("acc_diff", tol.acc_abs), ("disagree", tol.disagree)):
            if not row[key] <= limit:
                failures.append(f"{name} {key} {row[key]:.2e} > {limit:g}")
    _need(not failures, f"evaluation on {device} vs the CPU: {'; '.join(failures)}")
    return result


def clustered_features(rows: int = KMEANS_ROWS, dim: int = FEATURE_DIM, k: int = 10, seed: int = 0,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Random features in ``k`` Gaussian clusters, through a ReLU like the model's z. The clusters
    are far enough apart that a fit from k-means++ seeds rarely ends in a poorer local minimum
    (with closer ones, a single fit of either backend ended about 20% above the best one in two to six
    seeds of ten)."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, dim, generator=gen)
    x = centres[torch.randint(k, (rows,), generator=gen)] + torch.randn(rows, dim, generator=gen)
    return x.relu_().to(device)


def check_kmeans(features: torch.Tensor | None = None, k: int = 10, n_init: int = 3, seed: int = 0,
                 device: str | torch.device = "cuda", max_ratio: float = 1.01, seeds: int = 5) -> dict:
    """The torch k-means on the device against scikit-learn's on the same features (default:
    :func:`clustered_features`): torch's mean inertia over ``seeds`` fits (seeds ``seed``,
    ``seed + 1``, ...) at most ``max_ratio`` times scikit-learn's mean over the same seeds (a lower one
    is a better fit, not a fault), and the median fit times (scikit-learn's includes the copy to the
    host, as in training).

    Means over seeds, not one fit each: on poorly separated features (a briefly trained model's)
    which local minimum one fit of either backend ends in is luck; one pair of fits differed by 1.6%
    in either direction from seed to seed, while the means of five agreed within 0.1%."""
    device = torch.device(device)
    x = (features if features is not None else clustered_features(k=k, seed=seed)).to(device).float()
    fit_centroids(x[: max(k, min(len(x), 1000))], k, 1, seed, backend="torch")  # warm-up: kernels, cuBLAS
    fits = {"torch": [], "sklearn": []}  # (inertia, seconds) per seed
    for s in range(seed, seed + seeds):
        for backend, rows in fits.items():
            (_, inertia), secs = _timed(lambda: fit_centroids(x, k, n_init, s, backend=backend), device)
            rows.append((inertia, secs))
    torch_inertia = statistics.fmean(i for i, _ in fits["torch"])
    sk_inertia = statistics.fmean(i for i, _ in fits["sklearn"])
    torch_s = statistics.median(t for _, t in fits["torch"])
    sk_s = statistics.median(t for _, t in fits["sklearn"])
    ratio = torch_inertia / sk_inertia
    _need(ratio <= max_ratio, f"k-means: torch inertia {torch_inertia:.6g} (mean of {seeds} seeds) is "
                              f"{100 * (ratio - 1):.2f}% above scikit-learn's {sk_inertia:.6g} "
                              f"(allowed {100 * (max_ratio - 1):.0f}%)")
    return {"ok": True, "rows": len(x), "dim": int(x.shape[1]), "k": k, "n_init": n_init, "seeds": seeds,
            "device": str(device), "torch_s": torch_s, "sklearn_s": sk_s, "speedup": sk_s / torch_s,
            "torch_inertia": torch_inertia, "sklearn_inertia": sk_inertia, "inertia_ratio": ratio,
            "torch_inertias": [i for i, _ in fits["torch"]], "sklearn_inertias": [i for i, _ in fits["sklearn"]]}


# ------------------------------------------------------------------------------- the sections

def bench_pass(cfg: Config, repeats: int, quick: bool, memory: bool = True) -> dict:
    """One :func:`ssl_lib.tools.bench.run_bench` (it prints its own table); its whole result."""
    with tempfile.TemporaryDirectory() as tmp:
        return {"ok": True, **run_bench(cfg, Path(tmp) / "bench.json", repeats=repeats, quick=quick, memory=memory)}


def training_run(cfg: Config, data: ImageDataset | None = None) -> tuple[dict, torch.nn.Module]:
    """Train ``cfg`` into a temporary run directory; its figures and the trained model (on the CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, quiet=True, data=data)
        wall = time.perf_counter() - t0
        epochs = json.loads((run_dir / rundir.METRICS).read_text())["epoch"]
        state = rundir.load(run_dir / rundir.MODEL)
    net = build_model(cfg, summary["num_classes"])
    net.load_state_dict(state)
    seconds = epochs["seconds"]
    result = {
        "ok": True, "experiment": EXPERIMENT, "epochs": summary["epochs"],
        "num_labeled": summary["num_labeled"], "num_unlabeled": summary["num_unlabeled"],
        "data": summary["data"], "precision": cfg.precision, "compile": cfg.compile,
        "seconds_per_epoch": summary["seconds_per_epoch"],
        # the first epoch carries the warm-up (cuDNN's algorithm search, allocations)
        "seconds_per_epoch_after_first": statistics.mean(seconds[1:]) if len(seconds) > 1 else None,
        "images_per_sec": summary["images_per_sec"],
        "test_acc": summary["final_acc"], "best_acc": summary["best_acc"],
        "cluster_acc": summary["final_cluster_acc"],
        "epoch_seconds": seconds, "epoch_train_seconds": epochs["train_seconds"],
        "epoch_kmeans_seconds": epochs["kmeans_seconds"], "epoch_images_per_sec": epochs["images_per_sec"],
        "epoch_test_acc": epochs["test_acc"], "peak_memory_mb": summary["peak_memory_mb"],
        "wall_seconds": wall,
    }
    return result, net


def scaling_processes(cfg: Config, gpus: int) -> int:
    """The most GPUs, of ``gpus``, whose count divides both batch sizes (each process takes an equal
    share of every batch): all of them on 2, 4 or 8 GPUs at 64 + 448."""
    return max(k for k in range(1, gpus + 1) if cfg.batch_size % k == 0 and cfg.unlabeled_batch_size % k == 0)


def scaling_pass(gpus: int, quick: bool) -> dict:
    """The protocol step on one GPU and on ``gpus`` (:func:`~ssl_lib.tools.scaling.measure_scaling`)."""
    settings = SCALING_QUICK if quick else SCALING
    cfg = load_config(protocol_dir() / f"{SCALING_CONFIG}.yaml", settings)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_scaling(cfg, scaling_processes(cfg, gpus), tmp)
    del result["run_dirs"]  # a temporary folder, gone
    return {**result, "config": SCALING_CONFIG, "settings": settings}


def _section(name: str, fn, failures: list[str]) -> dict:
    """Run one section; a failure is recorded (and the check goes on), bad input is raised."""
    print(f"gpu-check: {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except BadInput:
        raise
    except Exception as err:  # recorded in the JSON and named at the end: the other sections still run
        failures.append(f"{name}: {err}")
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = time.perf_counter() - t0
    return result


def _source(data_root: str | None, dataset: str, cache_dir: str) -> dict | None:
    if not data_root:
        return None
    if dataset not in ("cifar10", "imagefolder"):
        raise ConfigError(f"--dataset must be cifar10 or imagefolder with --data-root, got {dataset!r}")
    source = {"dataset": dataset, "data_root": str(Path(data_root).expanduser().resolve())}
    if cache_dir:
        source["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
    return source


def _check_writable(out: Path) -> None:
    """Fail now, not after the measurements, when the JSON could not be written."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the JSON file's path")
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write below {base}")


def run_gpu_check(out: str | Path, *, data_root: str | None = None, dataset: str = "cifar10",
                  cache_dir: str = "", epochs: int = 3, quick: bool = False, device: str = "cuda",
                  profile: str = "full") -> dict:
    """Run the checks, the two bench passes and the training; write the JSON to ``out``, print the
    table, return the dict. Raises :class:`GpuCheckFailed` (after writing) if anything failed.

    ``device`` and ``profile`` are for the test suite: ``device="cpu"`` runs the same flow on the CPU
    (compile off; the sync debug mode is CUDA's), ``profile="smoke"`` trains the experiment on
    synthetic data, so the flow can be tested without a GPU or data."""
    started = time.perf_counter()
    out = Path(out)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"gpu-check needs a CUDA device; torch {torch.__version__} sees none here "
                          f"(CUDA build: {torch.version.cuda or 'none'})")
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    _check_writable(out)
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    source = _source(data_root, dataset, cache_dir)
    repeats = 1 if quick else BENCH_REPEATS

    # the configs, and the data, before anything long runs: a bad --data-root fails in seconds
    base = {**(source or (SYNTHETIC_QUICK if quick else SYNTHETIC_FULL)), "device": str(dev)}
    if quick and source:
        base.update(train_subset=5000, test_subset=1000, num_unlabeled=2500)
    if quick and not on_cuda:
        base.update(CPU_BATCHES)
    bench_cfgs = {"bf16_compile": make_config({**base, "precision": "bf16", "compile": on_cuda}),
                  "fp32": make_config({**base, "precision": "fp32", "compile": False})}
    train_cfg = train_data = None
    if source is not None or profile != "full":  # the full profile without data has nothing to train on
        changes = {"epochs": epochs, "device": str(dev), "name": f"gpu-check-{EXPERIMENT}"}
        if quick:
            changes.update(max_iters_per_epoch=20)
        train_cfg = make_config(resolve(EXPERIMENT, profile, source or {}).to_dict(), changes)
        train_data = load_data(train_cfg)

    failures: list[str] = []
    checks = {
        "no_host_sync": _section("no host sync in a bf16 step", lambda: check_no_host_sync(dev), failures),
        "compiled_step": _section("bf16 + compile training steps",
                                  lambda: check_compiled_step(dev, steps=2 if quick else 10, compile=on_cuda),
                                  failures),
    }
    bench = {}
    for name, cfg in bench_cfgs.items():
        if cfg.precision == "bf16" and not on_cuda:  # the same code as the fp32 pass, at an emulated speed
            bench[name] = {"ok": None, "skipped": "bf16 is emulated on the CPU: only the fp32 pass runs",
                           "seconds": 0.0}
            continue
        # on the CPU (the test suite's flow) without the memory probes: two more Pythons importing torch,
        # for what `make bench` measures on the CPU anyway
        bench[name] = _section(f"bench {name}", lambda cfg=cfg: bench_pass(cfg, repeats, quick, memory=on_cuda),
                               failures)

    net = None
    if train_cfg is not None:
        def train_section():
            nonlocal net
            result, net = training_run(train_cfg, train_data)
            return result

        training = _section(f"training {EXPERIMENT}, {epochs} epoch(s)", train_section, failures)
    else:
        training = {"ok": None, "skipped": f"no --data-root: the {EXPERIMENT} training needs the real images "
                                           "(CIFAR-10 or an image folder)"}
    training["config"] = train_cfg.to_dict() if train_cfg is not None else None

    # the evaluation and k-means checks on the trained model and the real data when there are some
    kmeans_rows = 5_000 if quick else KMEANS_ROWS
    if net is not None:
        def real_features():
            x = train_data.train.images[:kmeans_rows].to(dev)
            model = net.to(dev, memory_format=memory_format(train_cfg, dev))
            return predict(model, x, Normalize(train_data.mean, train_data.std, dev), train_cfg.eval_batch_size)[1]

        checks["eval_matches_cpu"] = _section("evaluation on the device vs the CPU",
                                              lambda: check_eval_matches_cpu(dev, net, train_data), failures)
        checks["kmeans"] = _section("k-means torch vs scikit-learn",
                                    lambda: {**check_kmeans(real_features(), device=dev),
                                             "features": f"the trained {EXPERIMENT} model"}, failures)
    else:
        checks["eval_matches_cpu"] = _section("evaluation on the device vs the CPU",
                                              lambda: check_eval_matches_cpu(dev), failures)
        checks["kmeans"] = _section("k-means torch vs scikit-learn",
                                    lambda: {**check_kmeans(clustered_features(kmeans_rows), device=dev),
                                             "features": "random clustered"}, failures)

    gpus = torch.cuda.device_count() if on_cuda else 0
    if gpus >= 2:
        scaling = _section(f"scaling: the protocol step on 1 GPU and on several ({gpus} visible)",
                           lambda: scaling_pass(gpus, quick), failures)
    else:
        scaling = {"ok": None, "skipped": f"{gpus or 'no'} GPU{'' if gpus == 1 else 's'} visible: scaling is measured "
                                          "on 2 or more", "seconds": 0.0}

    total = time.perf_counter() - started
    result = {
        "machine": environment(dev), "quick": quick, "budget_s": BUDGET_S,
        "data": ({**source, "synthetic": False} if source else
                 {"dataset": "synthetic", "synthetic": True, "n_train": base["synthetic_train"],
                  "n_test": base["synthetic_test"]}),
        "checks": checks, "bench": bench, "training": training, "scaling": scaling,
        "bench_configs": {name: cfg.to_dict() for name, cfg in bench_cfgs.items()},
        "seconds": {"checks": sum(c.get("seconds", 0.0) for c in checks.values()),
                    **{f"bench_{k}": b["seconds"] for k, b in bench.items()},
                    "training": training.get("seconds", 0.0), "scaling": scaling["seconds"], "total": total},
        "within_budget": total <= BUDGET_S,
        "failures": failures, "ok": not failures,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(format_table(result))
    print(f"written {out}")
    if failures:
        raise GpuCheckFailed(f"gpu-check: {len(failures)} failure(s), see {out}: " + " | ".join(failures))
    return result


# ---------------------------------------------------------------------------------- the table

def _ok(r: dict) -> str:
    return {True: "ok", False: "FAILED", None: "skipped"}[r.get("ok")]


def _check_line(name: str, r: dict) -> str:
    if not r.get("ok"):
        return f"  {name:38s} {_ok(r):8s} {r.get('error', r.get('skipped', ''))}"
    if name.startswith("no host sync"):
        detail = (f"{r['steps']} steps under sync debug mode 'error'" if r["sync_debug"]
                  else f"{r['steps']} steps; sync debug mode needs CUDA (not checked)")
    elif name.startswith("bf16"):
        detail = (f"compile {'on' if r['compile'] else 'off'}: first step {r['first_step_s']:.1f} s, then "
                  f"{r['step_ms_median']:.1f} ms/step; losses finite, first vs eager {r['loss_rel_diff']:.1e}")
    elif name.startswith("evaluation"):
        detail = (f"{r['images']} images: acc {r['fp32']['test_acc']:.4f} (bf16 {r['bf16']['test_acc']:.4f}) vs CPU "
                  f"{r['cpu']['test_acc']:.4f}; loss rel. diff {r['fp32']['loss_rel_diff']:.1e} "
                  f"(bf16 {r['bf16']['loss_rel_diff']:.1e}); predictions differ {100 * r['fp32']['disagree']:.2f}% "
                  f"(bf16 {100 * r['bf16']['disagree']:.2f}%)")
    else:
        detail = (f"{r['rows']} x {r['dim']} ({r['features']}), k {r['k']}, n_init {r['n_init']}: torch "
                  f"{r['torch_s']:.2f} s, scikit-learn {r['sklearn_s']:.2f} s; inertia ratio {r['inertia_ratio']:.4f}")
    return f"  {name:38s} {_ok(r):8s} {detail}"


def format_table(r: dict) -> str:
    m, d, c = r["machine"], r["data"], r["checks"]
    data = (f"synthetic {d['n_train']} / {d['n_test']} images" if d["synthetic"]
            else f"{d['dataset']} at {d['data_root']}")
    rows = [f"ssl_lib gpu-check: {m['device']} ({m['device_name']}), torch {m['torch']}, {m['threads']} threads; "
            f"data: {data}{'; quick' if r['quick'] else ''}",
            "checks",
            _check_line("no host sync (bf16 step)", c["no_host_sync"]),
            _check_line("bf16 + compile steps", c["compiled_step"]),
            _check_line("evaluation on the device vs the CPU", c["eval_matches_cpu"]),
            _check_line("k-means torch vs scikit-learn", c["kmeans"]),
            f"bench{'':33s}{'full ms/it':>11s}{'img/s':>9s}{'model-only':>11s}{'comparator':>11s}"
            f"{'full/model':>12s}{'comp/full':>11s}"]
    for name, b in r["bench"].items():
        cfg = r["bench_configs"][name]
        label = f"  {cfg['precision']}{' + compile' if cfg['compile'] else ''}"
        if b.get("ok") is None:
            rows.append(f"{label:38s} skipped: {b['skipped']}")
            continue
        if not b.get("ok"):
            rows.append(f"{label:38s} FAILED   {b['error']}")
            continue
        rows.append(f"{label:38s}{b['full']['ms_per_iter']:11.2f}{b['full']['images_per_s']:9.0f}"
                    f"{b['model_only']['ms_per_iter']:11.2f}{b['comparator']['ms_per_iter']:11.2f}"
                    f"{b['ratio_full_over_model_only']:12.3f}{b['ratio_comparator_over_full']:11.2f}")
    t = r["training"]
    if t.get("ok"):
        after = t["seconds_per_epoch_after_first"]
        rows.append(f"training {t['experiment']} ({t['epochs']} epoch(s), M = {t['num_unlabeled']}, "
                    f"{t['precision']}, compile {'on' if t['compile'] else 'off'}): {t['seconds_per_epoch']:.1f} s/epoch"
                    + (f" ({after:.1f} after the first)" if after is not None else "")
                    + f", {t['images_per_sec']:.0f} img/s, test acc {t['test_acc']:.4f} (best {t['best_acc']:.4f})")
    else:
        rows.append(f"training {EXPERIMENT}: {_ok(t)}: {t.get('error', t.get('skipped', ''))}")
    g = r["scaling"]
    if g.get("ok"):
        rows.append(f"scaling {g['config']} ({g['settings']['precision']}, batch {g['global_batch']}): "
                    f"{g['one']['steps_per_s']:.2f} steps/s on 1 GPU, {g['all']['steps_per_s']:.2f} on {g['processes']}: "
                    f"speedup {g['speedup']:.2f}, efficiency {100 * g['efficiency']:.0f}%")
    else:
        rows.append(f"scaling: {_ok(g)}: {g.get('error', g.get('skipped', ''))}")
    s = r["seconds"]
    rows.append(f"time: checks {s['checks']:.0f} s, bench " + ", ".join(
        f"{k.removeprefix('bench_')} {v:.0f} s" for k, v in s.items() if k.startswith("bench_"))
        + f", training {s['training']:.0f} s, scaling {s['scaling']:.0f} s; total {s['total']:.0f} s (budget {r['budget_s']} s: "
        f"{'met' if r['within_budget'] else 'NOT met'})")
    rows.append("result: " + ("all checks passed" if r["ok"] else f"{len(r['failures'])} FAILED: "
                              + "; ".join(r["failures"])))
    return "\n".join(rows)
