"""int8 GEMM with a fused dequant epilogue, per-token activation quantization, and LayerNorm + quantize.

    out[M, N] = gelu?((a_q[M, K] @ w_q[K, N]) * a_scale[M, None] * w_scale[None, N] + bias[N])

int32 accumulation; the epilogue (per-token x per-channel dequant, bias, exact-erf GELU) runs in fp32 and
stores bf16/fp16. ``quantize_per_token`` gives symmetric int8 codes (round half to even, +-127) and the
fp32 scale ``absmax / 127`` per row; ``layernorm_quantize`` does LayerNorm first in the same pass, so
quantizing the activations of ``qkv`` and ``fc1`` costs no extra read of the tensor.

Layout: torch references first (same argument names), then autotune configs, then the kernels, then the
wrappers, registered as ``torch.ops.vitcompress.*`` custom ops with fake implementations (torch.compile).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._triton import autotune_configs, builder, check_fits, chunks, interpreting, runs_kernel, tl, triton

EPS = 1e-8
QMAX = 127


# ---------------------------------------------------------------------------------------------- references
def int8_gemm_ref(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, gelu: bool = False,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_q int8 [M,K], w_q int8 [K,N], a_scale fp32 [M], w_scale fp32 [N], bias [N] -> [M,N] ``out_dtype``."""
    acc = (a_q.to(torch.int32) @ w_q.to(torch.int32)) if a_q.device.type == "cpu" else int_mm(a_q, w_q)
    out = acc.float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    if gelu:
        out = F.gelu(out)
    return out.to(out_dtype)


def int_mm(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (cuBLASLt's int8 GEMM: a_q [M,K] x w_q [K,N] -> int32 [M,N]), padding M <= 16 rows to
    17, which it needs on CUDA."""
    m = a_q.shape[0]
    if a_q.is_cuda and m <= 16:
        a_q = torch.cat([a_q, a_q.new_zeros(17 - m, a_q.shape[1])])
    return torch._int_mm(a_q, w_q)[:m]


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M,K] -> (codes int8 [M,K], scale fp32 [M]); symmetric, round half to even."""
    x = x.float()
    amax = x.abs().amax(1).clamp_min(EPS)
    # A tensor divisor, not a Python scalar: CUDA torch turns `t / scalar` into `t * (1 / scalar)`, which is 1 ulp
    # off the kernel's IEEE division (tl.div_rn) for some rows. On the CPU both forms give the same bits.
    scale = amax / torch.full_like(amax, QMAX)
    return torch.round(x / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


def layernorm_quantize_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x [M,K] in fp32, then :func:`quantize_per_token_ref`."""
    return quantize_per_token_ref(F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps))


# ---------------------------------------------------------------------------------------------- configs
# Pruned to four (from eight) so that a cold cache autotunes each shape in seconds: the tile families that span the
# M range of a ViT (a 128 x 256 tile for large M, 64-row tiles for batch 1); the per-shape choice between this
# kernel and torch._int_mm is the GEMM table's (tuned/), not run-time autotuning's.
GEMM_CONFIGS = [  # Hopper-sized tiles first; 8-bit operands want B column-major (K contiguous): see Int8Linear
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 5},
]
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


# ---------------------------------------------------------------------------------------------- kernels
def _gemm_kernel(a_ptr, w_ptr, o_ptr, sa_ptr, sw_ptr, b_ptr, M, N, K, s_am, s_ak, s_wk, s_wn, s_om, s_on,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, ACC_TYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of a scaled low-precision GEMM (grouped launch order for L2 reuse) + fused
    epilogue. ACC_TYPE: int32 for int8 operands; fp32 for fp8 ones (shared with :mod:`.fp8_gemm`).

    Edge tiles load wrapped rows / columns (``% M``, ``% N``: in bounds, discarded by the store mask), so with
    EVEN_K (K % BLOCK_K == 0, as in every ViT layer) the main loop's loads carry no mask at all."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rm % M)[:, None] * s_am + rk[None, :] * s_ak
    w_ptrs = w_ptr + rk[:, None] * s_wk + (rn % N)[None, :] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            w = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0.0)
        acc += tl.dot(a, w, out_dtype=ACC_TYPE)
        a_ptrs += BLOCK_K * s_ak
        w_ptrs += BLOCK_K * s_wk
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
    tl.store(o_ptr + rm[:, None] * s_om + rn[None, :] * s_on, out.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, w_ptr, b_ptr, K, s_xm, s_qm, eps, LN: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """One row: optional LayerNorm, then symmetric int8 codes (ties to even) and the row's scale."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * s_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if LN:
        mean = tl.sum(x, 0) / K
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / K + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, d * rstd * w + b, 0.0)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-8), 127.0)
    v = tl.div_rn(x, scale)
    r = tl.floor(v + 0.5)
    r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + row * s_qm + cols, r.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@builder
def _kernels():
    return build_gemm(GEMM_CONFIGS), triton.jit(_quant_rows_kernel)


def build_gemm(configs: list[dict[str, int]]) -> Any:
    """Autotuned :func:`_gemm_kernel` (EVEN_K derived from each config's BLOCK_K)."""
    even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    tuned = autotune_configs([INTERPRET_CONFIG] if interpreting() else configs)
    return triton.autotune(configs=tuned, key=["M", "N", "K"])(even_k(triton.jit(_gemm_kernel)))


def launch_gemm(gemm, a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype, acc_type):
    """Run an autotuned build of :func:`_gemm_kernel` (int8 here, e4m3 in :mod:`.fp8_gemm`), in row chunks
    whose int32 offsets fit (:func:`._triton.chunks`)."""
    m, k = a_q.shape
    n = w_q.shape[1]
    check_fits(w_q, "weight")
    out = torch.empty(m, n, device=a_q.device, dtype=out_dtype)
    w_scale = w_scale.float().contiguous()
    for a, o, sa in chunks(a_q, out, a_scale.float().contiguous()):
        mc = a.shape[0]
        grid = lambda meta, mc=mc: (triton.cdiv(mc, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        gemm[grid](a, w_q, o, sa, w_scale, bias if bias is not None else o, mc, n, k, a.stride(0), a.stride(1),
                   w_q.stride(0), w_q.stride(1), o.stride(0), o.stride(1), HAS_BIAS=bias is not None, GELU=gelu,
                   ACC_TYPE=acc_type)
    return out


def _quant_rows_triton(x, weight, bias, eps, ln):
    _, quant_rows = _kernels()
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.int8)
    s = torch.empty(m, device=x.device, dtype=torch.float32)
    for xc, qc, sc in chunks(x, q, s):
        quant_rows[(xc.shape[0],)](xc, qc, sc, weight if ln else xc, bias if ln else xc, k, xc.stride(0),
                                   qc.stride(0), eps, LN=ln, BLOCK_K=triton.next_power_of_2(k))
    return q, s


# ---------------------------------------------------------------------------------------------- wrappers
@torch.library.custom_op("vitcompress::int8_gemm", mutates_args=())
def _int8_gemm_op(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return launch_gemm(_kernels()[0], a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype, tl.int32)


@_int8_gemm_op.register_fake
def _(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype):
    return a_q.new_empty(a_q.shape[0], w_q.shape[1], dtype=out_dtype)


@register_flop_formula(torch.ops.vitcompress.int8_gemm)
def _int8_gemm_flops(a_q, w_q, *args, out_shape=None, **kwargs) -> int:
    """a_q [M,K] x w_q [K,N]: 2 M K N (the epilogue is not counted)."""
    return 2 * a_q[0] * a_q[1] * w_q[1]


@torch.library.custom_op("vitcompress::quantize_rows", mutates_args=())
def _quant_rows_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _quant_rows_triton(x, weight, bias, eps, weight is not None)


@_quant_rows_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


def int8_gemm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
              backend: str = "auto") -> torch.Tensor:
    """See :func:`int8_gemm_ref`. backend: auto (triton where usable and the GEMM table measured it faster than
    ``torch._int_mm`` at this shape), triton or torch (``torch._int_mm`` on CUDA)."""
    if not runs_kernel(backend, a_q, w_q, shape=("int8", a_q.shape[0], w_q.shape[1], a_q.shape[1])):
        return int8_gemm_ref(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype)
    return _int8_gemm_op(a_q, w_q, a_scale, w_scale, bias, gelu, out_dtype)


def quantize_per_token(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`quantize_per_token_ref`."""
    if not runs_kernel(backend, x):
        return quantize_per_token_ref(x)
    return _quant_rows_op(x, None, None, 0.0)


def layernorm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`layernorm_quantize_ref`."""
    if not runs_kernel(backend, x):
        return layernorm_quantize_ref(x, weight, bias, eps)
    return _quant_rows_op(x, weight, bias, eps)
