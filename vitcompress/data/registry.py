"""Resolve a data spec string to an :class:`ImageData`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError, check_positive
from .base import ImageData
from .corrupt import load_corrupted
from .digits import load_digits_data
from .sources import load_hf_hub, load_local, load_synthetic


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
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return load_synthetic(spec, data_cfg, limit)
    if spec.startswith("hf:"):
        return load_hf_hub(spec, data_cfg, split, limit, purpose)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"unknown data spec or missing path: '{spec}' (expected digits, digits-c, "
                        "cifar10-c[:SOURCE], synthetic[:N], hf:NAME[:SPLIT] or a local directory)")
    return load_local(path, data_cfg, split, limit, purpose)
