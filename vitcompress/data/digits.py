"""scikit-learn's bundled handwritten digits, and ``digits-c``: the test split under seeded corruptions.

The 8x8 scans (values 0..16) are upsampled to canonical 32x32 grayscale images; the model's timm eval
transform takes it from there. ``digits-c`` corrupts the canonical test images in the spirit of MNIST-C /
ImageNet-C: every (corruption, copy, image) triple has its own seed, so the split is identical on every
machine, and its order interleaves corruptions so that ``--limit`` keeps them balanced.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from .base import ImageData, TensorImages, build_eval_transform, even_subset

SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.3
CORRUPTION_SEED = 1234
COPIES = 2


@lru_cache(maxsize=1)
def canonical() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """All 1,797 digits as uint8 [N,32,32], labels [N], and the fixed split's indices."""

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    imgs = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    idx = np.arange(len(d.target))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=d.target, random_state=SPLIT_SEED)
    return imgs, d.target.astype(np.int64), {"train": np.sort(train), "test": np.sort(test)}


# ---------------------------------------------------------------------------------------------- corruptions
# Each takes a canonical image [1,32,32] float in [0,1] and a numpy Generator; returns the same shape.
def _affine(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:

    angle = float(rng.uniform(-25, 25))
    scale = float(rng.uniform(0.75, 1.1))
    shift = [int(v) for v in rng.integers(-3, 4, size=2)]
    shear = [float(rng.uniform(-10, 10)), 0.0]
    return TF.affine(x, angle=angle, translate=shift, scale=scale, shear=shear,
                     interpolation=TF.InterpolationMode.BILINEAR)


def _gaussian_noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    sigma = float(rng.uniform(0.12, 0.22))
    return x + torch.from_numpy(rng.normal(0.0, sigma, size=x.shape).astype(np.float32))


def _blur(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:

    return TF.gaussian_blur(x, kernel_size=[11, 11], sigma=[float(rng.uniform(2.0, 3.0))] * 2)


def _contrast(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    c = float(rng.uniform(0.45, 0.75))
    mean = x.mean()
    return mean + (x - mean) * c


def _occlusion(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    out = x.clone()
    h, w = (int(v) for v in rng.integers(8, 14, size=2))
    top, left = (int(v) for v in rng.integers(0, SIZE - 8, size=2))
    out[..., top:top + h, left:left + w] = float(rng.integers(0, 2))
    return out


def _impulse_noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    p = float(rng.uniform(0.05, 0.12))
    u = rng.random(size=x.shape)
    out = x.clone()
    out[torch.from_numpy(u < p / 2)] = 0.0
    out[torch.from_numpy(u > 1 - p / 2)] = 1.0
    return out


CORRUPTIONS: dict[str, Callable[[torch.Tensor, np.random.Generator], torch.Tensor]] = {
    "affine": _affine,
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "contrast": _contrast,
    "occlusion": _occlusion,
    "impulse_noise": _impulse_noise,
}


def corrupted_test_set(copies: int = COPIES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """digits-c: uint8 images [M,32,32], labels [M], corruption ids [M], M = copies x test x corruptions."""
    imgs, labels, split = canonical()
    names = list(CORRUPTIONS)
    out_imgs, out_labels, out_groups = [], [], []
    for copy in range(copies):
        for i in split["test"]:
            base = torch.from_numpy(imgs[i].astype(np.float32) / 255.0)[None]
            for c, name in enumerate(names):
                rng = np.random.default_rng([CORRUPTION_SEED, c, copy, int(i)])
                y = CORRUPTIONS[name](base, rng).clamp(0, 1)
                out_imgs.append((y[0] * 255).round().to(torch.uint8).numpy())
                out_labels.append(labels[i])
                out_groups.append(c)
    return np.stack(out_imgs), np.asarray(out_labels, np.int64), np.asarray(out_groups, np.int64)


_corrupted_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def load_digits_data(spec: str, split: str | None, limit: int | None, data_cfg: dict) -> ImageData:
    """Resolve ``digits`` / ``digits-c`` for a model whose timm data config is ``data_cfg``."""
    split = split or "test"
    if split not in ("train", "test"):
        raise DataError(f"{spec} has splits 'train' and 'test', not '{split}'")
    if spec == "digits":
        imgs, labels, idx = canonical()
        images, ys, groups, names = imgs[idx[split]], labels[idx[split]], None, ["all"]
    else:
        if split != "test":
            raise DataError("digits-c is a test split only (use --split test)")
        if COPIES not in _corrupted_cache:
            _corrupted_cache[COPIES] = corrupted_test_set(COPIES)
        images, ys, groups = _corrupted_cache[COPIES]
        names = list(CORRUPTIONS)
    keep = np.asarray(even_subset(len(ys), limit), dtype=np.int64)
    x = preprocess_uint8(images[keep], data_cfg)
    g = torch.from_numpy(groups[keep]) if groups is not None else None
    return ImageData(TensorImages(x, torch.from_numpy(ys[keep]), g), name=spec, split=split, has_labels=True,
                     num_classes=10, groups=names,
                     provenance={"source": "sklearn.datasets.load_digits", "split_seed": SPLIT_SEED,
                                 **({"corruption_seed": CORRUPTION_SEED, "copies": COPIES} if groups is not None
                                    else {})})


def preprocess_uint8(images: np.ndarray, data_cfg: dict) -> torch.Tensor:
    """Grayscale uint8 [N,h,w] -> model input [N,3,H,W] through the timm eval transform."""

    tf = build_eval_transform(data_cfg)
    return torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in images])
