"""Held-out train images: the slice of the train split that hyper-parameters are chosen on (never the test set).

The CIFAR-10 testbed trained on every train image, so held-out figures run above test figures: they rank
candidates, they do not estimate test accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitcompress.bench import BenchConfig
from vitcompress.data import load_data
from vitcompress.data.base import ImageData, TensorImages, even_subset
from vitcompress.evaluate import accuracy_metrics, predict

N_TRAIN = 50000
FP32_CPU = BenchConfig(dtype="fp32", device="cpu")  # held-out and test scores: the testbed's own fp32 numbers


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


def reference_logits(base: nn.Module, sets: dict[str, ImageData]) -> dict[str, torch.Tensor]:
    """The uncompressed model's logits [N, C] on each set, for agreement."""
    return {k: predict(base, d, batch_size=256, cfg=FP32_CPU)[0] for k, d in sets.items()}


def score(model: nn.Module, sets: dict[str, ImageData], refs: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """``{set}_top1`` and ``{set}_agreement`` (with ``refs[set]``; None without one), in percent, 2 decimals."""
    out: dict[str, float | None] = {}
    for name, d in sets.items():
        logits, labels, _ = predict(model, d, batch_size=256, cfg=FP32_CPU)
        m = accuracy_metrics(logits, labels, refs.get(name))
        out[f"{name}_top1"], out[f"{name}_agreement"] = round(m["top1"], 2), m["agreement"] and round(m["agreement"], 2)
    return out
