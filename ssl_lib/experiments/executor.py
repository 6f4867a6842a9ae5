"""Many runs at once: the executors that train a list of jobs (a config and its run directory) and
return when every one is finished, or raise one clear error.

    local (default)  SLOTS runs at a time on this machine. SLOTS=1 trains in this process, one run
                     after another (as before). More slots are worker processes: with GPUs each is
                     pinned to its own (CUDA_VISIBLE_DEVICES), on a CPU each gets THREADS threads
                     (default: the cores divided between the slots).
    ray              each run is a Ray task asking for THREADS CPUs, and a GPU when its device needs
                     one; at most SLOTS in flight when SLOTS is set. With RAY_ADDRESS it joins that
                     cluster; without it, it starts a local instance on 127.0.0.1 (no dashboard, no
                     usage reporting).
    slurm            each run is a SLURM job, through submitit (ssl_lib/experiments/slurm.py).

A run whose worker process (or node) dies starts again, up to RETRIES times, and resumes from its last
checkpoint; a dead local worker costs only its own run; a run that fails in itself does not stop the
others, and the first failure is raised once all are done.

A job calls :func:`~ssl_lib.engine.train.train` with ``resume=True``, the mode of ``train --resume
auto``: a run not there is started, a finished run is returned as it is, an interrupted one (killed,
or stopped by a SIGTERM at a step) resumes from its checkpoint (bit-identical on the CPU). So the numbers do
not depend on the executor or the slots, only on the threads per run (see docs/scale-out.md).

The settings come from the environment, where ``make reports`` puts its variables:

    SSL_LIB_EXECUTOR (EXECUTOR)   local | ray | slurm
    SSL_LIB_SLOTS    (SLOTS)      runs at a time: a positive integer
    SSL_LIB_THREADS  (THREADS)    CPU threads per run: a positive integer
    RAY_ADDRESS                   the Ray cluster to join (host:port, ray://host:port or auto)

This module imports torch, Ray and submitit only when it trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import BadInput
from ..files import atomic_write

EXECUTOR_ENV, SLOTS_ENV, THREADS_ENV, RAY_ADDRESS_ENV = ("SSL_LIB_EXECUTOR", "SSL_LIB_SLOTS", "SSL_LIB_THREADS",
                                                        "RAY_ADDRESS")
#: How long the driver waits for a Ray head to answer before saying nothing does.
CONNECT_TIMEOUT_S = 10.0
#: A run whose worker process (or node) died starts again this many times, resuming from its checkpoint.
RETRIES = 3
#: The local Ray instance's object store: jobs pass configs and small dicts, never tensors.
RAY_OBJECT_STORE_BYTES = 128 * 2**20


class RunsFailed(RuntimeError):
    """Some runs of a batch did not finish (a worker died, a run diverged); rerunning resumes them."""


#: What a job that keeps its divergence (``Job.keep_diverged``) leaves in its run directory.
DIVERGED = "diverged.json"


@dataclass(frozen=True)
class Job:
    cfg: Config
    run_dir: Path
    # a run whose loss diverged is an outcome, not a failure (a tuning pool's trial): written to
    # DIVERGED in its run directory instead of raised, so that every executor reports it the same way
    keep_diverged: bool = False


@dataclass(frozen=True)
class Settings:
    executor: str = "local"
    slots: int | None = None  # None: 1 for local; for ray, as many as the cluster's resources allow
    threads: int | None = None  # None: the cores divided between the slots (left alone in-process)
    ray_address: str | None = None  # None: a local Ray instance

    @property
    def in_process(self) -> bool:
        return self.executor == "local" and (self.slots or 1) == 1


def _positive(name: str, env: str, text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    if not re.fullmatch(r"[1-9][0-9]*", text.strip()):
        raise BadInput(f"{name}={text} ({env}): must be a positive integer")
    return int(text)


def settings_from_env(environ=None) -> Settings:
    """The executor settings of the environment, checked: BadInput names the variable."""
    environ = os.environ if environ is None else environ
    executor = (environ.get(EXECUTOR_ENV) or "local").strip()
    if executor not in EXECUTORS:
        raise BadInput(f"EXECUTOR={executor} ({EXECUTOR_ENV}): must be one of {', '.join(EXECUTORS)}")
    if executor == "slurm":  # its partition, time, ... (and their file) checked before anything runs
        from .slurm import slurm_settings

        slurm_settings(environ)
    return Settings(executor, _positive("SLOTS", SLOTS_ENV, environ.get(SLOTS_ENV)),
                    _positive("THREADS", THREADS_ENV, environ.get(THREADS_ENV)),
                    (environ.get(RAY_ADDRESS_ENV) or "").strip() or None)


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(settings: Settings) -> int:
    """THREADS, else this machine's cores divided between the slots (1 per task on an unbounded Ray)."""
    if settings.threads:
        return settings.threads
    if settings.executor == "slurm" or (settings.executor == "ray" and not settings.slots):
        return 1  # a job's or task's CPUs: the driver's cores say nothing of the nodes
    return max(1, cores() // (settings.slots or 1))


def _say(text: str) -> None:
    print(f"[ssl_lib.executor] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ one job

_loaded: tuple | None = None  # (data_key, data): the last data a job of this process loaded


def _data_for(cfg: Config):
    """The config's data, reused from the previous job when it is the same (a smoke run trains in
    less time than its data takes to build)."""
    global _loaded
    from ..data import data_key, load_data

    key = data_key(cfg)
    if _loaded is None or _loaded[0] != key:
        _loaded = None  # the previous copy goes before the next is built
        _loaded = (key, load_data(cfg))
    return _loaded[1]


@contextlib.contextmanager
def threads_of(threads: int | None):
    """Within: ``threads`` for torch's intra-op pool and for the OpenMP/BLAS pools of the libraries
    (scikit-learn's k-means among them), as the numbers of a run depend on it; nothing if None."""
    if not threads:
        yield
        return
    import sklearn.cluster  # noqa: F401  (its OpenMP runtime loaded, so that the limit reaches it)
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def check_shared(marker: str, token: str) -> None:
    """Refuse to train on a node that does not see the driver's runs root (the marker it wrote)."""
    path = Path(marker)
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        raise SharedStorageError(
            f"node {socket.gethostname()} does not see {path} that the driver wrote: the runs root "
            f"{path.parent.parent} must be storage every node of the Ray cluster sees (the same path)")


class SharedStorageError(BadInput):
    """A Ray worker cannot see the driver's runs root."""


def train_job(job: Job, threads: int | None = None, marker: tuple[str, str] | None = None, quiet: bool = True,
              device: str | None = None) -> dict:
    """Train one job (resume it if interrupted, return at once if finished): where it ran, how long.
    Always as a single process: a driver started under torchrun or srun (WORLD_SIZE, SLURM_NTASKS in
    its environment) does not make its runs join a process group. ``device``: the one a slot gives
    the run in place of its config's (a ``cuda:N`` run on its slot's GPU)."""
    if marker is not None:
        check_shared(*marker)
    from ..distributed import SINGLE
    from ..engine.loop import TrainingDiverged
    from ..engine.train import train

    t0 = time.perf_counter()
    with threads_of(threads):
        data = None if (job.run_dir / "summary.json").is_file() else _data_for(job.cfg)
        try:
            train(job.cfg, job.run_dir, resume=True, quiet=quiet, data=data, dist=SINGLE, device=device)
        except TrainingDiverged as err:
            if not job.keep_diverged:
                raise
            job.run_dir.mkdir(parents=True, exist_ok=True)  # gone if it diverged in its first epoch
            atomic_write(job.run_dir / DIVERGED, json.dumps({"error": str(err)}) + "\n")
    return {"run_dir": str(job.run_dir), "host": socket.gethostname(), "pid": os.getpid(),
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ executors

def run_in_process(jobs: list[Job], settings: Settings, quiet: bool = True) -> None:
    """SLOTS=1: one after another in this process (the threads left as they are unless THREADS is set)."""
    global _loaded
    failures = []
    try:
        for i, job in enumerate(jobs, 1):
            try:
                info = train_job(job, settings.threads, quiet=quiet)
            except Exception as err:  # noqa: BLE001  (the other runs still train; reported at the end)
                failures.append(err)
                continue
            _report(i, len(jobs), job, info)
    finally:
        _loaded = None  # the driver (a notebook kernel, a test) does not keep the data
    _raise_first(failures)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them for a child."""
    import torch

    count = torch.cuda.device_count()  # asks NVML: CUDA stays uninitialised (CUDA_VISIBLE_DEVICES still applies)
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def uses_gpu(cfg: Config) -> bool:
    """Whether a run trains on a GPU where there is one: ``auto``, ``cuda`` and ``cuda:N``."""
    return cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda:")


def slot_gpus(jobs: list[Job], gpus: list[str], slots: int) -> list[str | None]:
    """The GPU each slot's worker sees (its CUDA_VISIBLE_DEVICES; None: not pinned), a function of the
    jobs and the visible GPUs only: slot i gets GPU i as soon as one job can use a GPU. A ``device:
    cpu`` job takes a slot like any other and leaves its GPU alone, so it moves no GPU job. BadInput
    when the GPU jobs would have to share GPUs (more slots than GPUs)."""
    used = min(slots, len(jobs))
    if not gpus or not any(uses_gpu(j.cfg) for j in jobs):
        return [None] * used
    if slots > len(gpus):
        raise BadInput(f"SLOTS={slots} ({SLOTS_ENV}): this machine has {len(gpus)} GPU(s) and each "
                       f"slot gets its own; set SLOTS <= {len(gpus)}")
    return gpus[:used]


def slot_device(cfg: Config, gpu: str | None) -> str | None:
    """The device a run trains on in a slot pinned to ``gpu``: its slot's only GPU for a ``cuda:N``
    run (the index means a GPU of the whole machine, which the slots share out); None: its config's."""
    return "cuda" if gpu is not None and cfg.device.startswith("cuda:") else None


def _start_slot(gpu: str | None, threads: int) -> None:
    """A local worker process, before it imports torch: its GPU (if any) and its threads."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def run_local(jobs: list[Job], settings: Settings, quiet: bool = True) -> None:
    """SLOTS worker processes (progress bars only in-process); with GPUs, slot i sees only GPU i. A
    worker that dies costs only the run it was training: the slot gets a new worker, the run starts
    again there from its checkpoint (up to RETRIES times for each run), the other runs go on."""
    if settings.in_process:
        run_in_process(jobs, settings, quiet)
        return
    gpus = slot_gpus(jobs, visible_gpus(), settings.slots)
    threads = threads_per_run(settings)
    pinned = [g for g in gpus if g is not None]
    _say(f"{len(jobs)} run(s), {len(gpus)} at a time in worker processes, "
         + (f"GPUs {', '.join(pinned)}" if pinned else f"{threads} thread(s) each"))
    failures: list[BaseException] = []
    _run_slots(jobs, gpus, threads, failures)
    _raise_first(failures)


def _run_slots(jobs: list[Job], gpus: list[str | None], threads: int, failures: list) -> None:
    """Train ``jobs`` in one worker process per slot (slot i pinned to ``gpus[i]``), each slot taking
    the next job when it is free; the runs' own errors, and runs whose worker died more than RETRIES
    times, go to ``failures``. Each slot is a process pool of one worker, so that a worker's death
    breaks that slot alone (Python's pool of several workers breaks all of them, and every run in
    flight with it)."""
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch or CUDA state

    def new_worker(slot: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_start_slot, initargs=(gpus[slot], threads))

    workers = [new_worker(i) for i in range(len(gpus))]
    waiting, running, deaths, finished = list(jobs), {}, {}, 0
    try:
        while waiting or running:
            busy = {slot for slot, _ in running.values()}
            for slot in (i for i in range(len(workers)) if i not in busy):
                if not waiting:
                    break
                job = waiting.pop(0)
                future = workers[slot].submit(train_job, job, threads, device=slot_device(job.cfg, gpus[slot]))
                running[future] = (slot, job)
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                slot, job = running.pop(future)
                try:
                    info = future.result()
                except cf.process.BrokenProcessPool:  # this slot's worker died: this run alone
                    workers[slot].shutdown(wait=False)
                    workers[slot] = new_worker(slot)
                    deaths[job.run_dir] = deaths.get(job.run_dir, 0) + 1
                    if deaths[job.run_dir] > RETRIES:
                        failures.append(RunsFailed(
                            f"{job.run_dir}: its worker process died {deaths[job.run_dir]} times (killed, or out of "
                            "memory?); run the same command again: it resumes from its last checkpoint"))
                    else:
                        _say(f"the worker training {job.run_dir.name} died (killed, or out of memory?): it starts "
                             f"again in a new worker, from its checkpoint (retry {deaths[job.run_dir]} of {RETRIES})")
                        waiting.insert(0, job)
                    continue
                except Exception as err:  # noqa: BLE001  (the others still train; reported at the end)
                    failures.append(err)
                    continue
                finished += 1
                _report(finished, len(jobs), job, info)
    except BaseException:  # Ctrl-C: no new runs (those running are interrupted with the driver)
        for worker in workers:
            worker.shutdown(wait=False, cancel_futures=True)
        raise
    for worker in workers:
        worker.shutdown()


def _report(done: int, total: int, job: Job, info: dict) -> None:
    _say(f"{done}/{total} {job.run_dir.name} trained in {info['seconds']:.1f} s ({info['host']} pid {info['pid']})")


def _raise_first(failures: list[BaseException]) -> None:
    if not failures:
        return
    first = failures[0]
    if len(failures) > 1:
        try:
            first = type(first)(f"{first}; and {len(failures) - 1} other run(s) failed")
        except TypeError:  # an exception type that wants other arguments: as it is
            pass
    raise first


# ----------------------------------------------------------------------------------------- ray

def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"RAY_ADDRESS={address}: expected host:port, ray://host:port or auto")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """BadInput unless something accepts a TCP connection at ``address`` (host:port, ray://host:port)
    within ``timeout``: ray.init would otherwise keep retrying for minutes."""
    if address == "auto":  # the cluster `ray start` last started here: ray.init fails at once without one
        return
    try:
        socket.create_connection(_host_port(address), timeout=timeout).close()
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise BadInput(f"RAY_ADDRESS={address}: nothing answers there ({why}); start a head with "
                       "`ray start --head`, or unset RAY_ADDRESS for a local Ray instance") from None


def is_loopback(address: str | None) -> bool:
    """A local instance (None) or a head on this machine's loopback."""
    if address is None:
        return True
    if address == "auto":
        return False
    host = _host_port(address)[0]
    return host == "localhost" or host == "::1" or host.startswith("127.")


def keep_ray_on_loopback() -> None:
    """Make Ray use 127.0.0.1 as this node's address. Ray (2.60) turns a node address of 127.0.0.1
    into the machine's outward address unless clusters are switched off, which is what this
    switch does: then the head, the workers and the driver listen and connect on loopback only.
    Set before Ray is imported here, and so inherited by the processes Ray starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported earlier in this process: the switch is read at import
        constants.ENABLE_RAY_CLUSTER = False


def connect_ray(settings: Settings):
    """``(ray, started)``: Ray connected as this process already was (``started`` False), else joined
    to RAY_ADDRESS (this package shipped to the workers), else a new local instance on 127.0.0.1
    (no dashboard, no usage reporting) whose workers import this copy of the package."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    package = Path(__file__).resolve().parents[1]
    address = settings.ray_address
    if address:
        check_reachable(address)
    else:
        os.environ.pop(RAY_ADDRESS_ENV, None)  # an empty one: ray.init would read it
    try:
        import ray
    except ImportError:
        raise BadInput("EXECUTOR=ray needs Ray: pip install -e '.[cluster]'") from None
    if ray.is_initialized():  # a notebook or a test that connected first: its cluster, left running
        return ray, False
    if is_loopback(address):
        keep_ray_on_loopback()
    import logging

    # workers on this machine import this very copy (its git commit recorded): a local instance's
    # inherit this process's environment (so the workers Ray starts in advance serve), a head's get it
    # from the job; other machines get this copy of the package shipped by Ray
    path = os.pathsep.join(p for p in (str(package.parent), os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}} if is_loopback(address) else {"py_modules": [str(package)]}
    common = dict(log_to_driver=False, logging_level=logging.ERROR, ignore_reinit_error=True)
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, **common)
        else:
            os.environ["PYTHONPATH"] = path
            ray.init(address="local", num_cpus=cores(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=RAY_OBJECT_STORE_BYTES, **common)
    except ConnectionError as err:  # something answers, but not a Ray head that lets us in
        hint = "" if os.environ.get("RAY_AUTH_MODE") else " (a head with token authentication: set RAY_AUTH_MODE=token)"
        raise BadInput(f"RAY_ADDRESS={address}: {str(err).splitlines()[0] if str(err) else 'cannot connect'}"
                       + hint) from None
    return ray, True


def _markers(jobs: list[Job]) -> dict[Path, tuple[str, str]]:
    """A file with a random token in every runs root of the jobs, which each task must see."""
    token = secrets.token_hex(16)
    out = {}
    for root in sorted({j.run_dir.parent for j in jobs}):
        path = root / ".executor" / token
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, token + "\n")
        out[root] = (str(path), token)
    return out


def ray_gpus(cfg: Config, cluster_gpus: float) -> int:
    """The GPUs a run's Ray task asks for, from the run's own device: 1 for ``cuda`` and ``cuda:N``
    (the task waits for a GPU node, e.g. one an autoscaler starts), 0 for ``cpu`` and ``mps``; for
    ``auto``, 1 when the cluster has a GPU now (``cluster_gpus``), else 0 (it trains on a CPU)."""
    if cfg.device == "auto":
        return 1 if cluster_gpus else 0
    return 1 if uses_gpu(cfg) else 0


def run_ray(jobs: list[Job], settings: Settings, quiet: bool = True) -> None:
    """One Ray task per job: THREADS CPUs each, and a GPU for the runs whose device asks for one."""
    ray, started = connect_ray(settings)
    markers = _markers(jobs)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        threads = threads_per_run(settings)
        widest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if threads > widest:  # no node could ever take the task: Ray would wait forever
            raise BadInput(f"THREADS={threads}: no node of the Ray cluster has {threads} CPUs (the largest has "
                           f"{widest:g}); set THREADS <= {widest:g}")
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(train_job)
        limit = settings.slots or len(jobs)
        asks = [ray_gpus(j.cfg, gpus) for j in jobs]
        _say(f"{len(jobs)} run(s) as Ray tasks ({threads} CPU(s) each, one GPU for {sum(asks)} of them"
             + (f", {limit} at a time" if settings.slots else "") + f") on {ray.get_runtime_context().gcs_address}")
        if sum(asks) and not gpus:
            _say(f"{sum(asks)} run(s) ask for a GPU (device: cuda) and the cluster has none now: they wait for a GPU node")
        waiting, pending, failures = list(jobs), {}, []
        while waiting or pending:
            while waiting and len(pending) < limit:
                job = waiting.pop(0)
                gpu = ray_gpus(job.cfg, gpus)  # Ray shows the task its GPU alone: a cuda:N run trains on it
                ref = task.options(num_gpus=gpu, num_cpus=threads, name=f"train {job.run_dir.name}").remote(
                    job, threads, markers[job.run_dir.parent], True, "cuda" if gpu and job.cfg.device != "auto" else None)
                pending[ref] = job
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                _report(len(jobs) - len(waiting) - len(pending), len(jobs), job, ray.get(ready[0]))
            except ray.exceptions.RayTaskError as err:  # the job raised: the job's own error
                failures.append(err.cause if isinstance(err.cause, Exception) else RunsFailed(str(err)))
            except ray.exceptions.RayError as err:  # its worker or node died past the retries
                failures.append(RunsFailed(f"{job.run_dir}: {type(err).__name__} after {RETRIES} retries; "
                                           "run the same command again to resume it from its checkpoint"))
        _raise_first(failures)
    finally:
        for path, _ in markers.values():
            Path(path).unlink(missing_ok=True)
        if started:
            ray.shutdown()  # a local instance stops; a cluster is only left
    check_landed(jobs)


def check_landed(jobs: list[Job]) -> None:
    """RunsFailed unless every job's summary.json is here: a task that finished on a node whose runs
    root is not this one's would otherwise be lost without a word."""
    lost = [j.run_dir for j in jobs if not (j.run_dir / "summary.json").is_file()]
    if lost:
        raise RunsFailed(f"{len(lost)} run(s) finished on the cluster but their summary.json is not here, e.g. "
                         f"{lost[0]}: the runs root must be storage every node sees, at the same path")


def run_slurm(jobs: list[Job], settings: Settings, quiet: bool = True) -> None:
    """One SLURM job per run through submitit (ssl_lib/experiments/slurm.py): THREADS CPUs each, at
    most SLOTS at a time; the runs root must be storage the nodes share, as with Ray."""
    from .slurm import run_on_slurm

    failures = run_on_slurm(jobs, train_job, settings.threads or 1, settings.slots, _say, _report)
    _raise_first([RunsFailed(line) for line in failures])
    check_landed(jobs)


EXECUTORS = {"local": run_local, "ray": run_ray, "slurm": run_slurm}


def run_jobs(jobs: list[Job], settings: Settings | None = None, *, quiet: bool = True) -> None:
    """Train every job with the executor of ``settings`` (default: the environment's); return when all
    are finished. Jobs with the same run directory are trained once. ``quiet=False``: progress bars,
    when the runs train in this process."""
    settings = settings_from_env() if settings is None else settings
    unique = list({j.run_dir: j for j in jobs}.values())
    if unique:
        EXECUTORS[settings.executor](unique, settings, quiet)
