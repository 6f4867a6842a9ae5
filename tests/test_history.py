"""The run's history on disk: the step log (steps.npy) grows by appending, the checkpoint holds only
where the logs end, and an old-layout run directory is still read and resumed."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import run_metrics
from ssl_lib.engine import epochlog, rundir, steplog
from ssl_lib.engine.train import train
from ssl_lib.errors import RunDirError
from ssl_lib.method.columns import ITER_COLUMNS


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


def test_the_epoch_log_appends_and_is_cut_back_to_an_epoch(tmp_path):
    path = tmp_path / "epochs.jsonl"
    epochlog.create(path)
    assert epochlog.read(path) == []
    records = [{"epoch": 1, "test_acc": 0.5, "loss": float("nan")}, {"epoch": 2, "test_acc": 0.6, "share": 0.3},
               {"epoch": 3, "test_acc": 0.7}]
    for record in records:
        epochlog.append(path, record)
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"epoch": 4, "te')
    got = epochlog.read(path)
    assert [r["epoch"] for r in got] == [1, 2, 3] and np.isnan(got[0]["loss"]) and got[1] == records[1]
    # as lists: one value per epoch that recorded the key, in order (metrics.json's "epoch")
    folded = epochlog.fold(got)
    assert folded["epoch"] == [1, 2, 3] and folded["test_acc"] == [0.5, 0.6, 0.7] and folded["share"] == [0.3]
    assert epochlog.fold(epochlog.unfold(folded)) == folded  # an older run's lists, converted, read the same
    epochlog.truncate(path, 2)
    assert path.read_text().splitlines()[-1] == '{"epoch": 2, "test_acc": 0.6, "share": 0.3}'
    assert [r["epoch"] for r in epochlog.read(path)] == [1, 2] and path.read_bytes().endswith(b"}\n")
    with pytest.raises(RunDirError, match="epochs.jsonl holds 2 epochs but the checkpoint is at epoch 3"):
        epochlog.truncate(path, 3)
    path.write_bytes(b'{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(RunDirError, match="epochs.jsonl: line 2 is not an epoch's record"):
        epochlog.read(path)


def test_the_checkpoint_does_not_grow_with_the_run_and_the_epoch_log_only_grows(small_cfg, tmp_path):
    sizes, logs = {}, {}
    run_dir = tmp_path / "r"

    class Size:
        def on_epoch_end(self, state):
            sizes[state.epoch] = (run_dir / rundir.CHECKPOINT).stat().st_size
            logs[state.epoch] = (run_dir / rundir.EPOCHS).read_bytes()
            assert not (run_dir / rundir.METRICS).exists()  # written once, at the end

    cfg = _tiny(small_cfg, epochs=40, num_unlabeled=0)
    train(cfg, run_dir, quiet=True, callbacks=[Size()])
    # only integers change (epoch, step, where each log ends): no per-step or per-epoch values inside
    assert abs(sizes[40] - sizes[2]) <= 256 and sizes[40] <= 1.2 * sizes[2], (sizes[2], sizes[40])
    assert len(np.load(run_dir / rundir.STEPS)) == 80
    # each epoch end adds one line to what was there: nothing is rewritten
    assert all(logs[e + 1].startswith(logs[e]) and logs[e + 1].count(b"\n") == e + 1 for e in range(1, 40))
    finished = json.loads((run_dir / rundir.METRICS).read_text())
    assert finished == {"epoch": epochlog.fold(epochlog.read(run_dir / rundir.EPOCHS))}
    assert finished["epoch"]["epoch"] == list(range(1, 41))


def _to_old_layout(run_dir, fmt):
    """What an earlier version left. Format 3: steps.npy, the per-epoch lists in metrics.json (rewritten
    every epoch), where each list ends in the checkpoint. Format 2: per-step lists in metrics.json and
    the checkpoint too, no steps.npy."""
    metrics = run_metrics(run_dir)
    ckpt = torch.load(run_dir / rundir.CHECKPOINT, weights_only=True)
    del ckpt["epoch_records"]
    if fmt == rundir.EPOCH_LISTS_FORMAT:
        metrics = {"epoch": metrics["epoch"]}
        ckpt.update(format=fmt, epoch_log_ends={key: len(v) for key, v in metrics["epoch"].items()})
    else:
        ckpt.update(format=fmt, history=metrics)
        (run_dir / rundir.STEPS).unlink()
    torch.save(ckpt, run_dir / rundir.CHECKPOINT)
    (run_dir / rundir.METRICS).write_text(json.dumps(metrics))
    (run_dir / rundir.EPOCHS).unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", [rundir.EPOCH_LISTS_FORMAT, rundir.OLD_CHECKPOINT_FORMAT])
def test_an_old_layout_run_is_read_and_resumed(small_cfg, tmp_path, fmt):
    cfg = _tiny(small_cfg, epochs=2)
    train(cfg, tmp_path / "full", quiet=True)
    train(replace(cfg, epochs=1), tmp_path / "part", quiet=True)
    (tmp_path / "part" / rundir.SUMMARY).unlink()  # the 1-epoch run made an unfinished 2-epoch run
    (tmp_path / "part" / rundir.CONFIG).write_text((tmp_path / "full" / rundir.CONFIG).read_text())
    _to_old_layout(tmp_path / "part", fmt)
    old = rundir.read_metrics(tmp_path / "part")
    assert len(old["iteration"]["loss_total"]) == 2 and old["epoch"]["epoch"] == [1]
    train(cfg, tmp_path / "part", resume=True, quiet=True)
    a, b = (run_metrics(tmp_path / d) for d in ("full", "part"))
    assert a["iteration"] == b["iteration"]  # NaN as None
    assert [r["epoch"] for r in epochlog.read(tmp_path / "part" / rundir.EPOCHS)] == [1, 2]  # now in this layout
    assert {k: v for k, v in a["epoch"].items() if "seconds" not in k and k != "images_per_sec"} == \
        {k: v for k, v in b["epoch"].items() if "seconds" not in k and k != "images_per_sec"}
    full, part = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_a_damaged_history_is_one_line_on_resume(small_cfg, tmp_path):
    train(_tiny(small_cfg, epochs=1), tmp_path / "r", quiet=True)
    (tmp_path / "r" / rundir.EPOCHS).write_text("")
    with pytest.raises(RunDirError, match="epochs.jsonl holds 0 epochs but the checkpoint is at epoch 1"):
        rundir.resume_point(tmp_path / "r", torch.device("cpu"))
    (tmp_path / "r" / rundir.EPOCHS).unlink()
    with pytest.raises(RunDirError, match="epochs.jsonl cannot be read"):
        rundir.resume_point(tmp_path / "r", torch.device("cpu"))
    _to_old_layout(tmp_path / "r", rundir.EPOCH_LISTS_FORMAT)
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
    assert abs(early["epoch_log_bytes_appended"] - late["epoch_log_bytes_appended"]) <= 16  # one line, its digits
    assert late["file_bytes"][rundir.EPOCHS] > 60 * early["file_bytes"][rundir.EPOCHS]  # the log holds 64 epochs
    assert late["file_bytes"][rundir.STEPS] == steplog.HEADER_BYTES + 64 * 1024 * steplog.DTYPE.itemsize
    assert abs(late["file_bytes"][rundir.CHECKPOINT] - early["file_bytes"][rundir.CHECKPOINT]) <= 256
    with pytest.raises(ValueError, match="--steps 1000: must be a positive multiple of the 1024"):
        run_history_bench([1000], tmp_path / "h.json")
