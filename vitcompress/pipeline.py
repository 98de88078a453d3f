"""The one path from a model spec and a stack of configs to a compressed model.

- :func:`create_model`: a timm id (with ``--pretrained`` / ``--checkpoint`` / kwargs) or an artifact directory;
- :func:`load_artifact` / :func:`load_base`: rebuild a saved model (architecture, replayed transforms, weights),
  or the uncompressed model it came from;
- :class:`Calibration` and :func:`calibration_batches`: the only calibration loader (train split, evenly
  spaced, batches of at most 32), which records what it used in the model's provenance;
- :func:`apply_stack`: apply a stack of transform configs in order. The CLI, sweeps, the demo and every
  benchmark call it; ``recovery`` is a registered transform like the others, and its teacher is the model
  as it was before the stack.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .artifact import (
    WEIGHTS,
    absolute_base,
    check_writable,
    is_artifact,
    only_own_files,
    read_manifest,
    read_weights,
    save_artifact,
    writer_lock,
)
from .config import Config
from .data import load_data
from .errors import CheckpointError, ConfigError, ModelError
from .export import is_exported, load_runtime_model
from .models import INFO_ATTR, ModelInfo, build_model, check_supported, data_config, load_state_dict_strict, model_info
from .transforms import RecoveryConfig, compress_, config_from_dict, restore_
from .transforms.recovery import unpruned_teacher
from .ui import progress_bar

CALIB_BATCH = 32
"""Calibration batch size (at most): the same in the CLI, sweeps and benchmarks."""


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                 verify: bool = True, **kwargs: Any) -> nn.Module:
    """A supported ViT from a timm id, the model saved in a vitcompress artifact directory (eval mode, CPU), or an
    exported .onnx / .pt2 file run by its default runtime. ``verify``: check an artifact's or an export's weights
    against their recorded SHA-256 first."""
    exported = is_exported(name)
    if exported or is_artifact(name):
        if pretrained or checkpoint or kwargs:
            raise ModelError(f"{name} is {'an exported model' if exported else 'an artifact'}; --pretrained, "
                             "--checkpoint and overrides apply to timm ids only")
        return load_runtime_model(name, verify=verify) if exported else load_artifact(name, verify=verify)
    return build_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


def load_artifact(path: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild the exact model saved at ``path``: architecture, transforms, then weights (strict)."""
    path = Path(path)
    manifest, sd = read_weights(path, verify=verify)
    arch, kwargs = manifest["model"]["arch"], manifest["model"].get("kwargs") or {}
    if not timm.is_model(arch):
        raise CheckpointError(f"artifact {path} names model '{arch}', which this timm does not know")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    check_supported(model, arch)
    info = ModelInfo(arch=arch, kwargs=dict(kwargs), base=absolute_base(manifest.get("base"), path),
                     source=str(path.resolve()), provenance=dict(manifest.get("provenance") or {}),
                     metrics=dict(manifest.get("metrics") or {}))
    setattr(model, INFO_ATTR, info)
    restore_(model, list(manifest.get("transforms") or []))
    load_state_dict_strict(model, sd, f"artifact {path}")
    return model.eval()


def load_base(model: nn.Module) -> nn.Module | None:
    """The uncompressed model ``model`` came from, or None when it is unknown or gone.

    A model with no transforms is its own base.
    """
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
    return build_model(base["arch"], pretrained=base.get("pretrained", False), checkpoint=base.get("checkpoint"),
                       **base.get("kwargs", {}))


@dataclasses.dataclass
class Calibration:
    """Where calibration images come from: ``size`` images of ``data``'s train split, evenly spaced."""

    data: str = "digits"
    size: int = 32

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"calibration size must be >= 1, got {self.size}")


def calibration_batches(model: nn.Module, calib: Calibration, size: int | None = None,
                        ) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(images [B,3,H,W], labels [B], groups [B])`` for ``model``'s input size; records
    ``provenance.calibration`` (data, split, images) on the model."""
    n = size or calib.size
    data = load_data(calib.data, data_config(model), limit=n, purpose="calib")
    model_info(model).provenance["calibration"] = {**data.describe(), "batch_size": min(n, CALIB_BATCH)}
    return data.loader(min(n, CALIB_BATCH))


Step = Config | dict[str, Any]


def parse_stack(stack: Sequence[Step]) -> list[Config]:
    """Config objects for a stack given as configs or versioned dicts (``{name: token_merge, r: 8}``)."""
    out = []
    for i, step in enumerate(stack):
        if isinstance(step, Config):
            out.append(step)
        elif isinstance(step, dict) and "name" in step:
            out.append(config_from_dict(step))
        else:
            raise ConfigError(f"stack step {i} must be a config or a dict with a 'name', got {step!r}")
    return out


def apply_stack(model: nn.Module, stack: Sequence[Step], *, calib: Calibration | None = None,
                teacher: nn.Module | None = None, train: bool = True) -> nn.Module:
    """Apply each step of ``stack`` to ``model`` in place, in order; returns ``model``.

    calib: where steps that need calibration get it (default: 32 digits images).
    teacher: the model recovery distils from (default: a frozen copy of ``model`` as it was before the stack,
    else its recorded base). train: False skips recovery steps (timing a stack on random weights).
    """
    configs = parse_stack(stack)
    calib = calib or Calibration()
    if teacher is None and train and any(isinstance(c, RecoveryConfig) and c.needs_teacher for c in configs):
        teacher = load_base(model) if model_info(model).transforms else None
        teacher = teacher if teacher is not None else unpruned_teacher(model)
    with progress_bar(None, len(configs), "compress") as tick:
        for c in configs:
            tick(0, description=f"compress: {c.NAME}")
            if isinstance(c, RecoveryConfig) and not train:
                tick()
                continue
            batches = None
            if getattr(c, "needs_calibration", False):
                batches = calibration_batches(model, calib, c.calibration_images)
            compress_(model, c, calib=batches, teacher=teacher)
            tick()
    return model


def compress_to(out: str | os.PathLike, model: nn.Module, stack: Sequence[Step], *,
                calib: Calibration | None = None) -> list[dict[str, Any]]:
    """Apply ``stack`` to ``model`` and save it as an artifact at ``out`` (checked first: a user's folder is never
    overwritten). Returns the records this stack added (``{name, version, config, state}``)."""
    out = check_writable(out)
    if not stack:
        raise ConfigError("nothing to apply: the stack is empty")
    before = len(model_info(model).transforms)
    created = not out.exists()
    try:
        with writer_lock(out):  # one writer from the start: a second command on the same --out is refused
            apply_stack(model, stack, calib=calib)
            save_artifact(model, out)
    except BaseException:
        if created and out.is_dir() and only_own_files(out):  # nothing committed: remove what this run made
            shutil.rmtree(out, ignore_errors=True)
        raise
    return model_info(model).transforms[before:]
