"""timm ``Attention`` computed from its own submodules, shared by token merging and attention quantization, and
:class:`FusedAttention`, the drop-in that runs :func:`vitcompress.kernels.attention.attention` in any model.

Nothing of timm's forward is copied: qkv, q_norm / k_norm, norm (scale-norm), gate, proj and proj_drop are
called as they are. The core product softmax(q k^T * scale + bias) v runs through fused SDPA unless the
module defines ``_vc_attend(q, k, v, bias) -> out`` (the quantized attention does), so transforms stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn

from ..kernels._triton import Backend, runs_kernel
from ..kernels.attention import attention as fused


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B,N,C] -> q, k, v [B,H,N,Dh], with timm's q_norm / k_norm applied."""
    return split_heads(attn, attn.qkv(x))


def split_heads(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv layer's output [B,N,3*D] -> q, k, v [B,H,N,Dh], with timm's q_norm / k_norm applied."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, cls_row: bool = False,
              backend: str = "torch", seq_lens: torch.Tensor | None = None, significance: bool = False,
              importance: bool = False, key_weight: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Self-attention x [B,N,C] with an optional per-key bias [B,1,1,N].

    backend: where a bias is given, ``torch`` runs SDPA with it as a float mask; ``triton`` runs
    :func:`vitcompress.kernels.attention.attention` with it as a per-key bias (inference); ``auto`` picks triton
    on CUDA tensors when it is installed and, for a bias alone, where the per-architecture table
    (:mod:`vitcompress.kernels.tuned`) measured it faster than SDPA at this shape. seq_lens [B]: tokens at
    positions >= len are padding; the kernel skips them (varlen), SDPA relies on ``bias`` being -inf there.
    Returns (output [B,N,C], keys averaged over heads [B,N,Dh], CLS attention over heads [B,N] or None).
    significance: the CLS row times each value's norm (ATS's score, unnormalised) instead of the bare CLS row.
    importance: the attention each token receives, averaged over heads and the valid queries (LTMP's score),
    instead of the CLS row. key_weight [B,N]: a multiplicative key mask inside the softmax,
    exp(l_j) w_j / sum_k exp(l_k) w_k, so that a {0, 1} mask with straight-through gradients trains (the learned
    methods' relaxation; a log-mask would give -inf). Both compute the probabilities explicitly.
    """
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = qkv_heads(attn, x)
    mask = None if bias is None else bias.to(q.dtype)
    attend = getattr(attn, "_vc_attend", None)
    probs = _probabilities(q, k, attn.scale, mask, key_weight) if importance or key_weight is not None else None
    if probs is not None and (attend is None or key_weight is not None):  # a quantized attention keeps its own
        out = probs.to(v.dtype) @ v
    elif attend is not None:
        out = attend(q, k, v, mask)
    elif (mask is not None or seq_lens is not None) and not attn.training and runs_kernel(
            backend, q, shape=None if seq_lens is not None else ("attention", b * attn.num_heads, n, attn.head_dim)):
        out = fused(q, k, v, key_bias=None if bias is None else bias[:, 0, 0, :], seq_lens=seq_lens,
                    scale=attn.scale, backend="triton")
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls = None
    if importance:
        assert probs is not None
        received = probs.mean(1)  # [B,N(query),N(key)]
        if seq_lens is not None:  # padding queries are not tokens
            valid = (torch.arange(n, device=x.device)[None] < seq_lens[:, None]).to(received.dtype)
            cls = (received * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        else:
            cls = received.mean(1)
    elif cls_row or significance:  # EViT / ATS need only the CLS row of the attention matrix: [B,H,1,N]
        if probs is not None:
            cls = probs[:, :, 0].mean(1)
        else:
            logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            cls = logits.float().softmax(-1).mean(1)[:, 0]
        if significance:  # ATS: ||v_j|| over all heads weighs how much token j can move the CLS token
            cls = cls * v.transpose(1, 2).reshape(b, n, -1).float().norm(dim=-1)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1), cls


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                   key_weight: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) [B,H,N,N] in fp32, its keys weighted by key_weight [B,N] and renormalised."""
    p = ((q * scale) @ k.transpose(-2, -1)).float()
    if bias is not None:
        p = p + bias.float()
    p = p.softmax(-1)
    if key_weight is not None:
        p = p * key_weight[:, None, None, :].float()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return p


class FusedAttention(nn.Module):
    """Multi-head self-attention x [B, N, C] -> [B, N, C] from a timm ``Attention``'s own submodules.

    ``forward(x, key_bias=None, seq_lens=None)``: key_bias [B, N] (e.g. log token sizes), seq_lens [B];
    ``block_mask`` (bool [.., N/bs, N/bs]) and ``block_size`` are attributes, set once per model.
    backend: ``auto`` (the Triton kernel on CUDA where triton is installed), ``torch`` or ``triton``.
    """

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        if backend not in (Backend.AUTO, Backend.TORCH, Backend.TRITON):
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
        q, k, v = qkv_heads(self, x)
        backend = Backend.TRITON if runs_kernel(self.backend, x) else Backend.TORCH
        if backend == Backend.TORCH and key_bias is None and seq_lens is None and self.block_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # fused, no masks
        else:
            out = fused(q, k, v, key_bias, seq_lens, self.block_mask, block_size=self.block_size,
                        scale=self.scale, backend=backend)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj(out)


def use_fused_attention_(model: nn.Module, backend: str = "auto") -> int:
    """Replace every timm ``Attention`` in ``model`` by a :class:`FusedAttention` (same weights). Returns how many."""
    count = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is Attention:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FusedAttention(mod, backend))
            count += 1
    return count
