"""Compression methods. Importing this package registers every transform with :mod:`vitcompress.transforms`.

One method per module; each defines a ``XxxConfig`` and one function registered with
``@register_transform(XxxConfig)``.
"""

from .block_sparse import BlockSparseConfig
from .prune import PruneConfig
from .quantize import QuantConfig
from .resolution import ResolutionConfig
from .token_merge import PropAttn, TokenMergeConfig, TokenMethod

__all__ = ["BlockSparseConfig", "PropAttn", "PruneConfig", "QuantConfig", "ResolutionConfig", "TokenMergeConfig",
           "TokenMethod"]
