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
from torch import nn

from .errors import CheckpointError
from .io import atomic_write, atomic_write_json
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


def save_artifact(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory ``out`` (created if needed) and return its path."""
    from safetensors.torch import save_file

    from .models import model_info

    info = model_info(model)
    if metrics is not None:
        info.metrics = dict(metrics)
    if provenance:
        info.provenance.update(provenance)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write artifact: {out} exists and is not a directory")
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


def load_artifact(path: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild the exact model saved at ``path``: architecture, transforms, then weights (strict)."""
    from safetensors.torch import load_file

    from . import methods  # noqa: F401  (registers the transforms an artifact may name)
    from .models import INFO_ATTR, ModelInfo, check_supported, load_state_dict_strict
    from .transforms import restore_

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

    import timm

    arch, kwargs = manifest["model"]["arch"], manifest["model"].get("kwargs") or {}
    if not timm.is_model(arch):
        raise CheckpointError(f"artifact {path} names model '{arch}', which this timm does not know")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    check_supported(model, arch)
    info = ModelInfo(arch=arch, kwargs=dict(kwargs), base=_absolute_base(manifest.get("base"), path),
                     source=str(path.resolve()), provenance=dict(manifest.get("provenance") or {}),
                     metrics=dict(manifest.get("metrics") or {}))
    setattr(model, INFO_ATTR, info)
    restore_(model, list(manifest.get("transforms") or []))
    load_state_dict_strict(model, sd, f"artifact {path}")
    return model.eval()


def _relative_base(base: dict[str, Any] | None, out: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    target = Path(base["path"]).resolve()
    if target == out.resolve():
        return None
    return {**base, "path": os.path.relpath(target, out.resolve())}


def _absolute_base(base: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    return {**base, "path": str((path / base["path"]).resolve())}


def load_base(model: nn.Module) -> nn.Module | None:
    """The uncompressed model ``model`` came from, or None when it is unknown or gone.

    A model with no transforms is its own base.
    """
    from .models import create_model, model_info

    info = model_info(model)
    if not info.transforms:
        return model
    base = info.base
    if not base:
        return None
    if base.get("kind") == "artifact":
        p = Path(base["path"])
        if not is_artifact(p):
            return None
        if base.get("sha256") and read_manifest(p)["files"][WEIGHTS]["sha256"] != base["sha256"]:
            return None
        return load_artifact(p)
    return create_model(base["arch"], pretrained=base.get("pretrained", False), checkpoint=base.get("checkpoint"),
                        **base.get("kwargs", {}))
