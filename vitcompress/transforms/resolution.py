"""Resolution as a baseline knob: run the model at another input size, position embeddings resampled.

Fewer pixels means fewer tokens, which is the simplest token reduction of all (the original ViT paper
fine-tunes at another resolution the same way). Token merging has to beat it in the same tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import Config
from ..errors import ConfigError
from .registry import TransformContext, register_transform
from .tokens import token_state


@dataclasses.dataclass
class ResolutionConfig(Config):
    """img_size: the new square input size in pixels (a multiple of the patch size)."""

    NAME = "resolution"

    FAMILY = "token"
    VERSION = 1
    img_size: int = 224

    def validate(self) -> None:
        if int(self.img_size) != self.img_size or self.img_size < 1:
            raise ConfigError(f"img_size must be a positive integer, got {self.img_size}")


@register_transform(ResolutionConfig)
def resolution_(model: nn.Module, cfg: ResolutionConfig, ctx: TransformContext) -> dict[str, Any]:
    """Resample the position embeddings to ``img_size`` in place (timm's ``set_input_size``)."""
    patch = model.patch_embed.patch_size[0]
    if cfg.img_size % patch or cfg.img_size < patch:
        raise ConfigError(f"img_size {cfg.img_size} must be a positive multiple of the patch size {patch}")
    if token_state(model) is not None:
        raise ConfigError("change the resolution before token merging, not after")
    before = tuple(model.patch_embed.img_size)
    if before != (cfg.img_size, cfg.img_size):
        model.set_input_size(img_size=(cfg.img_size, cfg.img_size))
    return {"from": list(before), "tokens": int(model.patch_embed.num_patches + model.num_prefix_tokens)}
