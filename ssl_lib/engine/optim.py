"""Optimizers and learning-rate schedules, chosen by the config fields ``optimizer`` and ``schedule``.

A new one is a function here and one line in :data:`OPTIMIZERS` or :data:`SCHEDULES`; the loop steps
the schedule after every optimizer step, and the checkpoint saves both through their
``state_dict``, so nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config import Config


def _fused_if_possible(make: Callable[..., torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """One fused kernel for all parameters where the device has it (on 2 CPU cores 0.7 ms a step
    instead of 10 ms for the default model); the plain implementation elsewhere."""
    params = list(params)
    try:
        return make(params, fused=True, **kwargs)
    except RuntimeError:  # a device (or torch < 2.4 on the CPU) without the fused kernel
        return make(params, **kwargs)


def adam(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, weight decay (L2, added to the gradient) on every parameter: the writeup's optimizer."""
    return _fused_if_possible(torch.optim.Adam, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def sgd(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on the weights of convolutions and linear layers
    only, not on biases or normalisation parameters (the FixMatch reference code's grouping)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return _fused_if_possible(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def constant(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """The configured learning rate at every step."""
    return lambda step: 1.0


def cosine(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """FixMatch's decay: lr x cos(7 pi k / (16 K)) at step k of K, ending at about 0.2 lr."""
    return lambda step: math.cos(7.0 * math.pi * step / (16.0 * max(total_steps, 1)))


#: config field ``optimizer`` -> (config, model) -> optimizer.
OPTIMIZERS: dict[str, Callable[[Config, nn.Module], torch.optim.Optimizer]] = {"adam": adam, "sgd": sgd}
#: config field ``schedule`` -> (config, total steps) -> the LR factor at each step.
SCHEDULES: dict[str, Callable[[Config, int], Callable[[int], float]]] = {"constant": constant, "cosine": cosine}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](cfg, model)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR stepped once per optimizer step (a factor of exactly 1.0 leaves
    the learning rate bit for bit as configured)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[cfg.schedule](cfg, total_steps))
