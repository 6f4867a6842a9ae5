"""Models, chosen by the config field ``model``.

The contract every model keeps (the trainer, the k-means loss and evaluation rely on it):

* ``model(x)`` takes a normalised float batch B x 3 x H x W and returns ``(logits, z)``: the class
  logits B x C and the feature z B x ``feature_dim`` that the k-means loss clusters;
* ``model.feature_dim`` is an int attribute;
* ``model.train()`` / ``model.eval()`` switch BatchNorm and dropout, if it has any: the trainer
  puts it in eval mode for evaluation and the k-means feature pass, in train mode for the steps.

A new model is one module here and one line in :data:`MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import Config, ConfigError
from .simple_cnn import SimpleCNN
from .wrn import WideResNet

#: config field ``model`` -> a function (config, number of classes) -> the model.
MODELS: dict[str, Callable[[Config, int], nn.Module]] = {
    "simple_cnn": lambda cfg, num_classes: SimpleCNN(num_classes, cfg.image_size),
    "wrn28_2": lambda cfg, num_classes: WideResNet(num_classes, depth=28, widen=2, bn_momentum=cfg.bn_momentum),
}


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The config's model for ``num_classes`` classes, on the CPU; a ConfigError names the field
    when the model cannot take the config (e.g. an image size it does not support)."""
    try:
        return MODELS[cfg.model](cfg, num_classes)
    except ValueError as err:
        raise ConfigError(f"config field 'model' is {cfg.model!r}: {err}") from None
