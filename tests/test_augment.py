import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ssl_lib.augment.augmenter import Augmenter, Normalize, View, colour_jitter, to_unit
from ssl_lib.augment.augmenter import flip_crop as flip_crop_view
from ssl_lib.augment.views import adjust_hue, color_jitter, flip_crop, gaussian_blur3, weak_view
from ssl_lib.config import make_config
from ssl_lib.errors import ConfigError


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 32, 32, generator=g)
    x[0] = 0.5  # a gray image: no hue, zero chroma everywhere
    x[1, :, :4] = 0.3  # a gray band inside a colour image
    x[2, 0] = x[2, 1]  # ties between the max channels
    return x


def test_flip_crop_is_torchvision_flip_then_reflect_padded_crop(images):
    b = len(images)
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(b, generator=g) < 0.5
    dx, dy = torch.randint(0, 9, (b,), generator=g), torch.randint(0, 9, (b,), generator=g)
    out = flip_crop(images, flip, dx, dy, padding=4)
    for i in range(b):
        ref = TF.hflip(images[i]) if flip[i] else images[i]
        ref = F.pad(ref[None], (4, 4, 4, 4), mode="reflect")[0, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], ref)


def test_color_jitter_matches_torchvision_per_image_in_every_order(images):
    b = len(images)
    g = torch.Generator().manual_seed(2)
    br, co, sa = (0.6 + 0.8 * torch.rand(b, generator=g) for _ in range(3))
    hue = 0.2 * torch.rand(b, generator=g) - 0.1
    order = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per image
    out = color_jitter(images, br, co, sa, hue, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(b):
        ref = images[i]
        for op in order[i].tolist():
            ref = ops[op](ref, [br, co, sa, hue][op][i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_hue_shift_matches_torchvision_and_zero_shift_is_identity(images):
    shift = torch.linspace(-0.5, 0.5, len(images))
    out = adjust_hue(images, shift)
    ref = torch.stack([TF.adjust_hue(images[i], shift[i].item()) for i in range(len(images))])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(images, torch.zeros(len(images))), images, atol=1e-6, rtol=0)


def test_blur_matches_torchvision_and_sigma_zero_is_exactly_identity(images):
    sigma = torch.linspace(0.1, 2.0, len(images))
    sigma[:4] = 0.0
    out = gaussian_blur3(images, sigma)
    assert torch.equal(out[:4], images[:4])
    for i in range(4, len(images)):
        ref = TF.gaussian_blur(images[i], [3, 3], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_views_keep_shape_dtype_and_range(images, view):
    out = getattr(Augmenter(), view)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1


def test_weak_view_draws_flip_and_crop_per_image():
    x = torch.rand(1, 3, 32, 32).expand(256, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    out = Augmenter().weak(x)
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 40  # 2 x 9 x 9 = 162 possible views
    flipped = [torch.equal(o[:, 4:-4, 4:-4], x[0].flip(2)[:, 4:-4, 4:-4]) for o in out]
    unflipped = [torch.equal(o[:, 4:-4, 4:-4], x[0][:, 4:-4, 4:-4]) for o in out]
    assert sum(flipped) > 0 and sum(unflipped) > 0  # the centre crop, flipped and not


def test_strong_view_draws_jitter_grayscale_and_blur_per_image():
    torch.manual_seed(0)
    n = 2000
    x = torch.rand(1, 3, 32, 32).expand(n, 3, 32, 32).contiguous()
    out = Augmenter(flip_crop_view(0), colour_jitter(blur_p=0.0)).strong(x)
    gray = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(gray.float().mean().item() - 0.2) < 0.04  # grayscale_p = 0.2, per image
    assert len({round(v, 5) for v in out.mean((1, 2, 3)).tolist()}) > n * 0.9  # own jitter factors
    # blur only: p = 0.2 of the images change, and no others
    out = Augmenter(flip_crop_view(0), colour_jitter(0, 0, 0, 0, grayscale_p=0)).strong(x)
    changed = torch.minimum((out - x).abs().amax((1, 2, 3)), (out - x.flip(3)).abs().amax((1, 2, 3))) > 1e-6
    assert abs(changed.float().mean().item() - 0.2) < 0.04
    # with every amount 0 and no hue, the strong view is exactly the flip alone
    plain = Augmenter(flip_crop_view(0), colour_jitter(0, 0, 0, 0, grayscale_p=0, blur_p=0))
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(2)) for o in plain.strong(x[:16]))


def test_jitter_factor_ranges_follow_torchvision():
    # brightness alone: the output mean over unclipped mid-gray pixels is the factor times 0.5
    torch.manual_seed(0)
    x = torch.full((4000, 3, 4, 4), 0.5)
    aug = Augmenter(flip_crop_view(0), colour_jitter(contrast=0, saturation=0, hue=0, grayscale_p=0, blur_p=0))
    factors = aug.strong(x)[:, 0, 0, 0] / 0.5
    assert 0.6 - 1e-6 <= factors.min() < 0.62 and 1.38 < factors.max() <= 1.4 + 1e-6
    assert abs(factors.mean().item() - 1.0) < 0.02


def test_views_are_reproducible_from_torch_seed(images):
    aug = Augmenter()
    torch.manual_seed(5)
    a = aug.weak(images), aug.strong(images)
    torch.manual_seed(5)
    b = aug.weak(images), aug.strong(images)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.manual_seed(6)
    assert not torch.equal(aug.strong(images), a[1])


@pytest.mark.parametrize("view", ["weak", "strong", "batch"])
def test_views_need_no_host_sync(view):
    # meta tensors have no values: .item(), bool(), nonzero() and value-dependent shapes all fail,
    # the same operations that would make a CUDA step wait for the GPU.
    aug = Augmenter()
    if view == "batch":
        norm = Normalize((0.5,) * 3, (0.25,) * 3, "meta")
        out = aug.batch(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"), 2, 3, norm)
    else:
        out = getattr(aug, view)(torch.empty(8, 3, 32, 32, device="meta"))
    assert out.shape == (8, 3, 32, 32) and out.device.type == "meta"


def test_from_config_and_bad_padding():
    aug = Augmenter.from_config(make_config({"crop_padding": 2, "hue": 0.05, "dataset": "synthetic"}))
    assert aug.weak_view.apply.keywords["padding"] == 2 and aug.strong_view.apply.keywords["hue"] == 0.05
    assert (aug.weak_view.uniforms, aug.strong_view.uniforms) == (3, 11)
    with pytest.raises(ConfigError, match="crop_padding"):
        make_config({"image_size": 8, "crop_padding": 8})


def test_a_strong_view_declares_its_uniforms_and_plugs_in(images):
    # A new strong view is a function of (x, u) and its uniform count: the augmenter draws them.
    seen = []

    def shift(x, u):
        seen.append(u.shape)
        return (x + u[:, :1, None, None]).clamp(0, 1)

    aug = Augmenter(flip_crop_view(0), View(shift, 2))
    out = aug.strong(images)
    assert seen == [(len(images), 2)] and out.shape == images.shape
    u8 = (images[:10] * 255).round().to(torch.uint8)
    aug.batch(u8, 0, 4, Normalize((0.5,) * 3, (0.25,) * 3))
    assert seen[-1] == (4, 2)


def test_to_unit_and_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    u = to_unit(x)
    assert u.dtype == torch.float32 and u.min() == 0 and u.max() == 1
    n = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(u)
    assert torch.allclose(n, torch.tensor([-2.0, 2.0]).expand_as(n))


def test_views_are_pure_functions_of_the_uniforms(images):
    from ssl_lib.augment.views import strong_view, weak_view

    u = torch.rand(len(images), 14)
    args = (4, 0.4, 0.4, 0.4, 0.1, 0.2, 0.2, (0.1, 2.0))
    assert torch.equal(strong_view(images, u, *args), strong_view(images, u, *args))
    # weak: u0 < 0.5 flips; offsets floor(u * 9)
    u3 = torch.tensor([[0.0, 0.5, 0.5], [0.9, 0.0, 0.99]]).repeat(12, 1)
    out = weak_view(images, u3, 4)
    assert torch.equal(out[0], images[0].flip(2))  # flipped, centre crop (offset 4, 4)
    assert torch.equal(out[1, :, :28, 4:], images[1, :, 4:, :28])  # dx 0: content moves right, dy 8: up


@pytest.mark.parametrize("n_plain, n_strong", [(0, 8), (5, 8), (0, 0), (6, 0)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_is_the_views_of_weak_and_strong_normalised(images, n_plain, n_strong, memory_format):
    # The trainer's one-call route must give what the per-view functions give with the same
    # uniforms: plain rows untouched, then weak views, then strong ones, each normalised.
    u8 = (images[:20] * 255).round().to(torch.uint8)
    norm = Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    aug = Augmenter()
    torch.manual_seed(7)
    out = aug.batch(u8, n_plain, n_strong, norm, memory_format)
    torch.manual_seed(7)
    u_geo, u_colour = torch.rand(20 - n_plain, 3), torch.rand(n_strong, 11)
    x = to_unit(u8)
    geometric = weak_view(x[n_plain:], u_geo, 4)
    n_weak = 20 - n_plain - n_strong
    expected = torch.cat([x[:n_plain], geometric[:n_weak],
                          aug.strong_view.apply(geometric[n_weak:], u_colour)])
    assert out.is_contiguous(memory_format=memory_format) and out.dtype == torch.float32
    torch.testing.assert_close(out, norm(expected), atol=1e-5, rtol=0)
    if n_plain:
        torch.testing.assert_close(out[:n_plain], norm(x[:n_plain]), atol=1e-6, rtol=0)


def test_compiled_batch_matches_eager(images, monkeypatch):
    """Both view functions through torch.compile (the weak one on uint8, the strong one on float),
    on the route the trainer takes: the numbers of the eager views.

    Traced by dynamo and lowered through AOT autograd with inductor's decompositions, then run
    eagerly (backend aot_eager_decomp_partition): what our code meets under compile, tracing and the
    decomposed ops, without inductor's C++ code generation on the CPU, which is torch's own and cost
    25-30 s of compiler per test run on a fresh cache (as CI's is) against 4 s here. gpu-check
    compiles the whole step with inductor on the GPU, the route the compile setting is for."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition"))
    u8 = (images * 255).round().to(torch.uint8)
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    out = []
    for aug in (Augmenter(), Augmenter(compile=True)):
        torch.manual_seed(4)
        out.append(aug.batch(u8, 4, 10, norm, torch.channels_last))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)
