"""Every kind of bad input ends in one line naming what is wrong, exit status 2 (3 for a diverged
run), no traceback, and nothing written.

Each case is one row of CASES: a setup that builds what it needs under a temporary folder and
returns the command line, the exit status, fragments the message must hold, and the paths that
must not exist afterwards. Everything else in the folder must be exactly as the setup left it.
Cases run in this process, where a warning would be one more line on a user's terminal, so none may
be raised; those marked ``cli`` run as ``python -m ssl_lib`` and their real stderr is read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from ssl_lib.cli import main
from ssl_lib.engine import rundir

SMALL = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "num_unlabeled": 100, "epochs": 2,
         "max_iters_per_epoch": 2, "kmeans_n_init": 1}
SETS = [arg for k, v in SMALL.items() for arg in ("--set", f"{k}={v}")]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", *SETS, *extra, "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(run)) == 0
    return run


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], list[str]]  # (temporary folder, a finished run) -> argv
    fragments: tuple[str, ...]
    code: int = 2
    absent: tuple[str, ...] = ()  # paths (relative to the folder) that must not exist afterwards
    skip: str = ""
    cli: bool = False  # run as a separate process and read its stderr


def _copy_unfinished(tmp: Path, run: Path) -> Path:
    """A copy of a finished run made unfinished (summary and model removed): --resume continues it."""
    out = tmp / "unfinished"
    shutil.copytree(run, out)
    (out / rundir.SUMMARY).unlink()
    (out / rundir.MODEL).unlink()
    return out


def _resume_with(change: Callable[[Path], None]):
    def setup(tmp, run):
        out = _copy_unfinished(tmp, run)
        change(out / rundir.CHECKPOINT)
        return train_args(out, "--resume")
    return setup


def _evaluate_with(change: Callable[[Path], None]):
    def setup(tmp, run):
        out = tmp / "finished"
        shutil.copytree(run, out)
        change(out / rundir.MODEL)
        return ["evaluate", str(out)]
    return setup


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


class NotAllowed:  # pickled by reference: the safe loader refuses to import it
    pass


def _unsafe(path: Path) -> None:
    torch.save({"format": rundir.CHECKPOINT_FORMAT, "payload": NotAllowed()}, path)


class Malicious:  # what an attacker's file holds: unpickling it calls a function of the attacker's choice
    def __reduce__(self):
        return (print, ("the malicious pickle ran",))


def _malicious(path: Path) -> None:
    """Pickle protocol 4 (not torch's 2): torch warns about the protocol before refusing the file."""
    torch.save({"format": rundir.CHECKPOINT_FORMAT, "payload": Malicious()}, path, pickle_protocol=4)


def _edit_checkpoint(edit: Callable[[dict], None]):
    def change(path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    return change


def _wrong_shape(state: dict) -> None:
    state["fc3.weight"] = torch.zeros(3, 3)


def _image_folder(tmp: Path, classes=("a", "b"), bad_test: bool = False) -> Path:
    root = tmp / "img"
    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(4):
                Image.new("RGB", (8, 8), (40 * i + j, 90, 20)).save(folder / f"{j}.png")
    if bad_test:
        (root / "test" / classes[0] / "broken.png").write_bytes(b"not a png")
    return root


def _folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--set", "dataset=imagefolder", "--set", f"data_root={root}", "--set", f"cache_dir={root.parent / 'cache'}",
            "--set", "image_size=8", "--set", "crop_padding=1", "--set", "num_unlabeled=2", *extra,
            "--out", str(out), "--quiet"]


def _config_file(text: bytes | str, name: str = "bad.yaml"):
    def setup(tmp, run):
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", "--config", str(path), "--out", str(tmp / "run"), "--quiet"]
    return setup


CASES = [
    # --out that cannot be a run directory
    Case("out is a file", lambda t, r: (t / "f").write_text("x") and train_args(t / "f"), ("--out", "is a file")),
    Case("out below a file", lambda t, r: (t / "f").write_text("x") and train_args(t / "f" / "run"),
         ("is below", "which is a file"), absent=("f/run",)),
    Case("out name too long", lambda t, r: train_args(t / ("x" * 300)), ("longer than 255 bytes",)),
    Case("out the system refuses", lambda t, r: train_args(Path("/proc/ssl-lib-test/run")), ("cannot write in /proc",)),
    Case("out without write permission", lambda t, r: (t / "ro").mkdir(0o500) or train_args(t / "ro" / "run"),
         ("no permission to write in",), absent=("ro/run",),
         skip="root writes anywhere" if os.geteuid() == 0 else ""),
    # --resume and saved files
    Case("resume a directory that does not exist", lambda t, r: train_args(t / "typo", "--resume"),
         ("--resume", "typo", "not a run directory"), absent=("typo",)),
    Case("resume a truncated checkpoint", _resume_with(_truncate), ("checkpoint.pt", "damaged or not a torch file")),
    Case("resume a file that is not torch's", _resume_with(lambda p: p.write_bytes(b"hello")),
         ("checkpoint.pt", "damaged or not a torch file")),
    Case("resume a pickle the safe loader refuses", _resume_with(_unsafe), ("checkpoint.pt", "test_bad_input.NotAllowed, which the safe loader does not load")),
    Case("resume a foreign torch file", _resume_with(lambda p: torch.save({"weights": torch.zeros(2)}, p)),
         ("checkpoint.pt", "not an ssl_lib checkpoint")),
    Case("resume a checkpoint with a missing component",
         _resume_with(_edit_checkpoint(lambda c: c["components"].pop("optimizer"))),
         ("checkpoint.pt", "no saved state for optimizer")),
    Case("resume a checkpoint with wrong shapes",
         _resume_with(_edit_checkpoint(lambda c: _wrong_shape(c["components"]["model"]))),
         ("checkpoint.pt", "the saved model does not fit this run")),
    Case("resume a checkpoint with a damaged position",
         _resume_with(_edit_checkpoint(lambda c: c.update(epoch=99))), ("checkpoint.pt", "outside this run's 2 epochs")),
    Case("evaluate a truncated model", _evaluate_with(_truncate), ("model.pt", "damaged or not a torch file")),
    Case("evaluate a pickle the safe loader refuses", _evaluate_with(_unsafe), ("model.pt", "the safe loader does not load")),
    Case("resume a malicious pickle", _resume_with(_malicious), ("checkpoint.pt", "the safe loader does not load")),
    Case("evaluate a malicious pickle", _evaluate_with(_malicious), ("model.pt", "the safe loader does not load"), cli=True),
    Case("evaluate a model with wrong shapes",
         _evaluate_with(lambda p: torch.save({**torch.load(p, weights_only=True), "fc3.weight": torch.zeros(3, 3)}, p)),
         ("model.pt", "does not fit this run")),
    Case("evaluate a model that is not a state dict", _evaluate_with(lambda p: torch.save([1, 2], p)),
         ("model.pt", "not a state dict")),
    Case("evaluate a path that does not exist", lambda t, r: ["evaluate", str(t / "nope")], ("nope", "not a directory")),
    Case("evaluate a damaged config", lambda t, r: (shutil.copytree(r, t / "run"), (t / "run" / "config.yaml").write_text(
        "seed: [")) and ["evaluate", str(t / "run")], ("config.yaml", "damaged", "line 1")),
    # config values that pass the type check but not reason
    Case("negative seed", lambda t, r: train_args(t / "run", "--set", "seed=-1"), ("'seed' must be >= 0",), absent=("run",)),
    Case("NaN", lambda t, r: train_args(t / "run", "--set", "lr=nan"), ("'lr' must be a finite number",), absent=("run",)),
    Case("infinity", lambda t, r: train_args(t / "run", "--set", "tau=inf"), ("'tau' must be a finite number",),
         absent=("run",)),
    Case("infinity from YAML", _config_file("w_kmeans: .inf\n"), ("'w_kmeans' must be a finite number",),
         absent=("run",)),
    Case("config file not UTF-8", _config_file(b"name: caf\xe9\n"), ("bad.yaml", "not UTF-8"), absent=("run",)),
    Case("YAML syntax error", _config_file("epochs: 3\nname: [a,\n"), ("bad.yaml", "line 3, column 1"), absent=("run",)),
    Case("config file is a folder", lambda t, r: (t / "cfg").mkdir() or ["train", "--config", str(t / "cfg")],
         ("cfg is not a file",)),
    Case("override YAML error", lambda t, r: train_args(t / "run", "--set", "name=[x"), ("override 'name=[x'",),
         absent=("run",)),
    # data
    Case("one class", lambda t, r: _folder_args(_image_folder(t, classes=("only",)), t / "run"),
         ("1 class folder", "at least 2"), absent=("run",)),
    Case("bad test split leaves no train cache", lambda t, r: _folder_args(_image_folder(t, bad_test=True), t / "run"),
         ("broken.png",), absent=("run", "cache")),
    # a run that diverges at its first step: no checkpoint to name, nothing left
    Case("NaN at the first step", lambda t, r: train_args(t / "run", "--set", "w_labeled=1e39"),
         ("at step 0", "no checkpoint was written"), code=3, absent=("run",)),
]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, finished_run, capsys):
    if case.skip:
        pytest.skip(case.skip)
    argv = case.setup(tmp_path, finished_run)
    before = _snapshot(tmp_path)
    if case.cli:
        out = subprocess.run([sys.executable, "-m", "ssl_lib", *argv], capture_output=True, text=True, timeout=120)
        code, err = out.returncode, out.stderr.strip()
        assert "the malicious pickle ran" not in out.stdout
    else:
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)  # what Python does not show a user by default
            code = main(argv)
        err = capsys.readouterr().err.strip()
        assert not caught, [str(w.message)[:200] for w in caught]  # each would be a line more on stderr
    assert code == case.code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in case.fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for path in case.absent:
        assert not (tmp_path / path).exists(), path
    assert _snapshot(tmp_path) == before  # nothing written, nothing half-written


def test_a_failed_download_leaves_no_data_folder_and_names_the_fields(tmp_path, monkeypatch, capsys):
    # No network in tests: the download goes to a closed port on this machine and fails at once.
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = tmp_path / "cifar"
    code = main(["train", "--set", "dataset=cifar10", "--set", f"data_root={root}", "--out", str(tmp_path / "run"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dataset=cifar10" in err[0] and f"data_root={root}" in err[0], err
    assert "could not be downloaded" in err[0]
    assert not root.exists() and not (tmp_path / "run").exists()


def test_make_reports_with_an_unknown_profile_stops_in_one_line():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "reports", "PROFILE=nope"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 2
    assert "PROFILE=nope: no configs/profiles/nope.yaml; profiles:" in out.stderr and "smoke" in out.stderr


def test_a_runs_root_that_is_a_file_is_named(tmp_path):
    runs = tmp_path / "runs-file"
    runs.write_text("x")
    out = subprocess.run([sys.executable, "-m", "ssl_lib", "experiments", "train", "smoke", "exp1-m0", "--runs", str(runs)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the runs root (RUNS=, --runs or $SSL_LIB_RUNS)" in out.stderr and "is a file" in out.stderr
