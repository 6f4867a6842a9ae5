"""Which ``w_kmeans`` gives the k-means term which share of the gradient? ``python -m ssl_lib kmeans-share``.

Trains a config for a few steps as its run would (no run directory; refits every ``kmeans_every``
epochs) and, at each step asked for, takes the gradient of each unweighted loss on one batch
(:func:`~ssl_lib.engine.train.diagnostic_batch`) with the centroids the run holds then.
Since the total is ``sum_j w_j g_j``, the k-means share ``||w g_k|| / ||g_sup + w_aug g_aug + w g_k||``
follows for any weight ``w`` from the same three gradients: one table of weight against share, the
figure behind the protocol configs' ``w_kmeans`` (docs/protocol.md). What a share does to accuracy
is the protocol study's question (configs/protocol/tuning/), not this command's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data import load_data
from ..engine.env import environment, resolve_device
from ..engine.loop import TrainingDiverged, run_steps
from ..engine.train import (KMeansRefit, StepSchedule, build_trainer, diagnostic_batch, initial_state,
                           iterations_per_epoch, training_split)
from ..files import write_json
from ..method.diagnostics import LOSSES, loss_gradients, loss_weights, shares, spread
from ..method.modes import step_normalisation
from ..method.step import NonFiniteFeatures, refit_centroids


def measure(cfg: Config, weights: list[float], at_steps: list[int], data=None, quiet: bool = False) -> dict:
    """The k-means share for each of ``weights`` at each of ``at_steps``, on the run's own course:
    its weights, schedule, batches and refits (centroids kept for ``kmeans_every`` epochs, as
    :func:`~ssl_lib.engine.train.train` keeps them); at each step asked for, the shares with the
    centroids the run holds then. With ``w_kmeans: 0`` (plain FixMatch, for comparison) the run has
    no centroids: they are refit at each step asked for, the share is the one a weight would have
    there, and the features' scale is recorded all the same."""
    if cfg.w_kmeans <= 0 and cfg.w_augment <= 0:
        raise ConfigError("config fields 'w_kmeans' and 'w_augment' must not both be 0 here: the run draws no unlabeled images")
    if not weights or any(w <= 0 for w in weights):
        raise ConfigError(f"--weights must be numbers > 0, got {weights}")
    if not at_steps or any(s < 0 for s in at_steps):
        raise ConfigError(f"--steps must be step counts >= 0, got {at_steps}")
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg, quiet=quiet)
    split = training_split(cfg, data, device)
    ts = split.train_set
    if len(ts.unlabeled) < data.num_classes:
        raise ConfigError(f"config field 'num_labeled' leaves {len(ts.unlabeled)} unlabeled images: the refit "
                          f"needs at least {data.num_classes}")
    trainer = build_trainer(cfg, data, device)
    state = initial_state(cfg, trainer, iterations_per_epoch(cfg, len(ts.labeled), len(ts.unlabeled)))  # the run's schedule
    refit = KMeansRefit(trainer, ts, data.num_classes)
    schedule = [StepSchedule(state.components["scheduler"]).on_step_end]
    targets, rows, t0 = sorted(set(at_steps)), [], time.perf_counter()
    while targets:
        state.record = {}
        if split.use_kmeans:
            refit.on_epoch_start(state)  # when due: every kmeans_every epochs
        lab, unl = ts.batches(cfg, state.iters_per_epoch, state.sampler)
        done = 0
        while targets and targets[0] <= state.step + state.iters_per_epoch:
            upto = targets.pop(0) - state.step
            if upto > done:
                run_steps(trainer, ts, _rows(lab, done, upto), _rows(unl, done, upto), state, schedule)
                done = upto
            step = state.step + done
            if not quiet:
                print(f"[kmeans-share] step {step}: {time.perf_counter() - t0:.1f} s", flush=True)
            rows.append(_measure_at(trainer, ts, state, step, refit.scale, weights, data.num_classes, split.use_kmeans))
        if targets:
            run_steps(trainer, ts, _rows(lab, done, None), _rows(unl, done, None), state, schedule)
        state.step += state.iters_per_epoch
        state.epoch += 1
    return {"config": cfg.to_dict(), "weights": list(weights), "data": data.description,
            "environment": environment(device), "rows": rows}


def _rows(batches, start, end):
    return None if batches is None else batches[start:end]


def _measure_at(trainer, ts, state, step: int, scale: dict, weights, num_classes: int, use_kmeans: bool) -> dict:
    """The shares for ``weights`` with the run's centroids (or, without the term, centroids refit now)."""
    cfg = trainer.cfg
    centroids = state.centroids
    if not use_kmeans:
        images = ts.images
        try:
            centroids, _, scale = refit_centroids(trainer, images, ts.unlabeled.to(images.device), num_classes,
                                                  seed=cfg.seed * 100_003 + step, labeled=ts.labeled.to(images.device))
        except NonFiniteFeatures as err:
            raise TrainingDiverged(f"{err} at step {step}") from None
    x, y_l, y_u, n_l, n_u = diagnostic_batch(trainer, ts, centroids, cfg.seed + step)
    weights_of = {**loss_weights(cfg), "kmeans": 1.0}  # the term's gradient even when the run has it off
    grads, norm = loss_gradients(trainer, x, y_l, y_u, n_l, n_u, centroids, weights_of)
    with torch.no_grad(), step_normalisation(trainer.net):
        z = trainer.net(x)[1][n_l:n_l + n_u].float()
    by_weight = {w: shares(grads, {**weights_of, "kmeans": w})["grad_share_kmeans"] for w in weights}
    return {"step": step, "feature_norm_step": norm, "feature_spread_step": spread(z), **scale,
            "kmeans_share": by_weight,
            "gradient_norms": {name: float(grads[name].norm()) for name in LOSSES if name in grads}}


def format_table(result: dict) -> str:
    """Per step: the features' mean norm at the last refit and in the step, their spread in the step and
    the centroids' spread against the features' at the last refit, and the share for each weight."""
    weights, nan = result["weights"], float("nan")
    lines = [f"k-means share of the gradient norm, ||w g_k|| / ||g||, by w_kmeans ({result['config']['name']}; "
             f"{result['data'].split(' (')[0]})",
             f"{'step':>6} {'|z| refit':>9} {'|z| step':>9} {'spread':>7} {'c/f':>5} " + " ".join(f"{w:>7g}" for w in weights)]
    for r in result["rows"]:
        lines.append(f"{r['step']:>6} {r.get('feature_norm_refit', nan):>9.3f} {r['feature_norm_step'] or nan:>9.3f} "
                     f"{r['feature_spread_step']:>7.3f} {r.get('centroid_to_feature_spread') or nan:>5.2f} "
                     + " ".join(f"{100 * (r['kmeans_share'][w] or 0):>6.1f}%" for w in weights))
    return "\n".join(lines)


def run_kmeans_share(cfg: Config, weights: list[float], at_steps: list[int], out: str | Path) -> dict:
    result = measure(cfg, weights, at_steps)
    write_json(out, result)
    print(format_table(result))
    print(f"wrote {out}")
    return result
