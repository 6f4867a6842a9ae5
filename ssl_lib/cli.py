"""Command line: ``python -m ssl_lib {train,evaluate,bench,accuracy} ...``.

Bad input (config, data, run directory) exits with status 2 and one line naming what is wrong;
a diverged run exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one experiment into a run directory",
                       description="Train one experiment. A finished run in --out is not retrained.")
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field; repeatable (e.g. --set num_unlabeled=5000)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<config hash>)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    p = sub.add_parser("evaluate", help="evaluate a run's final model on its test split",
                       description="Recompute test loss, accuracy and clustering accuracy of RUN_DIR/model.pt.")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("bench", help="measure training speed and memory (see README)",
                       description="Benchmark the training step against the model-only floor and a "
                                   "conventional DataLoader pipeline; writes JSON and prints a table.")
    p.add_argument("--config", type=Path, help="YAML config for data and batch sizes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("bench/bench.json"), help="JSON output path")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (median)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (for a smoke check)")

    p = sub.add_parser("accuracy", help="train one config over several seeds: did a change move accuracy?",
                       description="Train the config once per seed and summarise final/best test accuracy; "
                                   "with --compare, the paired difference against an earlier check.")
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (default: 0 1 2)")
    p.add_argument("--compare", type=Path, help="JSON of an earlier check to pair with, seed by seed")
    p.add_argument("--out", type=Path, default=Path("bench/accuracy.json"), help="JSON output path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that `--help` answers without loading torch.
    from .config import ConfigError, load_config
    from .data import DataError
    from .train import RunDirError, TrainingDiverged

    try:
        if args.command == "train":
            from .train import train

            cfg = load_config(args.config, args.overrides)
            out = args.out or Path("runs") / cfg.run_name()
            summary = train(cfg, out, resume=args.resume, quiet=args.quiet)
            print(f"{out}: best acc {summary['best_acc']:.4f} (epoch {summary['best_epoch']}), "
                  f"final acc {summary['final_acc']:.4f}, {summary['seconds_per_epoch']:.1f} s/epoch")
        elif args.command == "evaluate":
            from .evaluate import evaluate_run

            print(json.dumps(evaluate_run(args.run_dir), indent=1))
        elif args.command == "bench":
            from .bench import run_bench

            cfg = load_config(args.config, args.overrides)
            run_bench(cfg, args.out, repeats=args.repeats, quick=args.quick)
        elif args.command == "accuracy":
            from .accuracy import run_seeds

            cfg = load_config(args.config, args.overrides)
            run_seeds(cfg, args.seeds, args.out, compare=args.compare)
    except (ConfigError, DataError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0
