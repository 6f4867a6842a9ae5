"""Files written so that no reader ever sees half of one: the package's one atomic writer.

Every file the package writes (run directories, checkpoints, data caches, report records, pages,
benchmark JSON) goes through :func:`atomic_write`: the content goes to a uniquely named temporary
file beside the target, which is renamed over it only once complete. A failure (a full disk, an
exception while serialising, Ctrl-C) removes the temporary file and leaves the target as it was.
Only a process killed outright (kill -9, a power cut) leaves its temporary behind: whoever takes the
folder up again removes those with :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
#: The temporary file of ``atomic_write(folder / name)``: ``.<name>.<mkstemp's 8 characters>.tmp``.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: str | Path, content: Callable[[Path], object] | str | bytes, *, sync: bool = False) -> None:
    """Write ``path`` through a temporary file in the same directory and a rename.

    ``content`` is text, bytes, or a function that writes the temporary path it is given (for
    ``torch.save`` and the like). ``sync`` flushes the data to the disk before the rename (for large
    files that are expensive to rebuild). The file gets the usual permissions (0666 less the umask),
    not the 0600 of a temporary file.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # _TEMPORARY
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                handle.write(content)
        if callable(content):
            content(tmp)
        if sync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` (not below it) when its
    process was killed mid-write; returns them. Only for a folder no live process writes to (a run
    directory taken up again by the one process that trains it): a live writer's temporary would go too."""
    stale = [p for p in Path(folder).iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def jsonable(x):
    """``json.dumps(default=...)`` for numpy and torch values and paths."""
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def finite_or_none(values: list) -> list:
    """NaN and infinities as None (JSON has neither)."""
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=1, default=jsonable) + "\n")


def write_if_changed(path: str | Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it (so Make sees no change)."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return True
