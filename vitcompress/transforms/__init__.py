"""Compression transforms: one folder per method family, each a ``XxxConfig`` plus one function registered
with ``@register_transform(XxxConfig)``. Importing this package registers them all.

- ``token_merge/``: ToMe, EViT (``ops``: the pure tensor functions; ``transform``: the glue);
- ``quantize/``: PTQ (``ops``, ``calib``, ``simulate``, the deployable int8 / fp8 / low-bit layers, ``bnb``);
- ``prune/``: structured heads / MLP (``structured``, ``importance``) and block sparsity;
- ``resolution``: run at another input size (the token-reduction baseline);
- ``recovery``: fine-tuning with distillation after compression;
- ``attention`` and ``layers``: the timm glue the families share.
"""

from .prune.block_sparse import BlockSparseConfig
from .prune.structured import PruneConfig
from .quantize.transform import QuantConfig
from .recovery import Distill, RecoveryConfig, finetune_
from .registry import TransformContext, compress_, config_from_dict, register_transform, registered, restore_
from .resolution import ResolutionConfig
from .token_merge.transform import PropAttn, TokenMergeConfig, TokenMethod

__all__ = ["BlockSparseConfig", "Distill", "PropAttn", "PruneConfig", "QuantConfig", "RecoveryConfig",
           "ResolutionConfig", "TokenMergeConfig", "TokenMethod", "TransformContext", "compress_", "config_from_dict",
           "finetune_", "register_transform", "registered", "restore_"]
