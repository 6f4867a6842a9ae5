"""Which ``w_kmeans`` gives the k-means term which share of the gradient? ``python -m ssl_lib kmeans-share``.

Trains a config for a few steps (no run directory) and, at each step asked for, refits the centroids
and takes the gradient of each unweighted loss on one batch (:func:`~ssl_lib.engine.train.diagnostic_batch`).
Since the total is ``sum_j w_j g_j``, the k-means share ``||w g_k|| / ||g_sup + w_aug g_aug + w g_k||``
follows for any weight ``w`` from the same three gradients: one table of weight against share, the
figure behind the protocol configs' ``w_kmeans`` (docs/protocol.md). What a share does to accuracy
is the protocol study's question (configs/protocol/tuning/), not this command's.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import Config, ConfigError
from ..data import load_data
from ..engine.env import environment, resolve_device
from ..engine.loop import run_steps
from ..engine.train import (StepSchedule, build_trainer, diagnostic_batch, initial_state, iterations_per_epoch,
                           training_split)
from ..files import write_json
from ..method.diagnostics import LOSSES, loss_gradients, loss_weights, shares
from ..method.step import refit_centroids


def measure(cfg: Config, weights: list[float], at_steps: list[int], data=None, quiet: bool = False) -> dict:
    """The k-means share for each of ``weights`` at each of ``at_steps`` (steps trained with the
    config's own weights and schedule, refit at each measurement)."""
    if cfg.w_kmeans <= 0:
        raise ConfigError("config field 'w_kmeans' must be > 0 here: the run trains with the k-means term")
    if not weights or any(w <= 0 for w in weights):
        raise ConfigError(f"--weights must be numbers > 0, got {weights}")
    if not at_steps or any(s < 0 for s in at_steps):
        raise ConfigError(f"--steps must be step counts >= 0, got {at_steps}")
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg, quiet=quiet)
    split = training_split(cfg, data, device)
    ts = split.train_set
    trainer = build_trainer(cfg, data, device)
    state = initial_state(cfg, trainer, iterations_per_epoch(cfg, len(ts.labeled), len(ts.unlabeled)))  # the run's schedule
    schedule = [StepSchedule(state.components["scheduler"]).on_step_end]
    rows, done = [], 0
    for target in sorted(set(at_steps)):
        if target > done:
            t0 = time.perf_counter()
            lab, unl = ts.batches(cfg, target - done, state.sampler)
            run_steps(trainer, ts, lab, unl, state, schedule)
            if not quiet:
                print(f"[kmeans-share] steps {done}-{target}: {time.perf_counter() - t0:.1f} s", flush=True)
            state.step = done = target
        state.centroids, state.inertia, scale = refit_centroids(trainer, ts.images, ts.unlabeled.to(ts.images.device),
                                                                data.num_classes, seed=cfg.seed * 100_003 + done)
        grads, norm = loss_gradients(trainer, *diagnostic_batch(trainer, ts, state.centroids, cfg.seed + done),
                                     state.centroids)
        by_weight = {w: shares(grads, {**loss_weights(cfg), "kmeans": w})["grad_share_kmeans"] for w in weights}
        rows.append({"step": done, "feature_norm_step": norm, **scale, "kmeans_share": by_weight,
                     "gradient_norms": {name: float(grads[name].norm()) for name in LOSSES if name in grads}})
    return {"config": cfg.to_dict(), "weights": list(weights), "data": data.description,
            "environment": environment(device), "rows": rows}


def format_table(result: dict) -> str:
    weights = result["weights"]
    lines = [f"k-means share of the gradient norm, ||w g_k|| / ||g||, by w_kmeans ({result['config']['name']}; "
             f"{result['data'].split(' (')[0]})",
             f"{'step':>6} {'|z| refit':>9} {'|z| step':>9} " + " ".join(f"{w:>8g}" for w in weights)]
    for r in result["rows"]:
        lines.append(f"{r['step']:>6} {r['feature_norm_refit']:>9.3f} {r['feature_norm_step'] or float('nan'):>9.3f} "
                     + " ".join(f"{100 * (r['kmeans_share'][w] or 0):>7.1f}%" for w in weights))
    return "\n".join(lines)


def run_kmeans_share(cfg: Config, weights: list[float], at_steps: list[int], out: str | Path) -> dict:
    result = measure(cfg, weights, at_steps)
    write_json(out, result)
    print(format_table(result))
    print(f"wrote {out}")
    return result
