"""One run of one config: :func:`train` builds the trainer, the state and the callbacks, checks the
run directory, and hands them to :func:`~ssl_lib.engine.loop.fit`; :func:`evaluate_run` reloads a
finished run.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..augment.augmenter import STRONG_VIEWS, Augmenter, Normalize
from ..config import Config, ConfigError, load_config
from ..data import DataError, ImageDataset, flip_labels, load_data, split_indices, validation_indices
from ..distributed import (SINGLE, Dist, all_gather, broadcast_object, from_env, local_device, local_first, start,
                           sync_batchnorm)
from ..evaluate import evaluate, kmeans_cluster_accuracy
from ..method.diagnostics import REFIT_SCALE, gradient_shares
from ..method.step import NonFiniteFeatures, Trainer, refit_centroids
from ..models import MODELS, build_model
from . import rundir, steplog
from .ema import EMA
from .env import environment, keep_freed_memory, memory_format, peak_memory_mb, resolve_device
from .live_curves import live_curves
from .loop import TrainingDiverged, TrainSet, TrainState, fit
from .preempt import Preempted
from .optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler

#: Set to 1 to check after every step that all processes of a run hold the same model (torchrun).
CHECK_REPLICAS_ENV = "SSL_LIB_CHECK_REPLICAS"
#: config fields whose values name a choice in a table of the package -> that table.
CHOICES = {"model": MODELS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "strong_view": STRONG_VIEWS}


def check_choices(cfg: Config) -> Config:
    """Raise ConfigError unless every choice field names an entry of its table; return ``cfg``."""
    for key, table in CHOICES.items():
        if getattr(cfg, key) not in table:
            raise ConfigError(f"config field '{key}' must be one of {', '.join(table)}, got {getattr(cfg, key)!r}")
    return cfg


def check_split(cfg: Config, dist: Dist) -> None:
    """Raise ConfigError unless the global batch sizes split evenly over the processes."""
    for key in ("batch_size", "unlabeled_batch_size"):
        if getattr(cfg, key) % dist.world:
            raise ConfigError(f"config field '{key}' ({getattr(cfg, key)}) must be a multiple of the {dist.world} "
                              "processes: each takes an equal share of the global batch")


def check_processes(cfg: Config, dist: Dist) -> None:
    """Raise ConfigError for the modes that several processes would get wrong: ``sync_bn: false``
    (each process's BatchNorm running statistics, and its EMA of them, drift apart: the sharded
    evaluation would score K different models, and process 0's copy alone is saved) and ``compile:
    true`` (with SyncBatchNorm under DDP it breaks the graph at every BatchNorm, and it is not yet
    measured on several GPUs by `make gpu-check`)."""
    if not dist.on:
        return
    if not cfg.sync_bn:
        raise ConfigError(f"config field 'sync_bn' is false but the run has {dist.world} processes: their BatchNorm "
                          "statistics would drift apart and the saved model would be process 0's alone; set sync_bn=true")
    if cfg.compile:
        raise ConfigError(f"config field 'compile' is true but the run has {dist.world} processes: torch.compile "
                          "under DDP with synchronised BatchNorm is not measured to work yet; set compile=false")


def iterations_per_epoch(cfg: Config, n_labeled: int, n_unlabeled: int) -> int:
    """``eval_every`` steps if set; else one pass over the larger of the two sets (counted in its own
    batches), capped at ``max_iters_per_epoch`` if set."""
    if cfg.eval_every:
        return cfg.eval_every
    iters = max(math.ceil(n_labeled / cfg.batch_size), math.ceil(n_unlabeled / cfg.unlabeled_batch_size))
    return min(iters, cfg.max_iters_per_epoch) if cfg.max_iters_per_epoch else iters


def number_of_epochs(cfg: Config, iters: int) -> int:
    """``epochs``, or ``steps`` / steps per epoch when the run length is given in steps."""
    if not cfg.steps:
        return cfg.epochs
    if cfg.steps % iters:
        raise ConfigError(f"config field 'steps' ({cfg.steps}) must be a multiple of the {iters} steps per epoch "
                          "(set eval_every to a divisor of it)")
    return cfg.steps // iters


def build_trainer(cfg: Config, data: ImageDataset, device: torch.device, dist: Dist = SINGLE,
                  unused_parameters: bool = False) -> Trainer:
    """The model, its optimizer, the views and the normalisation. Of several processes, the model
    normalises with the global batch's statistics (``sync_bn``) and is wrapped in DDP, which averages
    the gradients (``unused_parameters``: some parameters get none, e.g. the classifier of a run with
    neither labels nor FixMatch)."""
    torch.manual_seed(cfg.seed)  # fixes the initialisation and the augmentations (torch's generator)
    fmt = memory_format(cfg, device)
    net = build_model(check_choices(cfg), data.num_classes)
    if dist.on and cfg.sync_bn:
        net = sync_batchnorm(net, device)
    net = net.to(device, memory_format=fmt)
    model = net
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel

        with warnings.catch_warnings():  # broadcast_buffers: renamed in newer torch; the old name works in both
            warnings.simplefilter("ignore", FutureWarning)
            model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                            broadcast_buffers=False, find_unused_parameters=unused_parameters)
    model = torch.compile(model) if cfg.compile else model
    return Trainer(cfg, model, net, build_optimizer(cfg, net), Augmenter.from_config(cfg),
                   Normalize(data.mean, data.std, device), device, fmt, dist)


# ------------------------------------------------------------------------------------ callbacks

class KMeansRefit:
    """Epoch start: refit the centroids on the unlabeled features every ``kmeans_every`` epochs."""

    def __init__(self, trainer: Trainer, train_set: TrainSet, num_classes: int):
        self.trainer, self.train_set, self.num_classes = trainer, train_set, num_classes
        self.scale = dict.fromkeys(REFIT_SCALE)  # the last refit's (unknown after a resume until the next)

    def on_epoch_start(self, state: TrainState) -> None:
        cfg = self.trainer.cfg
        if state.centroids is None or state.epoch % cfg.kmeans_every == 0:
            t0 = time.perf_counter()
            images = self.train_set.images
            try:
                state.centroids, state.inertia, scale = refit_centroids(
                    self.trainer, images, self.train_set.unlabeled.to(images.device), self.num_classes,
                    seed=cfg.seed * 100_003 + state.epoch, labeled=self.train_set.labeled.to(images.device))
            except NonFiniteFeatures as err:
                raise TrainingDiverged(f"{err} at step {state.step}") from None
            state.record["kmeans_seconds"] = time.perf_counter() - t0
            self.scale = scale
        state.record.update(self.scale)  # every epoch, so that each column has one value per evaluation
        state.record["kmeans_inertia"] = state.inertia


def own_rng(device: torch.device):
    """Within: torch's random state (and this CUDA device's) is put back after, so that what draws
    inside leaves the run's random streams as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def diagnostic_batch(trainer: Trainer, train_set: TrainSet, centroids: torch.Tensor | None, seed: int) -> tuple:
    """One batch as a step would see it, ``(x, y_l, y_u, n_l, n_u)`` for
    :func:`~ssl_lib.method.diagnostics.loss_gradients`, drawn from generators seeded by ``seed``:
    the run's batch order and its views' random stream are left as they were."""
    cfg = trainer.cfg
    lab, unl = train_set.batches(cfg, 1, torch.Generator().manual_seed(seed), trainer.dist)
    x, y = train_set.images, train_set.labels
    pick = lambda idx: (None, None) if idx is None else (x.index_select(0, idx[0]), y.index_select(0, idx[0]))
    (x_l, y_l), (x_u, y_u) = pick(lab), pick(unl)
    with own_rng(trainer.device):
        torch.manual_seed(seed)  # the views' draws
        inputs, n_l, n_u = trainer.inputs(x_l, x_u, centroids)
    return inputs, y_l, y_u, n_l, n_u


class KMeansDiagnostics:
    """Evaluate: each loss's share of the gradient norm and the norm of the z the k-means loss pulls
    (:func:`~ssl_lib.method.diagnostics.gradient_shares`), on a :func:`diagnostic_batch`, so that
    the run's batches, views and weights are as they would be without it."""

    def __init__(self, trainer: Trainer, train_set: TrainSet):
        self.trainer, self.train_set = trainer, train_set

    def on_evaluate(self, state: TrainState) -> None:
        seed = self.trainer.cfg.seed * 100_003 + state.record["step"]
        batch = diagnostic_batch(self.trainer, self.train_set, state.centroids, seed)
        with own_rng(self.trainer.device):
            state.record.update(gradient_shares(self.trainer, *batch, state.centroids))  # dropout, if any, draws


class CheckReplicas:
    """Step end, several processes, with $SSL_LIB_CHECK_REPLICAS=1 (a debugging aid; it gathers the
    whole model every step): stop unless every process holds bit-identical parameters and buffers."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.steps = trainer, None

    def on_step_end(self, state: TrainState) -> None:
        self.steps = (state.step if self.steps is None else self.steps) + 1
        net, dist = self.trainer.net, self.trainer.dist
        flat = torch.cat([t.detach().flatten().double() for t in (*net.parameters(), *net.buffers())])
        copies = all_gather(flat, dist)
        differ = [r for r in range(dist.world) if not torch.equal(copies[r], copies[0])]
        if differ:
            raise RuntimeError(f"the model differs between process 0 and process(es) {differ} after {self.steps} steps")


class StepSchedule:
    """Step end: advance the learning-rate schedule."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_step_end(self, state: TrainState) -> None:
        self.scheduler.step()


class Evaluate:
    """Evaluate: loss, accuracy and clustering accuracy of ``model`` on a labeled split, recorded as
    ``<prefix>_loss``, ``<prefix>_acc`` and ``cluster_acc``, each followed by ``suffix``."""

    def __init__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 prefix: str = "test", model: torch.nn.Module | None = None, suffix: str = ""):
        self.trainer, self.images, self.labels, self.num_classes = trainer, images, labels, num_classes
        self.prefix, self.suffix, self.confusion = prefix, suffix, None
        self.model = model if model is not None else trainer.net

    def __call__(self, autocast_dtype=None) -> dict:
        t = self.trainer
        return evaluate(self.model, self.images, self.labels, t.normalize, self.num_classes, t.cfg.eval_batch_size,
                        autocast_dtype, t.dist)

    def on_evaluate(self, state: TrainState) -> None:
        result = self(self.trainer.autocast_dtype)
        self.confusion = result["confusion"]
        state.record[f"{self.prefix}_loss{self.suffix}"] = result["test_loss"]
        state.record[f"{self.prefix}_acc{self.suffix}"] = result["test_acc"]
        state.record[f"cluster_acc{self.suffix}"] = result["cluster_acc"]


class SaveToRunDir:
    """Log: the steps' rows appended to the step log. Epoch end: the epoch's record appended to the
    epoch log, then the checkpoint, written atomically (:func:`rundir.save_epoch`)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, state: TrainState, steps: range, rows: torch.Tensor, lrs: list[float]) -> None:
        steplog.append(self.run_dir / rundir.STEPS, steps.start, state.epoch, rows.numpy(), lrs)

    def on_epoch_end(self, state: TrainState) -> None:
        rundir.save_epoch(self.run_dir, state.state_dict(), state.last_record)

    def on_preempt(self, state: TrainState) -> None:  # mid-epoch: the epoch log has not changed
        rundir.save_checkpoint(self.run_dir, state.state_dict())


class PrintEpoch:
    """Epoch end: one line per epoch."""

    def __init__(self, split: str = "test"):
        self.split = split

    def on_epoch_end(self, state: TrainState) -> None:
        r, s = state.record, self.split
        tqdm.write(f"epoch {r['epoch']}/{state.epochs}  {s}_acc {r[f'{s}_acc']:.4f}  {s}_loss {r[f'{s}_loss']:.4f}"
                   f"  {r['seconds']:.1f}s  {r['images_per_sec']:.0f} img/s")


def restore(state: TrainState, ckpt: dict, path: Path, device: torch.device) -> None:
    """Put a checkpoint (from :func:`rundir.resume_point`) back into ``state`` and its components."""
    saved = ckpt["components"]
    missing = sorted(set(state.components) - set(saved))
    if missing:
        raise rundir.RunDirError(f"{path}: no saved state for {', '.join(missing)}")
    for name, component in state.components.items():
        rundir.load_state(component, saved[name], path, name)
    try:
        state.sampler.set_state(ckpt["rng"]["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            state_ = ckpt["rng"]["cuda"]  # this device's (a list of every device's before 0.2)
            torch.cuda.set_rng_state(state_[0] if isinstance(state_, (list, tuple)) else state_, device)
        state.epoch, state.step, state.history = int(ckpt["epoch"]), int(ckpt["step"]), ckpt["history"]
        state.record, state.epoch_rows = dict(ckpt.get("epoch_record") or {}), ckpt.get("epoch_rows")
        centroids = ckpt.get("centroids")
        state.centroids = None if centroids is None else centroids.to(device)
        state.inertia = float(ckpt.get("inertia", math.nan))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise rundir.RunDirError(f"{path}: the saved training position is damaged ({type(err).__name__})") from None
    if not 0 <= state.epoch <= state.epochs or not 0 <= state.step - state.epoch_start < state.iters_per_epoch:
        raise rundir.RunDirError(f"{path}: saved at epoch {state.epoch}, step {state.step}: outside this run's "
                                 f"{state.epochs} epochs of {state.iters_per_epoch} steps")


# --------------------------------------------------------------------------------------- training

@dataclass
class TrainingSplit:
    """The training images on the device, split; the counts are the split's, as the summary reports them."""

    train_set: TrainSet
    num_labeled: int
    num_unlabeled: int  # before unlabeled_includes_labeled adds the labeled images
    labels_flipped: int  # label_noise
    use_kmeans: bool


def training_split(cfg: Config, data: ImageDataset, device: torch.device) -> TrainingSplit:
    """The labeled / unlabeled split of the config, label noise on the labeled images, on ``device``."""
    if data.num_classes < 2:
        raise DataError(f"the training data has {data.num_classes} class ({', '.join(data.classes)}); "
                        "classification needs at least 2")
    labeled, unlabeled = split_indices(cfg, data.train.labels)
    if not len(labeled) and cfg.w_augment == 0 and cfg.w_kmeans == 0:
        raise ConfigError("no labeled images (num_unlabeled = all) and w_augment = w_kmeans = 0: nothing to train")
    counts = len(labeled), len(unlabeled)
    if cfg.unlabeled_includes_labeled:  # FixMatch's setting: every training image also as unlabeled
        unlabeled = np.union1d(labeled, unlabeled)
    labels, flipped = data.train.labels, np.empty(0, dtype=np.int64)
    if cfg.label_noise:  # after the split, on labeled images only: the unlabeled and test labels stay true
        noisy, flipped = flip_labels(labels, labeled, cfg.label_noise, data.num_classes, cfg.seed)
        labels = torch.from_numpy(noisy)
    use_kmeans = cfg.w_kmeans > 0 and len(unlabeled) >= data.num_classes
    train_set = TrainSet(data.train.images.to(device), labels.to(device), torch.from_numpy(labeled),
                         torch.from_numpy(unlabeled), use_unlabeled=cfg.w_augment > 0 or use_kmeans)
    return TrainingSplit(train_set, *counts, len(flipped), use_kmeans)


def scored_split(cfg: Config, data: ImageDataset, train_set: TrainSet) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(name, images, labels)`` the run is scored on: the held-out training images when ``val_size``
    is set (the test split is then not even read), else the test split."""
    if cfg.val_size:
        val = torch.from_numpy(validation_indices(cfg, data.train.labels)[0]).to(train_set.images.device)
        return "val", train_set.images[val], train_set.labels[val]
    device = train_set.images.device
    return "test", data.test.images.to(device), data.test.labels.to(device)


def initial_state(cfg: Config, trainer: Trainer, iters: int) -> TrainState:
    """Epoch 0 and every component the checkpoint saves: the model, the optimizer, the schedule, the EMA."""
    epochs = number_of_epochs(cfg, iters)
    components = {"model": trainer.net, "optimizer": trainer.optimizer,
                  "scheduler": build_scheduler(cfg, trainer.optimizer, epochs * iters)}
    if cfg.ema_decay > 0:
        components["ema"] = EMA(trainer.net, cfg.ema_decay)
    return TrainState(epochs, iters, components, sampler=torch.Generator().manual_seed(cfg.seed), device=trainer.device)


def builtin_callbacks(trainer: Trainer, split: TrainingSplit, state: TrainState, scored: Evaluate,
                      run_dir: Path, quiet: bool) -> list:
    """In order: the k-means refit, the LR schedule, the EMA and its raw weights' score, the k-means
    term's size, the score, the checkpoint, the live curves (TensorBoard), the epoch line; the last
    three on the process that writes the run directory."""
    out = [KMeansRefit(trainer, split.train_set, scored.num_classes)] if split.use_kmeans else []
    out.append(StepSchedule(state.components["scheduler"]))
    if "ema" in state.components:  # the average is scored (and saved); the raw weights are recorded beside it
        out += [state.components["ema"],
                Evaluate(trainer, scored.images, scored.labels, scored.num_classes, scored.prefix, suffix="_raw")]
    if split.use_kmeans:
        out.append(KMeansDiagnostics(trainer, split.train_set))
    if trainer.dist.on and os.environ.get(CHECK_REPLICAS_ENV) == "1":
        out.append(CheckReplicas(trainer))
    if not trainer.dist.main:  # one process writes the run directory and prints
        return out + [scored]
    return out + [scored, SaveToRunDir(run_dir), *live_curves(run_dir)] + ([] if quiet else [PrintEpoch(scored.prefix)])


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
          data: ImageDataset | None = None, callbacks=(), dist: Dist | None = None, device: str | None = None) -> dict:
    """Train one run into ``run_dir`` and return its summary (also written to summary.json).

    A finished run (summary.json present) is returned as is. Everything that can be wrong with the
    input is checked before the directory is created. ``callbacks`` run after the built-in ones
    (see :mod:`ssl_lib.engine.loop`). Under torchrun (``dist``: by default from its environment)
    every process trains its share of each batch and process 0 alone reads and writes the run
    directory, sending the others what they need. ``device``: train there instead of on the config's
    device (the executor's slot of a ``cuda:N`` run: the GPU it was given).
    """
    run_dir = Path(run_dir)
    dist = from_env() if dist is None else dist
    check_choices(cfg.validate())
    check_split(cfg, dist)
    check_processes(cfg, dist)
    device = local_device(dist, resolve_device(device or cfg.device))
    start(dist, device)
    todo = _on_main(dist, lambda: rundir.check(run_dir, cfg, resume))
    if todo == "finished":  # no need to load the data
        return _on_main(dist, lambda: rundir.read_summary(run_dir))
    if data is None:  # under torchrun: decoded and cached once per machine, outside the collective timeout
        data = local_first(dist, lambda: load_data(cfg, quiet=quiet or not dist.main))
    keep_freed_memory()  # after loading: its one-off buffers go back to the kernel
    split = training_split(cfg, data, device)
    name, images, labels = scored_split(cfg, data, split.train_set)
    trainer = build_trainer(cfg, data, device, dist,
                            unused_parameters=not len(split.train_set.labeled) and cfg.w_augment == 0)
    state = initial_state(cfg, trainer, iterations_per_epoch(cfg, len(split.train_set.labeled),
                                                             len(split.train_set.unlabeled)))
    if todo == "resume":
        ckpt = _on_main(dist, lambda: rundir.resume_point(run_dir, torch.device("cpu") if dist.on else device))
        restore(state, ckpt, run_dir / rundir.CHECKPOINT, device)
        if dist.main:
            rundir.take_up(run_dir, ckpt)  # a killed writer's temporaries; both logs cut back
        created = []
    else:
        created = rundir.create(run_dir, cfg) if dist.main else []
    final_model = state.components["ema"].model if "ema" in state.components else trainer.net
    scored = Evaluate(trainer, images, labels, data.num_classes, name, model=final_model)

    wall_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit_or_clean_up(trainer, split.train_set, state, [*builtin_callbacks(trainer, split, state, scored, run_dir,
                                                                         quiet or not dist.main), *callbacks],
                    run_dir, created, quiet)

    confusion = scored.confusion if scored.confusion is not None else scored()["confusion"]  # epochs = 0: still evaluate

    def finish() -> dict:
        rundir.save(run_dir, rundir.MODEL, final_model.state_dict())
        rundir.write_metrics(run_dir, state.history)
        summary = summarize(cfg, state.history, data, device, split.num_labeled, split.num_unlabeled, confusion,
                            time.perf_counter() - wall_start, name)
        summary["labels_flipped"] = split.labels_flipped
        summary["processes"] = dist.world
        summary.update(feature_clustering(trainer, final_model, images, labels, data.num_classes))
        rundir.write_summary(run_dir, summary)
        return summary

    return _on_main(dist, finish)


def _on_main(dist: Dist, work):
    """``work()`` on process 0, its result (or its bad-input error, raised) on every process."""
    if not dist.on:
        return work()
    result = None
    if dist.main:
        try:
            result = work()
        except (ConfigError, DataError, rundir.RunDirError) as err:
            result = err
    result = broadcast_object(result, dist)
    if isinstance(result, BaseException):
        raise result
    return result


def fit_or_clean_up(trainer: Trainer, train_set: TrainSet, state: TrainState, callbacks: list, run_dir: Path,
                    created: list, quiet: bool) -> None:
    """:func:`fit`; if it stops before the first checkpoint of this session, remove what this run
    created, so an interrupted or diverged first epoch leaves nothing behind."""
    first_epoch = state.epoch
    progress = None if quiet else (lambda n, desc: tqdm(total=n, desc=desc, leave=False, mininterval=1.0))
    try:
        fit(trainer, train_set, state, callbacks, progress=progress)
    except Preempted:  # its checkpoint is saved
        raise
    except TrainingDiverged as err:
        checkpoint = run_dir / rundir.CHECKPOINT
        if checkpoint.exists():
            raise TrainingDiverged(f"{err}; the last good checkpoint is {checkpoint} "
                                   f"(epoch {state.epoch}); resume with --resume") from None
        rundir.remove_created(created)
        raise TrainingDiverged(f"{err}, in the first epoch: no checkpoint was written") from None
    except BaseException:
        if state.epoch == first_epoch:  # nothing of this run was saved: leave nothing behind
            rundir.remove_created(created)
        raise


def feature_clustering(trainer: Trainer, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> dict:
    """What the features learnt, labels aside: the clustering accuracy of k-means on the scored
    split's features z, for the trained model and for a randomly initialised one of the same
    architecture (the floor); the headline figure of a run without labels."""
    cfg = trainer.cfg
    with own_rng(trainer.device):
        torch.manual_seed(cfg.seed)
        untrained = build_model(cfg, num_classes).to(trainer.device, memory_format=trainer.memory_format)
    kwargs = dict(batch_size=cfg.eval_batch_size, seed=cfg.seed, n_init=cfg.kmeans_n_init, backend=cfg.kmeans_backend)
    return {"feature_cluster_acc": kmeans_cluster_accuracy(model, images, labels, trainer.normalize, num_classes, **kwargs),
            "feature_cluster_acc_random_net": kmeans_cluster_accuracy(untrained, images, labels, trainer.normalize,
                                                                      num_classes, **kwargs)}


def summarize(cfg: Config, history: dict, data: ImageDataset, device: torch.device, n_labeled: int,
              n_unlabeled: int, confusion, wall_seconds: float, split: str = "test") -> dict:
    """The run's summary; accuracies are on ``split`` (``test``, or ``val`` for a validation run)."""
    ep = history["epoch"]
    acc = ep.get(f"{split}_acc", [])
    best = int(np.argmax(acc)) if acc else None
    return {
        "name": cfg.name, "config_digest": cfg.digest(), "epochs": len(acc), "scored_on": split,
        "num_labeled": n_labeled, "num_unlabeled": n_unlabeled, "num_classes": data.num_classes,
        "classes": list(data.classes), "data": data.description,
        "best_acc": acc[best] if acc else None, "best_epoch": best + 1 if acc else None,
        "final_acc": acc[-1] if acc else None,
        "median_last20_acc": float(np.median(acc[-20:])) if acc else None,  # as FixMatch reports it
        "final_cluster_acc": ep["cluster_acc"][-1] if acc else None,
        "grad_share_kmeans": (ep.get("grad_share_kmeans") or [None])[-1],  # the k-means term's last share
        f"final_{split}_loss": ep[f"{split}_loss"][-1] if acc else None,
        "seconds_per_epoch": float(np.mean(ep["seconds"])) if acc else None,
        "images_per_sec": float(np.median(ep["images_per_sec"])) if acc else None,
        "train_seconds": float(np.sum(ep["seconds"])) if acc else 0.0,
        "wall_seconds_this_session": wall_seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "confusion": np.asarray(confusion).tolist(),
        "environment": environment(device),
    }


def evaluate_run(run_dir: str | Path, data: ImageDataset | None = None) -> dict:
    """Reload a finished run's config, data and ``model.pt`` and evaluate it on the test split (of
    ``data`` when given: a tuning trial, trained with a validation hold-out, never loaded the test split)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise rundir.RunDirError(f"{run_dir} is not a directory")
    if not (run_dir / rundir.MODEL).is_file() or not (run_dir / rundir.CONFIG).is_file():
        raise rundir.RunDirError(f"{run_dir} is not a finished run directory (no {rundir.MODEL} and "
                                 f"{rundir.CONFIG})")
    try:
        cfg = check_choices(load_config(run_dir / rundir.CONFIG))
    except ConfigError as err:
        raise rundir.RunDirError(f"{run_dir / rundir.CONFIG} is damaged ({err})") from None
    device = resolve_device(cfg.device)
    state = rundir.load(run_dir / rundir.MODEL, device)
    data = load_data(cfg) if data is None else data
    # in the layout the run trained and evaluated in (channels_last on a CPU: 2-3x faster there)
    model = build_model(cfg, data.num_classes).to(device, memory_format=memory_format(cfg, device))
    if not isinstance(state, dict):
        raise rundir.RunDirError(f"{run_dir / rundir.MODEL} holds a {type(state).__name__}, not a state dict")
    rundir.load_state(model, state, run_dir / rundir.MODEL, "model")
    result = evaluate(model, data.test.images.to(device), data.test.labels, Normalize(data.mean, data.std, device),
                      data.num_classes, cfg.eval_batch_size)
    result["confusion"] = result["confusion"].tolist()
    return {"run_dir": str(run_dir), "device": str(device), **result}
