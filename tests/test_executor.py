"""Many runs at once (ssl_lib/experiments/executor.py): the same numbers in this process, in SLOTS=2
worker processes and as Ray tasks on a local 2-CPU instance (on loopback), also when a Ray worker is
killed mid-run; and bad settings, an unreachable RAY_ADDRESS, a node that does not share the runs
root, each as one clear line. CPU only; one Ray instance for the module."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ssl_lib import experiments as ex
from ssl_lib.config import make_config
from ssl_lib.errors import BadInput
from ssl_lib.experiments import executor as E
from ssl_lib.experiments.protocol import resolve_protocol
from conftest import run_metrics

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # the threads per run of every executor here: the numbers depend on it, not on the executor


def _configs() -> list:
    """Smoke runs that cover the method's paths: the protocol's WRN with EMA (on other data), and
    FixMatch + k-means with label noise made 4 epochs long, the run to kill."""
    noisy = ex.resolve("exp3-noise0.4", "smoke", {})
    return [resolve_protocol("fixmatch-kmeans-40", "smoke", 0, {}),
            make_config(noisy.to_dict(), {"name": "long", "epochs": 4})]


def _jobs(root: Path) -> list[E.Job]:
    return [E.Job(cfg, ex.run_dir_for(cfg, root)) for cfg in _configs()]


def _numbers(run_dir: Path) -> dict:
    """metrics.json without its timings."""
    metrics = run_metrics(run_dir)
    return {section: {k: v for k, v in cols.items() if "seconds" not in k and k != "images_per_sec"}
            for section, cols in metrics.items()}


def _assert_same_numbers(root: Path, reference: Path) -> None:
    for job in _jobs(root):
        assert (job.run_dir / "summary.json").is_file(), job.run_dir
        assert _numbers(job.run_dir) == _numbers(reference / job.run_dir.name), job.run_dir.name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The runs trained as SLOTS=1 trains them: one after another in this process (sharing the data)."""
    root = tmp_path_factory.mktemp("reference")
    E.run_jobs(_jobs(root), E.Settings("local", slots=1, threads=THREADS))
    return root


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs, started the executor's way (loopback, no dashboard, no usage
    reporting); stopped after the module."""
    pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        for var in ("PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # connect_ray sets them: restored after
            mp.setenv(var, os.environ.get(var, ""))
        mp.setattr(E, "cores", lambda: 2)
        ray, started = E.connect_ray(E.Settings("ray"))
        assert started
        try:
            yield ray
        finally:
            ray.shutdown()


# ------------------------------------------------------------------------ same numbers everywhere

def _pool_worker() -> int | None:
    """A worker process of this test's SLOTS pool (spawned children of this process)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"spawn_main" in cmdline:
            return int(pid)
    return None


def _ray_worker() -> int | None:
    """The pid of this test's Ray worker that trains the long run (Ray titles it "ray::train <name>")."""
    name = _jobs(Path("."))[-1].run_dir.name
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
        except (OSError, ValueError):
            continue
        if title == f"ray::train {name}":
            return int(pid)
    return None


def _run_killing_a_worker(root: Path, settings: E.Settings, worker) -> None:
    """The jobs under ``settings``, with ``worker()`` killed (SIGKILL) once the long run has its first
    checkpoint and before it is finished."""
    jobs = _jobs(root)
    long, errors = jobs[-1].run_dir, []

    def driver():
        try:
            E.run_jobs(jobs, settings)
        except BaseException as err:  # noqa: BLE001  (raised again below, in the test's thread)
            errors.append(err)

    thread = threading.Thread(target=driver)
    thread.start()
    deadline = time.monotonic() + 120
    while not (long / "checkpoint.pt").exists() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    pid = worker()
    assert pid is not None and not (long / "summary.json").exists(), "the long run ended before it could be killed"
    os.kill(pid, signal.SIGKILL)  # mid-run: after its first checkpoint, before its summary
    thread.join(timeout=180)
    assert not thread.is_alive() and not errors, errors


def test_two_slots_give_the_numbers_of_one_even_with_a_worker_killed(tmp_path, reference):
    _run_killing_a_worker(tmp_path, E.Settings("local", slots=2, threads=THREADS), _pool_worker)
    _assert_same_numbers(tmp_path, reference)


def test_ray_stays_on_loopback(ray_instance):
    assert ray_instance.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_instance.cluster_resources()["CPU"] == 2


def test_ray_gives_the_numbers_of_one_slot_even_with_a_worker_killed(tmp_path, reference, ray_instance):
    _run_killing_a_worker(tmp_path, E.Settings("ray", threads=THREADS), _ray_worker)
    _assert_same_numbers(tmp_path, reference)
    assert not list((tmp_path / ".executor").iterdir())  # the driver's marker is gone


# ---------------------------------------------------------------------------- bad input, faults

@pytest.mark.parametrize("env, value, message", [
    ("SSL_LIB_SLOTS", "0", "SLOTS=0 (SSL_LIB_SLOTS): must be a positive integer"),
    ("SSL_LIB_SLOTS", "two", "SLOTS=two"),
    ("SSL_LIB_THREADS", "1.5", "THREADS=1.5 (SSL_LIB_THREADS): must be a positive integer"),
    ("SSL_LIB_EXECUTOR", "dask", "EXECUTOR=dask (SSL_LIB_EXECUTOR): must be one of local, ray, slurm"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, env, value, message):
    done = subprocess.run([sys.executable, "-m", "ssl_lib", "experiments", "train", "smoke", "exp1-m0",
                           "--runs", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, env: value, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert not (tmp_path / "runs").exists()


def test_settings_default_to_one_slot_in_this_process():
    s = E.settings_from_env({})
    assert s == E.Settings("local", None, None, None) and s.in_process
    s = E.settings_from_env({"SSL_LIB_EXECUTOR": "ray", "SSL_LIB_SLOTS": "3", "SSL_LIB_THREADS": "2",
                             "RAY_ADDRESS": "10.0.0.1:6379"})
    assert s == E.Settings("ray", 3, 2, "10.0.0.1:6379") and not s.in_process


def test_threads_divide_the_cores_between_the_slots(monkeypatch):
    monkeypatch.setattr(E, "cores", lambda: 8)
    assert E.threads_per_run(E.Settings("local", slots=3)) == 2
    assert E.threads_per_run(E.Settings("local", slots=16)) == 1
    assert E.threads_per_run(E.Settings("local", slots=3, threads=5)) == 5
    assert E.threads_per_run(E.Settings("ray")) == 1  # as many tasks as the cluster has CPUs
    assert E.threads_per_run(E.Settings("ray", slots=2)) == 4


@pytest.mark.parametrize("make_args", [["SLOTS=0"], ["THREADS=x"], ["SLOTS=1 2"], ["EXECUTOR=spark"]])
def test_make_reports_refuses_bad_settings_in_one_line(make_args):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "reports", "PROFILE=smoke", *make_args],
                          capture_output=True, text=True, timeout=60)
    name = make_args[0].split("=")[0]
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{make_args[0]}: must be" in done.stderr and name in done.stderr


def _make_exports(tmp_path, *args, gpu=False, env=None):
    """The SSL_LIB_SLOTS / SSL_LIB_THREADS that `make reports PROFILE=smoke ARGS` would give its
    commands (make's database, nothing run), on a machine with or without an NVIDIA GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"  # stands in for the driver's tool: the Makefile only asks it for -L
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n" if gpu else "#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSL_LIB_") and k not in ("MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "-pn", "-C", str(ROOT), "reports", "PROFILE=smoke", *args],
                          env={**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = dict(re.findall(r"^(SSL_LIB_SLOTS|SSL_LIB_THREADS) :?= (.*)$", done.stdout, re.M))
    return found.get("SSL_LIB_SLOTS"), found.get("SSL_LIB_THREADS")


def test_make_reports_on_a_cpu_trains_one_run_per_core_at_one_thread_unless_told(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cores = str(len(os.sched_getaffinity(0)))
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    assert _make_exports(tmp_path) == (nproc or cores, "1")
    assert _make_exports(tmp_path, gpu=True) == (None, None)  # a GPU machine keeps one run at a time
    assert _make_exports(tmp_path, "SLOTS=1") == ("1", None)  # given: the executor divides the cores
    assert _make_exports(tmp_path, "THREADS=2") == (None, "2")
    assert _make_exports(tmp_path, env={"SSL_LIB_THREADS": "2"}) == (None, "2")
    assert _make_exports(tmp_path, "EXECUTOR=ray") == (None, None)
    assert _make_exports(tmp_path, "EXECUTOR=local") == (nproc or cores, "1")


def test_more_slots_than_gpus_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "visible_gpus", lambda: ["0", "1"])
    jobs = _jobs(tmp_path)
    with pytest.raises(BadInput, match=r"SLOTS=3 \(SSL_LIB_SLOTS\): this machine has 2 GPU\(s\).*SLOTS <= 2"):
        E.run_jobs(jobs, E.Settings("local", slots=3))
    assert not any(j.run_dir.exists() for j in jobs)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # (and restored after the test)
    assert E.visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert E.visible_gpus() == ["0", "1"]


def test_unreachable_ray_address_is_one_line_exit_2_within_a_minute(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ssl_lib", "experiments", "train", "smoke", "exp1-m0",
                           "--runs", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "SSL_LIB_EXECUTOR": "ray", "RAY_ADDRESS": f"127.0.0.1:{port}",
                               "PYTHONPATH": str(ROOT)})
    assert time.monotonic() - t0 < 60
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: RAY_ADDRESS=127.0.0.1:{port}: nothing answers there")
    assert not list((tmp_path / "runs").rglob("config.yaml"))  # nothing trained


def test_a_node_that_does_not_see_the_runs_root_refuses_to_train(tmp_path):
    job = _jobs(tmp_path / "runs")[0]
    marker = tmp_path / "runs" / ".executor" / "abc"  # the driver's marker, absent on this "node"
    with pytest.raises(E.SharedStorageError, match=f"node {socket.gethostname()} does not see {marker}"):
        E.train_job(job, THREADS, (str(marker), "abc"))
    marker.parent.mkdir(parents=True)
    marker.write_text("another driver's token\n")
    with pytest.raises(E.SharedStorageError, match="must be storage every node of the Ray cluster sees"):
        E.train_job(job, THREADS, (str(marker), "abc"))
    assert not job.run_dir.exists()


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    good = _jobs(tmp_path)[0]  # the protocol's smoke run: under a second
    bad = make_config(good.cfg.to_dict(), {"dataset": "imagefolder", "data_root": str(tmp_path / "nowhere")})
    jobs = [E.Job(bad, ex.run_dir_for(bad, tmp_path)), good]
    with pytest.raises(BadInput, match="nowhere"):
        E.run_jobs(jobs, E.Settings("local", slots=1, threads=THREADS))
    assert (good.run_dir / "summary.json").is_file() and not jobs[0].run_dir.exists()


def test_runs_that_finished_elsewhere_are_not_lost_silently(tmp_path):
    jobs = _jobs(tmp_path)[:2]
    jobs[0].run_dir.mkdir(parents=True)
    (jobs[0].run_dir / "summary.json").write_text("{}")
    with pytest.raises(E.RunsFailed, match=f"1 run\\(s\\) finished on the cluster .* e.g. {jobs[1].run_dir}"):
        E.check_landed(jobs)
    E.check_landed(jobs[:1])


# ------------------------------------------------------------------------------------- tuning

@pytest.mark.parametrize("device, gpus, index, expected", [
    ("auto", ["0", "1", "2"], 1, "1"), ("cuda", ["4", "6"], 3, "6"), ("cpu", ["0", "1"], 1, None),
    ("auto", ["0"], 0, None)])
def test_tuning_worker_i_sees_only_gpu_i(monkeypatch, device, gpus, index, expected):
    from ssl_lib.tuning import study

    seen = {}
    monkeypatch.setattr(E, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(study, "work", lambda spec: seen.setdefault("gpu", os.environ.get("CUDA_VISIBLE_DEVICES")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: the worker sets it here
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    study._work_in_process(SimpleNamespace(base=SimpleNamespace(device=device)), index)
    assert seen["gpu"] == expected


# ---------------------------------------------------------------- local slots: GPUs, deaths, retries

def _fake_jobs(root: Path, names, device="cpu") -> list[E.Job]:
    """Jobs for the stand-ins of tests/executor_fakes.py (their run directories are never created)."""
    return [E.Job(make_config({"name": n, "device": device}), root / n) for n in names]


def _jobs_on(devices) -> list[E.Job]:
    return [E.Job(make_config({"device": d}), Path(f"r{i}")) for i, d in enumerate(devices)]


def test_gpu_pinning_is_per_slot_whatever_the_other_jobs(monkeypatch):
    # a device: cpu job does not unpin the GPU jobs, and cuda:N is a GPU job (both were missed: all
    # the runs went to cuda:0 of every worker, or the cuda:N runs were not pinned at all)
    assert E.slot_gpus(_jobs_on(["cpu", "auto", "cuda:1"]), ["3", "5"], 2) == ["3", "5"]
    assert E.slot_gpus(_jobs_on(["cuda:1", "cuda:0"]), ["0", "1", "2"], 3) == ["0", "1"]  # 2 jobs: 2 slots
    assert E.slot_gpus(_jobs_on(["cpu", "cpu"]), ["0", "1"], 2) == [None, None]
    assert E.slot_gpus(_jobs_on(["auto", "cuda"]), [], 2) == [None, None]  # a CPU machine
    with pytest.raises(BadInput, match=r"SLOTS=3 .* 2 GPU\(s\)"):
        E.slot_gpus(_jobs_on(["cpu", "cpu", "cuda:0"]), ["0", "1"], 3)
    # a cuda:N run trains on its slot's only GPU; the others on their config's device
    assert [E.slot_device(j.cfg, "5") for j in _jobs_on(["cuda:1", "cuda", "auto", "cpu"])] == ["cuda", None, None, None]
    assert E.slot_device(make_config({"device": "cuda:1"}), None) is None
    # what run_local gives the workers: the same, with a CPU job among GPU jobs
    seen = {}
    monkeypatch.setattr(E, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(E, "_run_slots", lambda jobs, gpus, threads, failures: seen.setdefault("gpus", gpus))
    E.run_jobs(_jobs_on(["cpu", "cuda:1", "auto"]), E.Settings("local", slots=2, threads=1))
    assert seen["gpus"] == ["0", "1"]


def test_a_dead_worker_costs_only_its_own_run(tmp_path, monkeypatch):
    from executor_fakes import one_dies_while_the_other_trains, starts

    monkeypatch.setattr(E, "train_job", one_dies_while_the_other_trains)
    monkeypatch.setattr(E, "RETRIES", 1)
    dies, trains = _fake_jobs(tmp_path, ["dies", "trains"])
    with pytest.raises(E.RunsFailed, match=f"^{dies.run_dir}: its worker process died 2 times"):
        E.run_jobs([dies, trains], E.Settings("local", slots=2, threads=1))
    assert starts(dies.run_dir) == 2  # its first start and its one retry
    # the other run was in flight in its own worker each time: it trained once, uninterrupted
    assert starts(trains.run_dir) == 1 and (tmp_path / "starts" / "trains.finished").exists()


def test_retries_are_counted_per_run(tmp_path, monkeypatch):
    from executor_fakes import dies_the_first_time, starts

    monkeypatch.setattr(E, "train_job", dies_the_first_time)
    monkeypatch.setattr(E, "RETRIES", 1)
    jobs = _fake_jobs(tmp_path, [f"run{i}" for i in range(6)])
    E.run_jobs(jobs, E.Settings("local", slots=2, threads=1))  # 6 deaths in all, one per run: each retried once
    assert [starts(j.run_dir) for j in jobs] == [2] * 6
    assert all((tmp_path / "starts" / f"{j.run_dir.name}.finished").exists() for j in jobs)


def test_runs_train_as_single_processes_under_a_distributed_driver(tmp_path, monkeypatch):
    # a driver started by torchrun or srun: its runs must not try to join a process group
    for var, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(var, value)
    job = _jobs(tmp_path)[0]  # the protocol's smoke run: under a second
    E.train_job(job, THREADS)
    assert json.loads((job.run_dir / "summary.json").read_text())["processes"] == 1


def test_ray_tasks_ask_for_what_their_runs_device_needs():
    # a cuda run asks for a GPU even when the cluster has none yet (an autoscaler's GPU nodes start
    # at zero): it waits for one instead of training on a CPU; auto follows what the cluster has
    gpus = {d: [E.ray_gpus(j.cfg, n) for n in (0, 4)] for d, j in zip(["cuda", "cuda:1", "auto", "cpu", "mps"],
                                                                      _jobs_on(["cuda", "cuda:1", "auto", "cpu", "mps"]))}
    assert gpus == {"cuda": [1, 1], "cuda:1": [1, 1], "auto": [0, 1], "cpu": [0, 0], "mps": [0, 0]}
