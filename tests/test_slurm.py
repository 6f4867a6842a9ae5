"""EXECUTOR=slurm and srun on a real SLURM: a single-node cluster on loopback (.ci/slurm-loopback:
Debian's slurmctld, slurmd and munge, started here, or by .ci/run which passes its slurm.conf in
SSL_LIB_TEST_SLURM_CONF). A run trained as a SLURM job gives the metrics.json of the same run trained
in this process at the same threads, also when its job is preempted mid-run (submitit's signal, then
a requeue that resumes the run from its checkpoint); the docs' sbatch script trains one run on two
srun ranks. The two cluster tests are slow for their size: each job is a fresh Python that imports
torch (timed only on a heavily loaded machine: see docs/scale-out.md). The SLURM settings' checks
need no cluster."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ssl_lib.config import make_config
from ssl_lib.errors import BadInput
from ssl_lib.experiments import executor as E
from ssl_lib.experiments import slurm as S
from ssl_lib.experiments.protocol import resolve_protocol

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """The loopback SLURM's slurm.conf, in SLURM_CONF for the module (sbatch, squeue, scontrol)."""
    conf = os.environ.get("SSL_LIB_TEST_SLURM_CONF")
    started = None
    if not conf:
        if not (shutil.which("slurmctld") and shutil.which("munged")) or os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                pytest.fail("CI: no SLURM (SSL_LIB_TEST_SLURM_CONF unset, and no slurmctld/munged to run as root)")
            pytest.skip("no SLURM here: .ci/run starts one (needs root and Debian's slurm-wlm, munge)")
        started = tmp_path_factory.mktemp("slurm")
        out = subprocess.run([str(ROOT / ".ci" / "slurm-loopback"), "start", str(started)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        conf = out.stdout.strip()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", conf)
            mp.setenv("PYTHONPATH", str(ROOT))  # the jobs (sbatch exports this environment) import this checkout
            yield conf
    finally:
        if started:
            subprocess.run([str(ROOT / ".ci" / "slurm-loopback"), "stop", str(started)], timeout=60)


def _jobs(root: Path) -> list[E.Job]:
    """The protocol's smoke run (WRN, EMA, k-means) made 5 epochs long, to preempt mid-run. One job
    only: each costs a fresh Python that imports torch (docs/scale-out.md has the whole smoke grid)."""
    from ssl_lib import experiments as ex

    short = resolve_protocol("fixmatch-kmeans-40", "smoke", 0, {})
    long = make_config(short.to_dict(), {"name": "long", "epochs": 5})
    return [E.Job(long, ex.run_dir_for(long, root))]


def _numbers(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {section: {k: v for k, v in cols.items() if "seconds" not in k and k != "images_per_sec"}
            for section, cols in metrics.items()}


def test_slurm_jobs_give_the_numbers_of_one_slot_even_when_preempted(tmp_path, slurm_conf, caplog):
    pytest.importorskip("submitit")  # (configures its logger: quieted after)
    caplog.set_level(logging.ERROR, logger="submitit")  # no accounting here: sacct fails, which submitit warns of
    root = tmp_path / "slurm"
    jobs = _jobs(root)
    long, signalled, errors = jobs[-1].run_dir, [], []

    def preempt():  # once the long run has its first checkpoint: the signal SLURM sends before it preempts
        deadline = time.monotonic() + 600
        while not (long / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        job_id = _job_of(root, long.name)
        signalled.append((job_id, (long / "checkpoint.pt").exists() and not (long / "summary.json").exists()))
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    def submit():
        try:
            E.run_jobs(jobs, E.Settings("slurm", threads=THREADS))
        except BaseException as err:  # noqa: BLE001  (raised again below, in the test's thread)
            errors.append(err)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    driver = threading.Thread(target=submit)
    driver.start()
    # the reference, trained in this process while SLURM schedules, preempts and requeues the job
    reference = tmp_path / "reference"
    E.run_jobs(_jobs(reference), E.Settings("local", slots=1, threads=THREADS))
    driver.join(timeout=600)
    assert not driver.is_alive() and not errors, errors
    thread.join(timeout=10)
    assert signalled and signalled[0][1], "the job was not preempted between its first checkpoint and its end"
    for job in jobs:
        assert _numbers(job.run_dir) == _numbers(reference / job.run_dir.name), job.run_dir.name
    log = next((root / ".executor" / "slurm").glob(f"*/{signalled[0][0]}_*log.err"))
    assert "this job is preempted" in log.read_text()  # submitit caught it, checkpointed and requeued


def _job_of(root: Path, name: str) -> str:
    """The SLURM id (array_task) of the job that trains run ``name``: its submission pickle names it."""
    for submitted in (root / ".executor" / "slurm").glob("*/*_submitted.pkl"):
        if name.encode() in submitted.read_bytes():
            return submitted.name.removesuffix("_submitted.pkl")
    raise AssertionError(f"no SLURM job trains {name}")


# ------------------------------------------------------------------------------ settings, no cluster

def test_slurm_settings_come_from_the_variables_over_the_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"partition": "gpu", "account": "lab", "time_min": 240, "gpus_per_run": 2,
                                    "setup": ["module load cuda", "source /shared/venv/bin/activate"]}))
    s = S.slurm_settings({"SSL_LIB_SLURM_CONFIG": str(path), "SSL_LIB_SLURM_TIME_MIN": "30", "SSL_LIB_SLURM_MEM_GB": "16"})
    assert s == S.SlurmSettings("gpu", "lab", 30, 2, 16, ("module load cuda", "source /shared/venv/bin/activate"))
    assert S.slurm_settings({}) == S.SlurmSettings()
    params = S.job_parameters(s, gpus=2, threads=4, slots=3, name="ssl_lib-smoke")
    assert params == {"name": "ssl_lib-smoke", "timeout_min": 30, "cpus_per_task": 4, "tasks_per_node": 1, "nodes": 1,
                      "gpus_per_node": 2, "slurm_partition": "gpu", "slurm_account": "lab", "mem_gb": 16,
                      "slurm_array_parallelism": 3,
                      "slurm_setup": ["export OMP_NUM_THREADS=4", "export MKL_NUM_THREADS=4",
                                      "export OPENBLAS_NUM_THREADS=4", "module load cuda",
                                      "source /shared/venv/bin/activate"]}
    assert "gpus_per_node" not in S.job_parameters(S.SlurmSettings(), gpus=0, threads=1, slots=None, name="x")


def test_a_runs_gpus_come_from_its_device():
    default, two = S.SlurmSettings(), S.SlurmSettings(gpus_per_run=2)
    got = {d: (S.gpus_per_run(make_config({"device": d}), default), S.gpus_per_run(make_config({"device": d}), two))
           for d in ("cuda", "cuda:1", "auto", "cpu", "mps")}
    assert got == {"cuda": (1, 2), "cuda:1": (1, 2), "auto": (0, 2), "cpu": (0, 0), "mps": (0, 0)}


@pytest.mark.parametrize("env, file, message", [
    ({"SSL_LIB_SLURM_TIME_MIN": "0"}, None, "SLURM_TIME_MIN=0 (SSL_LIB_SLURM_TIME_MIN): must be an integer >= 1"),
    ({"SSL_LIB_SLURM_GPUS_PER_RUN": "one"}, None, "SLURM_GPUS_PER_RUN=one (SSL_LIB_SLURM_GPUS_PER_RUN): must be"),
    ({}, {"partition": "gpu", "time": 10}, "unknown key 'time' (known: partition, account, time_min"),
    ({}, {"setup": "module load cuda"}, "'setup'=module load cuda: must be a list of shell lines"),
    ({}, "- a list", "must be a mapping of partition"),
])
def test_bad_slurm_settings_are_one_line_before_anything_runs(tmp_path, env, file, message):
    if file is not None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(file) if isinstance(file, dict) else file)
        env = {**env, "SSL_LIB_SLURM_CONFIG": str(tmp_path / "c.yaml")}
    with pytest.raises(BadInput) as err:
        E.settings_from_env({"SSL_LIB_EXECUTOR": "slurm", **env})
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    with pytest.raises(BadInput, match=r"SLURM_CONFIG=.*nowhere.yaml: No such file"):
        S.slurm_settings({"SSL_LIB_SLURM_CONFIG": str(tmp_path / "nowhere.yaml")})


# ------------------------------------------------------------------------------ srun: one run, 2 ranks

def test_the_docs_sbatch_script_trains_one_run_on_two_srun_tasks(tmp_path, slurm_conf):
    """docs/slurm/train-ddp.sbatch as it is, on this one CPU node: 2 tasks instead of 4 per node, no
    GPU, a small config; the two srun tasks are ranks 0 and 1 of one run, whose numbers are the
    one-process run's within the tolerances of tests/test_distributed.py."""
    from test_distributed import CONFIGS, LOSS_TOL, WEIGHT_TOL, _max_differences

    from ssl_lib.engine.train import train

    values = {**CONFIGS["simple_cnn"], "epochs": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    job = _sbatch(["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                   "--time=10", f"--output={tmp_path}/job.out", str(ROOT / "docs" / "slurm" / "train-ddp.sbatch"),
                   "--config", str(tmp_path / "c.yaml"), "--set", "device=cpu", "--out", str(tmp_path / "two"),
                   "--quiet"], env)
    train(make_config({**values, "device": "cpu"}), tmp_path / "one", quiet=True)  # meanwhile, one process
    state = _wait_for(job, env)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED 0:0", state + "\n" + out[-3000:]
    assert out.count("2 processes") == 1  # rank 0 alone prints
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    losses, weights = _max_differences(tmp_path / "one", tmp_path / "two")
    assert losses < LOSS_TOL and weights < WEIGHT_TOL, (losses, weights)


def _sbatch(args: list[str], env: dict) -> str:
    """Submit a batch job; its id."""
    sub = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def _wait_for(job_id: str, env: dict, timeout: float = 300) -> str:
    """Wait for a batch job's end: "<JobState> <ExitCode>". (``sbatch --wait`` polls with a growing
    interval: a 9-second job took it 42 s.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                               timeout=30).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return f"{fields['JobState']} {fields.get('ExitCode')}"
        time.sleep(0.25)
    raise AssertionError(f"SLURM job {job_id} did not end within {timeout} s")
