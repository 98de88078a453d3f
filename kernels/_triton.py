"""Lazy Triton access shared by the kernel files: nothing imports triton until a kernel is first built.

``TRITON_INTERPRET=1`` (read by triton when a kernel is built) runs every kernel on the CPU through
Triton's interpreter, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing, as a constant
def available() -> bool:
    """Whether triton imports (probed once)."""
    return _probe()


@functools.cache
def _probe() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors: CUDA tensors, or any tensor when interpreting."""
    return available() and (interpreting() or all(t.is_cuda for t in tensors))


def runs_kernel(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether a kernel wrapper (``int8_gemm(..., backend=)`` etc.) runs Triton rather than its torch reference:
    always unless ``torch``; for ``auto`` only where :func:`usable` (CUDA tensors, or the interpreter)."""
    return backend != "torch" and (backend != "auto" or usable(*tensors))


def wants(backend: str, x: torch.Tensor) -> bool:
    """Whether a drop-in module with ``backend`` runs its Triton kernel on ``x``: always for ``triton`` (an
    error without triton), on CUDA tensors with triton installed for ``auto``, never for ``torch``."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not available():
            raise RuntimeError("backend 'triton' needs triton installed (or use backend='torch')")
        return True
    return x.is_cuda and usable(x)


def builder(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Cache a function that imports triton and returns jitted kernels (per interpreter mode)."""
    cache: dict[bool, Any] = {}

    @functools.wraps(fn)
    def get() -> Any:
        key = interpreting()
        if key not in cache:
            if not available():
                raise RuntimeError("triton is not installed: use backend='torch'")
            cache[key] = fn()
        return cache[key]

    return get


def autotune_configs(configs: list[dict[str, int]], num_warps: int = 4, num_stages: int = 3) -> list[Any]:
    """``triton.Config`` list; the interpreter gets only the first (autotuning there is pointless)."""
    import triton

    out = []
    for c in configs[:1] if interpreting() else configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c.get("num_warps", num_warps),
                                 num_stages=c.get("num_stages", num_stages)))
    return out
