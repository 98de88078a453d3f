"""Bundled recipes (YAML), importable as ``vitcompress.recipes`` so installed copies find them too."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipe_path(name_or_path: str) -> Path:
    """A recipe path as given, or a bundled recipe by name (``digits_vit`` or ``digits_vit.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    bundled = resources.files(__name__) / name
    return Path(str(bundled)) if bundled.is_file() else p
