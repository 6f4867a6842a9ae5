"""FixMatch's RandAugment on batched tensors, checked operation by operation against PIL."""

import numpy as np
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch
from PIL import Image, ImageDraw

from ssl_lib.augment import randaugment as ra


@pytest.fixture(scope="module")
def images():
    """Four 32 x 32 images with smooth structure, edges and flat areas, on the uint8 grid."""
    g = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 6, generator=g), size=32, mode="bilinear",
                                          align_corners=False)
    x = low * 0.8 + 0.1
    x[1, :, 8:20, 4:12] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)  # a block of colour
    x[2] = x[2] * 0.5 + 0.25  # low contrast: autocontrast and equalize change it a lot
    return torch.round(x * 255) / 255


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255


def _close(ours: torch.Tensor, pil: list, max_levels: float = 1.0, mean_levels: float = 0.5):
    ref = torch.stack([_tensor(p) for p in pil])
    diff = (ours - ref).abs() * 255
    assert diff.max() <= max_levels + 1e-3 and diff.mean() <= mean_levels, (diff.max().item(), diff.mean().item())


def _same_pixels(ours: torch.Tensor, pil: list, fraction: float = 0.99):
    ref = torch.stack([_tensor(p) for p in pil])
    same = ((ours - ref).abs() * 255 < 0.5).all(1).float().mean().item()
    assert same >= fraction, same


def test_point_operations_match_pil(images):
    _close(ra.autocontrast(images), [PIL.ImageOps.autocontrast(_pil(x)) for x in images])
    _close(ra.equalize(images), [PIL.ImageOps.equalize(_pil(x)) for x in images], max_levels=0)
    for bits in (4, 5, 7):
        _close(ra.posterize(images, torch.full((4,), float(bits))), [PIL.ImageOps.posterize(_pil(x), bits) for x in images],
               max_levels=0)
    for threshold in (26, 128, 231):
        _close(ra.solarize(images, torch.full((4,), float(threshold))),
               [PIL.ImageOps.solarize(_pil(x), threshold) for x in images], max_levels=0)


@pytest.mark.parametrize("kind, enhancer", list(enumerate([PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Color,
                                                           PIL.ImageEnhance.Contrast, PIL.ImageEnhance.Sharpness])))
def test_enhance_matches_pil(images, kind, enhancer):
    for factor in (0.14, 0.5, 0.86):
        ours = ra.enhance(images, torch.full((4,), factor), torch.full((4,), kind))
        _close(ours, [enhancer(_pil(x)).enhance(factor) for x in images], max_levels=1.0, mean_levels=0.5)
    assert torch.equal(ra.enhance(images, torch.ones(4), torch.full((4,), kind)), images)  # factor 1: unchanged


def test_geometric_operations_match_pil(images):
    b, _, h, w = images.shape
    for degrees in (-27.0, 9.0):
        m = ra.rotation_matrix(torch.full((b,), degrees), h, w)
        _same_pixels(ra.affine(images, m), [_pil(x).rotate(degrees) for x in images], 0.97)
    for coeffs in ((1, 0.27, 0, 0, 1, 0), (1, 0, 0, -0.15, 1, 0), (1, 0, 7, 0, 1, 0), (1, 0, 0, 0, 1, -4)):
        m = torch.tensor(coeffs, dtype=torch.float32).expand(b, 6)
        _same_pixels(ra.affine(images, m), [_pil(x).transform((w, h), Image.AFFINE, coeffs) for x in images])


def test_cutout_matches_the_reference_rectangle(images):
    u_x, u_y = torch.tensor([0.0, 0.5, 0.99, 0.3]), torch.tensor([0.5, 0.02, 0.99, 0.7])
    ours = ra.cutout(images, u_x, u_y, 16)
    ref = []
    for x, cx, cy in zip(images, u_x.tolist(), u_y.tolist()):
        img = _pil(x)
        x0, y0 = int(max(0, cx * 32 - 8)), int(max(0, cy * 32 - 8))
        ImageDraw.Draw(img).rectangle((x0, y0, int(min(32, x0 + 16)), int(min(32, y0 + 16))), (127, 127, 127))
        ref.append(img)
    _close(ours, ref, max_levels=0)


def test_each_image_draws_its_own_operations():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).expand(256, 3, 32, 32).contiguous()
    u = torch.rand(256, ra.UNIFORMS)
    out = ra.randaugment_view(x, u)
    distinct = {hash(tuple((o * 255).round().flatten().tolist())) for o in out}
    assert len(distinct) > 200  # one batch, the same image: nearly every copy differs
    ops = (u[:, 0] * len(ra.OPS)).long()
    assert len(set(ops.tolist())) == len(ra.OPS)  # every operation occurs within one batch
    # a copy whose two draws are both skipped (coins >= 1/2) is the image with only the cutout
    skipped = (u[:, 1] >= 0.5) & (u[:, 5] >= 0.5)
    gray = (out == ra.CUTOUT_GRAY).all(1)
    q = torch.round(x * 255) / 255
    assert skipped.sum() > 30 and torch.equal(torch.where(gray.unsqueeze(1), q, out)[skipped], q[skipped])
    assert (gray.sum((1, 2)) >= 64).all()  # every image has its cutout (at least a clipped corner)


def test_the_view_is_a_pure_function_of_its_uniforms_and_runs_on_the_meta_device(images):
    u = torch.rand(4, ra.UNIFORMS)
    assert torch.equal(ra.randaugment_view(images, u), ra.randaugment_view(images, u))
    meta = ra.randaugment_view(torch.empty(8, 3, 32, 32, device="meta"), torch.empty(8, ra.UNIFORMS, device="meta"))
    assert meta.shape == (8, 3, 32, 32)  # no value-dependent control flow: no host sync on a GPU


def test_randaugment_is_a_strong_view_choice_that_trains(tmp_path, monkeypatch):
    from ssl_lib.augment import augmenter
    from ssl_lib.augment.augmenter import Augmenter, Normalize
    from ssl_lib.config import make_config
    from ssl_lib.engine.train import train

    cfg = make_config({"strong_view": "randaugment", "dataset": "synthetic", "synthetic_train": 200,
                       "synthetic_test": 50, "num_unlabeled": 100, "epochs": 1, "max_iters_per_epoch": 2,
                       "unlabeled_batch_size": 24, "kmeans_n_init": 1})
    aug = Augmenter.from_config(cfg)
    assert aug.strong_view.uniforms == ra.UNIFORMS and aug.strong_view.apply.keywords == {"cutout_size": 16}
    u8 = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    out = aug.batch(u8, 0, 6, Normalize((0.5,) * 3, (0.25,) * 3))
    assert out.shape == (12, 3, 32, 32) and torch.isfinite(out).all()

    from ssl_lib.engine.train import KMeansDiagnostics

    monkeypatch.setattr(KMeansDiagnostics, "on_evaluate", lambda self, state: None)  # its batch is not a step's
    views = []  # every strong view the training steps make, by the function that made it
    for name in ("randaugment_view", "colour_view"):
        real = getattr(augmenter, name)
        monkeypatch.setattr(augmenter, name, lambda x, u, _f=real, _n=name, **k: views.append((_n, _f(x, u, **k))) or views[-1][1])
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["epochs"] == 1 and [n for n, _ in views] == ["randaugment_view"] * 2  # one per step, no writeup view
    for _, x in views:  # RandAugment's mark: every image has its 16-pixel Cutout square (at least a clipped corner)
        assert len(x) == 24 and ((x == ra.CUTOUT_GRAY).all(1).sum((1, 2)) >= 64).all()


def _fixmatch_reference(img: Image.Image, name: str, v: int, sign: int) -> Image.Image:
    """The operation as FixMatch's reference PyTorch code applies it at magnitude v (of 10), with the
    sign it drew for the signed ones: its parameter is v * max / 10 + bias, truncated for integers."""
    def f(max_v, bias=0.0):
        return v * max_v / 10 + bias

    def i(max_v, bias=0):
        return int(v * max_v / 10) + bias

    w, h = img.size
    s = sign
    return {
        "identity": lambda: img,
        "autocontrast": lambda: PIL.ImageOps.autocontrast(img),
        "equalize": lambda: PIL.ImageOps.equalize(img),
        "brightness": lambda: PIL.ImageEnhance.Brightness(img).enhance(f(0.9, 0.05)),
        "color": lambda: PIL.ImageEnhance.Color(img).enhance(f(0.9, 0.05)),
        "contrast": lambda: PIL.ImageEnhance.Contrast(img).enhance(f(0.9, 0.05)),
        "sharpness": lambda: PIL.ImageEnhance.Sharpness(img).enhance(f(0.9, 0.05)),
        "posterize": lambda: PIL.ImageOps.posterize(img, i(4, 4)),
        "solarize": lambda: PIL.ImageOps.solarize(img, 256 - i(256)),
        "rotate": lambda: img.rotate(s * i(30)),
        "shear_x": lambda: img.transform((w, h), Image.AFFINE, (1, s * f(0.3), 0, 0, 1, 0)),
        "shear_y": lambda: img.transform((w, h), Image.AFFINE, (1, 0, 0, s * f(0.3), 1, 0)),
        "translate_x": lambda: img.transform((w, h), Image.AFFINE, (1, 0, int(s * f(0.3) * w), 0, 1, 0)),
        "translate_y": lambda: img.transform((w, h), Image.AFFINE, (1, 0, 0, 0, 1, int(s * f(0.3) * h))),
    }[name]()


#: per operation, what each image must meet: (largest and mean difference in uint8 levels, the
#: fraction of pixels equal). Blends and autocontrast round within a level of PIL; a rotation or shear may move
#: one row of pixel centres that fall exactly on a boundary (float32 here, float64 in PIL), 3% of 32 x 32.
_TOLERANCE = {**{name: (1, 0.6, 0.0) for name in ("autocontrast", "brightness", "color", "contrast", "sharpness")},
              **{name: (255, 255, 0.97) for name in ("rotate", "shear_x", "shear_y")}}


@pytest.mark.parametrize("name", ra.OPS)
def test_each_magnitude_and_sign_is_the_reference_parameter(images, name):
    """Every operation at magnitudes 1..9 and both signs, drawn through the step's uniforms, against
    PIL at the parameter FixMatch's reference code gives that magnitude."""
    cases = [(v, sign) for v in range(1, 10) for sign in (-1, 1)]
    x = images.repeat(len(cases), 1, 1, 1)  # image j of case c is row 4 c + j
    u = torch.tensor([[(ra.OPS.index(name) + 0.5) / len(ra.OPS), 0.25, (v - 0.5) / 9, 0.25 if sign < 0 else 0.75]
                      for v, sign in cases for _ in images])
    ours = ra._step(x, u)
    ref = torch.stack([_tensor(_fixmatch_reference(_pil(img), name, v, sign)) for v, sign in cases for img in images])
    levels = ((ours - ref).abs() * 255).round().flatten(1)
    most, mean, equal = _TOLERANCE.get(name, (0, 0.0, 1.0))
    per_image = zip(levels.amax(1).tolist(), levels.mean(1).tolist(), (levels == 0).float().mean(1).tolist())
    bad = [(cases[k // 4], k % 4, m, round(a, 3), round(f, 3)) for k, (m, a, f) in enumerate(per_image)
           if m > most or a > mean or f < equal]
    assert not bad, bad  # ((magnitude, sign), image, largest difference, mean difference, fraction equal)
