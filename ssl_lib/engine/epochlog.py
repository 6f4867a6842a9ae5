"""The per-epoch record while a run trains: ``epochs.jsonl`` in the run directory, one JSON object
per epoch (the keys that epoch recorded), appended at each epoch's end.

    [json.loads(line) for line in open("runs/<run>/epochs.jsonl")]       the records
    pandas.read_json("runs/<run>/epochs.jsonl", lines=True)              a frame (NaN for a key an epoch lacks)

Why a line per epoch: an epoch's end appends one line instead of rewriting the whole record, so its
cost does not grow with the run (a 2^20-step protocol run has 1,024 epochs). A finished run also
gets ``metrics.json``, the same record as lists (:func:`fold`), written once at its end.

A line is written whole and then flushed; a process killed mid-line leaves a last line without its
newline, which readers ignore and :func:`truncate` cuts off on resume, with any epochs logged after
the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RunDirError
from ..files import jsonable


def create(path: str | Path) -> None:
    """An empty log at ``path`` (replacing any)."""
    Path(path).write_bytes(b"")


def append(path: str | Path, record: dict) -> None:
    """One epoch's record at the end of the log."""
    line = json.dumps(record, default=jsonable).encode("utf-8") + b"\n"  # NaN as metrics.json writes it
    with open(path, "ab") as f:
        f.write(line)


def _complete_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return data.split(b"\n")[:-1]  # the part after the last newline is a line a killed writer did not finish


def read(path: str | Path, count: int | None = None) -> list[dict]:
    """The first ``count`` records (all complete ones when None); RunDirError naming the file when it
    is missing, damaged or shorter than ``count``."""
    path = Path(path)
    try:
        lines = _complete_lines(path)
    except OSError as err:
        raise RunDirError(f"{path} cannot be read ({err.strerror})") from None
    if count is not None and len(lines) < count:
        raise RunDirError(f"{path} holds {len(lines)} epochs but the checkpoint is at epoch {count}: it is damaged; "
                          "start the run again in another --out")
    records = []
    for i, line in enumerate(lines[:count]):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise RunDirError(f"{path}: line {i + 1} is not an epoch's record; start the run again in another --out")
        records.append(record)
    return records


def truncate(path: str | Path, count: int) -> None:
    """Cut the log back to its first ``count`` records (a resume from the checkpoint at epoch ``count``);
    RunDirError as :func:`read`."""
    path = Path(path)
    if not path.is_file() and count == 0:
        return create(path)
    read(path, count)  # checks there are that many, each readable
    size = sum(len(line) + 1 for line in _complete_lines(path)[:count])
    os.truncate(path, size)


def fold(records: list[dict]) -> dict:
    """The records as ``{key: [one value per epoch that recorded it]}``: metrics.json's "epoch"."""
    columns: dict[str, list] = {}
    for record in records:
        for key, value in record.items():
            columns.setdefault(key, []).append(value)
    return columns


def unfold(columns: dict) -> list[dict]:
    """Records that :func:`fold` turns back into ``columns`` (an older run directory's lists, when it
    is resumed in this layout). A key with fewer values than others (recorded at some epochs only) is
    put in the first records: which epochs recorded it is not in the lists, and the lists are what
    is read."""
    n = max((len(v) for v in columns.values()), default=0)
    return [{key: values[i] for key, values in columns.items() if i < len(values)} for i in range(n)]
