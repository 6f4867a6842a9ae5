"""Speed and memory benchmark: ``python -m ssl_lib bench`` (and ``make bench``).

Measured in one process, on the config's data and batch composition (``batch_size`` labeled +
``unlabeled_batch_size`` unlabeled images per iteration; the forward pass sees the labeled weak
view and the unlabeled weak and strong views), after warm-up, as the median of ``repeats``
repeats, the variants interleaved (A B C A B C ...) so that a busy machine slows all of them alike:

1. ``model_only``: forward and backward of the model on ready-made normalised tensors of the same
   shape, with ready-made output gradients (no augmentation, losses or optimizer step): the floor.
2. ``full``: the trainer's iteration as :func:`ssl_lib.engine.loop.fit` runs it: index sampling,
   gathering the uint8 batches on the device, both views, three losses, the optimizer step and
   the on-device metric bookkeeping with its periodic host read.
3. ``comparator``: the conventional pipeline done well, as the reference FixMatch code does it:
   a torch ``Dataset`` of PIL images with torchvision transforms drawn per image (weak, and weak +
   strong for unlabeled images, then ToTensor + Normalize), one ``DataLoader`` per set with
   persistent workers (one worker per CPU core in all), then one step per batch on the same
   model, losses and optimizer.
4. ``kmeans``: the refit on the unlabeled features: the feature pass over 50,000 images and the
   k-means fit of 50,000 x 100 features with k = 10 (the configured backend, and the other one
   for comparison).
5. ``memory``: peak memory of a short real run (``train`` with a few iterations, one k-means
   refit and the evaluation) at M = 5,000 and M = 50,000, each in a fresh process, since the
   resident-set high-water mark only rises.

Images per second count the labeled plus unlabeled images of an iteration (not the views). The
process runs under the same settings as ``train`` (torch's threads, :func:`keep_freed_memory`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data import load_data, split_indices
from ..engine.env import environment, keep_freed_memory, resolve_device
from ..engine.loop import ITER_COLUMNS, TrainSet, TrainState, check_finite, run_steps
from ..engine.train import build_trainer
from ..evaluate import evaluate
from ..files import write_json
from ..method.kmeans import fit_centroids
from ..method.step import features

KMEANS_ROWS = 50_000
MEMORY_M = (5_000, 50_000)
# The eight runs of the writeup (M, epochs), 319 epochs in all: the GPU target's workload.
WRITEUP_RUNS = ((0, 35), (50, 31), (5000, 58), (40000, 54), (50000, 36), (20000, 35), (20000, 35), (20000, 35))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------ 1. the model-only floor

class ModelOnly:
    """Forward + backward on a fixed, already normalised batch with fixed output gradients."""

    def __init__(self, trainer, n_views: int, num_classes: int, image_size: int):
        gen = torch.Generator().manual_seed(0)
        device = trainer.device
        x = torch.randn(n_views, 3, image_size, image_size, generator=gen).to(device)
        x = x.contiguous(memory_format=trainer.memory_format)
        self.x, self.trainer = x, trainer
        self.g_logits = (torch.randn(n_views, num_classes, generator=gen) / n_views).to(device)
        self.g_z = (torch.randn(n_views, trainer.net.feature_dim, generator=gen) / n_views).to(device)

    def iterations(self, n: int) -> None:
        tr = self.trainer
        for _ in range(n):
            with torch.autocast(tr.device.type, dtype=torch.bfloat16, enabled=tr.cfg.precision == "bf16"):
                logits, z = tr.model(self.x)
            tr.optimizer.zero_grad(set_to_none=True)  # as in the step: fresh gradients each time
            torch.autograd.backward([logits.float(), z.float()], [self.g_logits, self.g_z])


# --------------------------------------------------------------------- 2. the trainer's iteration

class FullIteration:
    """The steps of :func:`ssl_lib.engine.loop.fit`, on a chunk of ``n`` iterations."""

    def __init__(self, trainer, data, labeled: torch.Tensor, unlabeled: torch.Tensor, centroids):
        device = trainer.device
        self.trainer = trainer
        self.train_set = TrainSet(data.train.images.to(device), data.train.labels.to(device), labeled, unlabeled,
                                  use_unlabeled=True)
        self.state = TrainState(1, 1, {}, torch.Generator().manual_seed(trainer.cfg.seed), centroids=centroids)

    def iterations(self, n: int) -> None:
        lab, unl = self.train_set.batches(self.trainer.cfg, n, self.state.sampler)
        run_steps(self.trainer, self.train_set, lab, unl, self.state)


# ------------------------------------------------------------------------------ 3. the comparator

class PilViews(torch.utils.data.Dataset):
    """Images as PIL, transformed per image in the DataLoader workers (the conventional pipeline)."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, indices: np.ndarray, weak, strong=None):
        self.images, self.labels, self.indices = images_hwc, labels, indices
        self.weak, self.strong = weak, strong

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        j = self.indices[i]
        img = Image.fromarray(self.images[j])
        if self.strong is None:
            return self.weak(img), int(self.labels[j])
        return self.weak(img), self.strong(img), int(self.labels[j])


def torchvision_transforms(cfg: Config, mean, std):
    """The weak and strong views of :class:`ssl_lib.augment.augmenter.Augmenter` as torchvision PIL transforms."""
    from torchvision import transforms as T

    geometric = [T.RandomHorizontalFlip()]
    if cfg.crop_padding:
        geometric.append(T.RandomCrop(cfg.image_size, padding=cfg.crop_padding, padding_mode="reflect"))
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    weak = T.Compose([*geometric, *finish])
    if cfg.strong_view == "randaugment":
        return weak, T.Compose([*geometric, PilRandAugment(cfg.image_size // 2), *finish])
    strong = T.Compose([*geometric, T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
                        T.RandomGrayscale(cfg.grayscale_p),
                        T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=cfg.blur_p), *finish])
    return weak, strong


class PilRandAugment:
    """FixMatch's RandAugment on one PIL image, as the reference PyTorch pipeline runs it in its
    DataLoader workers (the definition :mod:`ssl_lib.augment.randaugment` batches): two operations
    of the 14, each with p = 1/2 at a magnitude 1..9, then a gray Cutout square."""

    def __init__(self, cutout: int = 16):
        self.cutout = cutout

    def __call__(self, img):
        import random

        from PIL import Image, ImageDraw, ImageEnhance, ImageOps

        w, h = img.size
        for _ in range(2):
            op, v, sign = random.randrange(14), random.randint(1, 9), random.choice((-1, 1))
            if random.random() >= 0.5:
                continue
            affine = lambda coeffs: img.transform(img.size, Image.AFFINE, coeffs)  # noqa: E731
            img = [
                lambda: img,
                lambda: ImageOps.autocontrast(img),
                lambda: ImageEnhance.Brightness(img).enhance(0.05 + 0.09 * v),
                lambda: ImageEnhance.Color(img).enhance(0.05 + 0.09 * v),
                lambda: ImageEnhance.Contrast(img).enhance(0.05 + 0.09 * v),
                lambda: ImageOps.equalize(img),
                lambda: ImageOps.posterize(img, 4 + int(0.4 * v)),
                lambda: img.rotate(sign * 3 * v),
                lambda: ImageEnhance.Sharpness(img).enhance(0.05 + 0.09 * v),
                lambda: affine((1, sign * 0.03 * v, 0, 0, 1, 0)),
                lambda: affine((1, 0, 0, sign * 0.03 * v, 1, 0)),
                lambda: ImageOps.solarize(img, 256 - int(25.6 * v)),
                lambda: affine((1, 0, sign * int(0.03 * v * w), 0, 1, 0)),
                lambda: affine((1, 0, 0, 0, 1, sign * int(0.03 * v * h))),
            ][op]()
        x0, y0 = int(max(0, random.uniform(0, w) - self.cutout / 2)), int(max(0, random.uniform(0, h) - self.cutout / 2))
        img = img.copy()
        ImageDraw.Draw(img).rectangle((x0, y0, int(min(w, x0 + self.cutout)), int(min(h, y0 + self.cutout))),
                                      (127, 127, 127))
        return img


class Comparator:
    """DataLoader + PIL transforms feeding the same model, losses and optimizer, one step per batch."""

    def __init__(self, trainer, data, labeled: np.ndarray, unlabeled: np.ndarray, centroids, workers: int):
        cfg, device = trainer.cfg, trainer.device
        self.trainer, self.centroids = trainer, centroids
        images = data.train.images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x 3, as PIL wants
        labels = data.train.labels.numpy()
        weak, strong = torchvision_transforms(cfg, data.mean, data.std)
        w_lab, w_unl = worker_split(workers)
        common = dict(shuffle=True, drop_last=True, persistent_workers=True, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed))
        self.loaders = (
            torch.utils.data.DataLoader(PilViews(images, labels, labeled, weak), batch_size=cfg.batch_size,
                                        num_workers=w_lab, **common),
            torch.utils.data.DataLoader(PilViews(images, labels, unlabeled, weak, strong),
                                        batch_size=cfg.unlabeled_batch_size, num_workers=w_unl, **common),
        )
        self.workers = (w_lab, w_unl)
        self.iters = [iter(loader) for loader in self.loaders]
        # Batches a loader holds ready (prefetch_factor 2 per worker): consumed untimed before each
        # timed chunk, since they were prepared while the other variants ran.
        self.prefetched = 2 * max(self.workers)

    def _next(self, k: int):
        try:
            return next(self.iters[k])
        except StopIteration:
            self.iters[k] = iter(self.loaders[k])
            return next(self.iters[k])

    def close(self) -> None:
        """Stop the persistent workers now rather than at garbage collection."""
        for it in self.iters:
            it._shutdown_workers()  # noqa: SLF001 - DataLoader has no public way to stop them
        self.iters = []

    def drain(self) -> None:
        self.iterations(self.prefetched)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the workers have refilled their prefetch queues and gone idle, so that they
        take no cores from the variant timed next. On 2 cores they are idle already when a chunk
        ends (the comparator waits on its main process, not on them); where the workers are the
        bottleneck they would still be decoding."""
        pids = [w.pid for it in self.iters for w in it._workers]  # DataLoader has no public handle on them
        deadline, last = time.perf_counter() + timeout, None
        while time.perf_counter() < deadline:
            now = _cpu_ticks(pids)
            if now is None:  # no /proc (not Linux): a fixed pause instead
                time.sleep(0.5)
                return
            if now == last:
                return
            last = now
            time.sleep(0.05)

    def iterations(self, n: int) -> None:
        tr, cfg, dev = self.trainer, self.trainer.cfg, self.trainer.device
        rows = torch.empty(n, len(ITER_COLUMNS), device=dev)
        for i in range(n):
            xl, yl = self._next(0)
            xw, xs, yu = self._next(1)
            x = torch.cat([xl, xw, xs]).to(dev, non_blocking=True)
            yl, yu = yl.to(dev, non_blocking=True), yu.to(dev, non_blocking=True)
            x = x.contiguous(memory_format=tr.memory_format)
            rows[i] = tr.update(x, yl, yu, len(xl), len(xw), self.centroids)  # the trainer's losses and step
            if (i + 1) % cfg.log_every == 0 or i + 1 == n:
                check_finite(rows[: i + 1], 0)


def _cpu_ticks(pids: list[int]) -> int | None:
    """User + system CPU ticks the processes have used so far, from /proc; None where unreadable."""
    total = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None
    return total


# ------------------------------------------------------------------------------ 5. peak memory

def memory_probe(cfg_dict: dict, m: int, iters: int) -> dict:
    """Run in a fresh process: a short real training run at M = m; its peak memory."""
    import resource

    from ..config import make_config
    from ..engine.train import train

    cfg = make_config(cfg_dict, {"num_unlabeled": m, "epochs": 1, "max_iters_per_epoch": iters,
                                 "name": f"bench-memory-{m}"})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(cfg, Path(tmp) / "run", quiet=True)
        seconds = time.perf_counter() - t0
    out = {"M": m, "iterations": iters, "seconds": seconds,
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if summary["environment"]["device"].startswith("cuda"):
        out["cuda_peak_allocated_mb"] = summary["peak_memory_mb"]
    return out


def _memory(cfg: Config, n_train: int, iters: int) -> list[dict]:
    """The probes side by side, each in its own process: what each measures is its own peak memory
    (max RSS; on CUDA, its own allocator's peak), which the other process does not change; only their
    seconds, which nothing compares, would be those of one probe alone when run one after the other."""
    ms = MEMORY_M if n_train >= MEMORY_M[1] else (max(1, n_train // 10), n_train)
    code = ("import json, sys; from ssl_lib.tools.bench import memory_probe; "
            "print(json.dumps(memory_probe(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))")
    procs = {m: subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(m), str(iters)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in ms}
    outputs = {m: proc.communicate() for m, proc in procs.items()}
    results = []
    for m, proc in procs.items():
        out, err = outputs[m]
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe at M={m} failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------------- the driver

def _median_ms(seconds: list[float], n: int) -> float:
    return statistics.median(seconds) / n * 1e3


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_bench(cfg: Config, out_path: str | Path, repeats: int = 7, quick: bool = False, memory: bool = True) -> dict:
    """Run the five measurements, write them as JSON to ``out_path``, print a table; return the dict.
    ``memory=False`` leaves out the fifth (two fresh processes that each import torch and train):
    ``None`` in its fields, and the table says so."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    cfg.validate()
    out_path = Path(out_path)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    load_before = _load()
    data = load_data(cfg, quiet=True)
    keep_freed_memory()  # where train() calls it
    labeled_np, unlabeled_np = split_indices(cfg, data.train.labels)
    if not len(labeled_np) or not len(unlabeled_np):
        raise ConfigError("the benchmark needs labeled and unlabeled images: set 0 < num_unlabeled < "
                          f"{len(data.train.labels)} (got {len(unlabeled_np)})")
    iters = 3 if quick else 20  # iterations per timed chunk
    warmup = 1 if quick else 5
    per_iter_images = cfg.batch_size + cfg.unlabeled_batch_size
    n_views = cfg.batch_size + 2 * cfg.unlabeled_batch_size
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    trainer = build_trainer(cfg, data, device)
    x_train = data.train.images.to(device)
    # 4. k-means: the feature pass and the fit (also yields the centroids the iterations use)
    n_rows = min(KMEANS_ROWS, len(x_train))
    feature_s, fit_s, fit_other_s = [], [], []
    backend = cfg.kmeans_backend if cfg.kmeans_backend != "auto" else ("sklearn" if device.type == "cpu" else "torch")
    other = "torch" if backend == "sklearn" else "sklearn"
    feats, inertia = None, {backend: [], other: []}

    def feature_pass():
        nonlocal feats
        feats = features(trainer, x_train, torch.arange(n_rows, device=device), cfg.eval_batch_size)

    feature_s.append(_timed(feature_pass, device))  # once: seconds on 2 cores, and it varies little
    centroids = None
    for r in range(repeats):
        # the configured backend every repeat, the other one (for comparison) in up to 3 of them
        for name, times in ((backend, fit_s), (other, fit_other_s))[: 2 if r < 3 else 1]:
            def fit():
                nonlocal centroids
                c, value = fit_centroids(feats, data.num_classes, cfg.kmeans_n_init, seed=cfg.seed + r, backend=name)
                inertia[name].append(value)
                if name == backend:
                    centroids = c
            times.append(_timed(fit, device))
    eval_s = _timed(lambda: evaluate(trainer.net, data.test.images.to(device), data.test.labels.to(device),
                                     trainer.normalize, data.num_classes, cfg.eval_batch_size,
                                     trainer.autocast_dtype), device)

    # 1-3, interleaved
    variants = {
        "model_only": ModelOnly(trainer, n_views, data.num_classes, cfg.image_size),
        "full": FullIteration(trainer, data, torch.from_numpy(labeled_np), torch.from_numpy(unlabeled_np),
                              centroids),
    }
    comparator_trainer = build_trainer(cfg, data, device)  # its own model and optimizer state
    variants["comparator"] = Comparator(comparator_trainer, data, labeled_np, unlabeled_np, centroids, workers)
    for v in variants.values():
        v.iterations(warmup)
    seconds = {k: [] for k in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            if name == "comparator":
                v.drain()
            seconds[name].append(_timed(lambda v=v: v.iterations(iters), device))  # bind v now
            if name == "comparator":
                v.settle()
    variants["comparator"].close()
    del variants, v

    # 5. peak memory, fresh processes
    peaks = _memory(cfg, len(x_train), 2 if quick else 5) if memory else None

    ms = {k: _median_ms(v, iters) for k, v in seconds.items()}
    # the ratios within each repeat (its three chunks ran back to back): their spread shows the noise
    spread = {"full_over_model_only": [f / m for f, m in zip(seconds["full"], seconds["model_only"])],
              "comparator_over_full": [c / f for c, f in zip(seconds["comparator"], seconds["full"])]}
    ips = {k: per_iter_images / (v / 1e3) for k, v in ms.items()}
    n_lab_total = len(data.train.labels)

    def epoch_seconds(m: int) -> float:
        n_l = n_lab_total - m
        it = max(math.ceil(n_l / cfg.batch_size), math.ceil(m / cfg.unlabeled_batch_size))
        refit = (feature_s[0] * m / n_rows + statistics.median(fit_s)) if m >= 10 else 0.0
        return it * ms["full"] / 1e3 + refit + eval_s

    mem_ratio = peaks[1]["max_rss_mb"] / peaks[0]["max_rss_mb"] if peaks else None
    result = {
        "config": cfg.to_dict(),
        "quick": quick, "repeats": repeats, "iterations_per_repeat": iters, "warmup_iterations": warmup,
        "images_per_iteration": per_iter_images, "views_per_iteration": n_views,
        "machine": {"cpu_count": workers, "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": _load(), **environment(device)},
        "model_only": {"ms_per_iter": ms["model_only"], "images_per_s": ips["model_only"],
                       "repeat_seconds": seconds["model_only"]},
        "full": {"ms_per_iter": ms["full"], "images_per_s": ips["full"], "repeat_seconds": seconds["full"]},
        "comparator": {"ms_per_iter": ms["comparator"], "images_per_s": ips["comparator"],
                       "repeat_seconds": seconds["comparator"], "workers": list(worker_split(workers))},
        "ratio_full_over_model_only": ms["full"] / ms["model_only"],
        "ratio_comparator_over_full": ms["comparator"] / ms["full"],
        "ratio_per_repeat": spread,
        "kmeans": {"rows": n_rows, "dim": int(feats.shape[1]), "k": data.num_classes, "n_init": cfg.kmeans_n_init,
                   "feature_pass_s": feature_s[0],
                   "backend": backend, "fit_s": statistics.median(fit_s), "fit_repeats": fit_s,
                   "inertia": inertia[backend], "other_backend": other,
                   "other_fit_s": statistics.median(fit_other_s), "other_inertia": inertia[other],
                   # same seeds, same features: the largest relative difference of the two backends
                   "inertia_rel_diff": max(abs(o - b) / b for o, b in zip(inertia[other], inertia[backend]))},
        "eval_s": eval_s,
        "memory": peaks, "memory_ratio_large_over_small": mem_ratio,
        "cuda_memory_ratio_large_over_small": (peaks[1]["cuda_peak_allocated_mb"] / peaks[0]["cuda_peak_allocated_mb"]
                                               if peaks and "cuda_peak_allocated_mb" in peaks[0] else None),
        "projected": {"epoch_s_at_M40000": epoch_seconds(40000) if n_lab_total >= 40000 else None,
                      "writeup_profile_s": (sum(e * epoch_seconds(m) for m, e in WRITEUP_RUNS)
                                            if n_lab_total >= 50000 else None),
                      "note": "from the measured full iteration, feature pass, fit and evaluation"},
        "bench_seconds": time.perf_counter() - started,
    }
    result["targets"] = {
        "full_over_model_only_le_1.15": result["ratio_full_over_model_only"] <= 1.15,
        "full_ge_2x_comparator": result["ratio_comparator_over_full"] >= 2.0,
        "memory_M50000_within_10pct_of_M5000": mem_ratio <= 1.10 if peaks else None,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    print(format_table(result))
    print(f"written {out_path}")
    return result


def worker_split(workers: int) -> tuple[int, int]:
    """DataLoader workers for the (labeled, unlabeled) loaders: one per core in all, at least one
    each; the unlabeled loader does about three times the work (two views, one of them strong)."""
    w_lab = max(1, workers // 4)
    return w_lab, max(1, workers - w_lab)


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def format_table(r: dict) -> str:
    m, k, mem = r["machine"], r["kmeans"], r["memory"]
    spread = r["ratio_per_repeat"]
    head = (f"ssl_lib bench: {m['device']} ({m['device_name']}), {m['cpu_count']} cores, {m['threads']} threads, "
            f"torch {m['torch']}; {r['config']['batch_size']} labeled + {r['config']['unlabeled_batch_size']} "
            f"unlabeled images per iteration ({r['views_per_iteration']} views), precision "
            f"{r['config']['precision']}, compile {r['config']['compile']}; median of {r['repeats']} repeats x "
            f"{r['iterations_per_repeat']} iterations; load average {m['load_average_before']} -> "
            f"{m['load_average_after']}")
    t = r["targets"]
    rows = [
        head,
        f"{'':40s}{'ms/iter':>9s}{'img/s':>9s}",
        f"{'1. model-only (forward + backward)':40s}{r['model_only']['ms_per_iter']:9.1f}"
        f"{r['model_only']['images_per_s']:9.0f}",
        f"{'2. full iteration (ssl_lib trainer)':40s}{r['full']['ms_per_iter']:9.1f}{r['full']['images_per_s']:9.0f}"
        f"   full / model-only = {r['ratio_full_over_model_only']:.3f} (target <= 1.15: "
        f"{'met' if t['full_over_model_only_le_1.15'] else 'NOT met'}; repeats {_span(spread['full_over_model_only'])})",
        f"{'3. comparator (DataLoader + PIL, ' + '+'.join(map(str, r['comparator']['workers'])) + ' workers)':40s}"
        f"{r['comparator']['ms_per_iter']:9.1f}{r['comparator']['images_per_s']:9.0f}"
        f"   comparator / full = {r['ratio_comparator_over_full']:.2f} (target >= 2: "
        f"{'met' if t['full_ge_2x_comparator'] else 'NOT met'}; repeats {_span(spread['comparator_over_full'])})",
        f"4. k-means refit, {k['rows']} x {k['dim']}, k = {k['k']}, n_init {k['n_init']}: feature pass "
        f"{k['feature_pass_s']:.2f} s, fit ({k['backend']}) {k['fit_s']:.2f} s; {k['other_backend']} "
        f"{k['other_fit_s']:.2f} s, inertia differs by {100 * k['inertia_rel_diff']:.3f}%",
        "5. peak memory (max RSS) of a short run: " + (", ".join(
            f"M = {x['M']}: {x['max_rss_mb']:.0f} MB" + (f" (CUDA {x['cuda_peak_allocated_mb']:.0f} MB)"
                                                          if "cuda_peak_allocated_mb" in x else "")
            for x in mem) + f"; ratio {r['memory_ratio_large_over_small']:.3f} (target <= 1.10: "
        f"{'met' if t['memory_M50000_within_10pct_of_M5000'] else 'NOT met'})" if mem else "not measured in this pass"),
    ]
    if r.get("cuda_memory_ratio_large_over_small"):
        rows[-1] += f"; CUDA peak ratio {r['cuda_memory_ratio_large_over_small']:.3f}"
    p = r["projected"]
    if p["epoch_s_at_M40000"] is not None:
        rows.append(f"projected: {p['epoch_s_at_M40000']:.1f} s per epoch at M = 40000; the writeup's eight runs "
                    f"(319 epochs): {p['writeup_profile_s'] / 60:.1f} min")
    rows.append(f"evaluation of the test split: {r['eval_s']:.2f} s; benchmark wall time {r['bench_seconds']:.0f} s")
    return "\n".join(rows)
