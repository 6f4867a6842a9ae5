"""Which embedded storage for several workers on one machine? ``python -m ssl_lib.tuning.storage_bench``

K worker processes share one study and run trials that do no training: ask (TPE over three
parameters), report ``--epochs`` intermediate values with a pruning check after each, tell. So the
time measured is the storage's and the sampler's, the part that grows with contention. For each
storage: trials per second, the slowest single storage operation, errors, and whether exactly N
trials were recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path


def _storage(kind: str, folder: Path):
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if kind == "sqlite":
        return RDBStorage(f"sqlite:///{folder / 'study.db'}")
    if kind == "journal":
        return JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    return RDBStorage(kind)  # a database URL


def _worker(kind: str, folder: str, study_name: str, trials: int, epochs: int, seed: int, queue) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    errors, slowest, done = [], 0.0, 0
    study = optuna.load_study(study_name=study_name, storage=_storage(kind, Path(folder)),
                              sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10))
    while done < trials:
        try:
            t0 = time.perf_counter()
            trial = study.ask()
            x = trial.suggest_float("x", 1e-3, 1e2, log=True)
            y = trial.suggest_float("y", 0.0, 1.0)
            z = trial.suggest_int("z", 1, 5)
            slowest = max(slowest, time.perf_counter() - t0)
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                trial.report((x * y + z) / epoch, epoch)
                trial.should_prune()
                slowest = max(slowest, time.perf_counter() - t0)
            t0 = time.perf_counter()
            study.tell(trial, x * y + z)
            slowest = max(slowest, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - counting them is the point
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        done += 1
    queue.put({"errors": errors, "slowest_op_s": slowest})


def measure(kind: str, workers: int, trials: int, epochs: int) -> dict:
    import optuna

    with tempfile.TemporaryDirectory() as folder:
        name = "bench"
        optuna.create_study(study_name=name, storage=_storage(kind, Path(folder)), direction="maximize")
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        per = -(-trials // workers)
        procs = [ctx.Process(target=_worker, args=(kind, folder, name, per, epochs, i, queue)) for i in range(workers)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        seconds = time.perf_counter() - t0
        recorded = optuna.load_study(study_name=name, storage=_storage(kind, Path(folder))).get_trials()
    errors = [e for r in results for e in r["errors"]]
    return {"storage": kind, "workers": workers, "trials": per * workers, "epochs": epochs,
            "seconds": round(seconds, 2), "trials_per_s": round(per * workers / seconds, 1),
            "slowest_op_s": round(max(r["slowest_op_s"] for r in results), 3), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "complete": sum(t.state.name == "COMPLETE" for t in recorded), "recorded": len(recorded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials", type=int, default=200, help="trials in all, shared by the workers")
    parser.add_argument("--epochs", type=int, default=10, help="intermediate values per trial")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "journal"])
    parser.add_argument("--out", type=Path, help="JSON of the rows")
    args = parser.parse_args()
    rows = []
    for k in args.workers:
        for kind in args.storages:
            rows.append(measure(kind, k, args.trials, args.epochs))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from ..files import write_json

        write_json(args.out, rows)


if __name__ == "__main__":
    main()
