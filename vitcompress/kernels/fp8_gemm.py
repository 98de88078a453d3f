"""FP8 (e4m3) GEMM with the int8 GEMM's fused epilogue, and per-token e4m3 quantization.

    out[M, N] = gelu?((a_q[M, K] @ w_q[K, N]) * a_scale[M, None] * w_scale[None, N] + bias[N])

a_q, w_q: float8_e4m3fn, fp32 accumulation (Hopper / Ada tensor cores; Triton's interpreter on the CPU).
The epilogue (per-token x per-channel dequant, bias, exact-erf GELU) runs in fp32 and stores bf16/fp16. The
tile kernel is :mod:`.int8_gemm`'s, compiled with an fp32 accumulator, autotuned separately. The baseline
to beat is ``torch._scaled_mm`` (cuBLASLt), which the reference calls where it can run.

Layout: torch references first (same argument names), then configs, then the kernel build, then the
wrappers, registered as ``torch.ops.vitcompress.fp8_gemm`` with a fake implementation (torch.compile).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._triton import builder, runs_kernel, tl
from .int8_gemm import build_gemm, launch_gemm

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-8


# ---------------------------------------------------------------------------------------------- references
def fp8_gemm_ref(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, gelu: bool = False,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_q e4m3 [M,K], w_q e4m3 [K,N], a_scale fp32 [M], w_scale fp32 [N], bias [N] -> [M,N] ``out_dtype``.

    Exact products of the e4m3 values accumulated in fp32 (``torch._scaled_mm`` accumulates the same way).
    """
    out = (a_q.float() @ w_q.float()) * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    if gelu:
        out = F.gelu(out)
    return out.to(out_dtype)


def scaled_mm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The same product through ``torch._scaled_mm`` (row-wise scales; w_q must be column-major [K,N])."""
    return torch._scaled_mm(a_q, w_q, scale_a=a_scale.float()[:, None].contiguous(),
                            scale_b=w_scale.float()[None, :].contiguous(), bias=None if bias is None else
                            bias.to(out_dtype), out_dtype=out_dtype)


@torch.compiler.assume_constant_result  # a compiled graph takes the probe's answer as a constant
def scaled_mm_rowwise(device: str) -> bool:
    """See :func:`_scaled_mm_rowwise` (cached)."""
    return _scaled_mm_rowwise(device)


@functools.cache
def _scaled_mm_rowwise(device: str) -> bool:
    """Whether ``torch._scaled_mm`` takes row-wise scales on this device ("cpu" or "cuda:0"): it needs CUDA
    capability >= 8.9, and on the CPU a recent torch (2.11's CPU kernel takes per-tensor scales only). Probed once."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        return False
    try:
        a = torch.ones(16, 16, device=dev).to(FP8)
        one = torch.ones(16, 1, device=dev)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def quantize_per_token_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M,K] -> (e4m3 [M,K], scale fp32 [M] = absmax / 448); round to nearest even, saturating."""
    x = x.float()
    amax = x.abs().amax(1).clamp_min(EPS)
    scale = amax / torch.full_like(amax, FP8_MAX)  # IEEE division on CUDA too (see quantize_per_token_ref)
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# ---------------------------------------------------------------------------------------------- configs
# Narrower than int8's list: Triton keeps e4m3 products exact by accumulating each wgmma into a fresh fp32
# tile and adding it to the running one, so the accumulator costs twice the registers; 128 x 256 tiles spill
# (python -m vitcompress.bench.codegen shows it for sm_90).
GEMM_CONFIGS = [  # four, as for int8 (see int8_gemm.GEMM_CONFIGS)
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 5},
]


# ---------------------------------------------------------------------------------------------- kernel
@builder
def _kernel():
    return build_gemm(GEMM_CONFIGS)


# ---------------------------------------------------------------------------------------------- wrappers
@torch.library.custom_op("vitcompress::fp8_gemm", mutates_args=())
def _fp8_gemm_op(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return launch_gemm(_kernel(), a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype, tl.float32)


@_fp8_gemm_op.register_fake
def _(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype):
    return a_q.new_empty(a_q.shape[0], w_q.shape[1], dtype=out_dtype)


@register_flop_formula(torch.ops.vitcompress.fp8_gemm)
def _fp8_gemm_flops(a_q, w_q, *args, out_shape=None, **kwargs) -> int:
    """a_q [M,K] x w_q [K,N]: 2 M K N."""
    return 2 * a_q[0] * a_q[1] * w_q[1]


def fp8_gemm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
             backend: str = "auto") -> torch.Tensor:
    """See :func:`fp8_gemm_ref`. backend: auto (triton where usable and the GEMM table measured it faster than
    ``torch._scaled_mm`` at this shape), triton or torch (``torch._scaled_mm`` where it takes row-wise scales)."""
    if not runs_kernel(backend, a_q, w_q, shape=("fp8", a_q.shape[0], w_q.shape[1], a_q.shape[1])):
        if a_q.is_cuda and not gelu and w_q.stride(0) == 1 and scaled_mm_rowwise(str(a_q.device)) and \
                not (a_q.shape[1] % 16 or w_q.shape[1] % 16):
            return scaled_mm(a_q, w_q, a_scale, w_scale, bias, out_dtype)
        return fp8_gemm_ref(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype)
    return _fp8_gemm_op(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype)
