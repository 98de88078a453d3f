"""The dataset container every data spec resolves to, and the shared preprocessing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import check_positive


@dataclasses.dataclass
class ImageData:
    """A resolved data spec.

    dataset: items ``(image[3,H,W] float32 normalized, label int (-1: none), group int)``.
    groups: names of the group ids (e.g. digits-c corruptions); ``["all"]`` when ungrouped.
    """

    dataset: Dataset
    name: str
    split: str
    has_labels: bool
    num_classes: int | None
    groups: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    reload: Callable[[dict[str, Any]], ImageData] | None = dataclasses.field(default=None, repr=False)

    def for_config(self, data_cfg: dict[str, Any]) -> ImageData:
        """The same images, in the same order, preprocessed for a model with timm data config ``data_cfg``."""
        if self.reload is None:
            raise ValueError(f"{self.name} cannot be re-preprocessed for another model")
        return self.reload(data_cfg)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def loader(self, batch_size: int, *, shuffle: bool = False, workers: int = 0, seed: int = 0,
               indices: Sequence[int] | None = None) -> DataLoader:
        """Batches ``(images [B,3,H,W], labels [B], groups [B])``; ``indices`` restricts to a subset, in order."""
        check_positive("batch size", batch_size)
        gen = torch.Generator().manual_seed(seed)
        ds = self.dataset if indices is None else Subset(self.dataset, list(indices))
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen,
                          persistent_workers=False)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "split": self.split, "images": len(self), "labels": self.has_labels,
                "groups": self.groups, **self.provenance}


class TensorImages(Dataset):
    """Preprocessed images held in memory. images: [N,3,H,W] float; labels, groups: [N] int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.groups = groups if groups is not None else torch.zeros(len(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.labels[i]), int(self.groups[i])


class MappedImages(Dataset):
    """Lazily decoded images: ``fetch(i) -> (PIL image, label)``, then ``transform``."""

    def __init__(self, n: int, fetch: Callable[[int], tuple[Any, int]], transform: Callable, indices=None):
        self.fetch, self.transform = fetch, transform
        self.indices = list(range(n)) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> tuple[Any, int]:
        """Item ``i`` before preprocessing: (PIL image, label)."""
        return self.fetch(self.indices[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img, label = self.fetch(self.indices[i])
        return self.transform(img.convert("RGB")), int(label), 0


def build_eval_transform(data_cfg: dict[str, Any]) -> Callable:
    """timm's eval transform (resize, center crop, to tensor, normalize) for a PIL image."""

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_cfg[k] for k in keys if k in data_cfg}, is_training=False)


def even_subset(n: int, limit: int | None) -> Sequence[int]:
    """Deterministic, evenly spaced indices: ``limit`` of ``n`` covering every class and group."""
    check_positive("limit", limit)
    if limit is None or limit >= n:
        return range(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64)).tolist()
