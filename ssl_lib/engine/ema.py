"""An exponential moving average of the weights, FixMatch's evaluation model.

After every optimizer step, for each parameter w of the model and its average a:

    a <- decay * a + (1 - decay) * w

while buffers (BatchNorm's running statistics) are copied as they are. The average is a component
of the training state (checkpointed and resumed through ``state_dict``) and a step-end callback.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.source, self.decay = model, decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = list(zip(self.model.parameters(), model.parameters()))
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        averages, weights = zip(*self._pairs)
        torch._foreach_lerp_(averages, weights, 1.0 - self.decay)  # a + (1 - decay)(w - a), one kernel per group
        for average, buffer in self._buffers:
            average.copy_(buffer)

    def on_step_end(self, state) -> None:
        self.update()

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
