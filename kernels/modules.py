"""Drop-in modules around the kernels, usable in any PyTorch model (not only timm ViTs).

- :class:`~vitcompress.methods.int8_linear.Int8Linear` ``.from_linear(linear, backend=...)``: W8A8;
- :class:`~vitcompress.methods.block_sparse_linear.BlockSparseLinear` ``.from_linear(linear, mask=... or
  block_sparsity=..., block_size=B, backend=...)``: BSR weights;
- :class:`FusedAttention` ``.from_timm(attn, backend=...)``: replaces a timm ``Attention`` with the same
  weights (qkv, q/k-norm, scale-norm, gate, proj) and runs :func:`vitcompress.kernels.attention.attention`,
  which also takes a per-key bias, per-sample lengths and a block mask.

``backend`` is ``auto`` (triton on CUDA when installed, torch elsewhere), ``torch`` or ``triton``.
"""

from __future__ import annotations

import torch
from torch import nn

from vitcompress.methods.block_sparse_linear import BlockSparseLinear
from vitcompress.methods.int8_linear import Int8Linear

from ._triton import wants
from .attention import attention

__all__ = ["BlockSparseLinear", "FusedAttention", "Int8Linear", "use_fused_attention_"]


class FusedAttention(nn.Module):
    """Multi-head self-attention x [B, N, C] -> [B, N, C] from a timm ``Attention``'s own submodules.

    ``forward(x, key_bias=None, seq_lens=None)``: key_bias [B, N] (e.g. log token sizes), seq_lens [B];
    ``block_mask`` (bool [.., N/bs, N/bs]) and ``block_size`` are attributes, set once per model.
    """

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got '{backend}'")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.backend = backend
        self.block_mask: torch.Tensor | None = None
        self.block_size = 64

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: str = "auto") -> FusedAttention:
        return cls(attn, backend)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                key_bias: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("FusedAttention takes key_bias / seq_lens / block_mask, not a dense attn_mask")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        backend = "triton" if wants(self.backend, x) else "torch"
        if backend == "torch" and key_bias is None and seq_lens is None and self.block_mask is None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)  # fused, no masks
        else:
            out = attention(q, k, v, key_bias, seq_lens, self.block_mask, block_size=self.block_size,
                            scale=self.scale, backend=backend)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj(out)


def use_fused_attention_(model: nn.Module, backend: str = "auto") -> int:
    """Replace every timm ``Attention`` in ``model`` by a :class:`FusedAttention` (same weights). Returns how many."""
    from timm.layers.attention import Attention

    count = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is Attention:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FusedAttention(mod, backend))
            count += 1
    return count
