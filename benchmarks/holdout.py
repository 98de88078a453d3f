"""Held-out train images: the slice of the train split that hyper-parameters are chosen on (never the test set).

The CIFAR-10 testbed trained on every train image, so held-out figures run above test figures: they rank
candidates, they do not estimate test accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

from vitcompress.data import load_data
from vitcompress.data.base import ImageData, TensorImages, even_subset

N_TRAIN = 50000


def holdout_indices(used_limits: int | tuple[int, ...], n: int = 5000, total: int = N_TRAIN) -> list[int]:
    """``n`` evenly spaced train indices outside ``even_subset(total, limit)`` for every used limit (the images
    that a step with ``limit`` / ``calib_size`` = that many trains or calibrates on)."""
    limits = (used_limits,) if isinstance(used_limits, int) else used_limits
    used = {i for lim in limits for i in even_subset(total, lim)}
    rest = [i for i in range(total) if i not in used]
    return [rest[i] for i in even_subset(len(rest), n)]


def subset(data: ImageData, idx: list[int]) -> ImageData:
    """The images ``idx`` of ``data``, preprocessed, in memory."""
    images = torch.stack([data.dataset[i][0] for i in idx])
    labels = torch.tensor([data.dataset[i][1] for i in idx])
    return ImageData(TensorImages(images, labels), name=data.name, split=data.split, has_labels=True, num_classes=10)


def holdout_sets(data: str, cfg: dict[str, Any], used_limits: int | tuple[int, ...], n: int = 5000,
                 ) -> dict[str, ImageData]:
    """``holdout`` (clean) and ``holdout-c`` (cifar10-c's corruptions of the same train images)."""
    idx = holdout_indices(used_limits, n)
    return {"holdout": subset(load_data(data, cfg, split="train", purpose="eval"), idx),
            "holdout-c": subset(load_data(f"cifar10-c:{data}", cfg, split="train"), idx)}
