import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock, Timeout  # a dependency of torch

from ssl_lib.config import make_config

# Small enough that a few epochs take seconds on 2 CPU cores (16 px images), large enough to learn.
SMALL = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 300, "num_unlabeled": 300,
         "epochs": 2, "max_iters_per_epoch": 6, "kmeans_n_init": 1, "eval_batch_size": 300, "log_every": 3,
         "image_size": 16}
#: The smoke report's pages the tests read (tests/test_notebooks.py, tests/test_report_browser.py).
SMOKE_PAGES = ["01-data", "02-augmentation", "03-training-exp1-m0", "03-training-exp1-m50000", "04-ablations",
               "05-conclusions", "06-tuning"]


def pytest_configure(config):
    """One runs root for the whole test run ($SSL_LIB_RUNS, made by the controller and inherited by
    the pytest-xdist workers and the kernels nbval starts): the notebooks on their defaults find the
    runs the page tests trained (or train them for those tests) instead of training them twice, and
    nothing lands in the project's runs/."""
    if hasattr(config, "workerinput"):
        return
    config.ssl_lib_runs = tempfile.mkdtemp(prefix="ssl-lib-test-runs-")
    os.environ["SSL_LIB_RUNS"] = config.ssl_lib_runs


def pytest_unconfigure(config):
    if getattr(config, "ssl_lib_runs", None):
        shutil.rmtree(config.ssl_lib_runs, ignore_errors=True)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """``python -m ssl_lib train`` called in-process turns SIGTERM / SIGUSR1 into stop requests: put
    the test process's handlers back after each test, with no request pending."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    from ssl_lib.engine import preempt

    preempt.clear()


@pytest.fixture(scope="session")
def small_cfg():
    return make_config(SMALL)


@pytest.fixture(scope="session")
def small_data(small_cfg):
    from ssl_lib.data import load_data  # here, not above: pytest-xdist's controller loads this file too, and needs no torch

    return load_data(small_cfg)


def _shared(tmp_path_factory) -> Path:
    """A folder every worker of this test run shares (make test runs pytest-xdist workers), so that
    what several test files need is built once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_shared(locks: Path, tasks: dict, done) -> None:
    """Run each task of ``tasks`` (``{key: callable}``) for which ``done(key)`` is false, once per test
    run, with the other pytest-xdist workers that need the same tasks taking their share: a task
    another worker holds is skipped, then waited for once this worker has done what it could. (One
    worker building everything while the other waits on one lock cost minutes of ``make test``.)"""
    locks.mkdir(parents=True, exist_ok=True)
    held_elsewhere = []
    for key, task in tasks.items():
        lock = FileLock(str(locks / f"{key}.lock"))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            held_elsewhere.append(key)
            continue
        try:
            if not done(key):
                task()
        finally:
            lock.release()
    for key in held_elsewhere:
        with FileLock(str(locks / f"{key}.lock")):
            if not done(key):  # the other worker failed on it: this one tries, and reports the error
                tasks[key]()


@pytest.fixture(scope="session")
def smoke_grid():
    """Every experiment of the smoke profile trained once per test run, Experiment 3 over its seeds,
    under the test run's runs root (where the notebooks look on their defaults): (runs root,
    {name: Run}). The workers that need it train its runs between them."""
    from ssl_lib import experiments as ex
    from ssl_lib.experiments.executor import Job, train_job
    from ssl_lib.experiments.runs import TRAIN_LOCK

    root = ex.runs_root("smoke")
    root.mkdir(parents=True, exist_ok=True)
    cfgs = {cfg.digest(): cfg for cfg in [*ex.seeded("smoke", {}).values(),
                                          *ex.grid("smoke", {}, ex.ALL_EXPERIMENTS).values()]}
    jobs = {digest: Job(cfg, ex.run_dir_for(cfg, root)) for digest, cfg in cfgs.items()}

    def train(job):
        # the root's training lock held shared: the workers train side by side, while a notebook's
        # ensure_grid (which holds it exclusively) and they wait for each other; a run finished
        # meanwhile returns at once
        with open(root / TRAIN_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            train_job(job)

    build_shared(root / ".test-locks", {d: (lambda job=job: train(job)) for d, job in jobs.items()},
                 lambda d: ex.is_finished(jobs[d].run_dir, jobs[d].cfg))
    return root, ex.ensure_grid("smoke", root, source={}, names=ex.ALL_EXPERIMENTS)


@pytest.fixture(scope="session")
def smoke_pages(tmp_path_factory, smoke_grid) -> Path:
    """The smoke report's pages of SMOKE_PAGES and its index, executed once per test run (the workers
    that need them execute them between them; 06-tuning's pools and untuned pair are trained first,
    under the test run's $SSL_LIB_RUNS, the page's default)."""
    from ssl_lib.report import build as report

    root, _ = smoke_grid
    out = _shared(tmp_path_factory) / "smoke-report"
    def execute(page):
        if page == "02-augmentation":  # given as a relative folder, as `make` passes it (test_notebooks.py)
            with contextlib.chdir(out.parent):
                report.execute_page(page, "smoke", Path(out.name), runs_dir=root, source={})
        elif page == "06-tuning":  # as make reports does: its runs trained first (a stage of their own), then the
            # page, on the default runs root ($SSL_LIB_RUNS), where nbval's 06-tuning looks for the pools too
            from ssl_lib.tuning import report as tuning_report

            tuning_report.ensure_runs("smoke", None, {})
            report.execute_page(page, "smoke", out, runs_dir=None, source={})
        else:
            report.execute_page(page, "smoke", out, runs_dir=root, source={})

    tasks = {page: (lambda page=page: execute(page)) for page in SMOKE_PAGES}
    build_shared(out / ".test-locks", tasks, lambda page: (out / f"{page}.html").is_file())
    build_shared(out / ".test-locks", {"index": lambda: report.build_index("smoke", out, runs_dir=root, source={})},
                 lambda _: (out / "index.html").is_file())
    return out


@pytest.fixture(scope="session")
def protocol_smoke_page(tmp_path_factory) -> tuple[Path, Path]:
    """07-protocol on the smoke protocol profile (its five runs trained under the test run's runs
    root, seconds), executed once per test run: (report folder, runs root). As make reports does,
    the runs are trained first (here, in this warm process), then the page reads them."""
    from ssl_lib import experiments as ex
    from ssl_lib.experiments.runs import ensure_protocol
    from ssl_lib.report import build as report

    out, runs = _shared(tmp_path_factory) / "smoke-protocol-report", ex.runs_root("protocol-smoke")
    with FileLock(str(out) + ".lock"):
        if not (out / ".built").exists():
            ensure_protocol("smoke", runs, source={})
            report.execute_page("07-protocol", "smoke", out, runs_dir=runs, source={})
            (out / ".built").touch()
    return out, runs


def run_metrics(run_dir) -> dict:
    """A run's history as the tests compare it: ``{"iteration": {column: list}, "epoch": {...}}`` with
    NaN as None (the values as the run computed them: float32 step values, float64 learning rates)."""
    import math

    from ssl_lib.engine.rundir import read_metrics

    metrics = read_metrics(run_dir)
    it = {c: [None if isinstance(v, float) and not math.isfinite(v) else v for v in a.astype(float).tolist()]
          if a.dtype.kind == "f" else a.tolist() for c, a in metrics["iteration"].items()}
    return {"iteration": it, "epoch": metrics["epoch"]}
