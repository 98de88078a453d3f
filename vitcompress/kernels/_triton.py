"""Triton access shared by the kernel files, and the one predicate that decides whether a kernel runs.

Triton is optional: where it does not import, ``triton`` and ``tl`` are None and every wrapper runs its torch
reference. ``TRITON_INTERPRET=1`` (read by triton when a kernel is built) runs every kernel on the CPU through
Triton's interpreter, which is how the tests check them without a GPU.

:class:`Backend` is the one kernel-preference enum (``vitcompress`` re-exports it): ``auto`` runs a kernel where it
can (CUDA tensors with triton installed), ``torch`` never, ``triton`` always (an error without triton). ``bnb``
(bitsandbytes) applies to quantized layers only. :func:`runs_kernel` is the one predicate.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .tuned import GemmPath, gemm_path

try:  # optional: the torch references run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels on Linux
    triton = tl = None


class Backend(str, enum.Enum):
    """Where a kernel-backed op runs. A str-Enum: ``Backend.AUTO == "auto"``."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    BNB = "bnb"

    def __str__(self) -> str:
        return self.value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel must widen its bf16 ``tl.dot`` operands to fp32: only in Triton's interpreter, which stores
    bf16 as uint16 and multiplies the bit patterns (triton-lang/triton#11584, "not supported yet"). The widened
    dot is what the GPU computes: a product of two bf16 values is exact in fp32, and both accumulate in fp32."""
    return dtype == torch.bfloat16 and interpreting()


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing, as a constant
def available() -> bool:
    """Whether triton imports (probed once)."""
    return _probe()


def _probe() -> bool:
    return triton is not None


def runs_kernel(backend: str, *tensors: torch.Tensor, shape: tuple[str, int, int, int] | None = None) -> bool:
    """Whether an op (``int8_gemm(..., backend=)`` etc.) or a drop-in layer runs its Triton kernel on ``tensors``
    rather than its torch reference: never for ``torch`` (or ``bnb``, not ours); always for ``triton`` (an error
    without triton; on CPU tensors only under ``TRITON_INTERPRET=1``); for ``auto`` only on CUDA tensors with
    triton installed and, where the op gives its ``shape`` (``(op, M, N, K)``), only where the per-architecture
    table (:mod:`.tuned`) measured our kernel faster than the vendor path. The one such predicate in vitcompress."""
    if backend in (Backend.TORCH, Backend.BNB):
        return False
    if backend == Backend.TRITON:
        if not available():
            raise RuntimeError("backend 'triton' needs triton installed (or use backend='torch')")
        return True
    if backend != Backend.AUTO:
        raise ValueError(f"backend must be one of {', '.join(b.value for b in Backend)}, got '{backend}'")
    if not (available() and all(t.is_cuda for t in tensors)):
        return False
    return shape is None or gemm_path(*shape, tensors[0].device) == GemmPath.TRITON


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
    out = []
    for c in configs[:1] if interpreting() else configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c.get("num_warps", num_warps),
                                 num_stages=c.get("num_stages", num_stages)))
    return out


# ---------------------------------------------------------------------------------------------- launch limits
INDEX_LIMIT = 2**31 - 1
"""Kernels compute element offsets in int32 (program ids and integer arguments that fit are i32, and so are their
products), so one launch must address fewer elements than this in every tensor. Wrappers split bigger inputs
along their rows (GEMMs) or batch (attention) into launches that fit, keeping the fast int32 arithmetic."""
GRID_Y_LIMIT = 65535  # CUDA's limit on the second and third grid dimensions


def span(t: torch.Tensor, skip: int | None = None) -> int:
    """Elements from t's first to its last addressed element, inclusive (optionally ignoring dimension ``skip``)."""
    return 1 + sum((size - 1) * abs(stride) for i, (size, stride) in enumerate(zip(t.shape, t.stride()))
                   if i != skip and size > 0)


def per_launch(*tensors: torch.Tensor, cap: int | None = None) -> int:
    """How many items along dim 0 (shared by all ``tensors``) one launch may take so that each tensor's int32
    element offsets stay below :data:`INDEX_LIMIT` (and at most ``cap``). Raises ValueError when not even one fits."""
    best = cap if cap is not None else INDEX_LIMIT
    for t in tensors:
        rest = span(t, skip=0)
        if rest > INDEX_LIMIT:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} addresses {rest} elements per item along dim 0; "
                             f"the Triton kernels index in int32 (at most {INDEX_LIMIT})")
        if t.stride(0) != 0:
            best = min(best, (INDEX_LIMIT - rest) // abs(t.stride(0)) + 1)
    return max(1, best)


def check_fits(t: torch.Tensor, what: str) -> None:
    """ValueError unless a tensor that is not split (a weight) fits int32 offsets."""
    if span(t) > INDEX_LIMIT:
        raise ValueError(f"{what} of shape {tuple(t.shape)} spans more than {INDEX_LIMIT} elements: too large "
                         "for the Triton kernels' int32 offsets")


def _reach(t: torch.Tensor) -> int:
    """Elements from t's first element to the end of its storage: an O(1) upper bound on :func:`span`."""
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def chunks(*tensors: torch.Tensor | None, cap: int | None = None) -> Iterator[tuple[Any, ...]]:
    """The tensors (None passes through), split along their shared dim 0 into launches whose int32 offsets fit
    (:func:`per_launch`), at most ``cap`` items each. Yields the tensors themselves when one launch does."""
    given = [t for t in tensors if t is not None]
    total = given[0].shape[0]
    if (cap is None or total <= cap) and all(_reach(t) <= INDEX_LIMIT for t in given):  # the usual case, O(1)
        yield tensors
        return
    per = per_launch(*given, cap=cap)
    for start in range(0, total, per):
        rows = slice(start, min(start + per, total))
        yield tuple(None if t is None else t[rows] for t in tensors)
