"""Training-free sparse attention (Sparsifiner-style): each query block reads only the key blocks a cheap
pooled score ranks highest. The config, the timm glue (``SparseAttention``) and the transform.

Sparsifiner learns a low-rank predictor of the attention pattern; this is its training-free first step, with
the mean query and mean key of each block as the predictor (see ``ops.block_mask``). On CUDA the tiles run
through the block-sparse Triton attention kernel, which never loads the skipped tiles; elsewhere SDPA runs
with the pattern as a mask, which is exact but not faster. Token merging stacks: its blocks call the same
attention glue, so the pattern is predicted on the tokens each layer has left, with their ``log size`` bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn

from ...config import Config, upgrade_backend
from ...errors import ConfigError
from ...kernels._triton import Backend, runs_kernel
from ...kernels.attention import attention as fused
from ..attention import attention
from ..registry import TransformContext, register_transform
from ..tokens import analytic_flops, tokens_per_layer
from . import ops


@dataclasses.dataclass
class SparseAttentionConfig(Config):
    """density: fraction of key blocks each query block computes (1 = dense: off); block_size: the tile edge
    in tokens (a power of 2; the Triton kernel needs >= 16); layers: blocks to sparsify (default all);
    backend: ``triton`` the block-sparse kernel, ``torch`` SDPA with the pattern as a mask, ``auto``
    triton on CUDA."""

    NAME = "sparse_attention"

    FAMILY = "attention"
    VERSION = 2  # 2: attention -> backend
    density: float = 0.5
    block_size: int = 16
    layers: list[int] | None = None
    backend: Backend = Backend.AUTO

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        return upgrade_backend(data, version, 2)

    @property
    def exportable(self) -> bool:
        return False  # a block pattern chosen per image at run time

    def validate(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.block_size < 2 or self.block_size & (self.block_size - 1) or self.block_size > 128:
            raise ConfigError(f"block_size must be a power of 2 in [2, 128], got {self.block_size}")
        if self.backend == Backend.BNB:
            raise ConfigError("backend must be one of: auto, torch, triton (bnb is for quantized layers)")
        if self.backend == Backend.TRITON and self.block_size < 16:
            raise ConfigError(f"the Triton kernel needs block_size >= 16, got {self.block_size}")


class SparseAttention(Attention):
    """timm ``Attention`` x [B,N,C] -> [B,N,C] that computes only the predicted (query, key) block tiles."""

    _vc_density: float
    _vc_block: int
    backend: Backend  # the one kernel-preference attribute, as on every layer
    # its block mask is chosen per image by a top-k and a scatter, which the ONNX exporter cannot trace
    _vc_export_refusal = "sparse attention chooses its blocks per image, which has no ONNX form: export without it"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("sparse attention does not take attention masks")
        return attention(self, x)[0]

    def flops_saved(self, model: nn.Module) -> float:
        """FLOPs per image this layer's skipped tiles save (what a dense FLOP count of the masked SDPA overstates),
        at the tokens its block gets (after token merging, when a fixed schedule is installed)."""
        n0 = model.patch_embed.num_patches + model.num_prefix_tokens
        tokens = tokens_per_layer(model) or [n0] * len(model.blocks)
        n = next(t for blk, t in zip(model.blocks, tokens) if blk.attn is self)
        return 4 * n * n * self.num_heads * self.head_dim * (1 - ops.density(n, self._vc_block, self._vc_density))

    def _vc_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   ) -> torch.Tensor:
        """q, k, v [B,H,N,Dh], bias [B,1,1,N] or None -> softmax(q k^T * scale + bias) v over the kept tiles."""
        bs, n = self._vc_block, q.shape[2]
        mask = ops.block_mask(q, k, bias, bs, self._vc_density, self.scale)
        if not self.training and bs >= 16 and runs_kernel(self.backend, q):
            return fused(q, k, v, key_bias=None if bias is None else bias[:, 0, 0, :], block_mask=mask,
                         block_size=bs, scale=self.scale, backend=Backend.TRITON)
        allowed = ops.token_mask(mask, n, bs)
        float_mask = torch.where(allowed, q.new_zeros(()) if bias is None else bias, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=self.scale,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)


def sparse_layers(model: nn.Module, cfg: SparseAttentionConfig) -> list[int]:
    depth = len(model.blocks)
    layers = list(range(depth)) if cfg.layers is None else list(cfg.layers)
    if any(not 0 <= i < depth for i in layers):
        raise ConfigError(f"layers must be in [0, {depth - 1}], got {layers}")
    return layers


def flops_fraction(model: nn.Module, density: float, layers: list[int]) -> float:
    """GFLOPs over the dense model's when the attention matmuls of ``layers`` compute ``density`` of their
    tiles (the unreduced token count; the block scoring itself is O(N nb) and left out)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    dense = analytic_flops(model, [(n, n)] * len(model.blocks))
    attn_dim = [int(getattr(b.attn.qkv, "out_features", 3 * model.embed_dim)) // 3 for b in model.blocks]
    saved = sum(4 * n * n * attn_dim[i] * (1 - density) for i in layers)
    return (dense - saved) / dense


@register_transform(SparseAttentionConfig)
def sparse_attention_(model: nn.Module, cfg: SparseAttentionConfig, ctx: TransformContext) -> dict[str, Any]:
    """Switch the attention of ``cfg.layers`` to :class:`SparseAttention` in place (nothing at density 1)."""
    layers = sparse_layers(model, cfg)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    if cfg.density < 1:
        for i in layers:
            attn = model.blocks[i].attn
            if type(attn) is not Attention:
                raise ConfigError(f"blocks.{i}.attn is {type(attn).__name__}: sparse attention needs timm's "
                                  "Attention (apply it before quantization)")
            attn.__class__ = SparseAttention
            attn._vc_density, attn._vc_block, attn.backend = cfg.density, cfg.block_size, cfg.backend
    tile_density = ops.density(n, cfg.block_size, cfg.density) if cfg.density < 1 else 1.0
    return {"layers": layers, "tiles": ops.keep_blocks(n, cfg.block_size, cfg.density),
            "tile_density": round(tile_density, 4),
            "flops_fraction": round(flops_fraction(model, tile_density, layers), 4)}


__all__ = ["SparseAttention", "SparseAttentionConfig", "sparse_attention_"]
