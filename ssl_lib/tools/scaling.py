"""One run on one process and on K (``train --nproc-per-node K``): steps per second and scaling
efficiency.

The two runs train the same config; under DDP the K processes share each global batch (each takes
1/K of it), so this is strong scaling: speedup = steps/s on K / steps/s on 1, efficiency = speedup / K.
The rate of a run is its steps over its training seconds (``train_seconds`` of the epoch records:
the steps alone, not the evaluation or the k-means refit), from the second epoch on when there is
one, since the first carries the warm-up (cuDNN's algorithm search, allocations, compiles).

``make gpu-check`` runs it on the protocol's WRN step on a machine with 2+ GPUs (:mod:`.gpu_check`);
the test suite runs the same code on two CPU processes (gloo), where the figures only show that it
works: two processes on a 2-core machine are not a speedup anyone should read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..config import Config, save_config
from ..data import ImageDataset
from ..engine.rundir import read_metrics
from ..engine.train import train


def steady_rate(run_dir: str | Path) -> dict:
    """A run's steps per second and images per second over its epochs after the first (all its
    epochs when it has one)."""
    epochs = read_metrics(run_dir)["epoch"]
    ends, seconds, images = epochs["step"], epochs["train_seconds"], epochs["images_per_sec"]
    steps = [b - a for a, b in zip([0, *ends], ends)]
    first = 1 if len(steps) > 1 else 0
    total_steps, total_seconds = sum(steps[first:]), sum(seconds[first:])
    total_images = sum(r * s for r, s in zip(images[first:], seconds[first:]))
    return {"epochs_counted": len(steps) - first, "steps": total_steps, "train_seconds": total_seconds,
            "steps_per_s": total_steps / total_seconds, "images_per_s": total_images / total_seconds}


def measure_scaling(cfg: Config, processes: int, out_dir: str | Path, *, data: ImageDataset | None = None,
                    env: dict | None = None, timeout: float = 600) -> dict:
    """Train ``cfg`` into ``out_dir/1`` (in this process) and into ``out_dir/<processes>`` (through
    the front end, ``env`` for its processes); the two rates, the speedup and the efficiency.
    RuntimeError with the processes' last line when the K-process run fails."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    one, many = out_dir / "1", out_dir / str(processes)
    train(cfg, one, quiet=True, data=data)
    config = out_dir / "config.yaml"
    save_config(cfg, config)
    result = subprocess.run([sys.executable, "-m", "ssl_lib", "train", "--nproc-per-node", str(processes),
                             "--config", str(config), "--out", str(many), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"the {processes}-process run failed (exit status {result.returncode}): {last}")
    rate_one, rate_many = steady_rate(one), steady_rate(many)
    speedup = rate_many["steps_per_s"] / rate_one["steps_per_s"]
    return {"ok": True, "processes": processes, "one": rate_one, "all": rate_many, "speedup": speedup,
            "efficiency": speedup / processes, "global_batch": cfg.batch_size + cfg.unlabeled_batch_size,
            "run_dirs": {"1": str(one), str(processes): str(many)}}
