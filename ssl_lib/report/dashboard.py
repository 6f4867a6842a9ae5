"""A study, live: optuna-dashboard on its storage (``make dashboard STUDY=dir``).

    python -m ssl_lib report dashboard STUDY [--storage URL] [--host HOST] [--port PORT]

STUDY is a study directory of ``python -m ssl_lib tune`` (``runs/tuning/<study>``). Its storage is
the embedded journal file ``STUDY/study.journal``, or ``--storage`` for a study kept in a database
(PostgreSQL: the URL with its password, which the study's records never hold). The trials' curves
are TensorBoard's: ``tensorboard --logdir STUDY`` (docs/live-curves.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import BadInput
from ..tuning.storage import EMBEDDED, check_url


def study_storage(study: str | Path, storage: str | None = None) -> str:
    """What optuna-dashboard opens for ``study``: ``storage`` when given (a database URL, or
    ``journal:FILE``'s file), else the study's embedded journal file. BadInput, naming STUDY, when
    there is no such study."""
    if not str(study).strip() or not Path(study).is_dir():
        raise BadInput(f"STUDY {str(study)!r}: not a directory; give a study directory of `python -m ssl_lib "
                       "tune` (runs/tuning/<study>)")
    study = Path(study)
    if storage:
        check_url(storage)
        return storage.removeprefix("journal:")
    journal = study / EMBEDDED
    if journal.is_file():
        return str(journal)
    recorded = _recorded_storage(study)
    if recorded and recorded != EMBEDDED:
        raise BadInput(f"STUDY {study}: the study is kept in {recorded}; give its URL with the password as "
                       "STORAGE=... (--storage)")
    raise BadInput(f"STUDY {study}: no {EMBEDDED} in it: not a study directory of `python -m ssl_lib tune` "
                   "(a study in a database: give STORAGE=postgresql://...)")


def _recorded_storage(study: Path) -> str | None:
    """The (password-free) storage study.json names, if the study has finished once."""
    try:
        return json.loads((study / "study.json").read_text()).get("storage")
    except (OSError, ValueError, AttributeError):
        return None


def serve(storage: str, host: str, port: int) -> None:
    """optuna-dashboard on ``storage`` until Ctrl-C."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise BadInput("optuna-dashboard is not installed: pip install 'ssl_lib[tuning]'") from None
    print(f"optuna-dashboard on {storage} at http://{host}:{port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    run_server(storage, host=host, port=port)


def main(argv: list[str] | None = None, prog: str = "python -m ssl_lib.report.dashboard") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("study", metavar="STUDY", help="study directory (runs/tuning/<study>)")
    parser.add_argument("--storage", help="the study's database URL (default: STUDY/study.journal)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    args = parser.parse_args(argv)
    try:
        serve(study_storage(args.study, args.storage), args.host, args.port)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
