"""Structured pruning of timm ViTs: whole attention heads and MLP hidden channels.

The result is an ordinary, smaller dense model. Channels are removed with torch-pruning's pruning
functions (``prune_linear_out_channels`` etc., which keep weights, biases and ``in/out_features``
consistent); the timm glue is ours: for a head it removes that head's q, k and v rows of ``qkv`` (and of
``gate``), its columns of ``proj`` and its slice of a scale-norm, then rewrites ``num_heads`` and
``attn_dim``. ``head_dim`` and therefore the attention ``scale`` never change. For the MLP it removes
``fc1`` rows, a hidden norm's channels and ``fc2`` columns, the same group torch-pruning's dependency graph
finds (a test checks this).

Importance (:mod:`.importance`) is ranked per layer, or globally after dividing each layer's scores by
their mean. MLP widths are rounded to multiples of ``round_to`` (8); every layer keeps >= 1 head and
>= ``round_to`` MLP channels.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ...config import Config, StrEnum
from ...errors import ConfigError
from ..layers import run_calibration
from ..registry import TransformContext, register_transform
from . import importance as imp
from .importance import Criterion
from .refit import check_head_refittable, check_refittable, refit_


class Scope(StrEnum):
    GLOBAL = "global"
    PER_LAYER = "per_layer"


@dataclasses.dataclass
class PruneConfig(Config):
    """heads / mlp: the fraction of attention heads / MLP hidden channels removed, in [0, 1).

    criterion: how structures are ranked (:mod:`.importance`); refit: afterwards, refit each block's ``attn.proj``
    and ``fc2`` by least squares on ``refit_size`` calibration images so the stream follows the dense model's
    (:mod:`.refit`; no training); refit_head: then the classifier, so the logits follow the dense model's."""

    NAME = "prune"

    FAMILY = "prune"
    VERSION = 3  # 2: criterion output, refit, refit_size (v1 dicts read as they were); 3: refit_head
    heads: float = 0.0
    mlp: float = 0.0
    criterion: Criterion = Criterion.MAGNITUDE
    scope: Scope = Scope.GLOBAL
    round_to: int = 8
    calib_size: int = 32
    refit: bool = False
    refit_size: int = 128
    refit_head: bool = False

    @property
    def calibration_images(self) -> int:
        """The ranking reads ``calib_size`` images and the refit ``refit_size``: the stack draws the larger."""
        return max(self.calib_size, self.refit_size) if self.refit else self.calib_size

    def validate(self) -> None:
        for name in ("heads", "mlp"):
            f = getattr(self, name)
            if not 0 <= f < 1:
                raise ConfigError(f"--{name} is the fraction removed and must be in [0, 1), got {f}")
        if self.round_to < 1 or self.calib_size < 1 or self.refit_size < 1:
            raise ConfigError(f"round_to, calib_size and refit_size must be >= 1 (got {self.round_to}, "
                              f"{self.calib_size}, {self.refit_size})")
        if self.refit_head and not self.refit:
            raise ConfigError("refit_head refits the classifier after the blocks' refit: it needs refit")

    @property
    def needs_calibration(self) -> bool:
        return (self.criterion != Criterion.MAGNITUDE or self.refit) and (self.heads > 0 or self.mlp > 0)


# ---------------------------------------------------------------------------------------------- surgery
def _tp() -> Any:
    """torch-pruning, imported when a layer is pruned (a dependency, but the kernels and drop-ins run without it)."""
    import torch_pruning

    return torch_pruning


def prune_heads_(attn: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` (sorted indices) of a timm ``Attention``, in place."""
    h, d = attn.num_heads, attn.head_dim
    drop = sorted(set(range(h)) - set(keep))
    if not drop:
        return
    channels = [c for head in drop for c in range(head * d, (head + 1) * d)]
    a, tp = attn.attn_dim, _tp()
    tp.prune_linear_out_channels(attn.qkv, [part * a + c for part in range(3) for c in channels])
    if getattr(attn, "gate", None) is not None:
        tp.prune_linear_out_channels(attn.gate, channels)
    _prune_norm(attn.norm, channels, f"cannot prune heads through a {type(attn.norm).__name__} scale-norm")
    tp.prune_linear_in_channels(attn.proj, channels)
    attn.num_heads = len(keep)
    attn.attn_dim = len(keep) * d


def _prune_norm(norm: nn.Module, channels: list[int], refusal: str) -> None:
    """Drop ``channels`` from a LayerNorm between pruned layers; Identity needs nothing; anything else is refused."""
    if isinstance(norm, nn.LayerNorm):
        _tp().prune_layernorm_out_channels(norm, channels)
    elif not isinstance(norm, nn.Identity):
        raise ConfigError(refusal)


def prune_mlp_(mlp: nn.Module, keep: list[int]) -> None:
    """Keep only hidden channels ``keep`` (sorted indices) of a timm ``Mlp``, in place."""
    drop = sorted(set(range(mlp.fc1.out_features)) - set(keep))
    if not drop:
        return
    tp = _tp()
    tp.prune_linear_out_channels(mlp.fc1, drop)
    _prune_norm(mlp.norm, drop, f"cannot prune MLP channels through a {type(mlp.norm).__name__}")
    tp.prune_linear_in_channels(mlp.fc2, drop)


# ---------------------------------------------------------------------------------------------- selection
def _round(n: float, to: int, hi: int) -> int:
    return int(min(hi, max(to, round(n / to) * to)))


def keep_heads(scores: list[torch.Tensor], frac: float, scope: Scope, layer_normalized: bool = True
               ) -> list[list[int]]:
    """Head indices each layer keeps. scores: per layer [H_l]. A global ranking keeps >= 1 head a layer."""
    if frac == 0:
        return [list(range(len(s))) for s in scores]
    if scope == Scope.PER_LAYER:
        counts = [len(s) - round(frac * len(s)) for s in scores]
    else:
        counts = [max(1, int(m.sum())) for m in imp.global_keep(scores, frac, layer_normalized)]
    out = []
    for i, (s, n) in enumerate(zip(scores, counts)):
        if n < 1:
            raise ConfigError(f"--heads {frac} removes all {len(s)} heads of block {i}")
        out.append(sorted(s.topk(n).indices.tolist()))
    return out


def keep_channels(scores: list[torch.Tensor], frac: float, scope: Scope, round_to: int,
                  layer_normalized: bool = True) -> list[list[int]]:
    """MLP hidden channels each layer keeps (counts rounded to ``round_to``). scores: per layer [hidden_l]."""
    if frac == 0:
        return [list(range(len(s))) for s in scores]
    if scope == Scope.PER_LAYER:
        counts = [(1 - frac) * len(s) for s in scores]
    else:
        counts = [float(m.sum()) for m in imp.global_keep(scores, frac, layer_normalized)]
    out = []
    for s, n in zip(scores, counts):
        k = _round(n, round_to, len(s)) if len(s) >= round_to else len(s)
        out.append(sorted(s.topk(k).indices.tolist()))
    return out


def _check_prunable(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if name.startswith("blocks.") and (getattr(mod, "_vc_compressed", False)
                                           or type(mod).__module__.startswith("bitsandbytes")):
            raise ConfigError(f"'{name}' is already {type(mod).__name__}: prune before quantizing or "
                              "block-sparsifying")


def _rebuild(model: nn.Module, cfg: PruneConfig, state: dict[str, Any]) -> None:
    """The recorded widths (the kept heads and channels come first; the weights are loaded afterwards)."""
    for blk, h, m in zip(model.blocks, state.get("heads") or [], state.get("mlp") or []):
        prune_heads_(blk.attn, list(range(h)))
        prune_mlp_(blk.mlp, list(range(m)))


@register_transform(PruneConfig, rebuild=_rebuild)
def prune_(model: nn.Module, cfg: PruneConfig, ctx: TransformContext) -> dict[str, Any]:
    """Remove heads and MLP channels in place. State: heads and MLP width kept in each block."""
    blocks = list(model.blocks)
    if cfg.heads == 0 and cfg.mlp == 0:
        return {"heads": [b.attn.num_heads for b in blocks], "mlp": [b.mlp.fc1.out_features for b in blocks]}
    _check_prunable(model)
    if cfg.heads > 0 and any(b.attn.num_heads < 2 for b in blocks):
        raise ConfigError("--heads: a block has a single head, which cannot be removed")
    # refused before anything changes: the model is pruned in place
    if (cfg.criterion == Criterion.OUTPUT or cfg.refit) and ctx.calib is None:
        what = "criterion 'output'" if cfg.criterion == Criterion.OUTPUT else "refit"
        raise ConfigError(f"{what} needs calibration images (--calib-data)")
    if cfg.refit:
        check_refittable(model)
        if cfg.refit_head:
            check_head_refittable(model)

    def score_fn(term: imp.Term) -> dict[str, torch.Tensor]:
        out = {}
        for i, b in enumerate(blocks):
            if cfg.heads > 0:
                out[f"h{i}"] = imp.head_scores(b.attn, term)
            if cfg.mlp > 0:
                out[f"m{i}"] = imp.mlp_scores(b.mlp, term)
        return out

    if cfg.criterion == Criterion.OUTPUT:
        sc = imp.output_scores(blocks, lambda hooks: run_calibration(model, ctx.calib, cfg.calib_size, hooks),
                               cfg.heads > 0, cfg.mlp > 0)
    else:
        sc = imp.scores(model, cfg.criterion, score_fn, ctx.calib, cfg.calib_size)
    n, norm = len(blocks), cfg.criterion.layer_normalized
    heads = keep_heads([sc[f"h{i}"] for i in range(n)], cfg.heads, cfg.scope, norm) if cfg.heads > 0 else None
    mlp = (keep_channels([sc[f"m{i}"] for i in range(n)], cfg.mlp, cfg.scope, cfg.round_to, norm)
           if cfg.mlp > 0 else None)
    dense = copy.deepcopy(model) if cfg.refit else None
    before = sum(p.numel() for p in model.parameters())
    for i, b in enumerate(blocks):
        if heads is not None:
            prune_heads_(b.attn, heads[i])
        if mlp is not None:
            prune_mlp_(b.mlp, mlp[i])
    after = sum(p.numel() for p in model.parameters())
    state = {"heads": [b.attn.num_heads for b in blocks], "mlp": [b.mlp.fc1.out_features for b in blocks],
             "params_before": before, "params_after": after, "params_fraction": round(after / before, 4)}
    if dense is not None:
        state.update(refit_(dense, model, ctx.calib, cfg.refit_size, head=cfg.refit_head))
    return state
