"""Data sources beyond digits: synthetic tensors, local ImageFolder / HF datasets / parquet, the HF hub."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, first_line
from .base import ImageData, MappedImages, TensorImages, build_eval_transform, even_subset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
EVAL_SPLITS = ("test", "validation", "val", "valid")
SYNTHETIC_DEFAULT = 64


def load_synthetic(spec: str, data_cfg: dict[str, Any], limit: int | None) -> ImageData:
    """Random N(0,1) images of the model's input size: latency only, never accuracy (labels are -1)."""
    n = SYNTHETIC_DEFAULT
    if ":" in spec:
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise DataError(f"bad synthetic spec '{spec}': expected synthetic:N") from None
        if n < 1:
            raise DataError(f"bad synthetic spec '{spec}': N must be >= 1")
    n = min(n, limit) if limit else n
    x = torch.randn(n, *data_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    return ImageData(TensorImages(x, torch.full((n,), -1, dtype=torch.long)), name=spec, split="none",
                     has_labels=False, num_classes=None)


def load_local(path: Path, data_cfg: dict[str, Any], split: str | None, limit: int | None,
               purpose: str) -> ImageData:
    """A directory: HF ``save_to_disk`` output, parquet files, or an ImageFolder (class subfolders)."""
    if path.is_file():
        if path.suffix == ".parquet":
            return _from_parquet([path], str(path), data_cfg, split, limit, purpose)
        raise DataError(f"data path {path} is a file; expected a directory (ImageFolder or HF dataset) or .parquet")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"cannot read HF dataset at {path}: {first_line(exc)}") from None
        return _from_hf_dataset(ds, str(path), data_cfg, split, limit, purpose)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return _from_parquet(parquet, str(path), data_cfg, split, limit, purpose)
    return _image_folder(path, data_cfg, split, limit, purpose)


def load_hf_hub(spec: str, data_cfg: dict[str, Any], split: str | None, limit: int | None,
                purpose: str) -> ImageData:
    """``hf:NAME[:SPLIT]`` through ``datasets.load_dataset`` (network needed unless cached)."""
    parts = spec[3:].split(":")
    name, hub_split = parts[0], (parts[1] if len(parts) > 1 else None)
    if not name:
        raise DataError(f"bad spec '{spec}': expected hf:NAME[:SPLIT]")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=hub_split or split)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset '{name}' (offline?): {first_line(exc)}") from None
    return _from_hf_dataset(ds, spec, data_cfg, hub_split or split, limit, purpose)


# ---------------------------------------------------------------------------------------------- helpers
def _pick_split(available: list[str], split: str | None, purpose: str, where: str) -> str:
    if split is not None:
        if split not in available:
            raise DataError(f"no split '{split}' in {where} (found: {', '.join(available)})")
        return split
    prefs = ("train",) if purpose in ("train", "calib") else EVAL_SPLITS
    for s in prefs:
        if s in available:
            return s
    if len(available) == 1:
        return available[0]
    raise DataError(f"{where} has splits {', '.join(available)}: choose one with --split")


def _parquet_splits(files: list[Path]) -> dict[str, list[Path]]:
    """Split name -> files, from each file's stem (``test-00000-of-00001``) or parent folder; else ``train``."""
    by_split: dict[str, list[Path]] = {}
    for f in files:
        stem = f.stem.lower()
        split = next((s for s in ("train", *EVAL_SPLITS) if stem.startswith(s) or f.parent.name == s), "train")
        by_split.setdefault(split, []).append(f)
    return by_split


def _from_parquet(files: list[Path], name: str, data_cfg: dict[str, Any], split: str | None, limit: int | None,
                  purpose: str) -> ImageData:
    """Parquet in the HF hub's image layout (``image``: struct {bytes, path} or binary; ``label``: int).

    Read with pyarrow (no ``datasets`` cache); images are decoded lazily. A row that does not decode raises a
    one-line :class:`DataError` naming the file and the row.
    """

    by_split = _parquet_splits(files)
    split = _pick_split(sorted(by_split), split, purpose, name)
    tables = []
    for f in sorted(by_split[split]):
        try:
            tables.append((f, pq.read_table(f)))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read parquet file {f}: {first_line(exc)}") from None
    cols = tables[0][1].column_names
    image_col = next((c for c in ("image", "img") if c in cols), None)
    if image_col is None:
        raise DataError(f"{tables[0][0]} has no image column (columns: {', '.join(cols)})")
    label_col = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    rows: list[tuple[Path, int]] = []  # (file, row in file) per image
    images: list[Any] = []
    labels: list[int] = []
    for f, t in tables:
        if image_col not in t.column_names or (label_col and label_col not in t.column_names):
            raise DataError(f"{f} does not have the columns of {tables[0][0]} ({', '.join(cols)})")
        col = t.column(image_col).combine_chunks()
        if pa.types.is_struct(col.type):
            col = col.field("bytes")
        images += col.to_pylist()
        labels += t.column(label_col).to_pylist() if label_col else [-1] * len(t)
        rows += [(f, i) for i in range(len(t))]
    if not images:
        raise DataError(f"dataset {name} (split '{split}') is empty")

    def fetch(i: int) -> tuple[Any, int]:
        f, row = rows[i]
        try:
            img = Image.open(io.BytesIO(images[i]))
            img.load()
        except (UnidentifiedImageError, OSError, TypeError, ValueError):
            raise DataError(f"cannot decode image in {f}, row {row}") from None
        label = labels[i]
        if label is None:
            raise DataError(f"missing label in {f}, row {row}")
        return img, int(label)

    has_labels = label_col is not None
    num_classes = max(labels) + 1 if has_labels and all(lb is not None for lb in labels) else None
    return ImageData(MappedImages(len(images), fetch, build_eval_transform(data_cfg), even_subset(len(images), limit)),
                     name=name, split=split, has_labels=has_labels, num_classes=num_classes,
                     provenance={"format": "parquet", "files": [str(f) for f, _ in tables]})


def _from_hf_dataset(ds: Any, name: str, data_cfg: dict[str, Any], split: str | None, limit: int | None,
                     purpose: str) -> ImageData:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        split = _pick_split(list(ds.keys()), split, purpose, name)
        ds = ds[split]
    split = split or "default"
    if len(ds) == 0:
        raise DataError(f"dataset {name} (split '{split}') is empty")
    feats = ds.features
    image_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in ("image", "img") if c in feats), None)
    if image_col is None:
        raise DataError(f"dataset {name} has no image column (columns: {', '.join(feats)})")
    label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in feats), None)
    num_classes = feats[label_col].num_classes if label_col and isinstance(feats[label_col], datasets.ClassLabel) \
        else None

    def fetch(i: int) -> tuple[Any, int]:
        row = ds[i]
        return row[image_col], (int(row[label_col]) if label_col else -1)

    idx = even_subset(len(ds), limit)
    return ImageData(MappedImages(len(ds), fetch, build_eval_transform(data_cfg), idx), name=name, split=split,
                     has_labels=label_col is not None, num_classes=num_classes)


def _image_folder(path: Path, data_cfg: dict[str, Any], split: str | None, limit: int | None,
                  purpose: str) -> ImageData:
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in subdirs if d in ("train", *EVAL_SPLITS)]
    if split is not None or (split_dirs and len(split_dirs) == len(subdirs)):
        chosen = _pick_split(split_dirs or subdirs, split, purpose, str(path))
        path, split = path / chosen, chosen
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples: list[tuple[Path, int]] = []
    for label, cls in enumerate(subdirs):
        samples += [(f, label) for f in sorted((path / cls).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    has_labels = bool(samples)
    if not samples:  # a flat folder of images: unlabeled
        samples = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise DataError(f"no images found in {path}")

    def fetch(i: int) -> tuple[Any, int]:
        f, label = samples[i]
        try:
            return Image.open(f), label
        except (UnidentifiedImageError, OSError):
            raise DataError(f"cannot decode image {f}") from None

    images = MappedImages(len(samples), fetch, build_eval_transform(data_cfg), even_subset(len(samples), limit))
    return ImageData(images, name=str(path), split=split or "default", has_labels=has_labels,
                     num_classes=len(subdirs) if has_labels else None,
                     groups=["all"], provenance={"classes": subdirs} if has_labels else {})
