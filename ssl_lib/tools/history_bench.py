"""``python -m ssl_lib bench-history``: what one epoch's history costs to write, early and late in a
long run (docs/performance.md).

For each history length (by default 1,024 steps and 2^20 steps, the protocol's run), the run
directory is given a synthetic history of that many steps less one epoch (the step log and the
per-epoch record, written untimed), then one more epoch is written exactly as ``train`` writes it:
the step log's appends every ``log_every`` steps and, at the epoch's end, the epoch log's line and
the checkpoint (:class:`~ssl_lib.engine.train.SaveToRunDir`). Measured: the seconds of those writes and
the bytes they wrote (the process's ``wchar``, Linux; else the files' sizes). The checkpoint's
component is a tiny model, so that what is measured is the history's share: a real model adds the
same bytes at every length. Also measured, once per length: ``metrics.json``, which a run writes
once, at its end.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..engine import epochlog, rundir, steplog
from ..engine.loop import TrainState, append_epoch
from ..engine.train import SaveToRunDir
from ..files import write_json
from ..method.columns import ITER_COLUMNS

#: Keys of a protocol run's per-epoch record (test and raw accuracies, losses, k-means diagnostics,
#: timings, the step means): about this many.
EPOCH_KEYS = 36


def _written_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _synthetic_history(run_dir: Path, steps: int, steps_per_epoch: int, rng: np.random.Generator) -> dict:
    rows = np.zeros(steps, steplog.DTYPE)
    rows["step"] = np.arange(steps)
    rows["epoch"] = rows["step"] // steps_per_epoch
    for column in ITER_COLUMNS:
        rows[column] = rng.random(steps, dtype=np.float32)
    rows["lr"] = 0.03
    steplog.write(run_dir / rundir.STEPS, rows)
    epochlog.create(run_dir / rundir.EPOCHS)
    records = [_synthetic_record(rng) for _ in range(steps // steps_per_epoch)]
    for record in records:
        epochlog.append(run_dir / rundir.EPOCHS, record)
    return {"epoch": epochlog.fold(records)}


def _record(rng: np.random.Generator) -> dict:
    """An epoch's record without its step means (:func:`append_epoch` adds those)."""
    return {f"key_{k}": float(rng.random()) for k in range(EPOCH_KEYS - len(ITER_COLUMNS))}


def _synthetic_record(rng: np.random.Generator) -> dict:
    return {**_record(rng), **{f"mean_{c}": float(rng.random()) for c in ITER_COLUMNS}}


def measure(total_steps: int, steps_per_epoch: int = 1024, log_every: int = 50, seed: int = 0) -> dict:
    """Seconds and bytes of writing the last epoch of a ``total_steps``-step history."""
    rng = np.random.default_rng(seed)
    model = torch.nn.Linear(4, 4)
    with tempfile.TemporaryDirectory(prefix="ssl_lib-history-") as tmp:
        run_dir = Path(tmp)
        done = total_steps - steps_per_epoch
        history = _synthetic_history(run_dir, done, steps_per_epoch, rng)
        epochs = total_steps // steps_per_epoch
        state = TrainState(epochs, steps_per_epoch, {"model": model, "optimizer": torch.optim.Adam(model.parameters())},
                           sampler=torch.Generator().manual_seed(seed), epoch=epochs - 1, step=done, history=history)
        state.record = _record(rng)
        epoch_log_before = (run_dir / rundir.EPOCHS).stat().st_size
        values = torch.from_numpy(rng.random((steps_per_epoch, len(ITER_COLUMNS)), dtype=np.float32))
        saver = SaveToRunDir(run_dir)
        wchar, t0 = _written_bytes(), time.perf_counter()
        for start in range(0, steps_per_epoch, log_every):
            chunk = values[start: start + log_every]
            saver.on_log(state, range(done + start, done + start + len(chunk)), chunk, [0.03] * len(chunk))
        append_epoch(state, values.numpy())
        state.epoch, state.step = epochs, total_steps
        saver.on_epoch_end(state)
        seconds = time.perf_counter() - t0
        after = _written_bytes()
        sizes = {name: (run_dir / name).stat().st_size for name in (rundir.STEPS, rundir.EPOCHS, rundir.CHECKPOINT)}
        epoch_line = sizes[rundir.EPOCHS] - epoch_log_before
        t1 = time.perf_counter()
        rundir.write_metrics(run_dir, state.history)  # once, at the run's end
        metrics_seconds = time.perf_counter() - t1
        metrics_bytes = (run_dir / rundir.METRICS).stat().st_size
    appended = steps_per_epoch * steplog.DTYPE.itemsize
    written = (after - wchar) if wchar is not None and after is not None else None
    return {"total_steps": total_steps, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "log_every": log_every,
            "seconds": seconds, "bytes_written": written if written is not None else appended + epoch_line
            + sizes[rundir.CHECKPOINT], "step_log_bytes_appended": appended, "epoch_log_bytes_appended": epoch_line,
            "file_bytes": sizes, "metrics_json_at_the_end": {"seconds": metrics_seconds, "bytes": metrics_bytes}}


def run_history_bench(steps: list[int], out_path: str | Path, steps_per_epoch: int = 1024, repeats: int = 3) -> dict:
    """Each length of ``steps``: the median of ``repeats`` measurements; a table, and JSON at ``out_path``."""
    rows = []
    for total in steps:
        if total < steps_per_epoch or total % steps_per_epoch:
            raise ValueError(f"--steps {total}: must be a positive multiple of the {steps_per_epoch} steps per epoch")
        runs = [measure(total, steps_per_epoch) for _ in range(repeats)]
        best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows.append(best)
    result = {"steps_per_epoch": steps_per_epoch, "repeats": repeats, "lengths": rows}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    print(f"{'history (steps)':>16} {'epochs':>7} {'ms per epoch':>13} {'bytes per epoch':>16} {'steps.npy':>12} "
          f"{'epochs.jsonl':>13} {'checkpoint':>11} {'metrics.json at the end (ms, bytes)':>36}")
    for r in rows:
        f, m = r["file_bytes"], r["metrics_json_at_the_end"]
        print(f"{r['total_steps']:>16,} {r['epochs']:>7,} {1e3 * r['seconds']:>13.1f} {r['bytes_written']:>16,} "
              f"{f[rundir.STEPS]:>12,} {f[rundir.EPOCHS]:>13,} {f[rundir.CHECKPOINT]:>11,} "
              f"{1e3 * m['seconds']:>21.1f}, {m['bytes']:>13,}")
    return result
