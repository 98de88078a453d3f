"""``cifar10-c[:SOURCE]``: a CIFAR-10 copy's test split under seeded corruptions (in the spirit of CIFAR-10-C).

SOURCE is any CIFAR-10 data spec (a local Parquet / ImageFolder copy, or ``hf:uoft-cs/cifar10``, the default).
Each test image gets one corruption, ``i % 6`` of :data:`CORRUPTIONS`, at a strength drawn from its own seed
``(CORRUPTION_SEED, corruption, i)``, so the split is the same on every machine and every corruption covers a
sixth of the images and every class. Per-corruption results are reported as the split's groups.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..errors import DataError
from .base import ImageData, MappedImages, TensorImages, build_eval_transform, even_subset

CORRUPTION_SEED = 4321
DEFAULT_SOURCE = "hf:uoft-cs/cifar10"


def _gaussian_noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, np.float32) / 255
    x = x + rng.normal(0.0, rng.uniform(0.06, 0.10), size=x.shape)
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.9, 1.3))))


def _contrast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, np.float32) / 255
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = mean + (x - mean) * rng.uniform(0.3, 0.5)
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(8, 16)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _occlusion(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    x = np.array(img)
    h, w = (int(v) for v in rng.integers(9, 14, size=2))
    top, left = int(rng.integers(0, x.shape[0] - h + 1)), int(rng.integers(0, x.shape[1] - w + 1))
    x[top:top + h, left:left + w] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(x)


def _pixelate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    f = float(rng.uniform(0.4, 0.55))
    return img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BOX).resize((w, h), Image.NEAREST)


CORRUPTIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "contrast": _contrast,
    "jpeg": _jpeg,
    "occlusion": _occlusion,
    "pixelate": _pixelate,
}


Loader = Callable[[str, dict[str, Any], str | None, int | None, str], ImageData]
_cache: dict[tuple[str, str], tuple[list[Image.Image], np.ndarray, np.ndarray]] = {}


def _corrupted(source: str, split: str, load: Loader) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """The corrupted images (PIL, RGB), labels [N] and corruption ids [N] of ``source``'s ``split`` (cached)."""
    if (source, split) in _cache:
        return _cache[source, split]
    base = load(source, {"input_size": (3, 32, 32)}, split, None, "eval")
    if not isinstance(base.dataset, MappedImages) or not base.has_labels:
        raise DataError(f"cifar10-c needs a labelled image source (a Parquet / ImageFolder copy or hf:...), "
                        f"got '{source}'")
    names = list(CORRUPTIONS)
    images, labels, groups = [], [], []
    for i in range(len(base)):
        img, label = base.dataset.raw(i)
        c = i % len(names)
        rng = np.random.default_rng([CORRUPTION_SEED, c, i])
        images.append(CORRUPTIONS[names[c]](img.convert("RGB"), rng))
        labels.append(label)
        groups.append(c)
    _cache.clear()  # one corrupted copy in memory at a time
    _cache[source, split] = images, np.asarray(labels, np.int64), np.asarray(groups, np.int64)
    return _cache[source, split]


def load_corrupted(spec: str, data_cfg: dict[str, Any], split: str | None, limit: int | None,
                   load: Loader) -> ImageData:
    """``cifar10-c[:SOURCE]`` preprocessed for a model with timm data config ``data_cfg``; ``load`` resolves
    SOURCE (the registry's loader, passed in so that this module does not import the registry)."""
    source = spec.partition(":")[2] or DEFAULT_SOURCE
    images, labels, groups = _corrupted(source, split or "test", load)
    keep = even_subset(len(labels), limit)
    tf = build_eval_transform(data_cfg)
    x = torch.stack([tf(images[i]) for i in keep])
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    return ImageData(TensorImages(x, torch.from_numpy(labels)[idx], torch.from_numpy(groups)[idx]), name=spec,
                     split=split or "test", has_labels=True, num_classes=10, groups=list(CORRUPTIONS),
                     provenance={"source": source, "corruption_seed": CORRUPTION_SEED})
