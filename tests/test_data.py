"""Tests for ssl_lib.data. CPU only, no network, tiny files built in tmp_path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lib.data import sources as data
from ssl_lib.data import (
    SOURCES,
    DataError,
    Split,
    load_dataset,
    num_unlabeled_for,
    partition,
    subset,
)

# ----------------------------------------------------------------------------- helpers


def _img(path: Path, size: tuple[int, int], mode: str, color: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _tree(root: Path) -> Path:
    """cat: 3 train / 1 test, dog: 2 train / 2 test; mixed formats, sizes and modes."""
    _img(root / "train/cat/a.png", (40, 20), "RGB", (200, 10, 10))
    _img(root / "train/cat/b.JPG", (32, 32), "RGB", (200, 10, 10))
    _img(root / "train/cat/c.png", (7, 9), "L", 100)  # grayscale
    _img(root / "train/dog/a.png", (64, 64), "RGBA", (10, 20, 200, 255))  # opaque RGBA
    _img(root / "train/dog/b.jpeg", (50, 30), "RGB", (10, 20, 200))
    _img(root / "test/cat/x.bmp", (16, 16), "RGB", (200, 10, 10))
    _img(root / "test/dog/y.webp", (16, 16), "RGB", (10, 20, 200))
    _img(root / "test/dog/z.PNG", (16, 16), "P", 3)  # palette, upper-case extension
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/.hidden").mkdir()
    return root


def _load(root: Path, cache: Path, **kw: object):
    return load_dataset("imagefolder", root, cache_dir=cache, quiet=True, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- partition


def test_partition_sizes_disjoint_cover_sorted():
    labels = np.arange(1000) % 10
    lab, unl = partition(labels, 750, seed=3)
    assert lab.dtype == np.int64 and unl.dtype == np.int64
    assert len(lab) == 250 and len(unl) == 750
    assert not set(lab) & set(unl)
    assert np.array_equal(np.sort(np.concatenate([lab, unl])), np.arange(1000))
    assert np.all(np.diff(lab) > 0) and np.all(np.diff(unl) > 0)


@pytest.mark.parametrize("m", [0, 100])
def test_partition_edges(m):
    lab, unl = partition(torch.arange(100) % 4, m, seed=0)  # torch labels accepted too
    assert len(unl) == m and len(lab) == 100 - m


@pytest.mark.parametrize("m", [-1, 101])
def test_partition_out_of_range(m):
    with pytest.raises(ValueError, match=rf"num_unlabeled must be in \[0, 100\], got {m}"):
        partition(np.zeros(100, dtype=int), m, seed=0)


def test_partition_deterministic_and_seeded():
    labels = np.arange(500) % 5
    a = partition(labels, 400, seed=1)
    b = partition(labels, 400, seed=1)
    c = partition(labels, 400, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_partition_balanced_counts():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), np.arange(40, 140, 10)))  # imbalanced
    lab, unl = partition(labels, len(labels) - 250, seed=0, balanced=True)
    assert np.array_equal(np.bincount(labels[lab], minlength=10), np.full(10, 25))
    assert len(lab) + len(unl) == len(labels) and not set(lab) & set(unl)


def test_partition_balanced_errors():
    labels = np.arange(100) % 10
    with pytest.raises(ValueError, match="divisible by the 10 classes"):
        partition(labels, 100 - 25, seed=0, balanced=True)
    skewed = np.array([0] * 95 + [1] * 5)
    with pytest.raises(ValueError, match=r"too few in class\(es\) 1 \(5\)"):
        partition(skewed, 80, seed=0, balanced=True)


def test_partition_labeled_sets_nest_with_budget():
    labels = np.arange(1000) % 10
    for balanced in (False, True):
        small, _ = partition(labels, 1000 - 40, seed=5, balanced=balanced)
        big, _ = partition(labels, 1000 - 250, seed=5, balanced=balanced)
        assert set(small) <= set(big)


def test_num_unlabeled_for():
    labels = np.zeros(50)
    assert num_unlabeled_for(labels, 10) == 40
    assert num_unlabeled_for(labels, 0) == 50 and num_unlabeled_for(labels, 50) == 0
    with pytest.raises(ValueError, match=r"num_labeled must be in \[0, 50\], got 51"):
        num_unlabeled_for(labels, 51)


# ---------------------------------------------------------------------------- subset


def _indexed_split(counts: list[int]) -> Split:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    # Each image carries its label so we can check that pairs stay aligned.
    images = labels.to(torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
    return Split(images, labels)


def test_subset_stratified_and_aligned():
    split = _indexed_split([600, 300, 100])
    sub = subset(split, 100, seed=0)
    assert len(sub) == 100
    assert torch.bincount(sub.labels).tolist() == [60, 30, 10]
    assert torch.equal(sub.images[:, 0, 0, 0].long(), sub.labels)
    again = subset(split, 100, seed=0)
    other = subset(_indexed_split([600, 300, 100]), 7, seed=1)
    assert torch.equal(sub.labels, again.labels)
    assert len(other) == 7 and torch.bincount(other.labels).tolist() == [4, 2, 1]
    assert subset(split, 1000, seed=0) is split and subset(split, 5000, seed=0) is split


def test_subset_seed_changes_choice():
    labels = torch.arange(200) % 2
    images = torch.arange(200, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 1, 1).contiguous()
    a = subset(Split(images, labels), 20, seed=0)
    b = subset(Split(images, labels), 20, seed=1)
    assert not torch.equal(a.images, b.images)


def test_split_validates():
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 of length 2"):
        Split(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_seeded():
    kw = dict(synthetic_train=120, synthetic_test=60, synthetic_classes=6, image_size=16)
    a = load_dataset("synthetic", "unused", seed=0, **kw)
    b = load_dataset("synthetic", "unused", seed=0, **kw)
    c = load_dataset("synthetic", "unused", seed=1, **kw)
    assert a.source == "synthetic" and a.num_classes == 6
    assert a.classes == tuple(f"class{i}" for i in range(6))
    assert a.train.images.shape == (120, 3, 16, 16) and a.train.images.dtype == torch.uint8
    assert a.test.images.shape == (60, 3, 16, 16)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.bincount(a.train.labels).tolist() == [20] * 6
    assert torch.bincount(a.test.labels).tolist() == [10] * 6
    assert a.train.images.float().std() > 20  # not a blank image


def test_synthetic_classes_are_separable():
    """Class means differ far more than the within-class spread of those means (learnable)."""
    d = load_dataset("synthetic", "", synthetic_train=600, synthetic_classes=3)
    x = d.train.images.float().flatten(1)
    means = torch.stack([x[d.train.labels == k].mean(0) for k in range(3)])
    nearest = torch.cdist(x, means).argmin(1)
    assert (nearest == d.train.labels).float().mean() > 0.8


# ----------------------------------------------------------------------- imagefolder


def test_imagefolder_loads_tree(tmp_path):
    root = _tree(tmp_path / "tree")
    d = _load(root, tmp_path / "cache", image_size=8)
    assert d.source == "imagefolder" and d.classes == ("cat", "dog") and d.num_classes == 2
    assert d.train.images.shape == (5, 3, 8, 8) and d.train.images.dtype == torch.uint8
    assert d.train.images.is_contiguous()
    assert d.test.images.shape == (3, 3, 8, 8)
    assert d.train.labels.tolist() == [0, 0, 0, 1, 1] and d.test.labels.tolist() == [0, 1, 1]
    assert d.train.labels.dtype == torch.int64
    px = d.train.images[:, :, 4, 4].tolist()
    assert px[0] == [200, 10, 10]  # PNG, resized from 40x20
    assert np.allclose(px[1], [200, 10, 10], atol=6)  # JPEG is lossy
    assert px[2] == [100, 100, 100]  # grayscale -> RGB
    assert px[3] == [10, 20, 200]  # opaque RGBA -> RGB
    assert str(root.resolve()) in d.description and "sha1" in d.description


def test_imagefolder_alpha_composited_on_black(tmp_path):
    root = tmp_path / "r"
    for split in ("train", "test"):
        _img(root / split / "a" / "t.png", (4, 4), "RGBA", (255, 255, 255, 0))
    d = _load(root, tmp_path / "c", image_size=4)
    assert int(d.train.images.max()) == 0


def test_imagefolder_mean_std_handmade(tmp_path):
    root = tmp_path / "r"
    _img(root / "train/a/0.png", (4, 4), "RGB", (0, 255, 51))
    _img(root / "train/a/1.png", (4, 4), "RGB", (255, 255, 51))
    _img(root / "test/a/0.png", (4, 4), "RGB", (9, 9, 9))
    d = _load(root, tmp_path / "c", image_size=4)
    assert np.allclose(d.mean, (0.5, 1.0, 0.2)) and np.allclose(d.std, (0.5, 0.0, 0.0), atol=1e-6)


def test_channel_stats_matches_numpy():
    x = torch.randint(0, 256, (5000, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = data._channel_stats(x)  # 5000 > chunk size: exercises chunking
    ref = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3))) and np.allclose(std, ref.std(axis=(0, 2, 3)))


def _assert_data_error(root: Path, cache: Path, needle: Path | str) -> str:
    with pytest.raises(DataError) as info:
        _load(root, cache)
    assert str(needle) in str(info.value)
    return str(info.value)


def test_imagefolder_errors(tmp_path):
    cache = tmp_path / "cache"
    _assert_data_error(tmp_path / "nope", cache, (tmp_path / "nope").resolve())

    only_train = tmp_path / "only_train"
    _img(only_train / "train/a/0.png", (4, 4), "RGB", 0)
    _assert_data_error(only_train, cache, (only_train / "test").resolve())

    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    _assert_data_error(no_classes, cache, (no_classes / "train").resolve())

    empty = _tree(tmp_path / "empty")
    (empty / "test/dog/y.webp").unlink()
    (empty / "test/dog/z.PNG").unlink()
    _assert_data_error(empty, cache, (empty / "test/dog").resolve())

    corrupt = _tree(tmp_path / "corrupt")
    (corrupt / "train/dog/bad.jpg").write_bytes(b"\x00garbage" * 50)
    msg = _assert_data_error(corrupt, cache, (corrupt / "train/dog/bad.jpg").resolve())
    assert "cannot read image" in msg

    mismatch = _tree(tmp_path / "mismatch")
    _img(mismatch / "train/cow/0.png", (4, 4), "RGB", 0)
    _img(mismatch / "test/eel/0.png", (4, 4), "RGB", 0)
    msg = _assert_data_error(mismatch, cache, mismatch.resolve())
    assert "only in train: ['cow']" in msg and "only in test: ['eel']" in msg


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        _img(p, (5 + i, 6), "RGB", (i * 30, 100, 255 - i * 30))
        paths.append(str(p))
    monkeypatch.setattr(data, "_DECODE_CHUNK", 2)  # 4 chunks -> really uses the pool
    serial = data._decode_paths(paths, 4, workers=1)
    parallel = data._decode_paths(paths, 4, workers=2)
    assert serial.shape == (7, 3, 4, 4) and torch.equal(serial, parallel)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.png"):
        data._decode_paths([*paths, str(bad)], 4, workers=2)


# --------------------------------------------------------------------------- caching


def _fail_decode(*_: object) -> None:
    raise AssertionError("decoder called: cache was not used")


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = _load(root, cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)  # one per split, no temp leftovers

    monkeypatch.setattr(data, "_decode_files", _fail_decode)
    second = _load(root, cache)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert second.mean == first.mean and second.std == first.std and second.classes == first.classes

    # A changed file (new size and mtime) must force a rebuild of its split.
    _img(root / "train/cat/a.png", (41, 20), "RGB", (1, 2, 3))
    with pytest.raises(AssertionError, match="decoder called"):
        _load(root, cache)
    # So must a different image size.
    _img(root / "train/cat/a.png", (40, 20), "RGB", (200, 10, 10))
    monkeypatch.undo()
    _load(root, cache)
    monkeypatch.setattr(data, "_decode_files", _fail_decode)
    with pytest.raises(AssertionError, match="decoder called"):
        _load(root, cache, image_size=16)


def test_default_cache_dir_and_touch_invalidates(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    load_dataset("imagefolder", root, quiet=True)
    assert len(list((root / ".ssl_lib_cache").glob("*.pt"))) == 2
    f = root / "test/cat/x.bmp"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    monkeypatch.setattr(data, "_decode_files", _fail_decode)
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("imagefolder", root, quiet=True)


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    ref = _load(root, cache)
    for p in cache.glob("*train*.pt"):
        p.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="ignoring unusable cache"):
        again = _load(root, cache)
    assert torch.equal(ref.train.images, again.train.images)
    assert torch.load(next(cache.glob("*train*.pt")), weights_only=True)["images"].shape == (5, 3, 32, 32)


# --------------------------------------------------------------------------- cifar10


def test_cifar10_missing_without_download(tmp_path):
    root = tmp_path / "cifar"
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root, download=False, quiet=True)
    msg = str(info.value)
    assert str(root.resolve()) in msg and "download=true" in msg and "dataset=cifar10" in msg and "imagefolder" in msg


def _fake_cifar(root: Path, per_batch: int = 4) -> None:
    """The python-pickle layout torchvision reads; pixel (c) of image with label y is 50*c + y."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(name: str, offset: int) -> None:
        labels = [(offset + i) % 10 for i in range(per_batch)]
        arr = np.stack([np.repeat(np.arange(3) * 50 + y, 1024) for y in labels]).astype(np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"data": arr, "labels": labels}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", i)
    batch("test_batch", 7)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_fake_layout_and_cache(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # md5s cannot match a fake
    root = tmp_path / "cifar"
    _fake_cifar(root)
    d = load_dataset("cifar10", root, download=False, quiet=True)
    assert d.source == "cifar10" and d.classes == tuple(f"c{i}" for i in range(10))
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    y = d.train.labels
    assert torch.equal(d.train.images[:, 0, 5, 5].long(), y)  # channel order kept (CHW)
    assert torch.equal(d.train.images[:, 2, 31, 0].long(), y + 100)
    assert np.allclose(d.mean[1], (50 + y.double().mean().item()) / 255)
    assert (root / "ssl_lib_cache").is_dir()

    small = load_dataset("cifar10", root, download=False, image_size=16, quiet=True)
    assert small.train.images.shape == (20, 3, 16, 16)
    assert torch.equal(small.train.images[:, 1, 8, 8].long(), y + 50)  # constant image survives resize

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("torchvision called: cache was not used")

    monkeypatch.setattr(tvd, "CIFAR10", boom)
    cached = load_dataset("cifar10", root, download=False, quiet=True)
    assert torch.equal(cached.train.images, d.train.images) and cached.classes == d.classes


def test_unknown_source_and_size():
    assert SOURCES == ("cifar10", "imagefolder", "synthetic")
    with pytest.raises(ValueError, match="unknown source"):
        load_dataset("mnist", ".")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic", ".", image_size=0)
