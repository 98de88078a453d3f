"""Fused attention forward with a per-key bias, per-sample valid lengths and block sparsity.

    out = softmax(q k^T * scale + key_bias[:, None, None, :] + masks) v       q, k, v: [B, H, N, D]

- ``key_bias`` [B, N]: added to every query's logit for that key (ToMe's proportional attention, log size);
- ``seq_lens`` [B] int: keys at positions >= len are ignored and output rows >= len are zero (pruned or
  padded tokens);
- ``block_mask`` bool, broadcastable to [B, H, ceil(N/bs), ceil(N/bs)]: only the (query block, key block)
  tiles that are True are computed. Skipped tiles are never loaded, not masked after the fact. A query row
  whose keys are all masked outputs zeros.

bf16/fp16 (or fp32, which the GPU multiplies in TF32, Triton's default) inputs, fp32 accumulation (online softmax
in base 2), output in q's dtype.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from ._triton import GRID_Y_LIMIT, autotune_configs, builder, chunks, dot_in_fp32, interpreting, runs_kernel, tl, triton

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------- reference
def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None,
                  seq_lens: torch.Tensor | None = None, block_mask: torch.Tensor | None = None,
                  block_size: int = 64, scale: float | None = None) -> torch.Tensor:
    """The same attention in fp32 with explicit masks -> [B, H, N, D] in q's dtype."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if key_bias is not None:
        s = s + key_bias.float()[:, None, None, :]
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool, device=q.device)
    if seq_lens is not None:
        allowed = allowed & (torch.arange(n, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    if block_mask is not None:
        nb = math.ceil(n / block_size)
        bm = block_mask.to(torch.bool).expand(b, h, nb, nb)
        allowed = allowed & bm.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :n, :n]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ v.float()
    if seq_lens is not None:
        out = out * (torch.arange(n, device=q.device)[None, :] < seq_lens[:, None])[:, None, :, None]
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------- configs
CONFIGS = [{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
           {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
           {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
           {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4}]
SPARSE_CONFIGS = [{"num_warps": 4, "num_stages": 3}, {"num_warps": 8, "num_stages": 3},
                  {"num_warps": 4, "num_stages": 2}, {"num_warps": 4, "num_stages": 4}]  # tiles = block_size
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


# ---------------------------------------------------------------------------------------------- kernel
def _fwd_kernel(Q, K, V, KB, SL, BM, Out, qk_scale, H, N, NK,
                s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                s_kbb, s_bmb, s_bmh, s_bmq, s_bmk,
                HAS_BIAS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr,
                NK_PAD: tl.constexpr,
                D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M queries of one (batch, head): online softmax over the key blocks that are run.

    The key loop has no branch (so Triton pipelines its loads): it runs over ``cdiv(len, BLOCK_N)`` blocks, or,
    with a block mask, over the compacted list of this query block's active key blocks below ``len`` (built in
    registers from the mask row with a prefix sum; NK = key blocks, NK_PAD its next power of 2).
    """
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D_PAD)
    dmask = rd < D
    q = tl.load(Q + b * s_qb + h * s_qh + rm[:, None] * s_qn + rd[None, :],
                mask=(rm[:, None] < N) & dmask[None, :], other=0.0)
    if DOT_F32:  # only in the interpreter, for bf16 (see _triton.dot_in_fp32)
        q = q.to(tl.float32)
    n_valid = N
    if HAS_LENS:
        n_valid = tl.load(SL + b).to(tl.int32)
    if HAS_BLOCKS:
        kbs = tl.arange(0, NK_PAD)
        row = tl.load(BM + b * s_bmb + h * s_bmh + pid_m * s_bmq + kbs * s_bmk, mask=kbs < NK, other=0)
        active = (row != 0) & (kbs * BLOCK_N < n_valid)
        rank = tl.cumsum(active.to(tl.int32), 0)  # rank[i] = j + 1 for the j-th active key block i
        n_iter = tl.sum(active.to(tl.int32), 0)
    else:
        n_iter = tl.cdiv(n_valid, BLOCK_N)
    n_iter = tl.where(pid_m * BLOCK_M < n_valid, n_iter, 0)  # a query block past len outputs zeros
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for j in range(0, n_iter):
        if HAS_BLOCKS:  # noqa: SIM108  (a compile-time branch; the other arm's names do not exist)
            start = tl.sum(tl.where(active & (rank == j + 1), kbs, 0), 0) * BLOCK_N
        else:
            start = j * BLOCK_N
        rn = start + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * s_kb + h * s_kh + rn[None, :] * s_kn + rd[:, None],
                     mask=(rn[None, :] < N) & dmask[:, None], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        if HAS_BIAS:  # the bias and the key mask as one [BLOCK_N] vector, so the tile costs one FMA
            kb = tl.load(KB + b * s_kbb + rn, mask=rn < N, other=0.0).to(tl.float32) * 1.4426950408889634
            kb = tl.where(rn < n_valid, kb, float("-inf"))
        else:
            kb = tl.where(rn < n_valid, 0.0, float("-inf"))
        s = tl.dot(q, kt) * qk_scale + kb[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        vt = tl.load(V + b * s_vb + h * s_vh + rn[:, None] * s_vn + rd[None, :],
                     mask=(rn[:, None] < N) & dmask[None, :], other=0.0)
        if DOT_F32:  # P is rounded to the inputs' dtype first, as on the GPU
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = tl.where((l_i > 0)[:, None], acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    out = tl.where((rm < n_valid)[:, None], out, 0.0)
    tl.store(Out + b * s_ob + h * s_oh + rm[:, None] * s_on + rd[None, :], out.to(Out.dtype.element_ty),
             mask=(rm[:, None] < N) & dmask[None, :])


@builder
def _kernels():
    fwd = triton.jit(_fwd_kernel)
    key = ["N", "D", "HAS_BIAS", "HAS_LENS"]
    dense = triton.autotune(configs=autotune_configs([INTERPRET_CONFIG] if interpreting() else CONFIGS), key=key)
    sparse = triton.autotune(configs=autotune_configs(SPARSE_CONFIGS), key=[*key, "BLOCK_M"])
    return dense(fwd), sparse(fwd)


def _attention_triton(q, k, v, key_bias, seq_lens, block_mask, block_size, scale):
    dense, sparse = _kernels()
    b, h, n, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # views of qkv's output are fine
    out = q.new_empty(b, n, h, d).transpose(1, 2)  # SDPA's layout: merging the heads afterwards is free
    bias = key_bias.float().contiguous() if key_bias is not None else None
    lens = seq_lens.to(torch.int32).contiguous() if seq_lens is not None else None
    bm = None
    if block_mask is not None:
        nb = triton.cdiv(n, block_size)
        bm = block_mask.to(torch.uint8).expand(b, h, nb, nb)  # broadcast dims keep stride 0
    kernel = dense if bm is None else sparse
    for qc, kc, vc, bc, lc, mc, oc in chunks(q, k, v, bias, lens, bm, out, cap=GRID_Y_LIMIT // h):  # batch chunks
        _launch(qc, kc, vc, bc, lc, mc, oc, scale, kernel, block_size)
    return out


def _launch(q, k, v, bias, lens, bm, out, scale, kernel, block_size):
    """One launch over q's batch: grid (query blocks, batch x heads)."""
    b, h, n, d = q.shape
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
               bias.stride(0) if bias is not None else 0)
    flags = dict(HAS_BIAS=bias is not None, HAS_LENS=lens is not None, DOT_F32=dot_in_fp32(q.dtype), D=d,
                 D_PAD=max(16, triton.next_power_of_2(d)))
    common = (q, k, v, bias if bias is not None else out, lens if lens is not None else out)
    if bm is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
        kernel[grid](*common, out, out, scale * LOG2E, h, n, 1, *strides, 0, 0, 0, 0, HAS_BLOCKS=False, NK_PAD=1,
                     **flags)
        return
    nb = bm.shape[-1]
    kernel[(nb, b * h)](*common, bm, out, scale * LOG2E, h, n, nb, *strides, *bm.stride(), HAS_BLOCKS=True,
                        NK_PAD=max(2, triton.next_power_of_2(nb)), BLOCK_M=block_size, BLOCK_N=block_size, **flags)


# ---------------------------------------------------------------------------------------------- wrapper
@torch.library.custom_op("vitcompress::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                  seq_lens: torch.Tensor | None, block_mask: torch.Tensor | None, block_size: int,
                  scale: float) -> torch.Tensor:
    return _attention_triton(q, k, v, key_bias, seq_lens, block_mask, block_size, scale)


@_attention_op.register_fake
def _(q, k, v, key_bias, seq_lens, block_mask, block_size, scale):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)  # the kernel's output layout, whatever q's strides


@register_flop_formula(torch.ops.vitcompress.attention)
def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """The dense work of q [B,H,N,D] attending to k, v (as SDPA counts it; skipped blocks are not discounted)."""
    return sdpa_flop_count(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None,
              seq_lens: torch.Tensor | None = None, block_mask: torch.Tensor | None = None, *,
              block_size: int = 64, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """See :func:`attention_ref`. block_size: the granularity of ``block_mask`` (16..128, a power of 2)."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    if block_mask is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of 2 >= 16, got {block_size}")
    if not runs_kernel(backend, q):
        return attention_ref(q, k, v, key_bias, seq_lens, block_mask, block_size, scale)
    return _attention_op(q, k, v, key_bias, seq_lens, block_mask, block_size, scale)
