"""timm ``Attention`` computed from its own submodules, shared by token merging and attention quantization.

Nothing of timm's forward is copied: qkv, q_norm / k_norm, norm (scale-norm), gate, proj and proj_drop are
called as they are. The core product softmax(q k^T * scale + bias) v runs through fused SDPA unless the
module defines ``_vc_attend(q, k, v, bias) -> out`` (the quantized attention does), so transforms stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._triton import wants


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B,N,C] -> q, k, v [B,H,N,Dh], with timm's q_norm / k_norm applied."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, cls_row: bool = False,
              kernel: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Self-attention x [B,N,C] with an optional per-key bias [B,1,1,N].

    kernel: where a bias is given, ``torch`` runs SDPA with it as a float mask; ``triton`` runs
    :func:`vitcompress.kernels.attention.attention` with it as a per-key bias (inference); ``auto`` picks triton
    on CUDA tensors when it is installed. Returns (output [B,N,C], keys averaged over heads [B,N,Dh], CLS
    attention over heads [B,N] or None).
    """
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = qkv_heads(attn, x)
    mask = None if bias is None else bias.to(q.dtype)
    attend = getattr(attn, "_vc_attend", None)
    if attend is not None:
        out = attend(q, k, v, mask)
    elif mask is not None and not attn.training and wants(kernel, q):
        from ..kernels.attention import attention as fused

        out = fused(q, k, v, key_bias=bias[:, 0, 0, :], scale=attn.scale, backend="triton")
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls = None
    if cls_row:  # EViT needs only the CLS row of the attention matrix: [B,H,1,N]
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        cls = logits.float().softmax(-1).mean(1)[:, 0]
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1), cls
