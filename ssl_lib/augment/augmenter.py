"""The model's input from uint8 batches: a weak and a strong view, each a :class:`View`, and the
normalisation.

A view is a pure function of a float batch in [0, 1] and of uniforms in [0, 1) that the
:class:`Augmenter` draws with one ``torch.rand`` per batch (torch's generator: seeded and
checkpointed by the trainer). Each view declares how many uniforms it takes per image, so a new
strong view is one function, one ``View`` and one line in :data:`STRONG_VIEWS`. The strong view is
applied on top of the weak view (flip and crop first, as FixMatch does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .randaugment import UNIFORMS as RANDAUGMENT_UNIFORMS
from .randaugment import randaugment_view
from .views import colour_view, weak_view


@dataclass(frozen=True)
class View:
    """``apply(x, u)``: the view of a B x 3 x H x W batch from B x ``uniforms`` uniforms.

    A strong view gets floats in [0, 1]. A weak view must also accept uint8 images (the training
    batch is flipped and cropped before its conversion to float), so it may only move pixels.
    """

    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    uniforms: int


def flip_crop(padding: int = 4) -> View:
    """The weak view: random horizontal flip, then a random crop of the reflect-padded image."""
    return View(partial(weak_view, padding=padding), 3)


def colour_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                  grayscale_p: float = 0.2, blur_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0)
                  ) -> View:
    """The writeup's strong view (after the weak one): colour jitter in random order, random
    grayscale, random 3 x 3 Gaussian blur."""
    return View(partial(colour_view, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                        grayscale_p=grayscale_p, blur_p=blur_p, blur_sigma=tuple(blur_sigma)), 11)


def randaugment(cutout_size: int = 16) -> View:
    """FixMatch's strong view (after the weak one): two RandAugment operations per image, then Cutout."""
    return View(partial(randaugment_view, cutout_size=cutout_size), RANDAUGMENT_UNIFORMS)


#: config field ``strong_view`` -> the view built from a Config.
STRONG_VIEWS: dict[str, Callable[..., View]] = {
    "writeup": lambda cfg: colour_jitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.grayscale_p,
                                         cfg.blur_p),
    "randaugment": lambda cfg: randaugment(cutout_size=cfg.image_size // 2),
}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.float().div_(255.0)


class Normalize:
    """(x - mean) / std per channel, with the statistics of the training split; applied as one
    multiply-add, x * (1 / std) + (-mean / std)."""

    def __init__(self, mean, std, device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / self.std, -self.mean / self.std
        self.scale_uint8 = self.scale / 255.0  # for uint8 values taken as floats in [0, 255]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class Augmenter:
    """Draws the weak and strong views of a batch.

    With ``compile=True`` the view functions go through ``torch.compile``, which fuses their ~80
    element-wise passes into a few kernels (strong view on 2 CPU cores: 0.8 ms instead of 1.4-1.8
    ms; on a GPU it removes most kernel launches); the random numbers, drawn outside, are the same
    either way.
    """

    def __init__(self, weak: View | None = None, strong: View | None = None, compile: bool = False):
        self.weak_view = weak or flip_crop()
        self.strong_view = strong or colour_jitter()
        self._weak, self._strong = self.weak_view.apply, self.strong_view.apply
        if compile:
            self._weak = torch.compile(self._weak, dynamic=False)
            self._strong = torch.compile(self._strong, dynamic=False)

    @classmethod
    def from_config(cls, cfg) -> "Augmenter":
        return cls(flip_crop(cfg.crop_padding), STRONG_VIEWS[cfg.strong_view](cfg), compile=cfg.compile)

    def weak(self, x: torch.Tensor) -> torch.Tensor:
        """The weak view of a float batch in [0, 1]."""
        return self._weak(x, torch.rand(len(x), self.weak_view.uniforms, device=x.device))

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        """The strong view (on top of the weak one) of a float batch in [0, 1]."""
        n_weak = self.weak_view.uniforms
        u = torch.rand(len(x), n_weak + self.strong_view.uniforms, device=x.device)
        return self._strong(self._weak(x, u[:, :n_weak]), u[:, n_weak:])

    def batch(self, images: torch.Tensor, n_plain: int, n_strong: int, normalize: Normalize,
              memory_format: torch.memory_format = torch.contiguous_format, rows: torch.Tensor | None = None,
              world: int = 1) -> torch.Tensor:
        """The model's input from one uint8 batch, normalised, in ``memory_format``.

        The first ``n_plain`` rows are used as they are, the others go through the weak view, and
        the last ``n_strong`` of those through the strong view as well; every row draws its own
        uniforms, as ``weak`` and ``strong`` do. The same views as those two make, by a shorter
        route: the weak view on uint8 (for flips and crops one gather, a quarter of the bytes of
        float32); one conversion to float; and the normalisation written straight into the output
        buffer, which saves a concatenation and a layout copy (10-14% less time than the per-view
        route measured alone; within noise inside a training step).

        With ``rows`` (one of ``world`` processes' share of a global batch: the rows of the global
        batch its rows are, :func:`ssl_lib.distributed.global_rows`), the uniforms are drawn for
        the whole global batch and this share's rows taken, so that the processes' views together
        are the one-process views.
        """
        n_plain_weak = len(images) - n_strong
        u_weak = torch.rand(world * (len(images) - n_plain), self.weak_view.uniforms, device=images.device)
        u_strong = torch.rand(world * n_strong, self.strong_view.uniforms, device=images.device) if n_strong else None
        if rows is not None:
            u_weak = u_weak.index_select(0, rows[n_plain:] - world * n_plain)
            if n_strong:
                u_strong = u_strong.index_select(0, rows[n_plain_weak:] - world * n_plain_weak)
        geometric = self._weak(images[n_plain:], u_weak)
        x = (torch.cat([images[:n_plain], geometric]) if n_plain else geometric).float()
        out = torch.empty(x.shape, device=x.device, memory_format=memory_format)
        torch.addcmul(normalize.shift, x[:n_plain_weak], normalize.scale_uint8, out=out[:n_plain_weak])
        if n_strong:
            strong = self._strong(x[n_plain_weak:].mul_(1.0 / 255.0), u_strong)
            torch.addcmul(normalize.shift, strong, normalize.scale, out=out[n_plain_weak:])
        return out
