"""MiniViT's weight multiplexing: groups of ``share`` consecutive blocks use one set of attention and MLP weights.

As in the reference (Mini-DeiT / Mini-Swin): the shared weights are qkv, proj, fc1 and fc2, taken from the first
block of each group; every layer keeps its own LayerNorms (and LayerScale), and gets its own small weight
transformations, which keep the layers of a group diverse:

- attention: two head-mixing linear maps [H,H] (+ bias), on the attention logits before the softmax and on the
  probabilities after it (Mini-Swin's ``proj_l`` / ``proj_w``), initialised to the identity;
- MLP: a 3x3 depth-wise convolution over the patch grid before the MLP (Mini-Swin's ``local_conv``, there 7x7
  after a LayerNorm), here a zero-initialised residual, so that a fresh model computes its shared blocks exactly.

Sharing is module identity (``blocks[j].attn.qkv is blocks[i].attn.qkv``): the artifact stores each shared weight
once, and loading re-ties it (the transform is deterministic in its config). ``share: 1`` changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ...config import Config
from ...errors import ConfigError
from ..attention import qkv_heads
from ..registry import TransformContext, register_transform

SHARED = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))


@dataclasses.dataclass
class MiniVitConfig(Config):
    """share: consecutive blocks per weight group (must divide the depth; 1 = off); transforms: the per-layer
    attention and MLP weight transformations (False: plain sharing)."""

    NAME = "minivit"

    FAMILY = "prune"
    VERSION = 1
    share: int = 2
    transforms: bool = True

    def validate(self) -> None:
        if self.share < 1:
            raise ConfigError(f"share must be >= 1, got {self.share}")

    def report_fields(self) -> dict[str, Any]:
        return {"share": self.share}


def _mix(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """Mix the heads of x [B,H,N,N] with lin (an [H,H] linear map)."""
    return lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MultiplexedBlock(Block):
    """A timm ``Block`` whose attention and MLP weights may be shared with its group, plus its own transformations
    (``_vc_logit_mix``, ``_vc_prob_mix``: [H,H] head mixing; ``_vc_local``: depth-wise conv over the patch grid)."""

    _vc_grid: tuple[int, int]
    _vc_prefix: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a MiniViT block does not take attention masks")
        x = x + self.drop_path1(self.ls1(self._attend(self.norm1(x))))
        if hasattr(self, "_vc_local"):
            p, (h, w) = self._vc_prefix, self._vc_grid
            patches = x[:, p:]
            grid = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            x = torch.cat([x[:, :p], patches + self._vc_local(grid).flatten(2).transpose(1, 2)], 1)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,C] -> the attention's output [B,N,C], with the head transformations around the softmax."""
        attn = self.attn
        q, k, v = qkv_heads(attn, x)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if hasattr(self, "_vc_logit_mix"):
            logits = _mix(logits, self._vc_logit_mix)
        probs = logits.softmax(-1)
        if hasattr(self, "_vc_prob_mix"):
            probs = _mix(probs, self._vc_prob_mix)
        o = attn.attn_drop(probs) @ v
        o = attn.norm(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return attn.proj_drop(attn.proj(o))


def _identity(h: int) -> nn.Linear:
    lin = nn.Linear(h, h)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(h))
        lin.bias.zero_()
    return lin


def multiplex_(model: nn.Module, cfg: MiniVitConfig) -> nn.Module:
    """Share the weights of each group of ``cfg.share`` blocks of ``model`` in place (nothing at share 1)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b, Block) for b in blocks):
        raise ConfigError("MiniViT shares timm ViT blocks: this model has none")
    depth = len(blocks)
    if depth % cfg.share:
        raise ConfigError(f"share {cfg.share} does not divide the depth {depth}: choose a divisor of {depth}")
    if cfg.share == 1:
        return model
    if any(type(b) is not Block for b in blocks):
        raise ConfigError("MiniViT goes first in a stack: its blocks must be plain timm blocks")
    grid = tuple(model.patch_embed.grid_size)
    for i, blk in enumerate(blocks):
        li = i - i % cfg.share
        lead = blocks[li]
        for parent, name in SHARED:
            owner, src = getattr(blk, parent), getattr(getattr(lead, parent), name)
            if getattr(owner, name).weight.shape != src.weight.shape:
                raise ConfigError(f"MiniViT shares blocks of one shape: block {i} differs from block {li}")
            setattr(owner, name, src)
        blk.__class__ = MultiplexedBlock
        blk._vc_grid, blk._vc_prefix = grid, model.num_prefix_tokens
        if cfg.transforms:
            dev = blk.norm1.weight.device
            h, c = blk.attn.num_heads, blk.norm1.weight.shape[0]
            blk._vc_logit_mix, blk._vc_prob_mix = _identity(h).to(dev), _identity(h).to(dev)
            blk._vc_local = nn.Conv2d(c, c, 3, padding=1, groups=c).to(dev)
            nn.init.zeros_(blk._vc_local.weight)
            nn.init.zeros_(blk._vc_local.bias)
    return model


@register_transform(MiniVitConfig)
def _minivit(model: nn.Module, cfg: MiniVitConfig, ctx: TransformContext) -> None:
    """Deterministic in its config: restoring an artifact shares again, then loads the weights."""
    multiplex_(model, cfg)
