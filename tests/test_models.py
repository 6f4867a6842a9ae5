import pytest
import torch

from ssl_lib.models.simple_cnn import SimpleCNN


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


def _writeup_order(net: SimpleCNN, x: torch.Tensor):
    """The writeup's block order, ReLU then pool, written out independently of SimpleCNN.forward."""
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(net.conv1(x)), 2)
    h = F.max_pool2d(F.relu(net.conv2(h)), 2)
    z = F.relu(net.fc2(F.relu(net.fc1(h.flatten(1)))))
    return net.fc3(z), z


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_before_relu_is_exact(channels_last):
    # The model pools before its ReLUs (cheaper); outputs and every gradient must equal the
    # writeup's order bit for bit, including windows whose values are all negative (ReLU gives 0).
    torch.manual_seed(0)
    net = SimpleCNN(10, 32)
    x = torch.randn(16, 3, 32, 32) * 3
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    g_logits, g_z = torch.randn(16, 10), torch.randn(16, 100)
    grads = []
    for forward in (net, lambda t: _writeup_order(net, t)):
        logits, z = forward(x)
        net.zero_grad()
        torch.autograd.backward([logits, z], [g_logits, g_z])
        grads.append((logits.detach(), z.detach(), *[p.grad.clone() for p in net.parameters()]))
    assert (grads[0][1] == 0).any() and (grads[0][1] > 0).any()
    for ours, theirs in zip(*grads):
        assert torch.equal(ours, theirs)
