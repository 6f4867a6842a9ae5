"""One run on several processes (torchrun, gloo on the CPU): the same numbers as one process, one run
directory, identical replicas, a resume onto another process count, a dead process, bad input.

Tolerances: the processes add up BatchNorm statistics, gradients and evaluation sums in another order
than one process does, so values agree to float rounding, which training then amplifies a little
each step. On the configs below one process at 1 and at 2 threads (another reduction order) differ
by the same amounts: losses by < 1e-5, weights by < 1e-4.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from ssl_lib import distributed as d
from ssl_lib.config import ConfigError, make_config
from ssl_lib.engine.train import check_split, train
from conftest import run_metrics

LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4
BASE = {"dataset": "synthetic", "synthetic_test": 60, "kmeans_n_init": 1, "log_every": 4, "eval_batch_size": 48}
CONFIGS = {
    # the writeup's CNN with Adam: 3 epochs of 8 steps, a k-means refit at each
    "simple_cnn": {**BASE, "synthetic_train": 200, "image_size": 16, "num_unlabeled": 120, "batch_size": 8,
                   "unlabeled_batch_size": 16, "epochs": 3, "max_iters_per_epoch": 8},
    # the protocol's WRN-28-2 (BatchNorm synchronised over the processes), RandAugment, SGD, EMA. A
    # small learning rate: at 0.03 on batches this small, one process at 1 and at 2 threads already
    # part ways after a few steps (the float noise of any reduction order grows ~10x a step).
    "wrn28_2": {**BASE, "synthetic_train": 96, "synthetic_test": 24, "image_size": 8, "crop_padding": 1,
                "model": "wrn28_2", "strong_view": "randaugment", "num_labeled": 16,
                "unlabeled_includes_labeled": True, "batch_size": 4, "unlabeled_batch_size": 12, "w_augment": 1.0,
                "w_kmeans": 4.0, "optimizer": "sgd", "lr": 1e-4, "momentum": 0.0, "ema_decay": 0.9,
                "bn_momentum": 0.1, "epochs": 2, "max_iters_per_epoch": 3},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def torchrun(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssl_lib", "train", *map(str, args)]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300, **kw)


def _config_file(tmp_path, values, name="c"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _iteration(run_dir):
    it = run_metrics(run_dir)["iteration"]
    return {k: np.array([np.nan if v is None else v for v in it[k]], dtype=float) for k in it}


def _max_differences(a, b):
    ia, ib = _iteration(a), _iteration(b)
    losses = max(float(np.nanmax(np.abs(ia[k] - ib[k]))) for k in ("loss_sup", "loss_aug", "loss_kmeans", "loss_total"))
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    weights = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    return losses, weights


def test_two_processes_compute_what_one_does_and_the_scaling_measurement_reads_their_rates(tmp_path):
    """The protocol's WRN on one process and, through the front end (train --nproc-per-node), on two:
    the runs gpu-check's scaling measurement makes (tools/scaling.py). The writeup's CNN on two
    processes is compared with one process by the dead-process test below (its resumed run), and bare
    torchrun starts the other tests' runs."""
    from ssl_lib.tools.scaling import measure_scaling

    cfg = make_config(CONFIGS["wrn28_2"])
    env = {**ENV, "SSL_LIB_CHECK_REPLICAS": "1"}  # every step: the processes' models bit-identical
    scaling = measure_scaling(cfg, 2, tmp_path, env=env, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "config.yaml"]  # one run directory each
    one, two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("1", "2"))
    assert (one["processes"], two["processes"]) == (1, 2) and one["config_digest"] == two["config_digest"]
    assert len(_iteration(tmp_path / "2")["loss_total"]) == cfg.epochs * cfg.max_iters_per_epoch
    losses, weights = _max_differences(tmp_path / "1", tmp_path / "2")
    assert losses < LOSS_TOL and weights < WEIGHT_TOL, (losses, weights)
    e1, e2 = (run_metrics(tmp_path / r)["epoch"] for r in ("1", "2"))
    # the rates: the second epoch's steps over its training seconds (the first is the warm-up), by hand
    rate1, rate2 = (3 / e["train_seconds"][1] for e in (e1, e2))
    assert scaling["one"]["steps"] == scaling["all"]["steps"] == 3 and scaling["one"]["epochs_counted"] == 1
    assert scaling["one"]["steps_per_s"] == pytest.approx(rate1) and scaling["all"]["steps_per_s"] == pytest.approx(rate2)
    assert scaling["speedup"] == pytest.approx(rate2 / rate1) and scaling["efficiency"] == pytest.approx(rate2 / rate1 / 2)
    assert scaling["all"]["images_per_s"] == pytest.approx(e2["images_per_sec"][1])
    assert np.allclose(e1["test_acc"], e2["test_acc"]) and np.allclose(e1["kmeans_inertia"], e2["kmeans_inertia"], rtol=1e-4)
    assert np.allclose(e1["grad_share_kmeans"], e2["grad_share_kmeans"], rtol=1e-3)


def test_a_dead_process_stops_the_other_in_one_line_and_the_run_resumes_on_one(tmp_path):
    values = {**CONFIGS["simple_cnn"], "epochs": 20, "max_iters_per_epoch": 2, "lr": 2e-4}  # 40 steps, 20 checkpoints
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssl_lib", "train", "--config", str(_config_file(tmp_path, values)), "--out", str(run), "--quiet"]
    launcher = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (run / "checkpoint.pt").exists(), launcher.communicate()[1][-2000:]
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    t0 = time.time()
    _, err = launcher.communicate(timeout=60)  # no hang: torchrun ends the other process
    assert launcher.returncode != 0 and time.time() - t0 < 60
    assert sum("another process of this run ended" in line for line in err.splitlines()) == 1
    assert not (run / "summary.json").exists() and (run / "checkpoint.pt").exists()

    # resume the 2-process run on 1 process: the numbers of an uninterrupted one-process run
    resumed = train(make_config(values), run, resume=True, quiet=True)
    reference = train(make_config(values), tmp_path / "one", quiet=True)
    assert resumed["epochs"] == reference["epochs"] == 20
    losses, weights = _max_differences(run, tmp_path / "one")
    assert losses < LOSS_TOL and weights < WEIGHT_TOL, (losses, weights)


#: Makes process 1 raise at its 12th step (a bug, an out-of-memory error): loaded by every Python of
#: the run through PYTHONPATH; only the worker whose RANK is 1 acts on it.
FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from ssl_lib.method.step import Trainer
    real, calls = Trainer.step, []
    def step(self, *args):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("injected failure")
        return real(self, *args)
    Trainer.step = step
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_an_error_on_one_process_ends_the_run_in_seconds_with_one_line_naming_it(tmp_path, rank):
    values = {**CONFIGS["simple_cnn"], "epochs": 50, "max_iters_per_epoch": 2}
    run, env = tmp_path / "run", dict(ENV)
    if rank == 1:
        (tmp_path / "inject").mkdir()
        (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
        env["PYTHONPATH"] = f"{tmp_path / 'inject'}:{ENV['PYTHONPATH']}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssl_lib", "train", "--config", str(_config_file(tmp_path, values)), "--out", str(run), "--quiet"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    t0 = time.time()
    if rank == 0:  # process 0's run directory becomes unwritable: its next step-log append fails
        run.rename(tmp_path / "moved")
        run.write_text("")
    _, err = launcher.communicate(timeout=90)
    assert launcher.returncode != 0 and time.time() - t0 < 60, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    # rank 0: the first write into the moved run directory fails, the step log's append (its path is
    # now a file) or the live curves' event file (its folder is gone), whichever comes first
    expected = {0: ("error: process 0 failed: NotADirectoryError: [Errno 20] Not a directory",
                    "error: process 0 failed: FileNotFoundError: [Errno 2] No such file or directory"),
                1: ("error: process 1 failed: RuntimeError: injected failure",)}[rank]
    assert len(ours) == 1 and ours[0].startswith(expected), err[-3000:]


def test_a_batch_that_does_not_split_is_one_line_from_process_0_and_no_run_directory(tmp_path, capsys):
    path = _config_file(tmp_path, {**CONFIGS["simple_cnn"], "unlabeled_batch_size": 15})
    expected = "error: config field 'unlabeled_batch_size' (15) must be a multiple of the 2 processes"
    result = torchrun("--config", path, "--out", tmp_path / "run")
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(expected), result.stderr[-2000:]
    assert "exitcode  : 2" in result.stderr and not (tmp_path / "run").exists()
    # the front end checks before any process starts: one line, exit 2, nothing else
    from ssl_lib.cli import main

    assert main(["train", "--nproc-per-node", "2", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(expected) and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ without processes

def test_the_global_batch_is_split_in_equal_shares():
    batches = torch.arange(24).view(2, 12)
    shares = [d.shard_columns(batches, d.Dist(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(shares, 1), batches) and shares[1].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
    assert d.shard_columns(batches, d.SINGLE) is batches
    # [labeled 2 | weak 3 | strong 3] of process 1 of 2 are rows 2-3, 7-9 and 13-15 of the global batch
    assert d.global_rows((2, 3, 3), d.Dist(1, 2)).tolist() == [2, 3, 7, 8, 9, 13, 14, 15]
    assert [d.slices(10, d.Dist(r, 3)) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ConfigError, match=r"'batch_size' \(64\) must be a multiple of the 3 processes"):
        check_split(make_config({}), d.Dist(0, 3))
    check_split(make_config({}), d.Dist(0, 4))


def test_the_views_of_the_shares_are_the_views_of_the_global_batch():
    from ssl_lib.augment.augmenter import Augmenter, Normalize, randaugment

    aug, norm = Augmenter(strong=randaugment(8)), Normalize((0.5,) * 3, (0.25,) * 3)
    labeled, unlabeled = (torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8) for n in (4, 6))
    torch.manual_seed(0)
    whole = aug.batch(torch.cat([labeled, unlabeled, unlabeled]), 0, 6, norm)  # weak views, then the strong ones
    for rank in range(2):
        lab, unl = labeled[2 * rank:2 * rank + 2], unlabeled[3 * rank:3 * rank + 3]
        torch.manual_seed(0)
        rows = d.global_rows((2, 3, 3), d.Dist(rank, 2))
        share = aug.batch(torch.cat([lab, unl, unl]), 0, 3, norm, rows=rows, world=2)
        assert torch.equal(share, whole[rows])


def test_combined_rows_are_the_one_process_values():
    # columns (loss, mask rate, pseudo acc, masked pseudo acc) of one step on two processes of n images each
    gathered = torch.tensor([[[1.0, 0.50, 0.25, 1.0]], [[3.0, 0.25, 0.75, 0.0]]])
    out = d.combine_rows(gathered, mask_column=1, masked_column=3)
    # masked in: 0.5n + 0.25n images, 0.5n + 0 of them correct
    assert out[0].tolist() == pytest.approx([2.0, 0.375, 0.5, 0.5 / 0.75])
    none_in_one = torch.tensor([[[1.0, 0.5, 0.5, 0.8]], [[1.0, 0.0, 0.5, float("nan")]]])
    assert d.combine_rows(none_in_one, 1, 3)[0, 3] == pytest.approx(0.8)
    none_at_all = torch.tensor([[[1.0, 0.0, 0.5, float("nan")]], [[1.0, 0.0, 0.5, float("nan")]]])
    assert torch.isnan(d.combine_rows(none_at_all, 1, 3)[0, 3])


# ------------------------------------------------------------------------ SLURM, devices, modes

#: What SLURM 22.05 sets in the tasks of `srun -n 4` over 2 nodes (2 tasks each), seen from task 3
#: (the names and formats as the loopback SLURM of tests/test_slurm.py printed them).
SRUN_TASK_3 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
               "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}


def test_srun_tasks_are_ranks_with_a_rendezvous_on_the_first_node():
    assert d.from_env(SRUN_TASK_3) == d.Dist(3, 4, 1, 2, f"gpu07:{10000 + 4242}")
    # MASTER_ADDR and MASTER_PORT override; torchrun's variables (srun starting torchrun) come first
    assert d.from_env({**SRUN_TASK_3, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29500"}).address == "10.1.1.1:29500"
    torchrun = {**SRUN_TASK_3, "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert d.from_env(torchrun) == d.Dist(9, 16, 1, 8, None)
    # one process: no SLURM, a step of one task, the batch script (SLURM_PROCID 0, no step)
    assert d.from_env({}) is d.SINGLE
    assert d.from_env({**SRUN_TASK_3, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is d.SINGLE
    batch = {k: v for k, v in SRUN_TASK_3.items() if "STEP" not in k and "LAUNCH" not in k} | {"SLURM_PROCID": "0"}
    assert d.from_env(batch) is d.SINGLE
    # ... which a run refuses: it would train on one process while the job holds four
    with pytest.raises(ConfigError, match=r"^SLURM_NTASKS=4 but this process is the job's batch script.*srun python"):
        d.check_slurm_start(batch)
    d.check_slurm_start(SRUN_TASK_3)
    d.check_slurm_start({**batch, "SLURM_NTASKS": "1"})
    with pytest.raises(ConfigError, match=r"^SLURM_LOCALID=None: cannot place this srun task.*sbatch"):
        d.from_env({k: v for k, v in SRUN_TASK_3.items() if k != "SLURM_LOCALID"})


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("node1,node2", "node1"), ("r[1-2]-n[03-04]", "r1-n03"), ("a[5,1]", "a5"),
    ("localhost", "localhost"), ("", "")])
def test_the_first_host_of_a_slurm_host_list(nodelist, first):
    assert d.first_host(nodelist) == first


def test_tasks_per_node_reads_slurms_notation():
    assert [d.tasks_per_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, 0]
    assert d.tasks_per_node("4", 0) == 4 and d.tasks_per_node("", 0) == 0 and d.tasks_per_node("x", 0) == 0


def test_each_process_takes_its_own_gpu_or_is_refused():
    cuda = torch.device("cuda")
    # all GPUs visible to every process: local rank i on GPU i; one GPU each (CUDA_VISIBLE_DEVICES per task): GPU 0
    assert d.local_device(d.Dist(3, 4, 1, 2), cuda, gpus=2) == torch.device("cuda", 1)
    assert d.local_device(d.Dist(5, 8, 3, 4), cuda, gpus=1) == torch.device("cuda", 0)
    assert d.local_device(d.Dist(1, 2, 1, 2), torch.device("cpu"), gpus=0) == torch.device("cpu")
    assert d.local_device(d.SINGLE, torch.device("cuda", 1), gpus=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^config field 'device' is 'cuda:0' but the run has 2 processes"):
        d.local_device(d.Dist(1, 2, 1, 2), torch.device("cuda", 0), gpus=2)
    with pytest.raises(ConfigError, match=r"^4 processes on this machine but it has 2 GPUs"):
        d.local_device(d.Dist(0, 4, 0, 4), cuda, gpus=2)
    # one GPU seen by each of several processes: theirs, or a shared one, which the GPU ids tell once joined
    d.check_own_gpus(["GPU-a", "GPU-b", "GPU-c"])
    with pytest.raises(ConfigError, match=r"^processes 0 and 2 are on the same GPU \(GPU-a\)"):
        d.check_own_gpus(["GPU-a", "GPU-b", "GPU-a"])


def test_ddp_modes_that_would_be_wrong_are_refused():
    from ssl_lib.engine.train import check_processes

    with pytest.raises(ConfigError, match=r"^config field 'sync_bn' is false but the run has 2 processes"):
        check_processes(make_config({"sync_bn": False}), d.Dist(0, 2))
    with pytest.raises(ConfigError, match=r"^config field 'compile' is true but the run has 2 processes"):
        check_processes(make_config({"compile": True}), d.Dist(1, 2))
    check_processes(make_config({"sync_bn": False, "compile": True}), d.SINGLE)  # one process: both fine
    check_processes(make_config({}), d.Dist(0, 2))


@pytest.mark.parametrize("env, overrides, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, [],
     "error: SLURM_NTASKS=2 but this process is the job's batch script"),
    ({}, ["--set", "sync_bn=false"], "error: config field 'sync_bn' is false but the run has 2 processes"),
    ({}, ["--set", "compile=true"], "error: config field 'compile' is true but the run has 2 processes"),
])
def test_refused_starts_are_one_line_exit_2_and_no_run_directory(tmp_path, monkeypatch, capsys, env, overrides,
                                                                 expected):
    from ssl_lib.cli import main

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    path = _config_file(tmp_path, CONFIGS["simple_cnn"])
    nproc = [] if env else ["--nproc-per-node", "2"]  # the front end, before it starts any process
    assert main(["train", *nproc, "--config", str(path), *overrides, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
