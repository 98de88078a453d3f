"""Compression methods. Importing this package registers every transform with :mod:`vitcompress.transforms`.

One method per module; each defines a ``XxxConfig`` and one function registered with
``@register_transform(XxxConfig)``.
"""

from .quantize import QuantConfig
from .resolution import ResolutionConfig
from .token_merge import PropAttn, TokenMergeConfig, TokenMethod

__all__ = ["PropAttn", "QuantConfig", "ResolutionConfig", "TokenMergeConfig", "TokenMethod"]
