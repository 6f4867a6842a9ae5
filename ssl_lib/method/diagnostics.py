"""How large the k-means term is beside the others: figures recorded at refits and evaluations,
computed off the training step so that they change nothing in the run.

    gradient share   share_j = ||grad_theta w_j L_j|| / ||grad_theta sum_i w_i L_i||   on one batch
    spread           s(x) = sqrt(mean_i ||x_i - mean(x)||^2)

A k-means weight whose term has a share near 0 cannot change the run: comparing it with plain
FixMatch says nothing. The centroids' spread against the features' spread says how separated the
clusters are that the term pulls towards (1: as spread as the features; near 0: one blob).
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum
from .modes import step_normalisation

LOSSES = ("sup", "fixmatch", "kmeans")


def loss_weights(cfg) -> dict:
    """The config's weight of each loss, by the names of LOSSES."""
    return dict(zip(LOSSES, (cfg.w_labeled, cfg.w_augment, cfg.w_kmeans)))


def spread(x: torch.Tensor) -> float:
    """sqrt(mean_i ||x_i - mean(x)||^2): the root-mean-square distance of the rows to their mean."""
    return float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())


#: What :func:`refit_scale` returns.
REFIT_SCALE = ("feature_norm_refit", "feature_spread", "centroid_spread", "centroid_to_feature_spread")


def refit_scale(feats: torch.Tensor, centroids: torch.Tensor) -> dict:
    """The refit's features and centroids: mean feature norm, the two spreads and their ratio."""
    f, c = spread(feats), spread(centroids)
    return {"feature_norm_refit": float(feats.norm(dim=1).mean()), "feature_spread": f, "centroid_spread": c,
            "centroid_to_feature_spread": c / f if f > 0 else None}


def loss_gradients(trainer, x: torch.Tensor, y_l, y_u, n_l: int, n_u: int, centroids: torch.Tensor | None,
                   weights: dict | None = None) -> tuple[dict, float | None]:
    """The gradient of each unweighted loss that is on (w > 0 in ``weights``, by default the
    config's :func:`loss_weights`) with respect to the parameters, flat,
    on the model input ``x`` (built by ``trainer.inputs``); and the mean norm of the unlabeled weak
    views' z there (what the k-means loss pulls, to set beside the refit's ``feature_norm_refit``).

    The model normalises as in a step (batch statistics) without updating its running statistics;
    nothing is accumulated into ``.grad`` and the optimizer is not touched. The caller keeps the
    run's random streams out of it (the views', dropout's)."""
    cfg, net = trainer.cfg, trainer.net
    params = [p for p in net.parameters() if p.requires_grad]
    weights = loss_weights(cfg) if weights is None else weights
    grads = {}
    with torch.enable_grad(), step_normalisation(net, dropout=True):
        losses, _ = trainer.losses(net, x, y_l, y_u, n_l, n_u, centroids)
        for name, loss in zip(LOSSES, losses):
            if weights[name] > 0 and loss.requires_grad:
                parts = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                         for g, p in zip(parts, params)])
        with torch.no_grad():
            z = net(x)[1][n_l:n_l + n_u].float()
    dist = trainer.dist  # several processes: the global batch's gradient is the mean of theirs, as DDP's is
    grads = {name: all_reduce_sum(g, dist) / dist.world for name, g in grads.items()}
    norm = all_reduce_sum(z.norm(dim=1).mean().reshape(1), dist) / dist.world if n_u else None
    return grads, (None if norm is None else float(norm))


def shares(grads: dict, weights: dict) -> dict:
    """``grad_share_<loss>`` = ||w_j g_j|| / ||sum_i w_i g_i|| for unweighted gradients ``grads``;
    0 for a loss that is off, None for all when no loss has a gradient."""
    terms = {name: weights[name] * g for name, g in grads.items() if weights.get(name, 0) > 0}
    total = torch.stack(list(terms.values())).sum(0).norm() if terms else None
    return {f"grad_share_{name}": (None if total is None or total == 0 else
                                   float(terms[name].norm() / total) if name in terms else 0.0) for name in LOSSES}


def gradient_shares(trainer, x: torch.Tensor, y_l, y_u, n_l: int, n_u: int, centroids: torch.Tensor | None
                    ) -> dict:
    """Each weighted loss's share of the step's gradient norm on ``x``, at the config's weights, and
    ``feature_norm_step`` (:func:`loss_gradients`)."""
    grads, norm = loss_gradients(trainer, x, y_l, y_u, n_l, n_u, centroids)
    return {"feature_norm_step": norm, **shares(grads, loss_weights(trainer.cfg))}
