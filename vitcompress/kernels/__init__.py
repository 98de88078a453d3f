"""Triton kernels for vitcompress's hot paths: ``vitcompress.kernels``, usable in any model.

A subpackage that imports nothing else from vitcompress (``import vitcompress.kernels`` loads neither timm nor the
pipeline: the package's ``__init__`` is lazy). Triton is imported once, in ``_triton``, and is optional: without it
every op runs its torch reference.
"""

import torch

from . import attention, bsr_gemm, fp8_gemm, int8_gemm  # noqa: F401  (defines the torch.ops.vitcompress ops)
from ._triton import Backend, available, runs_kernel


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (else the torch references are used)."""
    return available() and torch.cuda.is_available()


__all__ = ["Backend", "runs_kernel", "triton_available"]
