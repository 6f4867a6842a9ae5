"""The method in one screen: a training step (supervised + FixMatch + k-means losses, one optimizer
step) and the k-means refit that fixes the centroids between refits.

    step:   x = [labeled weak | unlabeled weak | unlabeled strong]     (one forward pass)
            L = w_labeled L_sup + w_augment L_aug(mask from the weak view) + w_kmeans L_kmeans(z_weak)
            (kmeans_loss standardised: z_weak and the centroids each by their own mean and spread)
    refit:  z of the unlabeled images' weak views in batches shaped like the step's, in a seeded
            random order, BatchNorm on batch statistics (kmeans_refit: step) -> k-means -> centroids
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..augment.augmenter import Augmenter, Normalize, to_unit
from ..config import Config
from ..distributed import SINGLE, Dist, all_reduce_sum, broadcast, global_rows, slices
from .diagnostics import refit_scale
from .kmeans import fit_centroids
from .modes import eval_mode, has_batchnorm, step_normalisation
from .losses import fixmatch_loss, kmeans_loss, standardise, supervised_loss


@dataclass
class Trainer:
    """Everything one training step needs, built once per run."""

    cfg: Config
    model: torch.nn.Module  # possibly compiled; ``net`` is the plain module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augment: Augmenter
    normalize: Normalize
    device: torch.device
    memory_format: torch.memory_format = torch.contiguous_format
    dist: Dist = SINGLE  # this process's share of the global batch (torchrun)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.cfg.precision == "bf16" else None

    def step(self, x_l: torch.Tensor | None, y_l: torch.Tensor | None, x_u: torch.Tensor | None,
             y_u: torch.Tensor | None, centroids: torch.Tensor | None) -> torch.Tensor:
        """One optimizer step on a labeled and an unlabeled uint8 batch: their views, then :meth:`update`.
        Returns the values of :data:`.columns.ITER_COLUMNS` on the device.

        Either batch may be None (M = 0, or M = |D|). ``y_u`` is used only to log pseudo-label accuracy.
        """
        x, n_l, n_u = self.inputs(x_l, x_u, centroids)
        return self.update(x, y_l, y_u, n_l, n_u, centroids)

    def inputs(self, x_l: torch.Tensor | None, x_u: torch.Tensor | None, centroids: torch.Tensor | None,
               weak: bool = False) -> tuple[torch.Tensor, int, int]:
        """The model's input ``[labeled | unlabeled weak | unlabeled strong]`` from uint8 batches, and
        the number of labeled and of unlabeled images in it (the unlabeled ones only if a loss uses
        them, or with ``weak``: the k-means refit's view of a step)."""
        cfg = self.cfg
        use_weak_u = x_u is not None and (weak or cfg.w_augment > 0 or centroids is not None)
        use_strong_u = x_u is not None and cfg.w_augment > 0
        # One forward pass over [labeled | unlabeled weak | unlabeled strong], made by one
        # augmentation call from one uint8 batch (the unlabeled images twice when there is a strong view).
        x_u = x_u if use_weak_u or use_strong_u else None
        n_l, n_u = (0 if x_l is None else len(x_l)), (0 if x_u is None else len(x_u))
        x = torch.cat([b for b in (x_l, x_u, x_u if use_strong_u else None) if b is not None])
        segments = tuple(n for n in (n_l, n_u, n_u if use_strong_u else 0) if n)
        x = self.augment.batch(x, n_plain=n_l if cfg.labeled_view == "none" else 0,
                               n_strong=n_u if use_strong_u else 0, normalize=self.normalize,
                               memory_format=self.memory_format, world=self.dist.world,
                               rows=global_rows(segments, self.dist, x.device) if self.dist.on else None)
        return x, n_l, n_u

    def update(self, x: torch.Tensor, y_l: torch.Tensor | None, y_u: torch.Tensor | None, n_l: int, n_u: int,
               centroids: torch.Tensor | None) -> torch.Tensor:
        """Forward, the three losses, backward and the optimizer step on the model's input ``x``:
        ``n_l`` labeled views, ``n_u`` weak unlabeled views, then the strong views of the same
        unlabeled images (or none). Returns the values of :data:`.columns.ITER_COLUMNS` on the device."""
        cfg = self.cfg
        (loss_sup, loss_aug, loss_kmeans), stats = self.losses(self.model, x, y_l, y_u, n_l, n_u, centroids)
        loss = cfg.w_labeled * loss_sup + cfg.w_augment * loss_aug + cfg.w_kmeans * loss_kmeans
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # Stays on the device: the host reads these once per logging interval, not every step.
        return torch.stack([loss_sup, loss_aug, loss_kmeans, loss, *stats]).detach()

    def losses(self, model: nn.Module, x: torch.Tensor, y_l: torch.Tensor | None, y_u: torch.Tensor | None,
               n_l: int, n_u: int, centroids: torch.Tensor | None) -> tuple[tuple, tuple]:
        """The forward pass of ``model`` on ``x`` and the three unweighted losses: ``((L_sup, L_aug,
        L_kmeans), (mask rate, pseudo-label accuracy, the same among masked-in images))``; a loss
        that is off is 0."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits, z = model(x)
        logits, z = logits.float(), z.float()

        # 1. supervised cross-entropy on the labeled batch
        loss_sup = supervised_loss(logits[:n_l], y_l) if n_l else logits.new_zeros(())
        # 2. FixMatch: pseudo-labels from the weak view, confidence mask, CE on the strong view
        if len(x) > n_l + n_u:
            logits_weak, logits_strong = logits[n_l:n_l + n_u], logits[n_l + n_u:]
            loss_aug, mask, pseudo = fixmatch_loss(logits_weak, logits_strong, cfg.tau)
            correct = (pseudo == y_u).float()
            mask_rate, pseudo_acc = mask.mean(), correct.mean()
            pseudo_acc_masked = (correct * mask).sum() / mask.sum()  # NaN when nothing passes tau
        else:
            nan = logits.new_full((), float("nan"))
            loss_aug, mask_rate, pseudo_acc, pseudo_acc_masked = logits.new_zeros(()), nan, nan, nan
        # 3. k-means: pull each unlabeled feature towards its nearest centroid (fixed since the refit)
        use_kmeans = n_u and centroids is not None
        z_u = z[n_l:n_l + n_u]
        if use_kmeans and cfg.kmeans_loss == "standardised":  # centroids standardised at the refit
            z_u = standardise(z_u)
        loss_kmeans = kmeans_loss(z_u, centroids)[0] if use_kmeans else logits.new_zeros(())
        return (loss_sup, loss_aug, loss_kmeans), (mask_rate, pseudo_acc, pseudo_acc_masked)


class NonFiniteFeatures(FloatingPointError):
    """The refit's features hold NaN or infinite values (the training loop stops with one line)."""


@contextlib.contextmanager
def seeded_stream(device: torch.device, seed: int):
    """Within: torch's random stream (and this CUDA device's) seeded by ``seed``, put back after,
    so that the refit's views leave the run's random streams as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def features(trainer: Trainer, images: torch.Tensor, indices: torch.Tensor, batch_size: int,
             labeled: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """z of ``images[indices]`` (one row per index, in their order), as the k-means loss sees z in a
    step (``kmeans_refit``, ``kmeans_bn``):

    * ``step`` view: the weak views of the images, in batches shaped like the step's
      ``[batch_size labeled weak | unlabeled_batch_size weak | their strong views]`` (the labeled
      images drawn from ``labeled``, the strong part only when FixMatch is on), BatchNorm on each
      batch's statistics. The last batch is filled up with images from the start of the order;
      only their first z is kept.
    * ``clean`` view on batch statistics: the un-augmented images alone, in near-equal batches of
      at most ``batch_size`` (a small last batch would be normalised by noisy statistics).
    * ``clean`` view otherwise (no BatchNorm, or ``kmeans_bn: running``): eval mode, batches of
      ``batch_size`` in the given order; the features do not depend on the batches.

    On batch statistics the images go into the batches in a random order drawn from ``seed``
    (its own generators: the run's random streams are left as they were), so that the batches
    mix the classes whatever the data's order (an image folder is read class by class). The
    running statistics are never updated. Several processes (torchrun) each take their share of
    every batch (BatchNorm's statistics are the whole batch's) and add up their rows, so every
    process holds every feature."""
    net, cfg, dist = trainer.net, trainer.cfg, trainer.dist
    n = len(indices)
    view = cfg.kmeans_refit_view()
    on_batch_statistics = view == "step" or (cfg.kmeans_bn == "batch" and has_batchnorm(net))
    out = (torch.zeros if dist.on else torch.empty)(n, net.feature_dim, device=images.device)
    dtype = trainer.autocast_dtype

    def z_of(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x)[1].float()

    if not on_batch_statistics:
        with eval_mode(net):
            for start in range(0, n, batch_size):
                first, last = (start + a for a in slices(min(batch_size, n - start), dist))
                out[first:last] = z_of(trainer.normalize(to_unit(images.index_select(0, indices[first:last]))))
        return all_reduce_sum(out, dist)  # every row from exactly one process: the sum is exact

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).to(indices.device)  # row j of the pass is indices[order[j]]
    with step_normalisation(net):
        if view == "clean":
            batches = -(-n // batch_size)
            bounds = [n * i // batches for i in range(batches + 1)]
            for start, end in zip(bounds, bounds[1:]):
                first, last = (start + a for a in slices(end - start, dist))
                rows = order[first:last]
                out[rows] = z_of(trainer.normalize(to_unit(images.index_select(0, indices[rows]))))
        else:
            _step_view_features(trainer, images, indices, order, labeled, gen, seed, z_of, out)
    return all_reduce_sum(out, dist)


def _step_view_features(trainer: Trainer, images: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                        labeled: torch.Tensor | None, gen: torch.Generator, seed: int, z_of, out: torch.Tensor) -> None:
    """The ``step`` view of :func:`features`: fills ``out`` (rows in the order of ``indices``)."""
    cfg, dist = trainer.cfg, trainer.dist
    n, u, b = len(indices), cfg.unlabeled_batch_size, cfg.batch_size
    batches = -(-n // u)
    slots = torch.arange(batches * u, device=order.device)  # slot j of the pass holds row order[j mod n]
    rows = order[slots % n].view(batches, u)
    lab = None
    if labeled is not None and len(labeled):  # reshuffled passes over the labeled images, as a step draws them
        passes = -(-batches * b // len(labeled))
        lab = torch.cat([labeled[torch.randperm(len(labeled), generator=gen).to(labeled.device)]
                         for _ in range(passes)])[:batches * b].view(batches, b).to(images.device)
    share_u, share_b = u // dist.world, b // dist.world  # the step's batch sizes split evenly (checked)
    with seeded_stream(images.device, seed):
        for i in range(batches):
            mine = slice(dist.rank * share_u, (dist.rank + 1) * share_u)
            x_u = images.index_select(0, indices[rows[i, mine]])
            x_l = None if lab is None else images.index_select(0, lab[i, dist.rank * share_b:(dist.rank + 1) * share_b])
            x, n_l, n_u = trainer.inputs(x_l, x_u, None, weak=True)
            z = z_of(x)[n_l:n_l + n_u]
            first = i * u + dist.rank * share_u
            keep = slots[first:first + share_u] < n  # a filled-up slot repeats a row seen before
            out[rows[i, mine][keep]] = z[keep]


def refit_centroids(trainer: Trainer, images: torch.Tensor, unlabeled: torch.Tensor, num_classes: int,
                    seed: int, labeled: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict]:
    """The k-means refit: centroids (and inertia) of the unlabeled images' features (:func:`features`;
    ``labeled``: the labeled images that fill the step-shaped batches), k = num_classes, and their
    scale (:func:`~.diagnostics.refit_scale`). The centroids carry no gradient and stay fixed until
    the next refit; with ``kmeans_loss: standardised`` they are returned standardised by the
    features' mean and spread, as the step standardises its z. Raises :class:`NonFiniteFeatures`
    before the fit if a feature is NaN or infinite."""
    cfg, dist = trainer.cfg, trainer.dist
    on_batch_statistics = cfg.kmeans_bn == "batch" and has_batchnorm(trainer.net)
    feats = features(trainer, images, unlabeled, cfg.unlabeled_batch_size if on_batch_statistics else cfg.eval_batch_size,
                     labeled, seed)
    bad = int((~torch.isfinite(feats).all(1)).sum())
    if bad:
        raise NonFiniteFeatures(f"the k-means refit's features are NaN or infinite for {bad} of {len(feats)} images")
    if dist.main:  # one fit, sent to the others: k-means on another machine may round differently
        centroids, inertia = fit_centroids(feats, num_classes, cfg.kmeans_n_init, seed=seed, backend=cfg.kmeans_backend)
    else:
        centroids, inertia = torch.empty(num_classes, feats.shape[1], device=feats.device), 0.0
    if dist.on:
        centroids = broadcast(centroids.contiguous(), dist)
        inertia = float(broadcast(torch.tensor([inertia], dtype=torch.float64, device=feats.device), dist))
    scale = refit_scale(feats, centroids)
    if cfg.kmeans_loss == "standardised":  # in the units the loss compares them in: the refit's own
        mean = feats.mean(0)
        centroids = standardise(centroids, mean, (feats - mean).pow(2).mean().sqrt())
    return centroids, inertia, scale
