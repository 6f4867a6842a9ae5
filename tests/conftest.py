import os
import signal
from pathlib import Path

import pytest
from filelock import FileLock  # a dependency of torch

from ssl_lib.config import make_config
from ssl_lib.data import load_data

# Small enough that a few epochs take seconds on 2 CPU cores, large enough to learn.
SMALL = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 300, "num_unlabeled": 300,
         "epochs": 2, "max_iters_per_epoch": 6, "kmeans_n_init": 1, "eval_batch_size": 300, "log_every": 3}
#: The smoke report's pages the tests read (tests/test_notebooks.py, tests/test_report_browser.py).
SMOKE_PAGES = ["01-data", "02-augmentation", "03-training-exp1-m0", "03-training-exp1-m5000",
               "03-training-exp1-m50000", "04-ablations", "05-conclusions"]


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
    return load_data(small_cfg)


def _shared(tmp_path_factory) -> Path:
    """A folder every worker of this test run shares (make test runs pytest-xdist workers), so that
    what several test files need is built once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory):
    """Every experiment of the smoke profile trained once per test run, Experiment 3 over its seeds:
    (runs root, {name: Run}). A second worker waits on the runs root's training lock and finds the
    runs finished."""
    from ssl_lib import experiments as ex

    root = _shared(tmp_path_factory) / "smoke-runs"
    ex.ensure_seeded("smoke", root, source={})
    return root, ex.ensure_grid("smoke", root, source={}, names=ex.ALL_EXPERIMENTS)


@pytest.fixture(scope="session")
def smoke_pages(tmp_path_factory, smoke_grid) -> Path:
    """The smoke report's pages of SMOKE_PAGES and its index, executed once per test run."""
    from ssl_lib.report import build as report

    root, _ = smoke_grid
    out = _shared(tmp_path_factory) / "smoke-report"
    with FileLock(str(out) + ".lock"):
        if not (out / ".built").exists():
            for page in SMOKE_PAGES:
                report.execute_page(page, "smoke", out, runs_dir=root, source={})
            report.build_index("smoke", out, runs_dir=root, source={})
            (out / ".built").touch()
    return out


@pytest.fixture(scope="session")
def protocol_smoke_page(tmp_path_factory) -> tuple[Path, Path]:
    """07-protocol on the smoke protocol profile (its five runs trained here, seconds), executed once
    per test run: (report folder, runs root)."""
    from ssl_lib.report import build as report

    base = _shared(tmp_path_factory)
    out, runs = base / "smoke-protocol-report", base / "smoke-protocol-runs"
    with FileLock(str(out) + ".lock"):
        if not (out / ".built").exists():
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
