"""Weak and strong views, drawn per image on batched tensors on the training device.

Inputs and outputs are float images in [0, 1] of shape B x 3 x H x W; normalisation comes after,
so colour jitter sees the value range it is defined on. Every random parameter (flip, crop offset,
jitter factors, grayscale and blur coin flips) is drawn independently for each image by kornia,
from torch's generator on the input's device, so one seed fixes every view of a run.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


def _geometric(image_size: int, padding: int) -> list[nn.Module]:
    ops: list[nn.Module] = [K.RandomHorizontalFlip(p=0.5)]
    if padding > 0:
        # "slice" crops by indexing instead of kornia's default warp (bilinear resampling): exact
        # pixel shifts like torchvision's RandomCrop, and several times faster on the CPU.
        ops.append(K.RandomCrop((image_size, image_size), padding=padding, padding_mode="reflect",
                                cropping_mode="slice"))
    return ops


class Augmenter:
    """Builds the two FixMatch views from the augmentation fields of a Config."""

    def __init__(self, image_size: int = 32, crop_padding: int = 4, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 grayscale_p: float = 0.2, blur_p: float = 0.2):
        self.weak = nn.Sequential(*_geometric(image_size, crop_padding))
        self.strong = nn.Sequential(
            *_geometric(image_size, crop_padding),
            K.ColorJitter(brightness, contrast, saturation, hue, p=1.0),
            K.RandomGrayscale(p=grayscale_p),
            K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=blur_p),
        )

    @classmethod
    def from_config(cls, cfg) -> "Augmenter":
        return cls(cfg.image_size, cfg.crop_padding, cfg.brightness, cfg.contrast, cfg.saturation,
                   cfg.hue, cfg.grayscale_p, cfg.blur_p)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.float().div_(255.0)


class Normalize:
    """(x - mean) / std per channel, with the statistics of the training split."""

    def __init__(self, mean, std, device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
