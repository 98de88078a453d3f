"""Compression transforms: one folder per method family, each a ``XxxConfig`` plus one function registered
with ``@register_transform(XxxConfig)``. Importing this package registers them all.

- ``token_merge/``: ToMe, EViT (``ops``: the pure tensor functions; ``block``: the timm glue; ``transform``:
  config and schedules), adaptive per-image counts (``adaptive``, ATS-style), learned thresholds / rates
  (``learned``: LTMP, DiffRate-style);
- ``quantize/``: PTQ (``ops``, ``calib``, ``simulate``, the deployable int8 / fp8 / low-bit layers, ``bnb``,
  ``reconstruct``: BRECQ, ``mixed``: per-layer widths under a size budget);
- ``prune/``: structured heads / MLP (``structured``, ``importance``) and block sparsity;
- ``sparse_attn/``: training-free block-sparse attention (Sparsifiner-style);
- ``multiplex/``: MiniViT's weight multiplexing (recovered by recovery's ``distill: weight``, ``distill``);
- ``eventful/``: Eventful Transformers, stateful models that re-process only the changed tokens of video frames;
- ``resolution``: run at another input size (the token-reduction baseline);
- ``recovery``: fine-tuning with distillation after compression;
- ``attention`` and ``layers``: the timm glue the families share.
"""

from .eventful.transform import EventfulConfig, Policy
from .multiplex.transform import MiniVitConfig
from .prune.block_sparse import BlockSparseConfig
from .prune.structured import PruneConfig
from .quantize.mixed import MixedPrecisionConfig
from .quantize.transform import QuantConfig
from .recovery import Distill, RecoveryConfig, finetune_
from .registry import TransformContext, compress_, config_from_dict, register_transform, registered, restore_
from .resolution import ResolutionConfig
from .sparse_attn.transform import SparseAttentionConfig
from .token_merge.adaptive import AdaptiveMethod, AdaptiveTokensConfig
from .token_merge.learned import LearnedMergeConfig, LearnedMethod
from .token_merge.transform import PropAttn, TokenMergeConfig, TokenMethod

__all__ = ["AdaptiveMethod", "AdaptiveTokensConfig", "BlockSparseConfig", "Distill", "EventfulConfig",
           "LearnedMergeConfig", "LearnedMethod", "MiniVitConfig", "MixedPrecisionConfig", "Policy", "PropAttn",
           "PruneConfig", "QuantConfig", "RecoveryConfig", "ResolutionConfig", "SparseAttentionConfig",
           "TokenMergeConfig", "TokenMethod", "TransformContext", "compress_", "config_from_dict", "finetune_",
           "register_transform", "registered", "restore_"]
