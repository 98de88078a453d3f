"""Triton kernels for vitcompress's hot paths, importable as ``vitcompress.kernels``.

This folder is shipped under ``vitcompress.kernels`` (see pyproject's package-dir): a top-level
``kernels`` would clash with the unrelated PyPI package that bitsandbytes imports. Triton is imported
once, in ``_triton``, and is optional: without it every op runs its torch reference.
"""

if __name__ == "kernels":  # imported from a checkout's root as a top-level package: that name is not ours
    raise ImportError("this folder is vitcompress.kernels, not the PyPI package 'kernels'")


import torch

from . import attention, bsr_gemm, fp8_gemm, int8_gemm  # noqa: F401  (defines the torch.ops.vitcompress ops)
from ._triton import Backend, available, runs_kernel


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (else the torch references are used)."""
    return available() and torch.cuda.is_available()


__all__ = ["Backend", "runs_kernel", "triton_available"]
