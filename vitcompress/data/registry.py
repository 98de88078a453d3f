"""Resolve a data spec string to an :class:`ImageData`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from ..errors import DataError, check_positive
from .base import ImageData, even_subset
from .corrupt import load_corrupted
from .digits import load_digits_data
from .sources import load_hf_hub, load_local, load_synthetic
from .video import load_video

# The sizes of evenly spaced train subsets (calibration, recovery and training limits) that a held-out split never
# touches: a step that calibrates or trains on N images with N here cannot have seen a held-out image.
# every data spec, for help texts and errors
SPECS = ("digits, digits-c, cifar10-c[:SOURCE], heldout:N:SOURCE, video:[N:]SOURCE, synthetic[:N], hf:NAME[:SPLIT] "
         "or a local folder (class folders of images, or Hugging Face Parquet files)")
HELDOUT_DISJOINT_FROM = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 5000, 10000)


def heldout_capacity(total: int) -> int:
    """How many of a train split's ``total`` images a held-out split can take."""
    used: set[int] = set()
    for k in HELDOUT_DISJOINT_FROM:
        if k < total:
            used.update(even_subset(total, k))
    return total - len(used)


def heldout_indices(total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of a train split of ``total`` images outside ``even_subset(total, k)`` for every
    k in :data:`HELDOUT_DISJOINT_FROM`."""
    used: set[int] = set()
    for k in HELDOUT_DISJOINT_FROM:
        if k < total:
            used.update(even_subset(total, k))
    rest = [i for i in range(total) if i not in used]
    if n > len(rest):
        raise DataError(f"heldout: only {len(rest)} of {total} train images are outside the calibration and training "
                        f"subsets, asked for {n}")
    return [rest[i] for i in even_subset(len(rest), n)]


def load_data(spec: str, data_cfg: dict[str, Any], *, split: str | None = None, limit: int | None = None,
              purpose: str = "eval") -> ImageData:
    """Load ``spec`` preprocessed for a model with timm data config ``data_cfg``.

    purpose: ``eval`` (default split: test/validation) or ``train``/``calib`` (default split: train).
    limit: keep this many images, evenly spaced (deterministic, covers every class and group).
    """
    data = _load(spec, data_cfg, split, limit, purpose)
    data.reload = lambda cfg: load_data(spec, cfg, split=split, limit=limit, purpose=purpose)
    return data


def _load(spec: str, data_cfg: dict[str, Any], split: str | None, limit: int | None, purpose: str) -> ImageData:
    check_positive("limit", limit)
    if not spec:
        raise DataError("no data spec given")
    default_split = split or ("train" if purpose in ("train", "calib") else None)
    if spec in ("digits", "digits-c"):
        return load_digits_data(spec, default_split, limit, data_cfg)
    if spec == "cifar10-c" or spec.startswith("cifar10-c:"):
        if purpose in ("train", "calib"):
            raise DataError("cifar10-c is a corrupted test split: evaluate on it, never train or calibrate")
        return load_corrupted(spec, data_cfg, split, limit, _load)
    if spec.startswith("heldout:"):
        return _heldout(spec, data_cfg, limit)
    if spec.startswith("video:"):
        if purpose in ("train", "calib"):
            raise DataError("video: clips are for evaluating (Eventful and per-frame models), not for training or "
                            "calibrating")
        return load_video(spec, data_cfg, limit, _load)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return load_synthetic(spec, data_cfg, limit)
    if spec.startswith("hf:"):
        return load_hf_hub(spec, data_cfg, split, limit, purpose)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"unknown data spec or missing path: '{spec}' (expected {SPECS})")
    return load_local(path, data_cfg, split, limit, purpose)


def _heldout(spec: str, data_cfg: dict[str, Any], limit: int | None) -> ImageData:
    """``heldout:N:SOURCE``: N train images of SOURCE that no calibration or training subset of a size in
    :data:`HELDOUT_DISJOINT_FROM` contains, for choosing settings without the test split."""
    n, _, source = spec[len("heldout:"):].partition(":")
    if not n.isdigit() or int(n) < 1 or not source:
        raise DataError(f"held-out data is heldout:N:SOURCE with N >= 1 (e.g. heldout:5000:PATH), got '{spec}'")
    train = _load(source, data_cfg, "train", None, "train")
    idx = heldout_indices(len(train), int(n))
    idx = [idx[i] for i in even_subset(len(idx), limit)]
    return dataclasses.replace(train, dataset=Subset(train.dataset, idx), name=spec, split="heldout",
                               provenance={**train.provenance, "heldout_of": source, "heldout_images": len(idx)})
