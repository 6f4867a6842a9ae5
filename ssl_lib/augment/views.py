"""Weak and strong views, drawn per image on batched tensors on the training device.

Inputs and outputs are float images in [0, 1] of shape B x 3 x H x W; normalisation comes after,
so colour jitter sees the value range it is defined on. Every random parameter (flip, crop offset,
jitter factors and order, grayscale and blur coin flips, blur sigma) is drawn independently for
each image, from torch's default generator on the input's device (one ``torch.rand`` per view), so
``torch.manual_seed`` fixes every view of a run and the trainer's checkpointed RNG state resumes it.

The semantics are torchvision's (``RandomHorizontalFlip``, ``RandomCrop(padding, reflect)``,
``ColorJitter`` with its random order, ``RandomGrayscale``, ``GaussianBlur(3, (0.1, 2.0))``),
applied to every image of a batch at once. No operation depends on tensor values for control
flow or shapes, and no constant tensor is copied from the host per call, so a step never waits
on the GPU (the tests run both views on the ``meta`` device, where value-dependent operations fail).

Why by hand rather than kornia.augmentation (which the first version used): at this image size
every kornia op was measurably slower. Median ms for 64 images of 32 x 32 on 2 CPU cores
(AMD EPYC, torch 2.14, kornia 0.9.0, same process, quiet machine):

    op                      kornia   here
    flip + reflect crop      0.79    0.11   (kornia: two ops; here one gather)
    colour jitter            2.33    0.99   (and kornia draws one order per batch, not per image)
    random grayscale         0.15    0.08
    3x3 Gaussian blur        0.60    0.15
    weak view (64 / 128)     0.83 / 1.20   0.11 / 0.17
    strong view (64)         4.7     1.5

In a 2-core training step (fp32, 56 ms of forward and backward) that is ~6.5 ms of augmentation
with kornia and ~1.7 ms here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W luma of B x 3 x H x W RGB.

    Python-scalar weights: a weight tensor made per call would be a host-to-device copy, which
    PyTorch makes synchronous on CUDA."""
    w = GRAY_WEIGHTS
    return (x[:, 0:1] * w[0]).add_(x[:, 1:2], alpha=w[1]).add_(x[:, 2:3], alpha=w[2])


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index i in [-(n-1), 2n-2] mapped into [0, n-1] by reflection without repeating the edge."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def flip_crop(x: torch.Tensor, flip: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, padding: int
              ) -> torch.Tensor:
    """Per image: horizontal flip where ``flip``, then the H x W crop at offset (dy, dx) of the
    image reflect-padded by ``padding`` on each side (torchvision's flip, then RandomCrop).

    One gather: output pixel (i, j) reads input pixel (reflect(i + dy - p), mirror(reflect(j + dx - p))).
    """
    b, c, h, w = x.shape
    rows = _reflect(torch.arange(h, device=x.device) + dy[:, None] - padding, h)  # B x H
    cols = _reflect(torch.arange(w, device=x.device) + dx[:, None] - padding, w)  # B x W
    cols = torch.where(flip[:, None], (w - 1) - cols, cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image by ``shift`` (in turns, per image), as torchvision's
    ``adjust_hue``: value (max) and saturation (so also min) are kept per pixel.

    Written for few full-size passes: ``torch.where`` and ``remainder`` cost several times an
    add on the CPU, so the offsets ride in the numerator and one remainder does the wrap."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    # hue x chroma in sextants: g - b, 2c + b - r, 4c + r - g when the max is r, g, b (torchvision's
    # tie order). A gray pixel (chroma 0) has all three 0, so the clamp only avoids 0 / 0.
    is_r, is_g = maxc == r, maxc == g
    num = torch.where(is_r, g - b, torch.where(is_g, torch.add(b - r, chroma, alpha=2.0),
                                               torch.add(r - g, chroma, alpha=4.0)))
    h6 = torch.addcdiv(6.0 * shift.view(-1, 1, 1), num, chroma.clamp_min(1e-12))  # in (-1.6, 5.6)
    # HSV -> RGB without branches: channel n in (R, G, B) = (5, 3, 1) is
    # max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6.
    n = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # made on the device
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0),
                         value=-1.0)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue_shift: torch.Tensor, order: torch.Tensor,
                 hue: bool = True) -> torch.Tensor:
    """torchvision's ColorJitter with per-image factors and per-image application order.

    ``order`` is B x 4, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) per image.
    Brightness, contrast and saturation are torchvision's ``_blend(x, other, f) =
    clamp(f x + (1 - f) other)`` with ``other`` = 0, the image's mean luma, or its luma. The hue
    rotation (the costly step) runs once for the whole batch: three blend passes for each image's
    adjustments before its hue step, the hue rotation, three passes for those after it; in a pass
    outside its phase an image gets factor 1, which leaves it unchanged exactly (1 x + 0).
    ``hue=False`` skips the hue step (ColorJitter(hue=0)).
    """
    b = len(x)
    pos = order.argsort(1)  # B x 4: the step at which each adjustment runs
    kinds = pos[:, :3].argsort(1)  # each image's three blend kinds, in its order
    before = torch.arange(3, device=x.device) < pos[:, 3:]  # B x 3: blend s precedes the hue step
    f = torch.stack([brightness, contrast, saturation], 1).gather(1, kinds)  # B x 3
    f = torch.cat([torch.where(before, f, 1.0), torch.where(before, 1.0, f)], 1)  # B x 6 passes
    kinds = kinds.repeat(1, 2)
    # every per-pass coefficient at once (few tiny ops), then three full-size ops per pass
    coef = torch.stack([f, (1.0 - f) * (kinds == 2), (1.0 - f) * (kinds == 1)])  # factor, luma, mean luma
    coef = coef.permute(2, 0, 1).reshape(6, 3, b, 1, 1, 1).unbind(0)
    for step, (factor, w_gray, w_mean) in enumerate(coef):
        if step == 3 and hue:
            x = adjust_hue(x, hue_shift)
        gray = _gray(x)
        other = torch.addcmul(w_mean * gray.mean((2, 3), keepdim=True), w_gray, gray)
        x = torch.addcmul(other, factor, x).clamp_(0.0, 1.0)
    return x


def gaussian_blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3 x 3 Gaussian blur with a per-image sigma and reflect padding (torchvision's GaussianBlur(3)).

    The kernel is separable, (w, 1 - 2w, w) along each axis with w = e / (1 + 2e),
    e = exp(-1 / (2 sigma^2)); sigma 0 gives w = 0, the identity. Each axis is written as
    centre + w (left + right - 2 centre): three passes instead of four.
    """
    e = torch.exp(-0.5 / sigma.clamp_min(1e-6).pow(2))
    side = (e / (1.0 + 2.0 * e)).view(-1, 1, 1, 1)

    def along(p: torch.Tensor, dim: int) -> torch.Tensor:  # p is padded by one along dim
        n = p.shape[dim] - 2
        centre, left, right = p.narrow(dim, 1, n), p.narrow(dim, 0, n), p.narrow(dim, 2, n)
        return torch.addcmul(centre, side, torch.add(left, right).sub_(centre, alpha=2.0))

    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return along(along(p, 3), 2)  # along W, then along H


def weak_view(x: torch.Tensor, u: torch.Tensor, padding: int) -> torch.Tensor:
    """The weak view from B x 3 uniforms ``u``: flip (u0 < 0.5), then the crop at (u2, u1) x (2p + 1)."""
    n = 2 * padding + 1
    offsets = (u[:, 1:3] * n).long().clamp_(max=n - 1)
    return flip_crop(x, u[:, 0] < 0.5, offsets[:, 0], offsets[:, 1], padding)


def colour_view(x: torch.Tensor, u: torch.Tensor, brightness: float, contrast: float, saturation: float,
                hue: float, grayscale_p: float, blur_p: float, blur_sigma: tuple[float, float]) -> torch.Tensor:
    """The colour part of the strong view from B x 11 uniforms ``u``: 0-3 the jitter factors, 4-7
    the jitter order (their ranks), 8 the grayscale coin, 9-10 the blur coin and sigma."""

    def factor(v: torch.Tensor, amount: float) -> torch.Tensor:  # uniform in [1 - a, 1 + a], >= 0
        return (v * (2.0 * amount) + (1.0 - amount)).clamp_min_(0.0)

    x = color_jitter(x, factor(u[:, 0], brightness), factor(u[:, 1], contrast), factor(u[:, 2], saturation),
                     (u[:, 3] * 2.0 - 1.0) * hue, u[:, 4:8].argsort(1), hue=hue > 0)
    to_gray = (u[:, 8] < grayscale_p).to(x.dtype).view(-1, 1, 1, 1)  # exact: 1 g + 0 x or 0 g + 1 x
    x = torch.addcmul(_gray(x) * to_gray, x, 1.0 - to_gray)
    lo, hi = blur_sigma
    return gaussian_blur3(x, (u[:, 9] < blur_p) * (lo + (hi - lo) * u[:, 10]))  # sigma 0: no blur


def strong_view(x: torch.Tensor, u: torch.Tensor, padding: int, brightness: float, contrast: float,
                saturation: float, hue: float, grayscale_p: float, blur_p: float,
                blur_sigma: tuple[float, float]) -> torch.Tensor:
    """The strong view from B x 14 uniforms ``u``: 0-2 the weak view, 3-13 its colour part."""
    return colour_view(weak_view(x, u[:, :3], padding), u[:, 3:], brightness, contrast, saturation, hue,
                       grayscale_p, blur_p, blur_sigma)
