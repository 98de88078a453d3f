"""The drop-in layers around the kernels, usable in any PyTorch model (not only timm ViTs).

- :class:`Int8Linear` ``.from_linear(linear, backend=...)``: W8A8;
- :class:`BlockSparseLinear` ``.from_linear(linear, mask=... or block_sparsity=..., block_size=B, backend=...)``:
  BSR weights;
- :class:`FusedAttention` ``.from_timm(attn, backend=...)``: replaces a timm ``Attention`` with the same weights
  (qkv, q/k-norm, scale-norm, gate, proj) and runs :func:`vitcompress.kernels.attention.attention`, which also
  takes a per-key bias, per-sample lengths and a block mask; :func:`use_fused_attention_` swaps them all in.

``backend`` is a :class:`Backend`: ``auto`` (triton on CUDA when installed, torch elsewhere), ``torch`` or
``triton``. Each layer lives with its transform; this module only gathers them.
"""

from .kernels._triton import Backend
from .transforms.attention import FusedAttention, use_fused_attention_
from .transforms.prune.block_sparse_linear import BlockSparseLinear
from .transforms.quantize.int8_linear import Int8Linear

__all__ = ["Backend", "BlockSparseLinear", "FusedAttention", "Int8Linear", "use_fused_attention_"]
