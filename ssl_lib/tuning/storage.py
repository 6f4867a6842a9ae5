"""Where a study lives, and how a worker that died is noticed.

* no ``--storage``: the embedded study file ``<study dir>/study.journal`` (Optuna's JournalStorage
  on a file, appended to under a file lock, so several worker processes on one machine share it;
  see docs/tuning.md for the measurement against SQLite);
* ``postgresql://...`` (or any SQLAlchemy URL, ``sqlite:///...`` included): an RDBStorage with a
  heartbeat, so the trial of a worker that died on another machine is failed by the others;
* ``journal:PATH``: a journal file elsewhere than the study directory.

A dead worker on this machine is noticed without waiting for a heartbeat: every worker holds an
exclusive ``flock`` on its own file under ``<study dir>/workers/`` for as long as it lives, and its
trials name that file. The kernel drops the lock when the process dies (kill -9 included), so a
RUNNING trial whose worker file can be locked by someone else belongs to a dead worker.

Setting a study up is serialised (:func:`setup_lock`): Optuna creates its tables, and we record a
study's identity and enqueue its first trials, without a lock of their own, so two commands started
together on an empty PostgreSQL database would race (one failing with a duplicate key).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import uuid
import warnings
from pathlib import Path

from ..config import ConfigError

#: Seconds between heartbeats of a running trial (RDB storages), and how long a trial may go without
#: one before another worker marks it failed. A trial's epoch can take minutes; the heartbeat is a
#: separate thread, so this only has to outlast a stalled database connection.
HEARTBEAT_INTERVAL = 20
GRACE_PERIOD = 120
EMBEDDED = "study.journal"


def redact(url: str) -> str:
    """The URL without its password (for messages and the study's records)."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)


def check_url(url: str | None) -> None:
    if url is None or url.startswith("journal:"):
        return
    if "://" not in url:
        raise ConfigError(f"--storage {url!r} is not a database URL (postgresql://user:password@host/db, "
                          "sqlite:///file.db or journal:FILE)")


def open_storage(url: str | None, study_dir: Path):
    """The Optuna storage for ``url`` (None: the embedded journal file in ``study_dir``)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:"):
        path = study_dir / EMBEDDED if url is None else Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        with _database_errors(url), _advisory_lock(url, "optuna tables"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat, since 2.9
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def _database_errors(url: str):
    """A missing driver, an unreachable server, a bad login: one line naming the (redacted) URL."""
    try:
        yield
    except ConfigError:
        raise
    except ImportError as err:
        raise ConfigError(f"--storage {redact(url)}: the database driver is missing ({err}); "
                          "pip install 'ssl_lib[tuning]'") from None
    except Exception as err:  # sqlalchemy's OperationalError and friends
        import sqlalchemy.exc

        first = str(getattr(err, "orig", err)).strip().splitlines()
        reached = not isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError))
        raise ConfigError(f"--storage {redact(url)}: "
                          + ("cannot set up the study tables" if reached else "cannot open the database")
                          + f" ({type(err).__name__}: {first[0] if first else ''})") from None


@contextlib.contextmanager
def _advisory_lock(url: str, what: str):
    """PostgreSQL: hold a session advisory lock named ``what`` in the database of ``url`` for the
    block; it waits for the other holders, on any machine, and the server drops it when its
    connection closes (a holder that dies included). Other databases: no lock."""
    import sqlalchemy

    with _database_errors(url):
        if sqlalchemy.engine.make_url(url).get_backend_name() != "postgresql":
            conn = None
        else:
            key = int.from_bytes(hashlib.sha256(f"ssl_lib {what}".encode()).digest()[:8], "big", signed=True)
            # NullPool: closing the connection really disconnects, which releases the lock
            conn = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
    try:
        yield
    finally:
        if conn is not None:
            conn.close()


@contextlib.contextmanager
def setup_lock(url: str | None, study_dir: Path, study_name: str):
    """Held while a study is created or checked and its identity recorded: every command that sets
    up ``study_name`` waits for the others, on any machine (PostgreSQL: an advisory lock in the
    database; the embedded journal, ``journal:`` and SQLite: a file lock in the study directory)."""
    if is_local(url):
        with exclusive(study_dir / "workers" / ".setup.lock"):
            yield
    else:
        with _advisory_lock(url, f"study {study_name}"):
            yield


def is_local(url: str | None) -> bool:
    """Storage only this machine uses: every worker's liveness can be read from its lock file."""
    return url is None or url.startswith("journal:") or url.startswith("sqlite:")


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on ``path`` for the block (waits for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def worker_identity(study_dir: Path):
    """This worker's lock file, held for the block; yields its name (recorded in each trial)."""
    folder = study_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path = folder / f"{name}.lock"
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def worker_alive(study_dir: Path, name: str) -> bool:
    """Whether the worker ``name`` of this study directory (this machine) is still running."""
    path = study_dir / "workers" / f"{name}.lock"
    try:
        handle = open(path, "r+")
    except FileNotFoundError:  # a worker removes its file only after telling all its trials
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    path.unlink(missing_ok=True)
    return False
