"""EXECUTOR=slurm: each run of a stage is a SLURM job, submitted through submitit as one job array
per kind of run (GPU or CPU), and the driver waits for them.

The jobs' resources come from the environment, where ``make`` puts its variables, or from a small
YAML file (SLURM_CONFIG); a variable overrides the file:

    SSL_LIB_SLURM_CONFIG     (SLURM_CONFIG)     a YAML file with any of the keys below, and
                                                ``setup``: shell lines run before each job
                                                (module load ..., source .venv/bin/activate)
    SSL_LIB_SLURM_PARTITION  (SLURM_PARTITION)  partition:  the partition (default: the cluster's)
    SSL_LIB_SLURM_ACCOUNT    (SLURM_ACCOUNT)    account:    the account to charge
    SSL_LIB_SLURM_TIME_MIN   (SLURM_TIME_MIN)   time_min:   minutes a job may run (default 1440)
    SSL_LIB_SLURM_GPUS_PER_RUN (SLURM_GPUS_PER_RUN) gpus_per_run: GPUs of a run that may use one
                                                (default: 1 for ``device: cuda``/``cuda:N``, 0 else)
    SSL_LIB_SLURM_MEM_GB     (SLURM_MEM_GB)     mem_gb:     memory per job in GB (default: the cluster's)

(Not SLURM_GPUS: SLURM itself sets that one inside an allocation.)

THREADS is each job's CPUs (default 1) and SLOTS the most jobs of an array running at once. A job
that SLURM preempts, or that reaches its time limit, is requeued by submitit and starts the run
again with ``resume=True``: from its last checkpoint, as the other executors resume a run.

This module imports submitit only when it submits; it does not import the executor (which
passes it the function that trains one job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput

CONFIG_ENV = "SSL_LIB_SLURM_CONFIG"
#: The keys of the config file, each also a variable SSL_LIB_SLURM_<KEY> (make: SLURM_<KEY>).
KEYS = ("partition", "account", "time_min", "gpus_per_run", "mem_gb")
#: Seconds between the driver's looks at its jobs (their result files; squeue/sacct at most every minute).
POLL_S = 1.0


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    time_min: int = 24 * 60
    gpus_per_run: int | None = None  # None: 1 for cuda runs, 0 for the others
    mem_gb: int | None = None
    setup: tuple[str, ...] = ()


def _count(name: str, value, minimum: int = 1) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < minimum:
        raise BadInput(name.format(value) + f": must be an integer >= {minimum}")
    return int(text)


def slurm_settings(environ=None) -> SlurmSettings:
    """The SLURM settings of the environment and its config file, checked: BadInput names the
    variable, or the file and its key."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    path = (environ.get(CONFIG_ENV) or "").strip()
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BadInput(f"SLURM_CONFIG={path}: {getattr(err, 'strerror', None) or err}") from None
        if not isinstance(loaded, dict):
            raise BadInput(f"SLURM_CONFIG={path}: must be a mapping of {', '.join(KEYS)}, setup")
        for key, value in loaded.items():
            if key not in (*KEYS, "setup"):
                raise BadInput(f"SLURM_CONFIG={path}: unknown key '{key}' (known: {', '.join(KEYS)}, setup)")
            values[key] = (f"SLURM_CONFIG={path}: '{key}'={{}}", value)
    for key in KEYS:
        text = (environ.get(f"SSL_LIB_SLURM_{key.upper()}") or "").strip()
        if text:
            values[key] = (f"SLURM_{key.upper()}={{}} (SSL_LIB_SLURM_{key.upper()})", text)
    out = {}
    for key, (name, value) in values.items():
        if key in ("time_min", "mem_gb"):
            out[key] = _count(name, value)
        elif key == "gpus_per_run":
            out[key] = _count(name, value, minimum=0)
        elif key == "setup":
            if isinstance(value, str) or not all(isinstance(line, str) for line in value or []):
                raise BadInput(name.format(value) + ": must be a list of shell lines")
            out[key] = tuple(value)
        else:
            out[key] = str(value)
    return SlurmSettings(**out)


def gpus_per_run(cfg, settings: SlurmSettings) -> int:
    """The GPUs a run's job asks for: none for ``device: cpu``/``mps``; else SLURM_GPUS_PER_RUN, by default
    1 for ``cuda``/``cuda:N`` (an ``auto`` run asks for none unless SLURM_GPUS_PER_RUN says so)."""
    if cfg.device in ("cpu", "mps"):
        return 0
    if settings.gpus_per_run is not None:
        return settings.gpus_per_run
    return 1 if cfg.device.startswith("cuda") else 0


def job_parameters(settings: SlurmSettings, gpus: int, threads: int, slots: int | None, name: str) -> dict:
    """submitit's parameters (AutoExecutor.update_parameters) for the jobs of one array."""
    params = {"name": name, "timeout_min": settings.time_min, "cpus_per_task": threads, "tasks_per_node": 1,
              "nodes": 1, "slurm_setup": [*(f"export {v}={threads}" for v in
                                           ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")),
                                        *settings.setup]}
    if gpus:
        params["gpus_per_node"] = gpus
    if settings.partition:
        params["slurm_partition"] = settings.partition
    if settings.account:
        params["slurm_account"] = settings.account
    if settings.mem_gb:
        params["mem_gb"] = settings.mem_gb
    if slots:
        params["slurm_array_parallelism"] = slots
    return params


def _submitit():
    try:
        import submitit
    except ImportError:
        raise BadInput("EXECUTOR=slurm needs submitit: pip install -e '.[cluster]'") from None
    return submitit


class SlurmRun:
    """What a job runs: ``work(job, threads)``; requeued on preemption or at its time limit, it runs
    it again, which resumes the run from its last checkpoint (submitit calls :meth:`checkpoint`)."""

    def __init__(self, work):
        self.work = work

    def __call__(self, job, threads: int) -> dict:
        return self.work(job, threads)

    def checkpoint(self, job, threads: int):
        # submitit calls this from its signal handler and requeues the job at once, before the loop
        # could save at the current step (what `train --resume auto` does on SIGTERM/SIGUSR1 from a
        # batch script: docs/reliability.md); so the requeued job resumes from the last epoch's checkpoint.
        return _submitit().helpers.DelayedSubmission(SlurmRun(self.work), job, threads)


def run_on_slurm(jobs: list, work, threads: int, slots: int | None, say, report) -> list[str]:
    """Submit one SLURM job per job (an array per GPU count), wait for all; return the failures
    (a run's error, or its job's end without a result), each a line naming the run and the job's log."""
    submitit = _submitit()
    settings = slurm_settings()
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(gpus_per_run(job.cfg, settings), []).append(job)
    root = sorted({j.run_dir.parent for j in jobs})[0]
    submitted = []
    for gpus, group in sorted(groups.items()):
        executor = submitit.AutoExecutor(folder=root / ".executor" / "slurm" / "%j", cluster="slurm")
        executor.update_parameters(**job_parameters(settings, gpus, threads, slots, f"ssl_lib-{root.name}"))
        with executor.batch():
            futures = [executor.submit(SlurmRun(work), job, threads) for job in group]
        submitted += zip(futures, group)
        say(f"{len(group)} run(s) as SLURM jobs ({gpus} GPU(s), {threads} CPU(s) each"
            + (f", partition {settings.partition}" if settings.partition else "") + f"): array {futures[0].job_id.split('_')[0]}")
    failures, by_job = [], {id(f): job for f, job in submitted}
    for done, future in enumerate(submitit.helpers.as_completed([f for f, _ in submitted], poll_frequency=POLL_S), 1):
        job = by_job[id(future)]
        try:
            report(done, len(jobs), job, future.result())
        except Exception as err:  # noqa: BLE001  (the others still train; reported at the end)
            last = next((line for line in reversed(str(err).splitlines()) if line.strip() and set(line) != {"-"}), "")
            failures.append(f"{job.run_dir}: SLURM job {future.job_id} failed: {last.strip()} "
                            f"(log: {future.paths.stderr})")
    return failures

