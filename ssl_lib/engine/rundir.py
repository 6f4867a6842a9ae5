"""Run directories: what a run leaves on disk, checked before anything is created.

    config.yaml     the resolved config (written first)
    steps.npy       the per-step values, appended every ``log_every`` steps (:mod:`.steplog`)
    epochs.jsonl    the per-epoch record, one line appended after every epoch (:mod:`.epochlog`)
    checkpoint.pt   everything needed to resume, rewritten after every epoch; of the two logs it
                    holds only where they end (so its size does not grow with the run)
    model.pt        the final weights (a state dict)
    metrics.json    the per-epoch record as lists (``{"epoch": {key: [...]}}``), written once at the end
    summary.json    written last: its presence marks a finished run

A resume cuts both logs back to where the checkpoint says they ended, so what a killed session
logged after its last checkpoint is written again, identically. :func:`read_metrics` is how
everything else (pages, analysis, tuning, tests) reads a run's history, finished or not, of this
layout or of the older ones (the per-epoch record in ``metrics.json`` rewritten every epoch; before
that, the per-step lists too, in it and in the checkpoint), which are still read and resumed.

Every file is written atomically; what a writer killed outright left half-written (the atomic
writer's temporary files) is removed when the directory is taken up again (:func:`sweep`). Every problem with a directory or a saved file (a path that
cannot be a run directory, a damaged or foreign checkpoint) is a :class:`RunDirError` naming the
path: one line for the user, never a traceback. Saved files are read with torch's safe loader, so
nothing in them can run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import Config, ConfigError, load_config, save_config
from ..errors import RunDirError
from ..files import atomic_write, remove_stale_temporaries, write_json
from ..method.columns import ITER_COLUMNS
from . import epochlog, steplog

if TYPE_CHECKING:
    import torch

CONFIG, CHECKPOINT, METRICS, MODEL, SUMMARY = "config.yaml", "checkpoint.pt", "metrics.json", "model.pt", "summary.json"
STEPS, EPOCHS = "steps.npy", "epochs.jsonl"
CHECKPOINT_FORMAT = "ssl_lib-checkpoint-4"
# older layouts, converted on resume: the per-epoch record in metrics.json (3); all the history in the checkpoint (2)
EPOCH_LISTS_FORMAT, OLD_CHECKPOINT_FORMAT = "ssl_lib-checkpoint-3", "ssl_lib-checkpoint-2"
_FORMATS = {CHECKPOINT_FORMAT: "epoch_records", EPOCH_LISTS_FORMAT: "epoch_log_ends", OLD_CHECKPOINT_FORMAT: "history"}
_NAME_MAX = 255


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_creatable(path: Path, label: str = "--out") -> None:
    """Raise RunDirError (naming ``label``, the option or variable that gave the path) unless the
    directory ``path`` exists or can be created, and can be written."""
    path = Path(path)
    for part in path.parts:  # before asking the system anything about it (it raises for these)
        if len(os.fsencode(part)) > _NAME_MAX:
            raise RunDirError(f"{label} {part[:20]}...: a name in the path is longer than {_NAME_MAX} bytes")
    base = _nearest_existing(path)
    if not base.is_dir():
        what = "is a file" if base == path else f"is below {base}, which is a file"
        raise RunDirError(f"{label} {path} {what}; it must be a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"{label} {path}: no permission to write in {base}")
    try:  # the system may still refuse (a read-only file system, /proc, ...): ask it
        tempfile.TemporaryFile(dir=base).close()
    except OSError as err:
        raise RunDirError(f"{label} {path}: cannot write in {base} ({err.strerror})") from None


def check(run_dir: str | Path, cfg: Config, resume: bool) -> str:
    """What ``train`` should do with ``run_dir`` for ``cfg``: ``"new"``, ``"resume"`` or ``"finished"``.

    Creates nothing. Raises RunDirError when the path cannot be a run directory or holds something
    else (another config, files that are not a run, an unfinished run without ``resume``)."""
    run_dir = Path(run_dir)
    check_creatable(run_dir)
    if not run_dir.exists():
        return "new"
    if not any(run_dir.iterdir()):
        return "new"
    saved = run_dir / CONFIG
    if not saved.is_file():
        raise RunDirError(f"{run_dir} exists and is not a run directory (no {CONFIG}); choose another --out")
    try:
        saved_cfg = load_config(saved)
    except ConfigError as err:
        raise RunDirError(f"{saved} is damaged ({err}); choose another --out") from None
    if saved_cfg.digest() != cfg.digest():
        raise RunDirError(f"{run_dir} holds a run of a different config; choose another --out")
    if (run_dir / SUMMARY).exists():
        return "finished"
    if not resume:
        raise RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it")
    return "resume" if (run_dir / CHECKPOINT).exists() else "new"


def sweep(run_dir: str | Path) -> None:
    """Remove the half-written files of a writer killed in ``run_dir`` (kill -9 during a checkpoint):
    for an unfinished run taken up again (resumed, or restarted before its first checkpoint)."""
    remove_stale_temporaries(run_dir)


def take_up(run_dir: str | Path, ckpt: dict) -> None:
    """A resume from ``ckpt`` (:func:`resume_point`'s), once it is known to fit: sweep, and cut both
    logs back to where it ends them. An older layout's lists become the logs."""
    run_dir = Path(run_dir)
    step = int(ckpt["step"])
    sweep(run_dir)
    if not (run_dir / STEPS).exists() and step:  # format 2: its per-step lists become the step log
        iteration = load(run_dir / CHECKPOINT).get("history", {}).get("iteration", {})
        steplog.write(run_dir / STEPS, steplog.from_lists(iteration)[:step])
    steplog.truncate(run_dir / STEPS, step)
    if ckpt["format"] == CHECKPOINT_FORMAT:
        epochlog.truncate(run_dir / EPOCHS, int(ckpt["epoch_records"]))
    else:  # its per-epoch lists become the epoch log; metrics.json comes back at the end
        epochlog.create(run_dir / EPOCHS)
        for record in epochlog.unfold(ckpt["history"]["epoch"]):
            epochlog.append(run_dir / EPOCHS, record)
        (run_dir / METRICS).unlink(missing_ok=True)


def create(run_dir: str | Path, cfg: Config) -> list[Path]:
    """Create ``run_dir`` (and missing parents) holding ``config.yaml``; return the directories
    created, for :func:`remove_created`. Nothing is left behind when it fails. An existing
    directory (an unfinished run with no checkpoint) is swept first."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        sweep(run_dir)
        (run_dir / METRICS).unlink(missing_ok=True)  # of an older version's session killed before its first checkpoint
    created = []
    for d in reversed([run_dir, *run_dir.parents]):
        if not d.exists():
            created.append(d)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG)
        steplog.create(run_dir / STEPS)
        epochlog.create(run_dir / EPOCHS)
    except OSError as err:
        remove_created(created)
        raise RunDirError(f"--out {run_dir}: cannot create the run directory ({err.strerror})") from None
    return created


def remove_created(created: list[Path]) -> None:
    """Remove directories made by :func:`create`, innermost first (a run that never got going)."""
    for d in reversed(created):
        shutil.rmtree(d, ignore_errors=True)


def save(run_dir: Path, name: str, obj) -> None:
    """``torch.save(obj)`` to ``run_dir/name``, atomically."""
    import torch  # here and in load only: what reads the logs and summaries (the pages) does without it

    atomic_write(Path(run_dir) / name, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path, device: torch.device | str = "cpu"):
    """A file saved by :func:`save`, with the safe loader; RunDirError if it is not readable as one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():  # it loads or is refused in one line: torch's remarks on the
            warnings.simplefilter("ignore", UserWarning)  # file's pickle protocol would be more lines
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:  # the safe loader refused something in it
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it holds {found.group(1)}, which" if found else "it holds something"
        raise RunDirError(f"{path} is not a file ssl_lib saved: {what} the safe loader does not load") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise RunDirError(f"{path} is damaged or not a torch file ({type(err).__name__})") from None


def load_state(obj, state, path: Path, what: str) -> None:
    """``obj.load_state_dict(state)``, with a mismatch (keys, shapes, types) as a RunDirError."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path}: the saved {what} does not fit this run ({first[:200]})") from None


def load_checkpoint(run_dir: Path, device: torch.device) -> dict:
    """The checkpoint of ``run_dir``, checked to be one this version wrote."""
    path = Path(run_dir) / CHECKPOINT
    ckpt = load(path, device)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in _FORMATS:
        found = ckpt.get("format", "no format tag") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunDirError(f"{path} is not an ssl_lib checkpoint of format {CHECKPOINT_FORMAT} ({found}); "
                          "start a new run in another --out")
    missing = [k for k in ("epoch", "step", _FORMATS[ckpt["format"]], "components", "rng") if k not in ckpt]
    if missing:
        raise RunDirError(f"{path} is damaged: no {', '.join(missing)}")
    return ckpt


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} cannot be read ({type(err).__name__}); delete it to finish the run again") from None


def save_epoch(run_dir: Path, checkpoint: dict, record: dict) -> None:
    """An epoch's end: its record appended to the epoch log, then the checkpoint (atomically). A kill
    between the two leaves the log one epoch ahead, which the resume cuts back."""
    epochlog.append(Path(run_dir) / EPOCHS, record)
    save_checkpoint(run_dir, checkpoint)


def save_checkpoint(run_dir: Path, checkpoint: dict) -> None:
    save(run_dir, CHECKPOINT, {"format": CHECKPOINT_FORMAT, **checkpoint})


def write_metrics(run_dir: Path, history: dict) -> None:
    """A finished run's per-epoch record as lists, once: ``metrics.json``."""
    write_json(Path(run_dir) / METRICS, history)


def resume_point(run_dir: Path, device: torch.device) -> dict:
    """The checkpoint of ``run_dir`` with its per-epoch record as ``ckpt["history"]`` (the epoch log
    cut back to where the checkpoint ends it) and, when it was saved mid-epoch, that epoch's rows so
    far as ``ckpt["epoch_rows"]``. Reads only: :func:`take_up` changes the directory, once the
    checkpoint is known to fit the run."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir, device)
    step = int(ckpt["step"])
    if ckpt["format"] == OLD_CHECKPOINT_FORMAT:  # its step log is written by take_up
        ckpt["history"] = {"epoch": ckpt["history"]["epoch"]}
        return ckpt
    steplog.check(run_dir / STEPS, step)
    if ckpt["format"] == CHECKPOINT_FORMAT:
        ckpt["history"] = {"epoch": epochlog.fold(epochlog.read(run_dir / EPOCHS, int(ckpt["epoch_records"])))}
    else:
        ckpt["history"] = {"epoch": _epoch_lists(run_dir, ckpt["epoch_log_ends"])}
    if "epoch_start" in ckpt:  # saved mid-epoch: that epoch's steps so far, for its means
        rows = steplog.read(run_dir / STEPS)[int(ckpt["epoch_start"]):step]
        ckpt["epoch_rows"] = np.stack([rows[c] for c in ITER_COLUMNS], axis=1)
    return ckpt


def _epoch_lists(run_dir: Path, ends: dict) -> dict:
    """Format 3's per-epoch record: metrics.json's lists, cut back to the checkpoint's lengths."""
    saved = _read_json(run_dir / METRICS).get("epoch", {}) if ends else {}
    short = [key for key, n in ends.items() if len(saved.get(key, [])) < n]
    if short:
        raise RunDirError(f"{run_dir / METRICS} holds fewer epochs of {short[0]!r} than the checkpoint "
                          f"({len(saved.get(short[0], []))} < {ends[short[0]]}): it is damaged; start the run again in "
                          "another --out")
    return {key: saved[key][:n] for key, n in ends.items()}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} holds a {type(value).__name__}, not the metrics of a run")
    return value


def read_metrics(run_dir: str | Path) -> dict:
    """A run's history: ``{"iteration": {column: array, one value per step}, "epoch": {key: list}}``,
    from ``steps.npy`` and ``epochs.jsonl`` (finished or not), or from an older run directory's
    ``metrics.json`` (with ``steps.npy``, or alone)."""
    run_dir = Path(run_dir)
    if (run_dir / EPOCHS).is_file():
        metrics = {"epoch": epochlog.fold(epochlog.read(run_dir / EPOCHS))}
    else:
        metrics = _read_json(run_dir / METRICS)
    if (run_dir / STEPS).is_file():
        rows = steplog.read(run_dir / STEPS)
    elif isinstance(metrics.get("iteration"), dict):  # the old layout
        rows = steplog.from_lists(metrics["iteration"])
    else:
        raise RunDirError(f"{run_dir} has no {STEPS} (and no per-step lists in {METRICS})")
    return {"iteration": {column: rows[column] for column in steplog.COLUMNS}, "epoch": metrics.get("epoch", {})}


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)  # last: its presence marks a finished run
