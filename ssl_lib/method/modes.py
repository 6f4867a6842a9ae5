"""How the model normalises while the method reads it outside a step: as in the step (BatchNorm on
batch statistics) or as in evaluation (running statistics), changing nothing either way."""

from __future__ import annotations

import contextlib

from torch import nn


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@contextlib.contextmanager
def step_normalisation(net: nn.Module, dropout: bool = False):
    """The model as a training step normalises, changing nothing: BatchNorm on each batch's own
    statistics with its running statistics left as they are (``track_running_stats`` off for the
    duration); the other layers in eval mode (no dropout), or with ``dropout`` in train mode as in
    the step. The modes are restored after."""
    was_training = net.training
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    net.train(dropout)
    for m in norms:
        m.train()
        m.track_running_stats = False
    try:
        yield net
    finally:
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        net.train(was_training)


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)
