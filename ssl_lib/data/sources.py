"""Image sources: CIFAR-10, an image folder, or synthetic images, decoded once and cached.

Three sources give the same in-memory form (:class:`ImageDataset` of uint8 tensors):

* ``cifar10``: torchvision's CIFAR-10 python batches (downloaded into ROOT if asked).
* ``imagefolder``: ROOT/train/<class>/* and ROOT/test/<class>/* image files.
* ``synthetic``: seeded, file-free images for tests and smoke runs.

Decoded splits are cached on disk (one ``torch.save`` file per split) under a key
built from the files' names, sizes and mtimes, so a second load is a single read and
any change to the source data forces a rebuild.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from ..files import atomic_write

__all__ = [
    "SOURCES",
    "DataError",
    "ImageDataset",
    "Split",
    "load_dataset",
]

SOURCES = ("cifar10", "imagefolder", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Bump when decoding/resizing changes, so old caches are not reused.
_CACHE_VERSION = 1
# Below this many files a process pool costs more than it saves.
_PARALLEL_MIN_FILES = 4000
_DECODE_CHUNK = 1000
# Images per chunk for float work (stats, resize, synthesis): bounds peak memory.
_FLOAT_CHUNK = 2048

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_META = "batches.meta"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


@dataclass(frozen=True, eq=False)
class Split:
    """One split as dense tensors; checked on construction so consumers can trust it.

    ``eq=False``: element-wise tensor comparison has no single truth value.
    """

    images: torch.Tensor  # uint8, N x 3 x H x W, contiguous
    labels: torch.Tensor  # int64, N

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[1] != 3:
            raise ValueError(f"Split.images must be uint8 N x 3 x H x W, got {im.dtype} {tuple(im.shape)}")
        if not im.is_contiguous():
            raise ValueError("Split.images must be contiguous")
        if lb.dtype != torch.int64 or lb.ndim != 1 or lb.shape[0] != im.shape[0]:
            raise ValueError(
                f"Split.labels must be int64 of length {im.shape[0]}, got {lb.dtype} {tuple(lb.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train/test splits plus what is needed to normalise and to trace provenance."""

    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str  # "cifar10" | "imagefolder" | "synthetic"
    description: str  # which copy, root path, cache key
    mean: tuple[float, float, float]  # per-channel mean of train images in [0,1]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- loading


def load_dataset(
    source: str,
    root: str | Path,
    *,
    image_size: int = 32,
    cache_dir: str | Path | None = None,
    download: bool = True,
    seed: int = 0,
    synthetic_train: int = 1000,
    synthetic_test: int = 500,
    synthetic_classes: int = 10,
    quiet: bool = False,
    with_test: bool = True,
    min_classes: int = 1,
) -> ImageDataset:
    """Load ``source`` as square ``image_size`` uint8 images.

    ``root`` is ignored for ``synthetic``; ``download`` only matters for ``cifar10``;
    ``seed`` and ``synthetic_*`` only for ``synthetic``. ``cache_dir`` defaults to
    ROOT/.ssl_lib_cache (imagefolder) or ROOT/ssl_lib_cache (cifar10); synthetic data is
    never cached. ``quiet`` silences the progress lines printed to stderr. ``with_test=False``
    reads no test image: the dataset's test split is then empty. An image folder with fewer than
    ``min_classes`` class folders is refused before anything is decoded.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if source == "synthetic":
        return _load_synthetic(seed, synthetic_train, synthetic_test if with_test else 0, synthetic_classes, image_size)
    root = Path(root).expanduser().resolve()
    if source == "imagefolder":
        cache = Path(cache_dir) if cache_dir is not None else root / ".ssl_lib_cache"
        return _load_imagefolder(root, image_size, cache, quiet, with_test, min_classes)
    cache = Path(cache_dir) if cache_dir is not None else root / "ssl_lib_cache"
    return _load_cifar10(root, image_size, cache, download, quiet, with_test)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[ssl_lib.data] {msg}", file=sys.stderr, flush=True)


def _finish(
    train: dict[str, Any], test: dict[str, Any] | None, classes: Sequence[str], source: str, description: str
) -> ImageDataset:
    """The dataset of two decoded splits; no ``test`` (not read) gives an empty test split."""
    mean = tuple(float(v) for v in train["mean"])
    std = tuple(float(v) for v in train["std"])
    if test is None:
        size = train["images"].shape[-1]
        test = {"images": torch.empty(0, 3, size, size, dtype=torch.uint8), "labels": torch.empty(0, dtype=torch.int64)}
    return ImageDataset(
        train=Split(train["images"], train["labels"]),
        test=Split(test["images"], test["labels"]),
        classes=tuple(classes),
        source=source,
        description=description,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------- imagefolder


def _scan_split(split_dir: Path) -> dict[str, list[str]]:
    """Class name -> sorted image file names. Hidden files/folders are skipped
    (e.g. .ipynb_checkpoints); files in nested sub-folders are not read."""
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} is missing: imagefolder expects ROOT/train/<class>/ and ROOT/test/<class>/"
        )
    with os.scandir(split_dir) as it:
        class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image files>)")
    found: dict[str, list[str]] = {}
    for name in class_dirs:
        with os.scandir(split_dir / name) as it:
            found[name] = sorted(
                e.name
                for e in it
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
            )
    return found


def _files_key(parts: Sequence[str], root: Path, paths: Sequence[str]) -> str:
    """sha1 over the settings and every file's path (relative to root), size and mtime_ns."""
    h = hashlib.sha1()
    h.update("\n".join([f"v{_CACHE_VERSION}", *parts]).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"\n{os.path.relpath(path, root)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load_imagefolder(root: Path, image_size: int, cache_dir: Path, quiet: bool, with_test: bool = True,
                      min_classes: int = 1) -> ImageDataset:
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} does not exist or is not a directory")
    scans = {split: _scan_split(root / split) for split in (("train", "test") if with_test else ("train",))}
    train_cls, test_cls = set(scans["train"]), set(scans.get("test", scans["train"]))
    if train_cls != test_cls:
        raise DataError(
            f"train and test class folders differ under {root}: "
            f"only in train: {sorted(train_cls - test_cls)}, only in test: {sorted(test_cls - train_cls)}"
        )
    for split, per_class in scans.items():
        for cls, files in per_class.items():
            if not files:
                exts = "/".join(IMAGE_EXTENSIONS)
                raise DataError(f"class folder {root / split / cls} has no images ({exts})")
    classes = sorted(train_cls)
    if len(classes) < min_classes:
        raise DataError(f"imagefolder {root / 'train'} has {len(classes)} class folder(s) ({', '.join(classes)}); "
                        f"classification needs at least {min_classes}")

    splits: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    pending: list[tuple[Path, dict[str, Any]]] = []
    for split, per_class in scans.items():
        paths = [str(root / split / name / f) for name in classes for f in per_class[name]]
        labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
        key = _files_key(["imagefolder", split, str(image_size), str(root)], root, paths)
        keys[split] = key

        def build(paths: list[str] = paths, labels: list[int] = labels, split: str = split) -> dict[str, Any]:
            workers = (os.cpu_count() or 1) if len(paths) > _PARALLEL_MIN_FILES else 1
            _say(quiet, f"decoding {len(paths)} images from {root / split} ({workers} worker(s))")
            images = _decode_paths(paths, image_size, workers=workers)
            return {"images": images, "labels": torch.tensor(labels, dtype=torch.int64), "classes": classes}

        cache_path = cache_dir / f"imagefolder-{split}-{image_size}px-{key[:20]}.pt"
        splits[split] = _cached(
            cache_path, build, with_stats=split == "train", expect=(len(paths), image_size), quiet=quiet,
            pending=pending,
        )
    _write_pending(pending, quiet)

    description = (
        f"imagefolder {root} (sha1 of file list+sizes+mtimes: train {keys['train'][:12]}, "
        f"test {keys['test'][:12] if with_test else 'not read'}; cache {cache_dir})"
    )
    return _finish(splits["train"], splits.get("test"), classes, "imagefolder", description)


def _decode_paths(paths: Sequence[str], size: int, *, workers: int = 1) -> torch.Tensor:
    """Decode files to an N x 3 x size x size uint8 tensor, in file order.

    With workers > 1 chunks go to a process pool (decoding is CPU-bound Python+C and
    holds the GIL for small images, so threads would not help).
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    chunks = [list(paths[i : i + _DECODE_CHUNK]) for i in range(0, len(paths), _DECODE_CHUNK)]
    pool = None
    if workers > 1 and len(chunks) > 1:
        # fork on Linux: children need no re-import of torch or of the caller's __main__.
        ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
        pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx)
    try:
        results = (pool.map if pool else map)(_decode_files, chunks, repeat(size))
        for i, arr in enumerate(results):
            out[i * _DECODE_CHUNK : i * _DECODE_CHUNK + len(arr)] = arr
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # on error: drop queued chunks
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _decode_files(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode a chunk of files to n x size x size x 3 uint8 (runs in pool workers)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = _decode_image(path, size)
        except Exception as exc:  # Pillow raises many types for bad files
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return out


def _decode_image(path: str, size: int) -> np.ndarray:
    """One file -> size x size x 3 uint8.

    The image is squashed to a square with BILINEAR (antialiased when shrinking):
    aspect ratio is NOT kept, so nothing is cropped away. Alpha is composited onto
    black, because the colour under fully transparent pixels is arbitrary.
    """
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (0, 0, 0))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------- cifar10


def _load_cifar10(root: Path, image_size: int, cache_dir: Path, download: bool, quiet: bool, with_test: bool = True
                  ) -> ImageDataset:
    batch_dir = root / _CIFAR_DIR
    needed = [*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES, _CIFAR_META]
    missing = [n for n in needed if not (batch_dir / n).is_file()]
    if missing and not download:
        raise DataError(
            f"config fields dataset=cifar10, data_root={root}: CIFAR-10 not found (missing "
            f"{batch_dir / missing[0]}); set download=true to download it (needs network), or "
            f"dataset=imagefolder with data_root holding train/<class>/ and test/<class>/ image folders"
        )

    if missing:  # download=True: torchvision fetches and extracts both splits at once
        _say(quiet, f"CIFAR-10 not found under {root}; downloading")
        _download_cifar10(root)

    splits: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    pending: list[tuple[Path, dict[str, Any]]] = []
    for split, files in (("train", _CIFAR_TRAIN_FILES), ("test", _CIFAR_TEST_FILES))[: 2 if with_test else 1]:
        is_train = split == "train"

        def build(is_train: bool = is_train) -> dict[str, Any]:
            ds = _torchvision_cifar10(root, train=is_train, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            if image_size != images.shape[-1]:
                images = _resize_uint8(images, image_size)
            return {
                "images": images,
                "labels": torch.as_tensor(ds.targets, dtype=torch.int64),
                "classes": list(ds.classes),
            }

        paths = [str(batch_dir / n) for n in (*files, _CIFAR_META)]
        key = _files_key(["cifar10", split, str(image_size), str(root)], root, paths)
        keys[split] = key
        cache_path = cache_dir / f"cifar10-{split}-{image_size}px-{key[:20]}.pt"
        splits[split] = _cached(
            cache_path, build, with_stats=is_train, expect=(None, image_size), quiet=quiet, pending=pending
        )
    _write_pending(pending, quiet)

    classes = list(splits["train"]["classes"])
    description = (
        f"torchvision CIFAR-10 at {root} (sha1 of batch sizes+mtimes: train {keys['train'][:12]}, "
        f"test {keys['test'][:12] if with_test else 'not read'}; cache {cache_dir})"
    )
    return _finish(splits["train"], splits.get("test"), classes, "cifar10", description)


def _download_cifar10(root: Path) -> None:
    """torchvision's download into ``root``; on failure, everything it created there is removed
    (an empty or half-downloaded data folder would look like a damaged copy next time)."""
    made = [p for p in (root, root / _CIFAR_ARCHIVE, root / _CIFAR_DIR) if not p.exists()]
    try:
        _torchvision_cifar10(root, train=False, download=True)
    except DataError:
        for path in made if root in made else made[1:]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _torchvision_cifar10(root: Path, train: bool, download: bool) -> Any:
    """torchvision's CIFAR10, with its failures re-raised as DataError naming ROOT."""
    from torchvision import datasets  # lazy: ~1 s import, unused on cache hits

    try:
        return datasets.CIFAR10(str(root), train=train, download=download)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if download:
            raise DataError(
                f"config fields dataset=cifar10, data_root={root}: CIFAR-10 could not be downloaded ({what}); "
                f"check network access, or use dataset=imagefolder with a local copy"
            ) from exc
        raise DataError(
            f"config fields dataset=cifar10, data_root={root}: cannot read CIFAR-10 ({what}); delete "
            f"{root / _CIFAR_DIR} and set download=true to fetch it again, or use dataset=imagefolder"
        ) from exc


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 N x 3 x H x W, in chunks to bound memory."""
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], _FLOAT_CHUNK):
        x = images[s : s + _FLOAT_CHUNK].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s : s + _FLOAT_CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- caching


def _cached(
    path: Path,
    build: Callable[[], dict[str, Any]],
    *,
    with_stats: bool,
    expect: tuple[int | None, int],
    quiet: bool,
    pending: list[tuple[Path, dict[str, Any]]],
) -> dict[str, Any]:
    """Return the cached split at ``path`` if valid, else build it and add stats. A built split is
    appended to ``pending`` and written by :func:`_write_pending` once every split has loaded, so
    a split that fails leaves no cache of the others behind."""
    data = _read_cache(path, with_stats, expect)
    if data is not None:
        return data
    data = build()
    if with_stats:
        mean, std = _channel_stats(data["images"])
        data["mean"] = torch.tensor(mean, dtype=torch.float64)
        data["std"] = torch.tensor(std, dtype=torch.float64)
    pending.append((path, data))
    return data


def _write_pending(pending: list[tuple[Path, dict[str, Any]]], quiet: bool) -> None:
    for path, data in pending:
        _write_cache(path, data, quiet)


def _read_cache(path: Path, with_stats: bool, expect: tuple[int | None, int]) -> dict[str, Any] | None:
    """Load and sanity-check a cache file; None (rebuild) if absent or unusable."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = data["images"], data["labels"]
        n, size = expect
        ok = (
            images.dtype == torch.uint8
            and images.ndim == 4
            and tuple(images.shape[1:]) == (3, size, size)
            and (n is None or images.shape[0] == n)
            and labels.dtype == torch.int64
            and tuple(labels.shape) == (images.shape[0],)
            and isinstance(data["classes"], list)
            and (not with_stats or (data["mean"].shape == (3,) and data["std"].shape == (3,)))
        )
        if not ok:
            raise ValueError("unexpected contents")
        data["images"] = images.contiguous()
        return data
    except Exception as exc:  # any failure just means "rebuild"
        why = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"ignoring unusable cache {path} ({why}); rebuilding", stacklevel=3)
        return None


def _write_cache(path: Path, data: dict[str, Any], quiet: bool) -> None:
    """Atomic save: readers never see a half-written cache.
    A failure to write only warns; the data is already in memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(data, tmp), sync=True)
        _say(quiet, f"cached {path}")
    except OSError as exc:
        warnings.warn(f"could not write cache {path}: {exc}", stacklevel=3)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0,1]; float64 sums, chunked."""
    n = images.shape[0]
    if n == 0:
        raise DataError("cannot compute mean/std of an empty train split")
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for s in range(0, n, _FLOAT_CHUNK):
        x = images[s : s + _FLOAT_CHUNK].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_(min=0.0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())


# ------------------------------------------------------------------------- synthetic


def _load_synthetic(seed: int, n_train: int, n_test: int, n_classes: int, size: int) -> ImageDataset:
    """Each class is a fixed random low-frequency colour pattern (3x4x4 upsampled);
    each image is that pattern at a random shift, contrast and brightness, blended with
    a random low-frequency distractor and pixel noise. Flips/crops/jitter keep the class
    recognisable, yet no single pixel or colour gives it away."""
    if n_classes < 1 or n_train < 1 or n_test < 0:
        raise ValueError(
            f"synthetic needs classes >= 1, train >= 1, test >= 0; got {n_classes}, {n_train}, {n_test}"
        )
    rng = np.random.default_rng(seed)
    margin = max(1, size // 8)
    protos = rng.uniform(0.0, 1.0, size=(n_classes, 3, 4, 4)).astype(np.float32)
    protos_up = _upsample(protos, size + 2 * margin)
    train = _synthetic_split(rng, protos_up, n_train, size, margin)
    test = _synthetic_split(rng, protos_up, n_test, size, margin)
    mean, std = _channel_stats(train.images)
    classes = tuple(f"class{i}" for i in range(n_classes))
    description = f"synthetic seed={seed} classes={n_classes} train={n_train} test={n_test} size={size}"
    return ImageDataset(train, test, classes, "synthetic", description, mean, std)  # type: ignore[arg-type]


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    t = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    return t.numpy()


def _synthetic_split(
    rng: np.random.Generator, protos_up: np.ndarray, n: int, size: int, margin: int
) -> Split:
    n_classes = protos_up.shape[0]
    labels = rng.permutation(np.arange(n) % n_classes)  # balanced to within one
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    ar = np.arange(size)
    for s in range(0, n, _FLOAT_CHUNK):
        lab = labels[s : s + _FLOAT_CHUNK]
        m = len(lab)
        dy, dx = rng.integers(0, 2 * margin + 1, size=(2, m))
        rows = (dy[:, None] + ar)[:, None, :, None]
        cols = (dx[:, None] + ar)[:, None, None, :]
        pattern = protos_up[lab[:, None, None, None], np.arange(3)[None, :, None, None], rows, cols]
        distractor = _upsample(rng.uniform(0.0, 1.0, size=(m, 3, 4, 4)).astype(np.float32), size)
        contrast = rng.uniform(0.5, 1.0, size=(m, 1, 1, 1)).astype(np.float32)
        brightness = rng.uniform(-0.15, 0.15, size=(m, 1, 1, 1)).astype(np.float32)
        noise = rng.normal(0.0, 0.08, size=(m, 3, size, size)).astype(np.float32)
        x = 0.5 + contrast * (0.65 * (pattern - 0.5) + 0.35 * (distractor - 0.5)) + brightness + noise
        images[s : s + m] = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
