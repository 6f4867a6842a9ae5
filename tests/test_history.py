"""The run's history on disk: the step log (steps.npy) grows by appending, the checkpoint holds only
where the logs end, and an old-layout run directory is still read and resumed."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import run_metrics
from ssl_lib.engine import rundir, steplog
from ssl_lib.engine.train import train
from ssl_lib.errors import RunDirError
from ssl_lib.method.step import ITER_COLUMNS


def _tiny(small_cfg, **changes):  # a few milliseconds a step, one evaluation of 16 images an epoch
    values = dict(synthetic_train=64, synthetic_test=16, image_size=8, num_unlabeled=32, batch_size=8,
                  unlabeled_batch_size=8, eval_batch_size=16, max_iters_per_epoch=2, log_every=1)
    return replace(small_cfg, **{**values, **changes})


def test_the_step_log_appends_and_is_cut_back_to_a_step(tmp_path):
    path = tmp_path / "steps.npy"
    steplog.create(path)
    assert np.load(path).shape == (0,)
    values = np.arange(5 * len(ITER_COLUMNS), dtype=np.float32).reshape(5, -1)
    values[4, 6] = np.nan
    steplog.append(path, 0, 0, values[:3], [0.1, 0.2, 0.3])
    steplog.append(path, 3, 1, values[3:], [1 / 3, 0.5])
    rows = np.load(path)  # numpy's own reader, in one call
    assert rows["step"].tolist() == [0, 1, 2, 3, 4] and rows["epoch"].tolist() == [0, 0, 0, 1, 1]
    assert rows["lr"][3] == 1 / 3  # float64: the learning rate as it was
    assert np.array_equal(np.stack([rows[c] for c in ITER_COLUMNS], 1), values, equal_nan=True)
    assert path.stat().st_size == steplog.HEADER_BYTES + 5 * steplog.DTYPE.itemsize
    with open(path, "ab") as f:  # a writer killed between its rows and the header's count
        f.write(rows[:1].tobytes())
    assert len(np.load(path)) == 5 and steplog.rows_on_disk(path) == 6
    steplog.truncate(path, 4)
    assert np.load(path)["step"].tolist() == [0, 1, 2, 3] and steplog.rows_on_disk(path) == 4
    with pytest.raises(RunDirError, match="holds 4 steps but the checkpoint is at step 7"):
        steplog.truncate(path, 7)


def test_the_checkpoint_does_not_grow_with_the_run(small_cfg, tmp_path):
    sizes = {}

    class Size:
        def on_epoch_end(self, state):
            sizes[state.epoch] = (tmp_path / "r" / rundir.CHECKPOINT).stat().st_size

    cfg = _tiny(small_cfg, epochs=40, num_unlabeled=0)
    train(cfg, tmp_path / "r", quiet=True, callbacks=[Size()])
    # only integers change (epoch, step, where each log ends): no per-step or per-epoch values inside
    assert abs(sizes[40] - sizes[2]) <= 256 and sizes[40] <= 1.2 * sizes[2], (sizes[2], sizes[40])
    assert len(np.load(tmp_path / "r" / rundir.STEPS)) == 80


def _to_old_layout(run_dir):
    """What the previous version left: per-step lists in metrics.json and the checkpoint, no steps.npy."""
    metrics = run_metrics(run_dir)
    ckpt = torch.load(run_dir / rundir.CHECKPOINT, weights_only=True)
    del ckpt["epoch_log_ends"]
    ckpt.update(format=rundir.OLD_CHECKPOINT_FORMAT, history=metrics)
    torch.save(ckpt, run_dir / rundir.CHECKPOINT)
    (run_dir / rundir.METRICS).write_text(json.dumps(metrics))
    (run_dir / rundir.STEPS).unlink()


def test_an_old_layout_run_is_read_and_resumed(small_cfg, tmp_path):
    cfg = _tiny(small_cfg, epochs=2)
    train(cfg, tmp_path / "full", quiet=True)
    train(replace(cfg, epochs=1), tmp_path / "part", quiet=True)
    (tmp_path / "part" / rundir.SUMMARY).unlink()  # the 1-epoch run made an unfinished 2-epoch run
    (tmp_path / "part" / rundir.CONFIG).write_text((tmp_path / "full" / rundir.CONFIG).read_text())
    _to_old_layout(tmp_path / "part")
    old = rundir.read_metrics(tmp_path / "part")
    assert len(old["iteration"]["loss_total"]) == 2 and old["epoch"]["epoch"] == [1]
    train(cfg, tmp_path / "part", resume=True, quiet=True)
    assert run_metrics(tmp_path / "full")["iteration"] == run_metrics(tmp_path / "part")["iteration"]  # NaN as None
    full, part = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_a_damaged_history_is_one_line_on_resume(small_cfg, tmp_path):
    train(_tiny(small_cfg, epochs=1), tmp_path / "r", quiet=True)
    (tmp_path / "r" / rundir.METRICS).write_text(json.dumps({"epoch": {}}))
    with pytest.raises(RunDirError, match="metrics.json holds fewer epochs of 'epoch' than the checkpoint"):
        rundir.resume_point(tmp_path / "r", torch.device("cpu"))
    steplog.create(tmp_path / "r" / rundir.STEPS)
    with pytest.raises(RunDirError, match="steps.npy holds 0 steps but the checkpoint is at step 2"):
        rundir.resume_point(tmp_path / "r", torch.device("cpu"))


def test_the_history_bench_writes_the_same_step_bytes_early_and_late(tmp_path):
    from ssl_lib.tools.history_bench import measure, run_history_bench

    early, late = measure(1024), measure(64 * 1024)
    assert early["step_log_bytes_appended"] == late["step_log_bytes_appended"] == 1024 * steplog.DTYPE.itemsize
    assert late["file_bytes"][rundir.STEPS] == steplog.HEADER_BYTES + 64 * 1024 * steplog.DTYPE.itemsize
    assert abs(late["file_bytes"][rundir.CHECKPOINT] - early["file_bytes"][rundir.CHECKPOINT]) <= 256
    with pytest.raises(ValueError, match="--steps 1000: must be a positive multiple of the 1024"):
        run_history_bench([1000], tmp_path / "h.json")
