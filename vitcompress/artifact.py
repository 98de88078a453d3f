"""vitcompress artifacts: a directory with ``model.safetensors`` and ``vitcompress.json``.

The manifest holds a schema version, the timm id and kwargs, the ordered transforms (each with its config
and recorded state), the uncompressed base, provenance and the last measured metrics, plus the size and
SHA-256 of the weights file, so that a truncated or swapped weights file is caught at load time.
Both files are written atomically, weights first: the manifest is the commit point.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .io import atomic_write, atomic_write_json
from .models import model_info
from .provenance import utc_now, versions

MANIFEST = "vitcompress.json"
WEIGHTS = "model.safetensors"
FORMAT = "vitcompress-artifact"
SCHEMA_VERSION = 1
WEIGHTS_METADATA = {"format": "pt"}


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors stores it: contiguous CPU tensors, shared storage un-shared."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    return tensors


def check_writable(out: str | os.PathLike) -> Path:
    """``out`` as a Path if an artifact may be written there: a new path, an empty folder or an artifact (which
    is replaced). Anything else is a user's file or folder, and is refused rather than overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write artifact: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_artifact(out):
        raise CheckpointError(f"refusing to write into {out}: it exists, is not empty and is not a vitcompress "
                              "artifact (choose a new --out)")
    return out


def save_artifact(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory ``out`` (created if needed) and return its path."""
    info = model_info(model)
    if metrics is not None:
        info.metrics = dict(metrics)
    if provenance:
        info.provenance.update(provenance)
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)

    tensors = weight_tensors(model)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=WEIGHTS_METADATA))

    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": {"arch": info.arch, "kwargs": info.kwargs},
        "transforms": info.transforms,
        "base": _relative_base(info.base, out),
        "provenance": {**info.provenance, "saved": utc_now(), "versions": versions()},
        "metrics": info.metrics,
        "files": {WEIGHTS: {"bytes": (out / WEIGHTS).stat().st_size, "sha256": sha256_file(out / WEIGHTS)}},
    }
    atomic_write_json(out / MANIFEST, manifest)
    info.source = str(out.resolve())
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated manifest of the artifact at ``path``."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"not a vitcompress artifact: {path} (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} is not a vitcompress manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(f"artifact {path} has schema version {version!r}; this vitcompress reads up to "
                              f"{SCHEMA_VERSION}: upgrade vitcompress")
    if not isinstance(manifest.get("model"), dict) or "arch" not in manifest["model"]:
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} names no model")
    return manifest


def read_weights(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the state dict of the artifact at ``path``, checked against the manifest's size and
    SHA-256 when ``verify``. Rebuilding the model from them is :func:`vitcompress.pipeline.load_artifact`."""
    path = Path(path)
    manifest = read_manifest(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"artifact {path} is incomplete: {WEIGHTS} is missing")
    expected = manifest.get("files", {}).get(WEIGHTS, {})
    if verify and expected and (wpath.stat().st_size != expected.get("bytes")
                                or sha256_file(wpath) != expected.get("sha256")):
        raise CheckpointError(f"artifact {path} is corrupt: {WEIGHTS} does not match {MANIFEST} "
                              "(truncated or replaced)")
    try:
        sd = load_file(str(wpath))
    except Exception as exc:
        raise CheckpointError(f"artifact {path} is corrupt: cannot read {WEIGHTS} ({type(exc).__name__})") from None
    return manifest, sd


def _relative_base(base: dict[str, Any] | None, out: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    target = Path(base["path"]).resolve()
    if target == out.resolve():
        return None
    return {**base, "path": os.path.relpath(target, out.resolve())}


def absolute_base(base: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    return {**base, "path": str((path / base["path"]).resolve())}
