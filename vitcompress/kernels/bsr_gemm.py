"""Block-sparse GEMM: activations @ a BSR weight (BxB blocks, B in {16, 32, 64, 128}), plus bias.

    out[M, N] = x[M, K] @ W[N, K]^T + bias[N],   W stored as BSR: crow [N/B + 1], col [nnzb], values [nnzb, B, B]

(the layout of :class:`~vitcompress.methods.block_sparse_linear.BlockSparseLinear`). Each program owns a
BLOCK_M x B output tile of one block row and loops over that row's stored blocks only, so the work is
proportional to the density. fp32 accumulation (fp32 x is multiplied in TF32 on the GPU); the output has x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._triton import autotune_configs, builder, check_fits, chunks, dot_in_fp32, interpreting, runs_kernel, tl, triton

BLOCK_SIZES = (16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------- reference
def bsr_dense(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The dense [N, K] weight of a BSR (crow [N/B+1], col [nnzb], values [nnzb,B,B]); differentiable in values."""
    b = values.shape[-1]
    # output_size: the row of each block without a host sync (and a static shape for torch.compile)
    rows = torch.repeat_interleave(torch.arange(n // b, device=values.device), crow.diff(), output_size=values.shape[0])
    w = values.new_zeros(n // b, k // b, b, b).index_put((rows, col), values)
    return w.permute(0, 2, 1, 3).reshape(n, k)


def bsr_gemm_ref(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [M,K] @ W^T + bias in fp32, returned in x's dtype -> [M,N]."""
    w = bsr_dense(crow, col, values.float(), n, x.shape[1])
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------- configs
# x's tile address depends on a loaded column index, and for such a chain Triton's pipeliner keeps only
# 1 + (num_stages - 1) // 2 tile buffers (results/kernels/codegen_sm90.md): stages 3 / 5 / 7 give 2 / 3 / 4 deep
CONFIGS = [{"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 7},
           {"BLOCK_M": 128, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 128, "num_warps": 4, "num_stages": 5},
           {"BLOCK_M": 128, "num_warps": 4, "num_stages": 7}, {"BLOCK_M": 128, "num_warps": 8, "num_stages": 5},
           {"BLOCK_M": 128, "num_warps": 8, "num_stages": 7}, {"BLOCK_M": 256, "num_warps": 8, "num_stages": 3},
           {"BLOCK_M": 256, "num_warps": 8, "num_stages": 5}, {"BLOCK_M": 256, "num_warps": 8, "num_stages": 7}]
INTERPRET_CONFIG = {"BLOCK_M": 32}


# ---------------------------------------------------------------------------------------------- kernel
def _bsr_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, b_ptr, o_ptr, M, N, K, s_xm, s_xk, s_om, s_on,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr):
    """A BLOCK_M x B output tile of one block row: loops over that row's stored blocks only.

    Block rows vary fastest in the launch order, so the programs running at once share one BLOCK_M x K tile of x
    (read from HBM once, then from L2) rather than each streaming a different one."""
    n_rows = N // B
    row, pid_m = tl.program_id(0) % n_rows, tl.program_id(0) // n_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, B)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for j in range(start, end):
        kb = tl.load(col_ptr + j)
        kk = kb * B + rb
        a = tl.load(x_ptr + (rm % M)[:, None] * s_xm + kk[None, :] * s_xk)  # edge rows wrap; store drops them
        w = tl.trans(tl.load(v_ptr + j * B * B + rb[:, None] * B + rb[None, :]))  # [in, out] of this block
        if DOT_F32:  # only in the interpreter, for bf16 (see _triton.dot_in_fp32)
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w)
    rn = row * B + rb
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    tl.store(o_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(o_ptr.dtype.element_ty),
             mask=rm[:, None] < M)


@builder
def _kernel():
    configs = autotune_configs([INTERPRET_CONFIG] if interpreting() else CONFIGS)
    return triton.autotune(configs=configs, key=["M", "N", "K", "B"])(triton.jit(_bsr_kernel))

def _bsr_triton(x, crow, col, values, bias, n):
    kernel = _kernel()
    m, k = x.shape
    b = values.shape[-1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    values = values.to(x.dtype).contiguous()
    check_fits(values, "block values")
    for xc, oc in chunks(x, out):  # row chunks whose int32 offsets fit
        mc = xc.shape[0]
        grid = lambda meta, mc=mc: (n // b * triton.cdiv(mc, meta["BLOCK_M"]),)  # noqa: E731
        kernel[grid](xc, crow, col, values, bias if bias is not None else oc, oc, mc, n, k, xc.stride(0),
                     xc.stride(1), oc.stride(0), oc.stride(1), HAS_BIAS=bias is not None,
                     DOT_F32=dot_in_fp32(x.dtype), B=b)
    return out


# ---------------------------------------------------------------------------------------------- wrapper
@torch.library.custom_op("vitcompress::bsr_gemm", mutates_args=())
def _bsr_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
            bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return _bsr_triton(x, crow, col, values, bias, n)


@_bsr_op.register_fake
def _(x, crow, col, values, bias, n):
    return x.new_empty(x.shape[0], n)


@register_flop_formula(torch.ops.vitcompress.bsr_gemm)
def _bsr_gemm_flops(x, crow, col, values, *args, out_shape=None, **kwargs) -> int:
    """x [M,K] times the stored blocks only (values [nnz, B, B]): 2 M nnz B^2."""
    return 2 * x[0] * values[0] * values[1] * values[2]


def bsr_gemm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             bias: torch.Tensor | None = None, n: int | None = None, backend: str = "auto") -> torch.Tensor:
    """See :func:`bsr_gemm_ref`. n: output features (default: (len(crow) - 1) x B)."""
    b = values.shape[-1]
    if b not in BLOCK_SIZES:
        raise ValueError(f"block size {b} is not one of {BLOCK_SIZES}")
    n = n if n is not None else (crow.numel() - 1) * b
    if not runs_kernel(backend, x):
        return bsr_gemm_ref(x, crow, col, values, bias, n)
    return _bsr_op(x.contiguous(), crow.contiguous(), col.contiguous(), values, bias, n)
