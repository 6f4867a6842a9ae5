"""Command line: ``python -m ssl_lib COMMAND ...`` (or ``ssl-lib COMMAND ...``).

Bad input (a config, data, a path or a saved file) exits with status 2 and one line naming what is
wrong; a diverged run exits with status 3; a run stopped by SIGTERM or SIGUSR1 saves a checkpoint
at its current step and exits with 75 ("requeue me": run the same command again); an interrupted
one with 130. Under torchrun, a process that fails alone prints one line naming itself and its error
and leaves at once, so that the others stop within seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1


def _config_fields_help() -> str:
    from .config import _DEFAULTS, FIELD_HELP

    width = max(map(len, FIELD_HELP))
    lines = ["config fields (set in the --config YAML or with --set KEY=VALUE; default, then meaning):"]
    for key, text in FIELD_HELP.items():
        lines.append(f"  {key:<{width}}  {_DEFAULTS[key]!r:<12} {text}")
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field; repeatable (e.g. --set num_unlabeled=5000)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one config into a run directory",
                       description="Train one config. A finished run in --out is not retrained.",
                       epilog=_config_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<config hash>)")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the unfinished run in --out from its checkpoint; --resume auto: start the run "
                        "when --out holds none, continue it when unfinished (the one command a scheduler repeats)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--nproc-per-node", type=int, metavar="K",
                   help="train on K processes of this machine (torchrun's engine; one GPU each, or gloo on "
                        "CPUs); the config's batch sizes are the global batch")

    p = sub.add_parser("evaluate", help="evaluate a finished run's model on its test split",
                       description="Recompute test loss, accuracy and clustering accuracy of RUN_DIR/model.pt.")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("bench", help="measure training speed and memory (docs/performance.md)",
                       description="Benchmark the training step against the model-only floor and a "
                                   "conventional DataLoader pipeline; writes JSON and prints a table.")
    _add_config_args(p)
    p.add_argument("--out", type=Path, default=Path("bench/bench.json"), help="JSON output path")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (median)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (for a smoke check)")

    p = sub.add_parser("bench-history", help="seconds and bytes one epoch's history costs to write, early and late",
                       description="Write one epoch of history (step log, metrics.json, checkpoint) after a "
                                   "synthetic history of each of --steps steps; one table, one JSON.")
    p.add_argument("--steps", type=int, nargs="+", default=[1024, 2**20], help="history lengths (default: 1024 1048576)")
    p.add_argument("--out", type=Path, default=Path("bench/history.json"), help="JSON output path")

    p = sub.add_parser("accuracy", help="train one config over several seeds: did a change move accuracy?",
                       description="Train the config once per seed and summarise final/best test accuracy; "
                                   "with --compare, the paired difference against an earlier check.")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (default: 0 1 2)")
    p.add_argument("--compare", type=Path, help="JSON of an earlier check to pair with, seed by seed")
    p.add_argument("--out", type=Path, default=Path("bench/accuracy.json"), help="JSON output path")

    p = sub.add_parser("kmeans-share", help="the k-means term's share of the gradient for several w_kmeans",
                       description="Train a config a few steps and report, at each of --steps, the k-means "
                                   "term's share of the gradient norm for each of --weights (one table, one JSON).")
    _add_config_args(p)
    p.add_argument("--weights", type=float, nargs="+", default=[0.25, 1, 4, 8, 16, 64], help="w_kmeans values")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 10, 30], help="measure after this many steps")
    p.add_argument("--out", type=Path, default=Path("bench/kmeans-share.json"), help="JSON output path")

    p = sub.add_parser("gpu-check", help="check and measure the GPU path (CUDA tests, bench, k-means, a training)",
                       description="The CUDA checks, the bench on the GPU in bf16+compile and fp32, the torch "
                                   "k-means against scikit-learn, and a short full-data training; one JSON "
                                   "and a table.")
    p.add_argument("--data-root", help="CIFAR-10 (torchvision folder) or image-folder root for the training "
                                       "and bench (default: synthetic data for the bench; no training)")
    p.add_argument("--dataset", default="cifar10", help="cifar10 | imagefolder (with --data-root)")
    p.add_argument("--cache-dir", default="", help="decoded-data cache")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the exp1-m40000 training (default 3)")
    p.add_argument("--out", type=Path, default=Path("bench/gpu-check.json"), help="JSON output path")
    p.add_argument("--quick", action="store_true", help="a smoke check: tiny budgets everywhere")

    # --- tune (ssl_lib/tuning) ---
    p = sub.add_parser("tune", help="tune hyperparameters with Optuna on a validation split (docs/tuning.md)",
                       description="Run (or continue) an Optuna study until TRIALS trials are finished "
                                   "(complete or pruned), scoring each on the base config's val_size held-out "
                                   "training images; then write best.yaml and train it once, tested once.")
    _add_config_args(p)
    p.add_argument("--space", type=Path, required=True, help="YAML: config field -> {low, high[, log, step]} "
                                                                 "or {choices: [...]}")
    p.add_argument("--trials", type=int, help="finished trials wanted in the study (default: the profile's "
                                                "tune_trials: smoke 3, quick 20, full 40)")
    p.add_argument("--study", help="study name (default: <config name>-<space file name>[-<profile>])")
    p.add_argument("--storage", help="postgresql://user:password@host/db to share the study across machines "
                                     "(default: the embedded study.journal in the study directory)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--out", type=Path, help="study directory (default: runs/tuning/<study>)")
    p.add_argument("--profile", help="scale the base config like the report's experiments (full, quick, smoke)")
    p.add_argument("--protocol-profile", help="put the base config (a configs/protocol/ run) under a FixMatch protocol "
                                              "profile (configs/protocol/profiles/: study, study-cpu)")
    p.add_argument("--pruner", default="median", help="median (default) | hyperband | none")
    p.add_argument("--sampler", default="tpe", help="tpe (default) | random: random search, each value seeded by the "
                                                    "trial number and the parameter (a pool for the expected best of k)")
    p.add_argument("--seed-per-trial", action="store_true",
                   help="trial i trains with seed + i, its data (subsets, validation) fixed by the base seed")
    p.add_argument("--no-final", action="store_true", help="stop after best.yaml (no training on the full split)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    # --- end tune ---

    for name, text in (("experiments", "the writeup's experiment grid under a profile (list, show, data, train)"),
                       ("report", "build the HTML report (page, index, pages)")):
        p = sub.add_parser(name, help=text, add_help=False, description=text)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _train_argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv[1:]):
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


class _RunFailed(Exception):
    """A process of a torchrun run failed; ``line`` is what it prints (None: another process says it)."""

    def __init__(self, line: str | None, status: int):
        super().__init__(line)
        self.line, self.status = line, status


def _train(cfg, out: Path, args, dist) -> dict:
    """``train``. Under torchrun the processes leave the process group together when they stop
    together (done, diverged, preempted: process 0 may still be writing), and at once when one
    failed (no barrier, :func:`~ssl_lib.distributed.abort`): a process blocked in a collective with
    it then fails too, at once, and torchrun's agent ends the rest."""
    from .distributed import abort, stop
    from .engine.loop import TrainingDiverged
    from .engine.preempt import Preempted
    from .engine.train import train

    try:
        summary = train(cfg, out, resume=args.resume is not None, quiet=args.quiet, dist=dist)
    except (TrainingDiverged, Preempted):  # every process stops at the same step
        stop(dist)
        raise
    except BaseException as err:
        if not dist.on:
            raise
        failure = _RunFailed(*_failure_line(err, dist))  # before leaving: the reports go through the group's store
        abort(dist)
        raise failure from err
    stop(dist)
    return summary


def _failure_line(err: BaseException, dist) -> tuple[str | None, int]:
    """Under torchrun: the line a failed process prints (None when another process of the run
    printed the first one) and its exit status. The first process to fail names its rank and its
    error; one whose collective broke because another process ended without a word (killed) says so."""
    from .distributed import failure_reported, first_failure, lost_peer
    from .errors import BadInput

    if isinstance(err, KeyboardInterrupt):
        return ("interrupted" if dist.main else None), EXIT_INTERRUPTED
    if lost_peer(err):
        if failure_reported(dist):
            return None, EXIT_FAILED
        return (f"error: process {dist.rank} stopped: another process of this run ended; run the same command "
                "with --resume auto to continue from the last checkpoint"), EXIT_FAILED
    first = first_failure(dist)
    if isinstance(err, BadInput):  # the same on every process, or this process's data or paths
        return (f"error: {err}" if first else None), EXIT_BAD_INPUT
    text = (str(err).strip().splitlines() or [""])[0]
    return (f"error: process {dist.rank} failed: {type(err).__name__}: {text}" if first else None), EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Commands with their own subcommands parse their arguments themselves (their --help too).
    if argv and argv[0] == "experiments":
        from .experiments.runs import main as experiments_main

        return experiments_main(argv[1:], prog="python -m ssl_lib experiments")
    if argv and argv[0] == "report":
        from .report.build import main as report_main

        return report_main(argv[1:], prog="python -m ssl_lib report")
    args = _parser().parse_args(argv)
    # Imported here so that `--help` answers without loading torch.
    from .config import ConfigError, load_config
    from .data import DataError
    from .distributed import Dist, check_slurm_start, from_env
    from .engine.loop import TrainingDiverged
    from .engine.rundir import RunDirError

    try:
        dist = from_env()  # torchrun's or srun's processes: which one this is
        if args.command == "train":
            check_slurm_start()
    except ConfigError as err:  # every task of the step gets it: the first alone says it
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not dist.main:  # under torchrun, process 0 alone prints: its lines and its one-line errors
        sys.stdout = open(os.devnull, "w")

    def error(text: str) -> None:
        if dist.main:
            print(f"error: {text}", file=sys.stderr)

    try:
        if args.command == "train":
            from .engine import preempt
            from .engine.train import check_processes, check_split

            cfg = load_config(args.config, args.overrides)
            out = args.out or Path("runs") / cfg.run_name()
            if args.resume == "yes" and not out.is_dir():  # a typo must not silently start a new run
                raise RunDirError(f"--resume: {out} is not a run directory; leave out --resume (or use --resume auto) "
                                  "to start a new run")
            if args.nproc_per_node is not None and not dist.on:
                if args.nproc_per_node < 1:
                    raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
                check_split(cfg.validate(), Dist(0, args.nproc_per_node))
                check_processes(cfg, Dist(0, args.nproc_per_node))
                from .engine.launch import launch_train

                return launch_train(args.nproc_per_node, _train_argv_without_nproc(argv))
            preempt.install()  # SIGTERM / SIGUSR1: save at the current step, exit EXIT_REQUEUE
            try:
                summary = _train(cfg, out, args, dist)
            except preempt.Preempted as err:
                if dist.main:
                    print(f"{out}: {err}; run the same command again to continue (--resume auto)", file=sys.stderr)
                return preempt.EXIT_REQUEUE
            except _RunFailed as failed:
                if failed.line:
                    print(failed.line, file=sys.stderr, flush=True)
                return failed.status
            best, final, spe = summary["best_acc"], summary["final_acc"], summary["seconds_per_epoch"]
            print(f"{out}: best acc {best:.4f} (epoch {summary['best_epoch']}), final acc {final:.4f}"
                  + (f", {spe:.1f} s/epoch" if spe is not None else "")
                  + (f", {dist.world} processes" if dist.on else ""))
        elif args.command == "evaluate":
            from .engine.train import evaluate_run

            print(json.dumps(evaluate_run(args.run_dir), indent=1))
        elif args.command == "bench":
            from .tools.bench import run_bench

            run_bench(load_config(args.config, args.overrides), args.out, repeats=args.repeats, quick=args.quick)
        elif args.command == "bench-history":
            from .tools.history_bench import run_history_bench

            try:
                run_history_bench(args.steps, args.out)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        elif args.command == "accuracy":
            from .tools.accuracy import run_seeds

            run_seeds(load_config(args.config, args.overrides), args.seeds, args.out, compare=args.compare)
        elif args.command == "kmeans-share":
            from .tools.kmeans_share import run_kmeans_share

            run_kmeans_share(load_config(args.config, args.overrides), args.weights, args.steps, args.out)
        elif args.command == "gpu-check":
            from .tools.gpu_check import run_gpu_check

            from .tools.gpu_check import GpuCheckFailed

            try:
                run_gpu_check(args.out, data_root=args.data_root, dataset=args.dataset, cache_dir=args.cache_dir,
                              epochs=args.epochs, quick=args.quick)
            except GpuCheckFailed as err:  # the table and the JSON are written; say what failed, once
                print(f"error: gpu-check: {err}", file=sys.stderr)
                return 1
        elif args.command == "tune":  # --- tune (ssl_lib/tuning) ---
            from .tuning.command import spec_from_args
            from .tuning.study import StudyUnfinished, tune

            try:
                tune(spec_from_args(args))
            except StudyUnfinished as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    except (ConfigError, DataError, RunDirError) as err:
        error(str(err))
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        error(str(err))
        return EXIT_DIVERGED
    except OSError as err:  # a file the user named that cannot be read or written
        if err.filename is None:
            raise
        error(f"{err.filename}: {err.strerror}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if dist.main:
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
