"""Compression methods. Importing this package registers every transform with :mod:`vitcompress.transforms`.

One method per module; each defines a ``XxxConfig`` and one function registered with
``@register_transform(XxxConfig)``. (Token reduction, quantization and pruning land here.)
"""
