"""The training loop :func:`fit`: epochs of steps over one state object, with named callback points.

A callback is any object with some of these methods, called in the order the callbacks are given:

    on_epoch_start(state)   before the epoch's batches are drawn      (the k-means refit)
    on_step_end(state)      after every optimizer step                (LR schedule, EMA)
    on_log(state, steps, rows, lrs)   every ``log_every`` steps, when the host reads the losses:
                            ``rows`` (ITER_COLUMNS, on the CPU) and ``lrs`` of the steps in the
                            range ``steps`` since the last call            (live curves)
    on_evaluate(state)      after the steps: put metrics in state.record   (test or validation accuracy)
    on_epoch_end(state)     the epoch's record is in state.history    (checkpoint, log, a tuning trial's
                                                                       report; set state.stop to end early)
    on_preempt(state)       a stop signal (:mod:`.preempt`) stopped the epoch at state.step  (checkpoint)

A stop signal is seen at the next host read: the steps end there, the ``on_preempt`` callbacks save
the position (mid-epoch: the epoch's batch order is saved as it was at its start, and its record so
far), and :class:`~.preempt.Preempted` is raised. Resumed, the epoch redraws the same batches, skips
the steps taken, and its record comes out as an uninterrupted epoch's (timings aside).

The per-step values are not kept: ``on_log`` is where they are written (the run directory's step
log, :mod:`ssl_lib.engine.steplog`); ``state.history`` holds the per-epoch record only.

Everything that must survive a restart lives in :class:`TrainState`; the checkpoint saves the
``state_dict`` of each entry of ``state.components`` (model, optimizer, scheduler, ...), so a new
component is registered there and needs no change to saving or resuming.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Config
from ..distributed import SINGLE, Dist, all_gather, combine_rows, shard_columns
from ..method.columns import ITER_COLUMNS, LOSS_COLUMNS
from ..method.step import Trainer
from . import preempt

MASK_RATE, PSEUDO_ACC_MASKED = ITER_COLUMNS.index("mask_rate"), ITER_COLUMNS.index("pseudo_acc_masked")
HOOKS = ("on_epoch_start", "on_step_end", "on_log", "on_evaluate", "on_epoch_end", "on_preempt")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the loss and the step."""


def new_history() -> dict:
    return {"epoch": {}}  # key -> one value per epoch that recorded it


@dataclass
class TrainSet:
    """The training images on the device and the labeled / unlabeled indices into them."""

    images: torch.Tensor
    labels: torch.Tensor
    labeled: torch.Tensor
    unlabeled: torch.Tensor
    use_unlabeled: bool  # some unlabeled loss is on

    def batches(self, cfg: Config, iters: int, sampler: torch.Generator, dist: Dist = SINGLE) -> tuple:
        """This epoch's labeled and unlabeled index batches (iters x batch size, on the device), or None;
        of several processes, each gets its share of every global batch."""
        device = self.images.device
        lab = index_batches(self.labeled, cfg.batch_size, iters, sampler).to(device) if len(self.labeled) else None
        unl = (index_batches(self.unlabeled, cfg.unlabeled_batch_size, iters, sampler).to(device)
               if len(self.unlabeled) and self.use_unlabeled else None)
        return shard_columns(lab, dist), shard_columns(unl, dist)


@dataclass
class TrainState:
    """The loop's state: position, history, the k-means centroids and the checkpointed components."""

    epochs: int
    iters_per_epoch: int
    components: dict  # name -> object with state_dict() / load_state_dict()
    sampler: torch.Generator  # the batch order (a CPU generator on every device)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    centroids: torch.Tensor | None = None
    inertia: float = math.nan
    history: dict = field(default_factory=new_history)  # the per-epoch record
    record: dict = field(default_factory=dict)  # the current epoch's metrics
    last_record: dict = field(default_factory=dict)  # the epoch just completed, step means included (as logged)
    stop: bool = False  # set by a callback to end training after this epoch
    device: torch.device | None = None  # the training device (its CUDA generator is saved)
    epoch_sampler: torch.Tensor | None = None  # the batch order's state at this epoch's start
    epoch_rows: np.ndarray | None = None  # steps a preempted session took in this epoch (ITER_COLUMNS)

    @property
    def epoch_start(self) -> int:
        """The step this epoch starts at."""
        return self.epoch * self.iters_per_epoch

    def state_dict(self) -> dict:
        mid_epoch = self.step > self.epoch_start  # stopped by a signal: the epoch is replayed from its start
        rng = {"sampler": self.epoch_sampler if mid_epoch else self.sampler.get_state(), "torch": torch.get_rng_state()}
        if self.device is not None and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # where the logs end, not the logs: the step log at ``step`` rows, the epoch log at one record an epoch
        out = {"epoch": self.epoch, "step": self.step, "epoch_records": self.epoch, "centroids": self.centroids,
               "inertia": self.inertia, "rng": rng,
               "components": {name: c.state_dict() for name, c in self.components.items()}}
        if mid_epoch:
            out.update(epoch_start=self.epoch_start, epoch_record=self.record)
        return out


def index_batches(indices: torch.Tensor, batch_size: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """``iters`` x ``batch_size`` indices: reshuffled passes over ``indices``, cycled as needed.

    Every batch has the same size (no ragged last batch), which keeps shapes static for compiled
    models; the remainder of a pass carries over into the next batch.
    """
    needed = batch_size * iters
    passes = [indices[torch.randperm(len(indices), generator=gen)] for _ in range(-(-needed // len(indices)))]
    return torch.cat(passes)[:needed].view(iters, batch_size)


def _hooks(callbacks) -> dict[str, list]:
    return {name: [getattr(cb, name) for cb in callbacks if hasattr(cb, name)] for name in HOOKS}


def fit(trainer: Trainer, train_set: TrainSet, state: TrainState, callbacks=(), *, progress=None) -> TrainState:
    """Train from ``state`` to ``state.epochs`` (or until a callback sets ``state.stop``).

    ``progress(total, desc)`` may return a progress bar (tqdm's interface) for each epoch.
    """
    cfg, hooks = trainer.cfg, _hooks(callbacks)
    iters = state.iters_per_epoch
    stop_signal = lambda: preempt.agreed(trainer.dist, trainer.device)  # noqa: E731
    while state.epoch < state.epochs and not state.stop:
        t0 = time.perf_counter()
        done = state.step - state.epoch_start  # > 0: a preempted session took these steps of the epoch
        if not done:
            state.record = {"epoch": state.epoch + 1, "kmeans_inertia": None, "kmeans_seconds": 0.0}
            for hook in hooks["on_epoch_start"]:
                hook(state)
        state.epoch_sampler = state.sampler.get_state()
        lab, unl = (None if b is None else b[done:] for b in train_set.batches(cfg, iters, state.sampler, trainer.dist))
        bar = progress(iters - done, f"epoch {state.epoch + 1}/{state.epochs}") if progress else None
        t_train = time.perf_counter()
        trainer.net.train()
        rows, lrs = run_steps(trainer, train_set, lab, unl, state, hooks["on_step_end"], bar, hooks["on_log"],
                              stop=stop_signal)
        if bar is not None:
            bar.close()
        state.step += len(rows)
        if state.step < state.epoch_start + iters:  # a stop signal: save the position, then stop
            for hook in hooks["on_preempt"]:
                hook(state)
            raise _preempted(state)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        train_seconds = time.perf_counter() - t_train
        images = len(rows) * ((cfg.batch_size if lab is not None else 0) + (cfg.unlabeled_batch_size if unl is not None else 0))  # global
        state.record.update(step=state.step, train_seconds=train_seconds, images_per_sec=images / train_seconds)
        for hook in hooks["on_evaluate"]:
            hook(state)
        state.record["seconds"] = time.perf_counter() - t0
        rows = rows.cpu().numpy()
        if state.epoch_rows is not None:  # the steps of this epoch before the preemption (from the step log)
            rows, state.epoch_rows = np.concatenate([state.epoch_rows, rows]), None
        append_epoch(state, rows)
        state.epoch += 1
        for hook in hooks["on_epoch_end"]:
            hook(state)
        if state.epoch < state.epochs and not state.stop and stop_signal():  # saved just now: stop here
            raise _preempted(state)
    return state


def _preempted(state: TrainState) -> preempt.Preempted:
    return preempt.Preempted(preempt.requested() or "another process's signal", state.step,
                             state.epochs * state.iters_per_epoch)


def run_steps(trainer: Trainer, train_set: TrainSet, lab_batches: torch.Tensor | None,
              unl_batches: torch.Tensor | None, state: TrainState, step_hooks=(), bar=None, log_hooks=(),
              stop=None) -> tuple[torch.Tensor, list[float]]:
    """One optimizer step per row of the batch-index tensors, numbered from ``state.step``. Returns
    the ITER_COLUMNS rows (on the device) and the learning rate of each step taken.

    The host reads the rows only every ``log_every`` steps, those since its last read: to stop on a
    non-finite loss, to update the progress ``bar``, for the ``on_log`` callbacks, and to end the
    steps there when ``stop()`` says so (then fewer rows come back than there are batches).
    """
    x, y = train_set.images, train_set.labels
    iters = len(lab_batches if lab_batches is not None else unl_batches)
    rows = torch.empty(iters, len(ITER_COLUMNS), device=trainer.device)
    lrs = []
    param_group = trainer.optimizer.param_groups[0]
    dist = trainer.dist
    logged = torch.empty(iters, len(ITER_COLUMNS)) if dist.on else None  # the global values, on the host
    read = 0  # rows [0, read) have been read by the host
    for i in range(iters):
        il = lab_batches[i] if lab_batches is not None else None
        iu = unl_batches[i] if unl_batches is not None else None
        lrs.append(param_group["lr"])
        rows[i] = trainer.step(*_gather(x, y, il), *_gather(x, y, iu), state.centroids)
        for hook in step_hooks:
            hook(state)
        if (i + 1) % trainer.cfg.log_every == 0 or i + 1 == iters:
            new = rows[read: i + 1]
            if dist.on:  # every process reads the same global values, so they stop (or not) together
                new = combine_rows(all_gather(new, dist), MASK_RATE, PSEUDO_ACC_MASKED)
                logged[read: i + 1] = new.cpu()
            new = new.cpu()
            latest = check_finite(new, state.step + read)
            for hook in log_hooks:
                hook(state, range(state.step + read, state.step + i + 1), new, lrs[read: i + 1])
            read = i + 1
            if bar is not None:
                bar.update(i + 1 - bar.n)
                bar.set_postfix({c.removeprefix("loss_"): f"{v:.3f}" for c, v in zip(LOSS_COLUMNS, latest)})
            if stop is not None and stop():
                break
    return (logged if dist.on else rows)[:read], lrs[:read]


def _gather(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None) -> tuple:
    # index_select, not x[idx]: 4 us instead of 70 us for a 64-image uint8 batch on the CPU
    return (None, None) if idx is None else (x.index_select(0, idx), y.index_select(0, idx))


def check_finite(rows: torch.Tensor, first_step: int) -> list[float]:
    """Read the losses logged so far; raise TrainingDiverged at the first non-finite one."""
    losses = rows[:, : len(LOSS_COLUMNS)].cpu()
    bad = ~torch.isfinite(losses)
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise TrainingDiverged(f"loss '{LOSS_COLUMNS[j]}' became {losses[i, j].item()} at step {first_step + i}")
    return losses[-1].tolist()


def append_epoch(state: TrainState, rows: np.ndarray) -> None:
    """The epoch's record, with the mean of each step column over its ``rows``, into the history
    (and ``state.last_record``)."""
    record = {**state.record, **{f"mean_{c}": (float(np.nanmean(rows[:, j])) if np.isfinite(rows[:, j]).any()
                                               else None) for j, c in enumerate(ITER_COLUMNS)}}
    for key, value in record.items():
        state.history["epoch"].setdefault(key, []).append(value)
    state.last_record = record
