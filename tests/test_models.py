import pytest
import torch

from ssl_lib.models import SimpleCNN


@pytest.mark.parametrize("num_classes, size", [(10, 32), (3, 64), (7, 16)])
def test_shapes(num_classes, size):
    logits, z = SimpleCNN(num_classes, size)(torch.randn(5, 3, size, size))
    assert logits.shape == (5, num_classes) and z.shape == (5, 100)
    assert (z >= 0).all()  # z is taken after the ReLU, as in the writeup


def test_layers_match_the_writeup():
    net = SimpleCNN(10, 32)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters() if name.endswith("weight")}
    assert shapes == {"conv1.weight": (32, 3, 3, 3), "conv2.weight": (64, 32, 3, 3), "fc1.weight": (512, 4096),
                      "fc2.weight": (100, 512), "fc3.weight": (10, 100)}


def test_image_size_must_survive_two_poolings():
    with pytest.raises(ValueError, match="multiple of 4"):
        SimpleCNN(10, 30)
