"""Importance scores for pruning: magnitude, first-order Taylor, and a diagonal-Fisher "Hessian" (OBD).

Everything reduces to per-parameter *terms* summed over a structure (a head, an MLP channel, a BxB
weight tile):

- magnitude: ``w**2`` (the group's squared L2 norm; needs no data);
- taylor: ``w * g`` summed over the group per calibration batch, then squared (Molchanov et al. 2019);
- hessian: ``(w * g)**2`` per micro-batch, summed: ``w**2 * E[g**2]``, the OBD saliency with the Fisher as
  the Hessian diagonal;
- output: the energy a structure adds to the residual stream, ``E||gamma * W_out[:, s] h_s||^2`` over the
  calibration tokens, divided by the stream's own energy ``E||x||^2`` at that block (:func:`output_scores`).
  LayerScale's ``gamma`` is in it, and the division makes blocks comparable in a global ranking without the
  per-layer normalisation the weight-only criteria need (DINOv2's stream grows ~10x with depth).

Gradients come from the cross-entropy on the calibration labels (the model's own predictions where
there are none). Scores are float32 tensors on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import StrEnum
from ...errors import ConfigError
from ..layers import calib_batches, layer_scale

Term = Callable[[nn.Parameter], torch.Tensor]
HESSIAN_MICRO_BATCH = 4


class Criterion(StrEnum):
    MAGNITUDE = "magnitude"
    TAYLOR = "taylor"
    HESSIAN = "hessian"
    OUTPUT = "output"

    @property
    def layer_normalized(self) -> bool:
        """Whether a global ranking divides each layer's scores by their mean (scores not comparable across layers)."""
        return self != Criterion.OUTPUT


def rows(t: torch.Tensor) -> torch.Tensor:
    """Sum of a [out, ...] term over everything but dim 0 -> [out]."""
    return t.reshape(t.shape[0], -1).sum(1) if t.ndim > 1 else t


def cols(t: torch.Tensor) -> torch.Tensor:
    """Sum of a [out, in] term over dim 0 -> [in]."""
    return t.sum(0)


def tiles(t: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of a [out, in] term over BxB tiles -> [out/B, in/B]."""
    o, i = t.shape
    return t.reshape(o // block, block, i // block, block).sum((1, 3))


def head_scores(attn: nn.Module, term: Term) -> torch.Tensor:
    """Per-head score [H] of a timm Attention: its q/k/v rows (+ gate rows), bias entries and proj columns."""
    h, d = attn.num_heads, attn.head_dim
    score = rows(term(attn.qkv.weight)).reshape(3, h, d).sum((0, 2))
    if attn.qkv.bias is not None:
        score = score + term(attn.qkv.bias).reshape(3, h, d).sum((0, 2))
    if getattr(attn, "gate", None) is not None:
        score = score + rows(term(attn.gate.weight)).reshape(h, d).sum(1)
    return score + cols(term(attn.proj.weight)).reshape(h, d).sum(1)


def mlp_scores(mlp: nn.Module, term: Term) -> torch.Tensor:
    """Per-hidden-channel score [hidden] of a timm Mlp: fc1 rows (+ bias) and fc2 columns."""
    score = rows(term(mlp.fc1.weight)) + cols(term(mlp.fc2.weight))
    if mlp.fc1.bias is not None:
        score = score + term(mlp.fc1.bias)
    return score


def _magnitude(p: nn.Parameter) -> torch.Tensor:
    return p.detach().float() ** 2


def _taylor(p: nn.Parameter) -> torch.Tensor:
    return p.detach().float() * _grad(p)


def _fisher(p: nn.Parameter) -> torch.Tensor:
    return (p.detach().float() * _grad(p)) ** 2


def _grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)


def scores(model: nn.Module, criterion: Criterion, score_fn: Callable[[Term], dict[str, torch.Tensor]],
           calib: Iterable[Any] | None, calib_size: int) -> dict[str, torch.Tensor]:
    """Run ``score_fn(term)`` (which returns named score tensors) under ``criterion``.

    magnitude calls it once; taylor and hessian call it after each calibration backward pass and
    accumulate. Gradients are cleared afterwards and the model's mode and ``requires_grad`` are restored.
    """
    if criterion == Criterion.MAGNITUDE:
        return {k: v.cpu() for k, v in score_fn(_magnitude).items()}
    if calib is None:

        raise ConfigError(f"criterion '{criterion}' needs calibration images (--calib-data)")
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    was_training = model.training
    device = params[0].device
    total: dict[str, torch.Tensor] = {}
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for x, y in calib_batches(calib, calib_size, device):
            chunks = x.split(HESSIAN_MICRO_BATCH) if criterion == Criterion.HESSIAN else (x,)
            labels = (y.split(HESSIAN_MICRO_BATCH) if criterion == Criterion.HESSIAN else (y,)) if y is not None \
                else (None,) * len(chunks)  # unlabelled batches: every micro-batch, not only the first
            for xc, yc in zip(chunks, labels):
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    logits = model(xc).float()
                    target = yc if yc is not None and bool((yc >= 0).all()) else logits.argmax(-1)
                    F.cross_entropy(logits, target).backward()
                with torch.no_grad():
                    got = score_fn(_taylor if criterion == Criterion.TAYLOR else _fisher)
                for k, v in got.items():
                    v = v**2 if criterion == Criterion.TAYLOR else v
                    total[k] = total[k] + v if k in total else v
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        model.train(was_training)
    return {k: v.cpu() for k, v in total.items()}


def _gamma(blk: nn.Module, name: str, width: int) -> torch.Tensor:
    """LayerScale's gain [C] of ``ls1`` / ``ls2`` in float32 (ones where the block has none)."""
    g = layer_scale(blk, name)
    return g.float() if g is not None else torch.ones(width)


def output_scores(blocks: list[nn.Module], run: Callable[[list[tuple[nn.Module, Callable[..., None]]]], int],
                  heads: bool, mlp: bool) -> dict[str, torch.Tensor]:
    """The ``output`` criterion: per head ``h{i}`` [H] and per MLP channel ``m{i}`` [hidden] of block i,
    ``sum over tokens ||gamma * (W_out[:, s] @ a_s)||^2 / sum over tokens ||x_i||^2``.

    a_s: a head's output [tokens, d] (the input of ``attn.proj``, exact per head) or one hidden channel [tokens]
    (the input of ``fc2``; cross-channel terms are left out, as in Wanda's per-weight score). ``run(pre_hooks)``
    forwards the calibration images with the hooks in place (``layers.run_calibration``).
    """
    acc: dict[str, torch.Tensor] = {}

    def add(key: str, v: torch.Tensor) -> None:
        acc[key] = acc[key] + v if key in acc else v

    def on_block(i: int) -> Callable[..., None]:
        return lambda _m, args: add(f"x{i}", args[0].detach().float().pow(2).sum())

    def on_proj(i: int, blk: nn.Module) -> Callable[..., None]:
        attn = blk.attn
        w = attn.proj.weight.detach().float() * _gamma(blk, "ls1", attn.proj.out_features)[:, None]
        w = w.reshape(w.shape[0], attn.num_heads, attn.head_dim)  # [C, H, d]

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            o = args[0].detach().float().reshape(-1, attn.num_heads, attn.head_dim)  # [tokens, H, d]
            add(f"h{i}", torch.einsum("nhd,chd->nhc", o, w).pow(2).sum((0, 2)))
        return hook

    def on_fc2(i: int, blk: nn.Module) -> Callable[..., None]:
        fc2 = blk.mlp.fc2
        col = (fc2.weight.detach().float() * _gamma(blk, "ls2", fc2.out_features)[:, None]).pow(2).sum(0)  # [hidden]
        return lambda _m, args: add(f"m{i}", args[0].detach().float().pow(2).reshape(-1, col.numel()).sum(0) * col)

    hooks: list[tuple[nn.Module, Callable[..., None]]] = []
    for i, blk in enumerate(blocks):
        hooks.append((blk, on_block(i)))
        if heads:
            hooks.append((blk.attn.proj, on_proj(i, blk)))
        if mlp:
            hooks.append((blk.mlp.fc2, on_fc2(i, blk)))
    run(hooks)
    return {k: (v / acc[f"x{k[1:]}"].clamp_min(1e-30)).cpu() for k, v in acc.items() if k[0] != "x"}


def normalized(score: torch.Tensor) -> torch.Tensor:
    """Scores divided by their layer mean, so layers compete on relative importance in a global ranking."""
    return score / score.mean().clamp_min(1e-30)


def global_keep(scores: list[torch.Tensor], frac: float, layer_normalized: bool = True) -> list[torch.Tensor]:
    """Boolean keep-masks (one per score tensor, same shape) that drop exactly ``round(frac * total)`` entries:
    the lowest (layer-normalized) scores, ties broken by position (a threshold would drop every tied entry,
    e.g. all the zero Taylor scores)."""
    flat = torch.cat([(normalized(s) if layer_normalized else s).flatten() for s in scores])
    n_drop = round(frac * len(flat))
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:n_drop]] = False
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]
