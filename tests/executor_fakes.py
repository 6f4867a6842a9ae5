"""Stand-ins for ``executor.train_job`` in the spawned worker processes of tests/test_executor.py
(a module of its own, so that the workers import it without the test module). Each records its
starts as files under ``<runs root>/starts/`` and kills its own process with SIGKILL as a worker
that runs out of memory dies."""

import os
import signal
import time
from pathlib import Path


def starts(run_dir: Path) -> int:
    """How many times a fake began the run of ``run_dir``."""
    folder = run_dir.parent / "starts"
    return len([p for p in folder.glob(f"{run_dir.name}.*") if p.suffix[1:].isdigit()]) if folder.is_dir() else 0


def _start(job) -> int:
    folder = job.run_dir.parent / "starts"
    folder.mkdir(exist_ok=True)
    n = starts(job.run_dir) + 1
    (folder / f"{job.run_dir.name}.{n}").touch()
    return n


def _done(job) -> dict:
    (job.run_dir.parent / "starts" / f"{job.run_dir.name}.finished").touch()
    return {"run_dir": str(job.run_dir), "host": "test", "pid": os.getpid(), "seconds": 0.0}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def dies_the_first_time(job, threads=None, marker=None, quiet=True, device=None) -> dict:
    """Every run's worker dies at its first start; the second start finishes."""
    if _start(job) == 1:
        _die()
    return _done(job)


def one_dies_while_the_other_trains(job, threads=None, marker=None, quiet=True, device=None) -> dict:
    """The run named "dies" always kills its worker once the other run has started; the other takes
    two seconds, so it is in flight in its own worker whenever "dies" dies."""
    _start(job)
    if job.run_dir.name.startswith("dies"):
        deadline = time.monotonic() + 60
        while not list((job.run_dir.parent / "starts").glob("trains.*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        _die()
    time.sleep(2.0)
    return _done(job)
