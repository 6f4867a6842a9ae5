"""Live curves: TensorBoard event files written into the run directory while the run trains.

    tensorboard --logdir runs/                       every run, one TensorBoard run per run directory
    tensorboard --logdir runs/tuning/<study>         a study's trials (trials/trial-NNNN) side by side

The x axis is the number of optimizer steps taken. Tags:

    train/<column>  loss_sup, loss_aug, loss_kmeans, loss_total, mask_rate, pseudo_acc,
                    pseudo_acc_masked and lr: each point is the mean over the steps since the previous
                    point, written when the host reads the losses anyway (every ``log_every`` steps and
                    at the end of an epoch, :func:`ssl_lib.engine.loop.run_steps`)
    epoch/<key>     every finite number of the epoch record (test_acc and test_acc_raw or val_acc,
                    test_loss, cluster_acc, kmeans_inertia, seconds, ...), at the epoch's last step

A resumed run restarts at its last checkpoint; what an earlier session wrote after it is dropped by
TensorBoard (``purge_step``), so no step appears twice. The event files are TensorBoard's
append-only streams (its readers skip an incomplete last record), not files of :func:`atomic_write`.

TensorBoard is optional (``pip install 'ssl_lib[live]'``): without it runs train exactly the same,
and the first run of the process says once how to get the curves.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import weakref
from pathlib import Path

from ..method.columns import ITER_COLUMNS

#: Seconds between the writer thread's flushes to disk (TensorBoard reloads every 30 s); the epoch end
#: flushes too, so an epoch's scores show as soon as its line is printed.
FLUSH_SECONDS = 15
HINT = ("live curves: TensorBoard is not installed, so runs write no event files; "
        "pip install 'ssl_lib[live]', then: tensorboard --logdir runs/")
_hinted = False  # the hint is printed once per process


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or None (and the hint, once) without TensorBoard."""
    global _hinted
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _hinted:
            _hinted = True
            print(HINT, file=sys.stderr, flush=True)
        return None
    return SummaryWriter


def live_curves(run_dir: str | Path) -> list:
    """The callbacks that write ``run_dir``'s live curves: one, or none without TensorBoard.

    Only the process that writes the run directory may call this (under torchrun: rank 0)."""
    writer_class = summary_writer_class()
    return [] if writer_class is None else [LiveCurves(Path(run_dir), writer_class)]


def _close(writer) -> None:
    with contextlib.suppress(Exception):  # at exit, or after a failed write: never the reason a run fails
        writer.close()


class LiveCurves:
    """Writes the curves on the host, from what the loop has already read: no device sync of its own.

    The event file is opened at the session's first epoch end, once its checkpoint is saved: a first
    epoch that fails removes the new run directory (``train``), and no writer thread may still be
    writing into it. The curves of that epoch wait in memory until then."""

    def __init__(self, run_dir: Path, writer_class):
        self.run_dir, self.writer_class = run_dir, writer_class
        self.writer, self.pending, self.first_step = None, [], None

    def on_epoch_start(self, state) -> None:
        if self.first_step is None:
            self.first_step = state.step

    def _add(self, tag: str, value: float, step: int) -> None:
        if self.writer is None:
            self.pending.append((tag, value, step))
        else:
            self.writer.add_scalar(tag, value, step)

    def on_log(self, state, steps: range, rows, lrs: list[float]) -> None:
        if self.first_step is None:  # resumed mid-epoch (no epoch start in this session)
            self.first_step = steps.start
        means = rows.double().nanmean(0).tolist()  # NaN: no value in these steps (e.g. nothing passed tau)
        for column, value in zip((*ITER_COLUMNS, "lr"), (*means, sum(lrs) / len(lrs))):
            if math.isfinite(value):
                self._add(f"train/{column}", value, steps.stop)

    def on_epoch_end(self, state) -> None:
        if self.writer is None:
            # events an earlier session wrote after this session's starting checkpoint are dropped
            self.writer = self.writer_class(str(self.run_dir), purge_step=self.first_step + 1,
                                            flush_secs=FLUSH_SECONDS)
            weakref.finalize(self, _close, self.writer)  # an interrupted run's events still reach the disk
            for event in self.pending:
                self.writer.add_scalar(*event)
            self.pending.clear()
        record = state.record
        for key, value in record.items():
            if key not in ("epoch", "step") and _is_number(value) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, record["step"])
        self.writer.flush()
        if state.epoch >= state.epochs:
            _close(self.writer)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
