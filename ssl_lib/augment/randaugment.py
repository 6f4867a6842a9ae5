"""FixMatch's RandAugment strong view, drawn per image on batched tensors on the device.

For each image, twice: one of the 14 operations below, drawn uniformly, applied with probability
1/2 at a magnitude v drawn uniformly from 1..9 (of 10), with a random sign where the operation
has one; then Cutout: a gray square of 16 pixels (half a 32-pixel side) at a uniform centre. This
is the "RandAugment (MC)" variant of the FixMatch paper as the reference PyTorch code draws it:

    operation      parameter at magnitude v (PIL's definition)
    Identity, AutoContrast, Equalize
    Brightness, Color, Contrast, Sharpness     ImageEnhance factor 0.05 + 0.09 v
    Posterize      bits 4 + floor(0.4 v)
    Solarize       invert pixels >= 256 - floor(25.6 v)
    Rotate         +-3v degrees about the centre
    ShearX, ShearY +-0.03 v (about the top-left corner)
    TranslateX/Y   +-floor(0.03 v x side) pixels

Every image of a batch draws its own operations (kornia's RandAugment draws one set per batch,
which is not this). Inputs and outputs are floats in [0, 1]; each operation is PIL's, computed
on the values it would see as uint8 (rounded after each of the two steps), so the view matches
PIL's to within rounding (tested operation by operation). Nothing depends on tensor values for
control flow or shapes: each step computes its operations for the whole batch and keeps, per
image, the one that image drew (a gather for the geometric ones), so a step never waits for the
GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .views import _gray

OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "equalize", "posterize", "rotate",
       "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
N_OPS = 2
#: per image: (operation, coin, magnitude, sign) for each of the two steps, then the cutout centre (x, y)
UNIFORMS = 4 * N_OPS + 2
CUTOUT_GRAY = 127 / 255
_K = {name: i for i, name in enumerate(OPS)}


def _q(x: torch.Tensor) -> torch.Tensor:
    """Round to the uint8 grid (PIL's images are uint8 between operations)."""
    return torch.round(x * 255.0).div_(255.0)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast``: each channel stretched from its [min, max] to [0, 1]; a
    constant channel is left alone."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), 1.0)
    lo = torch.where(hi > lo, lo, 0.0)
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` per image and channel: the uint8 histogram h, step = (N - h[last
    used level]) // 255, level i -> (step // 2 + sum of h below i) // step (identity when step = 0)."""
    b, c, hgt, wid = x.shape
    v = torch.round(x * 255.0).long().view(b, c, -1)
    hist = torch.zeros(b, c, 256, device=x.device, dtype=torch.long).scatter_add_(2, v, torch.ones_like(v))
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)
    step = (hgt * wid - hist.gather(2, last.clamp_min(0))) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, levels)
    return lut.gather(2, v).view(b, c, hgt, wid).to(x.dtype) / 255.0


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.posterize``: keep the top ``bits`` (per image) bits of each uint8 value."""
    unit = torch.pow(2.0, 8.0 - bits.to(x.dtype)).view(-1, 1, 1, 1)
    return torch.floor(torch.round(x * 255.0) / unit) * unit / 255.0


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.solarize``: uint8 values >= ``threshold`` (per image, 0..256) inverted."""
    v = torch.round(x * 255.0)
    return torch.where(v >= threshold.to(x.dtype).view(-1, 1, 1, 1), 255.0 - v, v) / 255.0


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), border pixels kept as they are
    (PIL's ``ImageEnhance.Sharpness`` degenerate image)."""
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(x.shape[1], 1, 3, 3)
    inner = F.conv2d(x, kernel, groups=x.shape[1])
    return torch.cat([x[:, :, :1], torch.cat([x[:, :, 1:-1, :1], inner, x[:, :, 1:-1, -1:]], 3), x[:, :, -1:]], 2)


def enhance(x: torch.Tensor, factor: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance``: blend(degenerate, x, factor) = clamp(factor x + (1 - factor) degenerate)
    per image, the degenerate image by ``kind``: 0 Brightness (black), 1 Color (its luma), 2 Contrast
    (its mean luma), 3 Sharpness (smoothed). Factor 1 leaves an image unchanged."""
    gray = _q(_gray(x))  # PIL's degenerate images are uint8 too
    k = kind.view(-1, 1, 1, 1)
    degenerate = torch.where(k == 1, gray, torch.where(k == 2, _q(gray.mean((2, 3), keepdim=True)),
                                                       torch.where(k == 3, _q(_smooth(x)), 0.0)))
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    return torch.lerp(degenerate, x, f).clamp_(0.0, 1.0)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE)`` with nearest sampling, per image: output pixel (x, y) reads
    input pixel floor(a X + b Y + c), floor(d X + e Y + f) at its centre (X, Y) = (x + .5, y + .5);
    ``matrix`` is B x 6 (a, b, c, d, e, f); pixels from outside the image are ``fill``."""
    b, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                            torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    m = matrix.to(x.dtype).view(b, 6, 1, 1)
    src_x = torch.floor(m[:, 0] * xs + m[:, 1] * ys + m[:, 2])
    src_y = torch.floor(m[:, 3] * xs + m[:, 4] * ys + m[:, 5])
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).long().view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), out, fill)


def rotation_matrix(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's ``Image.rotate(degrees)`` (counter-clockwise about the centre) as B x 6 affine rows."""
    theta = -degrees * (math.pi / 180.0)
    a, bb = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack([a, bb, cx - a * cx - bb * cy, -bb, a, cy + bb * cx - a * cy], 1)


def cutout(x: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor, size: int, fill: float = CUTOUT_GRAY) -> torch.Tensor:
    """The reference code's Cutout: centre (u_x w, u_y h); corner x0 = floor(max(0, centre - size/2)),
    x1 = floor(min(w, x0 + size)), likewise y; PIL fills the rectangle corners included."""
    b, _, h, w = x.shape
    x0 = torch.floor((u_x * w - size / 2).clamp_min(0)).view(-1, 1, 1)
    y0 = torch.floor((u_y * h - size / 2).clamp_min(0)).view(-1, 1, 1)
    x1, y1 = torch.floor((x0 + size).clamp_max(w)), torch.floor((y0 + size).clamp_max(h))
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    inside = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)
    return torch.where(inside.unsqueeze(1), fill, x)


def _step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One of the two RandAugment steps, from B x 4 uniforms (operation, coin, magnitude, sign)."""
    b, _, h, w = x.shape
    op = (u[:, 0] * len(OPS)).long().clamp_(max=len(OPS) - 1)
    op = torch.where(u[:, 1] < 0.5, op, _K["identity"])  # each drawn operation is applied with p = 1/2
    v = (1.0 + torch.floor(u[:, 2] * 9.0)).clamp_(max=9.0)  # the magnitude, 1..9 of 10
    sign = torch.where(u[:, 3] < 0.5, -1.0, 1.0).to(x.dtype)
    is_ = {name: op == _K[name] for name in OPS}

    # geometric operations: one gather, with the identity for every other image
    shear, shift_x, shift_y = sign * 0.03 * v, sign * torch.floor(0.03 * v * w), sign * torch.floor(0.03 * v * h)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    matrix = torch.stack([one, zero, zero, zero, one, zero], 1)
    matrix = torch.where(is_["shear_x"][:, None], torch.stack([one, shear, zero, zero, one, zero], 1), matrix)
    matrix = torch.where(is_["shear_y"][:, None], torch.stack([one, zero, zero, shear, one, zero], 1), matrix)
    matrix = torch.where(is_["translate_x"][:, None], torch.stack([one, zero, shift_x, zero, one, zero], 1), matrix)
    matrix = torch.where(is_["translate_y"][:, None], torch.stack([one, zero, zero, zero, one, shift_y], 1), matrix)
    matrix = torch.where(is_["rotate"][:, None], rotation_matrix(sign * 3.0 * v, h, w), matrix)
    x = affine(x, matrix)

    # ImageEnhance blends: factor 1 (unchanged) for every other image
    blend_kind = torch.zeros_like(op)
    for kind, name in enumerate(("brightness", "color", "contrast", "sharpness")):
        blend_kind = torch.where(is_[name], kind, blend_kind)
    blends = is_["brightness"] | is_["color"] | is_["contrast"] | is_["sharpness"]
    x = enhance(x, torch.where(blends, 0.05 + 0.09 * v, 1.0), blend_kind)

    # point operations on the uint8 values
    x = torch.where(is_["autocontrast"].view(-1, 1, 1, 1), autocontrast(x), x)
    x = torch.where(is_["equalize"].view(-1, 1, 1, 1), equalize(x), x)
    x = posterize(x, torch.where(is_["posterize"], 4.0 + torch.floor(0.4 * v), 8.0))
    x = solarize(x, torch.where(is_["solarize"], 256.0 - torch.floor(25.6 * v), 256.0))
    return _q(x)


def randaugment_view(x: torch.Tensor, u: torch.Tensor, cutout_size: int = 16) -> torch.Tensor:
    """The RandAugment strong view of a float batch in [0, 1] from B x ``UNIFORMS`` uniforms."""
    x = _q(x)
    for i in range(N_OPS):
        x = _step(x, u[:, 4 * i:4 * i + 4])
    return cutout(x, u[:, -2], u[:, -1], cutout_size)
