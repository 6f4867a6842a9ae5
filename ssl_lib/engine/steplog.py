"""The per-step history: one row per optimizer step, appended to ``steps.npy`` in the run directory
each time the host reads the losses (every ``log_every`` steps and at the end of an epoch).

    np.load("runs/<run>/steps.npy")                  a record array: rows["loss_total"], rows["lr"], ...
    pandas.DataFrame(np.load("runs/<run>/steps.npy"))  the same as a frame

Why a ``.npy`` of fixed-size records rather than a CSV: numpy reads it in one call with the column
names and types from its header; a row is :data:`DTYPE`'s 52 bytes holding the values as computed
(float32 step values, float64 learning rate), where a CSV row written exactly is ~3x that; and
cutting the log back to a step (:func:`truncate`, on resume) is arithmetic on the file size, not a
scan of its lines. Appending writes only the new rows and the fixed-size header with the new row
count, so the cost of a log call does not depend on how long the log already is.

The file is not written through :func:`~ssl_lib.files.atomic_write` (that would rewrite it whole):
rows go at the end first, then the header's count. A process killed in between leaves rows past
the count, which readers ignore (numpy reads the counted rows) and :func:`truncate` cuts off.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import RunDirError
from ..method.columns import ITER_COLUMNS

COLUMNS = ("step", "epoch", *ITER_COLUMNS, "lr")
DTYPE = np.dtype([("step", "<i8"), ("epoch", "<i8"), *((c, "<f4") for c in ITER_COLUMNS), ("lr", "<f8")])
_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0, then a 2-byte little-endian header length


def _header_text(rows: int) -> str:
    return repr({"descr": DTYPE.descr, "fortran_order": False, "shape": (rows,)})


#: The whole header, padded to a multiple of 64 bytes (the format's alignment) with room for any count.
HEADER_BYTES = -(-(len(_MAGIC) + 2 + len(_header_text(2**62)) + 1) // 64) * 64


def _header(rows: int) -> bytes:
    text = _header_text(rows).encode("latin1")
    body = text + b" " * (HEADER_BYTES - len(_MAGIC) - 2 - len(text) - 1) + b"\n"
    return _MAGIC + (len(body)).to_bytes(2, "little") + body


def create(path: str | Path) -> None:
    """An empty log at ``path`` (replacing any)."""
    with open(path, "wb") as f:
        f.write(_header(0))


def rows_on_disk(path: Path) -> int:
    """Whole rows in the file (the header's count, or more if a writer died between the two writes)."""
    return max(0, (os.path.getsize(path) - HEADER_BYTES) // DTYPE.itemsize)


def append(path: str | Path, first_step: int, epoch: int, values, lrs) -> None:
    """Append the steps ``first_step, first_step + 1, ...`` of ``epoch``: ``values`` (steps x
    ITER_COLUMNS, numpy or a CPU tensor) and their learning rates."""
    values = np.asarray(values, dtype=np.float32)
    rows = np.empty(len(values), DTYPE)
    rows["step"] = np.arange(first_step, first_step + len(values))
    rows["epoch"] = epoch
    for j, column in enumerate(ITER_COLUMNS):
        rows[column] = values[:, j]
    rows["lr"] = lrs
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + first_step * DTYPE.itemsize)
        f.write(rows.tobytes())
        f.seek(0)
        f.write(_header(first_step + len(rows)))


def check(path: str | Path, steps: int) -> None:
    """RunDirError unless the log holds at least its first ``steps`` rows (those of a checkpoint at
    step ``steps``), changing nothing."""
    path = Path(path)
    if not path.is_file():
        if steps:
            raise RunDirError(f"{path} is missing: the checkpoint is at step {steps}; start the run again in another --out")
        return
    have = rows_on_disk(path)
    if have < steps:
        raise RunDirError(f"{path} holds {have} steps but the checkpoint is at step {steps}: the step log is damaged; "
                          "start the run again in another --out")
    if steps:
        last = np.fromfile(path, DTYPE, count=1, offset=HEADER_BYTES + (steps - 1) * DTYPE.itemsize)
        if int(last["step"][0]) != steps - 1:
            raise RunDirError(f"{path}: row {steps - 1} is step {int(last['step'][0])}: the step log is damaged; "
                              "start the run again in another --out")


def truncate(path: str | Path, steps: int) -> None:
    """Cut the log back to its first ``steps`` rows (a resume from the checkpoint at step ``steps``:
    what a killed session logged after it goes); RunDirError as :func:`check`."""
    path = Path(path)
    check(path, steps)
    if not path.is_file():
        return create(path)
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + steps * DTYPE.itemsize)
        f.seek(0)
        f.write(_header(steps))


def read(path: str | Path) -> np.ndarray:
    """The log's rows (a record array of :data:`DTYPE`); RunDirError naming the file if it is not one."""
    path = Path(path)
    try:
        rows = np.load(path)
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise RunDirError(f"{path} cannot be read as a step log ({type(err).__name__})") from None
    if rows.dtype.names is None or not set(COLUMNS) <= set(rows.dtype.names):
        raise RunDirError(f"{path} is not a step log (columns {rows.dtype.names})")
    return rows


def from_lists(iteration: dict) -> np.ndarray:
    """The rows of an old run directory's ``metrics.json`` "iteration" lists (None for NaN)."""
    n = max((len(v) for v in iteration.values()), default=0)  # a list may be missing: "step" too
    rows = np.empty(n, DTYPE)
    for column in COLUMNS:
        values = iteration.get(column)
        if values is None:  # not logged by that version: steps counted, epochs unknown (0), values NaN
            values = range(1, n + 1) if column == "step" else [0] * n if column == "epoch" else [None] * n
        rows[column] = np.array([np.nan if v is None else v for v in values], dtype=float)
    return rows


def write(path: str | Path, rows: np.ndarray) -> None:
    """A whole log at once (converting an old run directory)."""
    with open(path, "wb") as f:
        f.write(_header(len(rows)))
        f.write(np.ascontiguousarray(rows, DTYPE).tobytes())

