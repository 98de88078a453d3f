"""Helpers shared by the methods: pick layers by name/alias/glob/regex, replace a submodule, run calibration."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ui import progress_bar
from .tokens import token_state

LAYER_ALIASES = {"qkv": "blocks.*.attn.qkv", "proj": "blocks.*.attn.proj", "fc1": "blocks.*.mlp.fc1",
                 "fc2": "blocks.*.mlp.fc2", "head": "head", "attn_matmul": "blocks.*.attn",
                 "patch_embed": "patch_embed.proj"}


def _matcher(pattern: str):
    pattern = LAYER_ALIASES.get(pattern, pattern)
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def select_layers(model: nn.Module, layers: list[str], exclude: list[str], *, what: str = "quantized",
                  types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[tuple[str, nn.Module]]:
    """The modules that ``layers`` name (names, aliases, globs, ``re:REGEX``) minus ``exclude``, in model
    order. Every pattern must match something, and what matches must be one of ``types``."""
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, nn.Module] = {}
    for pattern in layers:
        match = _matcher(pattern)
        hits = [(n, m) for n, m in named if match(n)]
        if not hits:
            raise ConfigError(f"layer pattern '{pattern}' matches no module")
        for n, m in hits:
            if not isinstance(m, types):
                kinds = ", ".join(t.__name__ for t in types)
                raise ConfigError(f"layer '{n}' is {type(m).__name__}; only {kinds} layers are {what}")
            chosen[n] = m
    excluders = [_matcher(p) for p in exclude]
    out = [(n, m) for n, m in named if n in chosen and not any(ex(n) for ex in excluders)]
    if not out:
        raise ConfigError("the exclude patterns remove every selected layer")
    return out


def use_torch_references_(model: nn.Module) -> None:
    """Make every kernel choice in ``model`` its torch reference, in place: every layer's ``backend`` and token
    merging's shared attention ``backend`` (export and autograd need them)."""
    for holder in [*model.modules(), token_state(model)]:
        if isinstance(getattr(holder, "backend", None), str) and holder.backend in ("auto", "triton"):
            holder.backend = "torch"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def calib_batches(calib: Iterable[Any], limit: int, device: torch.device) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(images [b,3,H,W] on device, labels [b] or None)`` for up to ``limit`` images.

    Raises a ConfigError when the calibration set yields nothing.
    """
    done = 0
    with progress_bar(None, limit, "calibrate (images)") as tick:
        for batch in calib:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x[: limit - done].to(device)
            y = None if y is None else torch.as_tensor(y)[: len(x)].to(device)
            done += len(x)
            yield x, y
            tick(len(x))
            if done >= limit:
                break
    if done == 0:
        raise ConfigError("the calibration set is empty")


def run_calibration(model: nn.Module, calib: Iterable[Any], calib_size: int,
                    pre_hooks: list[tuple[nn.Module, Callable[..., None]]] = ()) -> int:
    """Forward up to ``calib_size`` calibration images (inference mode) with ``pre_hooks`` (module, forward
    pre-hook) registered for the duration; returns how many images ran."""
    device = next(model.parameters()).device
    done = 0
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
    try:
        with torch.inference_mode():
            for x, _ in calib_batches(calib, calib_size, device):
                model(x)
                done += len(x)
    finally:
        for h in handles:
            h.remove()
    return done


def simulated_quantization(model: nn.Module) -> bool:
    """Whether ``model`` holds simulated (fake-quantized) layers, from any step (quantize, mixed_precision, ...):
    their weights sit on a grid that training or re-sparsifying would silently break, and their activation
    quantizers live in the layers. Read from the layers themselves (``_vc_simulated_grid``), not from step names."""
    return any(getattr(m, "_vc_simulated_grid", False) for m in model.modules())


def token_stream(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The token stream a timm ViT feeds its first block, from timm's own submodules: [B,3,H,W] -> [B,N,C]."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def layer_scale(block: nn.Module, name: str) -> torch.Tensor | None:
    """LayerScale's per-channel gain [C] of a block's ``ls1`` / ``ls2``, detached; None where the block has none."""
    gamma = getattr(getattr(block, name, None), "gamma", None)
    return None if gamma is None else gamma.detach()
