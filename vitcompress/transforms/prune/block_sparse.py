"""Block-structured weight pruning: drop BxB tiles of qkv / proj / fc1 / fc2 under one global budget.

Each tile is scored by magnitude, first-order Taylor or diagonal-Fisher saliency (:mod:`.importance`),
the scores are divided by their layer mean, and the lowest ``sparsity`` fraction of all tiles in the
selected layers is removed (each layer keeps at least one block). The layers become
:class:`~vitcompress.methods.block_sparse_linear.BlockSparseLinear` (BSR storage in the artifact). On the
CPU each layer's implementation (dense-masked or torch BSR) is chosen by timing both at the layer's
shape, and recorded in the transform state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError
from ...kernels._triton import Backend
from ..layers import replace_module, select_layers, simulated_quantization
from ..registry import TransformContext, register_transform
from . import importance as imp
from .block_sparse_linear import BACKENDS, BlockSparseLinear, choose_cpu_impl
from .importance import Criterion


@dataclasses.dataclass
class BlockSparseConfig(Config):
    """sparsity: fraction of BxB blocks removed across ``layers``, in [0, 1).

    speed_tokens: rows of the input used to choose each layer's CPU implementation (197 x 16 = a ViT-B/16
    batch of 16); 0 keeps dense-masked without timing.
    """

    NAME = "block_sparse"

    FAMILY = "block-sparse"
    VERSION = 1
    sparsity: float = 0.0
    block_size: int = 32
    criterion: Criterion = Criterion.MAGNITUDE
    layers: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    exclude: list[str] = dataclasses.field(default_factory=list)
    calib_size: int = 32
    backend: Backend = Backend.AUTO
    speed_tokens: int = 197 * 16

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"--block-sparsity is the fraction of blocks removed and must be in [0, 1), "
                              f"got {self.sparsity}")
        if self.block_size < 1 or self.calib_size < 1 or self.speed_tokens < 0:
            raise ConfigError("block_size and calib_size must be >= 1 and speed_tokens >= 0")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if not self.layers:
            raise ConfigError("no layers to sparsify")
        if self.criterion == Criterion.OUTPUT:
            raise ConfigError("criterion 'output' ranks heads and MLP channels (prune); block sparsity takes "
                              "magnitude, taylor or hessian")

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != Criterion.MAGNITUDE and self.sparsity > 0


def select_blocks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Global selection: bool masks [out/B, in/B] per layer keeping the top ``1 - sparsity`` of all tiles
    by layer-normalized score, at least one per layer."""
    norm = {n: imp.normalized(s) for n, s in scores.items()}
    keeps = dict(zip(scores, imp.global_keep(list(scores.values()), sparsity)))
    masks = {}
    for n, s in norm.items():
        m = keeps[n].clone()
        if not m.any():
            m.view(-1)[s.flatten().argmax()] = True
        masks[n] = m
    return masks


def _rebuild(model: nn.Module, cfg: BlockSparseConfig, state: dict[str, Any]) -> None:
    """Empty BlockSparseLinear layers of the recorded block counts (the weights are loaded afterwards)."""
    for name, rec in (state.get("layers") or {}).items():
        old = model.get_submodule(name)
        replace_module(model, name, BlockSparseLinear(
            old.in_features, old.out_features, cfg.block_size, rec["nnzb"], old.bias is not None,
            cfg.backend, rec.get("cpu_impl", "dense"), device=old.weight.device))


@register_transform(BlockSparseConfig, rebuild=_rebuild)
def block_sparsify_(model: nn.Module, cfg: BlockSparseConfig, ctx: TransformContext) -> dict[str, Any]:
    """Replace the selected Linears by BlockSparseLinear in place. State: blocks kept and CPU impl per layer."""
    if cfg.sparsity == 0:
        return {"layers": {}, "sparsity": 0.0}
    if simulated_quantization(model):
        raise ConfigError("block sparsity after simulated quantization would drop its activation quantizers: "
                          "apply block_sparse before quantize")
    layers = select_layers(model, cfg.layers, cfg.exclude, what="block-sparsified")
    b = cfg.block_size
    for name, m in layers:
        if m.in_features % b or m.out_features % b:
            raise ConfigError(f"--block-size {b} does not divide {name}'s {m.out_features}x{m.in_features} weight")

    def score_fn(term: imp.Term) -> dict[str, torch.Tensor]:
        return {name: imp.tiles(term(m.weight), b) for name, m in layers}

    masks = select_blocks(imp.scores(model, cfg.criterion, score_fn, ctx.calib, cfg.calib_size), cfg.sparsity)
    state: dict[str, Any] = {"layers": {}}
    timed: dict[tuple[int, int], str] = {}
    total = kept = 0
    for name, m in layers:
        new = BlockSparseLinear.from_linear(m, mask=masks[name].to(m.weight.device), block_size=b, backend=cfg.backend)
        shape_key = (m.in_features, m.out_features)
        rec: dict[str, Any] = {"nnzb": int(new.values.shape[0]), "density": round(new.density, 4)}
        if cfg.speed_tokens and not m.weight.is_cuda:
            if shape_key not in timed:  # one timing per (shape, density) is representative enough
                rec["cpu_ms"] = {k: round(v, 4) for k, v in choose_cpu_impl(new, cfg.speed_tokens,
                                                                            torch.bfloat16).items()}
                timed[shape_key] = new.cpu_impl
            new.cpu_impl = timed[shape_key]
        rec["cpu_impl"] = new.cpu_impl
        state["layers"][name] = rec
        total += masks[name].numel()
        kept += int(masks[name].sum())
        replace_module(model, name, new)
    state["sparsity"] = round(1 - kept / total, 4)
    return state
