"""Triton kernels for vitcompress's hot paths, importable as ``vitcompress.kernels``.

This folder is shipped under ``vitcompress.kernels`` (see pyproject's package-dir): a top-level
``kernels`` would clash with the unrelated PyPI package that bitsandbytes imports. Triton is imported
lazily inside each kernel module, so the package imports on machines without it.
"""

if __name__ == "kernels":  # imported from a checkout's root as a top-level package: that name is not ours
    raise ImportError("this folder is vitcompress.kernels, not the PyPI package 'kernels'")


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (else the torch references are used)."""
    import torch

    from ._triton import available

    return available() and torch.cuda.is_available()
