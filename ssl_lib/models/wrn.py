"""Wide ResNet-28-2, the FixMatch protocol's model (Zagoruyko & Komodakis; as configured in FixMatch).

Pre-activation basic blocks in three groups of (28 - 4) / 6 = 4 blocks with 32, 64 and 128
channels (16 x widen 2, ...), leaky ReLU with slope 0.1, BatchNorm with PyTorch momentum 0.001
(TensorFlow's decay 0.999; settable, since statistics averaged that slowly are still mostly their
initial values after a short run), no dropout, then BatchNorm, leaky ReLU and global average pooling to
the 128-d feature z, and a linear classifier: 1,467,610 parameters for 10 classes.

As in FixMatch's own (TensorFlow) code, each block's first convolution takes the activated input;
the shortcut takes it too only in the very first block (``activate_before_residual``), elsewhere
the raw input, through a strided 1 x 1 convolution where the width changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.001
SLOPE = 0.1


def _bn(channels: int, momentum: float = BN_MOMENTUM) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False,
                 bn_momentum: float = BN_MOMENTUM):
        super().__init__()
        self.bn1, self.conv1 = _bn(c_in, bn_momentum), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _bn(c_out, bn_momentum), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if c_in != c_out or stride != 1 else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.bn1(x), SLOPE)
        residual = a if self.activate_before_residual else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(a)), SLOPE))
        return out + (self.shortcut(residual) if self.shortcut is not None else residual)


class WideResNet(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 2, bn_momentum: float = BN_MOMENTUM):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet's depth is 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.feature_dim = widths[3]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                c_in = widths[group] if i == 0 else widths[group + 1]
                blocks.append(Block(c_in, widths[group + 1], stride if i == 0 else 1,
                                    activate_before_residual=group == 0 and i == 0, bn_momentum=bn_momentum))
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(widths[3], bn_momentum)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, z)``: z is the pooled 128-d feature the k-means loss clusters."""
        h = F.leaky_relu(self.bn(self.blocks(self.conv(x))), SLOPE)
        z = h.mean((2, 3))
        return self.fc(z), z
