import pytest
import torch
import torch.nn.functional as F

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


def test_wrn28_2_is_the_fixmatch_protocols_model():
    from ssl_lib.models.wrn import WideResNet

    torch.manual_seed(0)
    model = WideResNet(10)
    assert sum(p.numel() for p in model.parameters()) == 1_467_610  # the FixMatch reference's count
    assert model.feature_dim == 128 and len(model.blocks) == 12
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 25 and all(m.momentum == 0.001 for m in bns)
    logits, z = model.eval()(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10) and z.shape == (3, 128)
    strides = [b.conv1.stride[0] for b in model.blocks]
    assert strides == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(10, depth=27)


def test_wrn_block_shortcut_takes_the_activated_input_only_before_the_first_group():
    # The first block adds its (projected) activated input; the others their raw input.
    from ssl_lib.models.wrn import Block

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for activate_first in (True, False):
        block = Block(4, 4, 1, activate_before_residual=activate_first).eval()
        a = F.leaky_relu(block.bn1(x), 0.1)
        body = block.conv2(F.leaky_relu(block.bn2(block.conv1(a)), 0.1))
        expected = body + (a if activate_first else x)
        torch.testing.assert_close(block(x), expected)


def test_build_model_picks_by_name_and_names_the_field():
    from ssl_lib.config import make_config
    from ssl_lib.errors import ConfigError
    from ssl_lib.models import build_model

    assert type(build_model(make_config({"model": "wrn28_2"}), 10)).__name__ == "WideResNet"
    fast = build_model(make_config({"model": "wrn28_2", "bn_momentum": 0.1}), 10)
    assert {m.momentum for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    assert type(build_model(make_config({}), 10)).__name__ == "SimpleCNN"
    with pytest.raises(ConfigError, match="config field 'image_size' must be a multiple of 4"):
        build_model(make_config({"image_size": 30}), 10)
