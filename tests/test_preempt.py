"""One command line for a scheduler: ``train --resume auto`` starts or continues the run; SIGTERM
(and SIGUSR1) save a checkpoint at the current step and exit with the "requeue me" status; the same
command then finishes with the numbers of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import run_metrics
from ssl_lib.cli import main
from ssl_lib.config import make_config
from ssl_lib.engine import rundir, steplog
from ssl_lib.engine.preempt import EXIT_REQUEUE
from ssl_lib.engine.train import train

#: 3 epochs of 20 steps on a tiny model: long enough to be stopped in the middle of an epoch.
TINY = {"dataset": "synthetic", "synthetic_train": 64, "synthetic_test": 16, "image_size": 8, "num_unlabeled": 32,
        "batch_size": 8, "unlabeled_batch_size": 8, "eval_batch_size": 16, "epochs": 3, "max_iters_per_epoch": 20,
        "eval_every": 20, "log_every": 1, "kmeans_n_init": 1, "schedule": "cosine", "ema_decay": 0.9}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
TIMINGS = ("seconds", "train_seconds", "kmeans_seconds", "images_per_sec")


def _without_timings(epoch_record: dict) -> dict:
    return {k: v for k, v in epoch_record.items() if k not in TIMINGS}


@pytest.fixture
def one_thread():
    """This process at the subprocess's thread count (ENV), so that their numbers can be compared
    whatever OMP_NUM_THREADS the suite runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_a_signal_mid_epoch_saves_and_requeues_and_the_same_command_finishes_identically(tmp_path, sig, one_thread):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl_lib", "train", "--config", str(config), "--out", str(run), "--quiet",
           "--resume", "auto"]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / rundir.STEPS).is_file() and steplog.rows_on_disk(run / rundir.STEPS) >= 25):
        time.sleep(0.01)
    job.send_signal(sig)  # in epoch 2 of 3
    _, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_REQUEUE, err[-2000:]
    ckpt = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    assert 25 <= ckpt["step"] < 60 and ckpt["step"] % 20, ckpt["step"]  # mid-epoch, where it stopped
    assert f"stopped by {sig.name} at step {ckpt['step']} of 60, checkpoint saved" in err
    assert not (run / rundir.SUMMARY).exists()

    assert main(cmd[3:]) == 0  # the same command (in this process: one interpreter start less)
    reference = train(make_config(TINY), tmp_path / "reference", quiet=True)
    assert (run / rundir.STEPS).read_bytes() == (tmp_path / "reference" / rundir.STEPS).read_bytes()
    a, b = run_metrics(run), run_metrics(tmp_path / "reference")
    assert _without_timings(a["epoch"]) == _without_timings(b["epoch"])
    ma, mb = (torch.load(d / rundir.MODEL, weights_only=True) for d in (run, tmp_path / "reference"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert rundir.read_summary(run)["final_acc"] == reference["final_acc"]


def test_resume_auto_starts_continues_or_returns_and_plain_resume_still_refuses_a_typo(small_cfg, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "epochs": 1, "max_iters_per_epoch": 2, "eval_every": 2}))
    args = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main([*args, "--resume", "auto"]) == 0  # nothing there: start
    mtime = (tmp_path / "run" / rundir.MODEL).stat().st_mtime_ns
    assert main([*args, "--resume", "auto"]) == 0  # finished: nothing to do
    assert (tmp_path / "run" / rundir.MODEL).stat().st_mtime_ns == mtime
    assert len(np.load(tmp_path / "run" / rundir.STEPS)) == 2
