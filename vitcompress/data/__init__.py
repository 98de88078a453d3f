"""Data specs: one string names where images come from.

- ``digits``: scikit-learn's bundled handwritten digits, fixed seeded train/test split (real labels);
- ``digits-c``: the digits test split under fixed, seeded corruptions (per-corruption groups);
- ``synthetic`` or ``synthetic:N``: random tensors, for latency only (no labels);
- a local ImageFolder directory, a ``datasets.save_to_disk`` directory, parquet files;
- ``hf:NAME[:SPLIT]``: a Hugging Face hub dataset (needs network).

Preprocessing follows the model's timm data config (size, crop, interpolation, mean/std).
"""

from __future__ import annotations

from .base import ImageData, build_eval_transform, even_subset
from .registry import load_data

__all__ = ["ImageData", "build_eval_transform", "even_subset", "load_data"]
