"""Triton kernels against their torch references, on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Odd shapes throughout: 197 and 577 tokens, batch 1, K not a multiple of the block, head_dim not a power
of 2; fp32, bf16 and fp16 activations. Quantizer codes and scales must match exactly; GEMMs meet an SQNR floor;
attention is within the stated tolerance. GPU runs of the same checks are marked ``gpu``.
"""

import json

import pytest
import torch

from benchmarks import kernels as kb
from vitcompress.kernels import attention as attn_mod
from vitcompress.kernels import bsr_gemm as bsr_mod
from vitcompress.kernels import fp8_gemm as f8
from vitcompress.kernels import int8_gemm as i8

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


HALF = [torch.bfloat16, torch.float16]  # activations as autocast gives them


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("m, k", [(197, 64), (577, 96), (1, 40), (3, 130)])
def test_quantize_per_token_codes_and_scales_are_exact(m, k, dtype):
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 3).to(_dev(), dtype)
    x[0, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]) * x[0].abs().max() / 127 * 2  # exact ties on the grid
    q, s = i8.quantize_per_token(x, backend="triton")
    q_ref, s_ref = i8.quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and torch.equal(s.cpu(), s_ref.cpu()) and torch.equal(q.cpu(), q_ref.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("m, k", [(197, 64), (1, 40)])
def test_layernorm_quantize_matches_reference(m, k, dtype):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * 2 + 1).to(_dev(), dtype)
    w, b = (torch.randn(k, generator=g).to(_dev(), dtype) for _ in range(2))
    q, s = i8.layernorm_quantize(x, w, b, backend="triton")
    q_ref, s_ref = i8.layernorm_quantize_ref(x, w, b)
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=1e-5, atol=0)  # LayerNorm reductions differ in order
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.999


def _int8_operands(x, w):
    a_q, a_s = i8.quantize_per_token_ref(x)
    w_s = w.abs().amax(1) / 127
    w_q = torch.round(w / w_s[:, None]).clamp(-127, 127).to(torch.int8)
    return a_q, w_q.t(), a_s, w_s  # w [K,N] column-major, as Int8Linear stores it (cuBLASLt / wgmma layout)


def _fp8_operands(x, w):
    a_q, a_s = f8.quantize_per_token_fp8_ref(x)
    assert torch.equal(a_s, x.abs().amax(1) / 448)
    assert torch.equal(a_q, (x / a_s[:, None]).to(torch.float8_e4m3fn))  # exact codes
    w_s = w.abs().amax(1) / 448
    return a_q, (w / w_s[:, None]).to(torch.float8_e4m3fn).t(), a_s, w_s  # w [K,N] column-major (_scaled_mm)


GEMMS = {"int8": (i8.int8_gemm, i8.int8_gemm_ref, _int8_operands, 30),  # SQNR floor (dB) vs the float GEMM
         "fp8": (f8.fp8_gemm, f8.fp8_gemm_ref, _fp8_operands, 25)}  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("kind", list(GEMMS))
@pytest.mark.parametrize("m, k, n", [(197, 64, 48), (1, 40, 80), (577, 96, 32)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("out_dtype", HALF)
def test_quantized_gemm_matches_reference_and_sqnr(kind, m, k, n, gelu, out_dtype):
    gemm, gemm_ref, operands, floor = GEMMS[kind]
    g = torch.Generator().manual_seed(m * n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g).to(out_dtype)  # the layer's bias, in the model's dtype
    dev = _dev()
    args = (*(t.to(dev) for t in operands(x, w)), bias.to(dev), gelu, out_dtype)
    out = gemm(*args, backend="triton")
    ref = gemm_ref(*args)
    assert out.dtype == out_dtype and out.shape == (m, n)
    torch.testing.assert_close(out.cpu().float(), ref.cpu().float(), rtol=1e-2, atol=1e-2)
    exact = x @ w.t() + bias.float()
    exact = torch.nn.functional.gelu(exact) if gelu else exact
    assert kb.sqnr_db(exact, out.cpu()) > floor
    if kind == "fp8" and not gelu and k % 16 == 0 and n % 16 == 0 and f8.scaled_mm_rowwise(str(dev)):
        # torch._scaled_mm (row-wise scales: CUDA >= 8.9, or the CPU on torch >= 2.12) computes the same product
        torch.testing.assert_close(f8.scaled_mm(*args[:5]).cpu().float(), ref.cpu().float(), rtol=1e-2, atol=1e-2)
    if kind == "int8" and m == 1:  # a row-major [K,N] weight gives the same result (the kernel takes strides)
        rowmajor = (args[0], args[1].contiguous(), *args[2:])
        torch.testing.assert_close(gemm(*rowmajor, backend="triton").float(), out.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("m, b", [(197, 16), (1, 32), (577, 16), (197, 64), (1, 128), (577, 128)])
def test_bsr_gemm_matches_dense(m, b, dtype):
    """fp32, bf16 and fp16 activations and blocks, 16- to 128-blocks; fp32 accumulation, output in x's dtype.
    Against the reference (fp32 math from the same inputs): 1e-4 in fp32; in bf16 / fp16, within one rounding of
    the output (rtol 2e-2, atol 5e-2)."""
    g = torch.Generator().manual_seed(m + b)
    n, k = 4 * b, 3 * b
    mask = torch.rand(n // b, k // b, generator=g) < 0.5
    mask[0] = False  # an empty block row: output is the bias
    w = torch.randn(n, k, generator=g) * mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    bsr = w.to_sparse_bsr((b, b))
    x, bias = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    dev = _dev()
    crow, col, vals = (t.to(dev) for t in (bsr.crow_indices(), bsr.col_indices(), bsr.values().to(dtype)))
    out = bsr_mod.bsr_gemm(x.to(dev), crow, col, vals, bias.to(dev), n, backend="triton")
    ref = bsr_mod.bsr_gemm_ref(x, *(t.cpu() for t in (crow, col, vals)), bias, n)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ref, x @ w.t() + bias, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=5e-2)
    assert torch.allclose(out.cpu()[:, :b], bias[:b].expand(m, b))


@pytest.mark.parametrize("dtype", HALF)
def test_attention_half_inputs_at_577_tokens(dtype):
    """ViT-B/16 at 384 px (577 tokens, head_dim 64), batch 1, a key bias: dense, then 64-block sparse with a length.
    bf16 / fp16 inputs with fp32 accumulation; tolerance 2e-2 (P is rounded to the inputs' dtype, as in flash
    attention) against the fp32-math reference on the same inputs."""
    g = torch.Generator().manual_seed(577)
    h, n, d, bs = 2, 577, 64, 64
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dtype) for _ in range(3))
    key_bias = torch.rand(1, n, generator=g).log1p()
    nb = (n + bs - 1) // bs
    block_mask = torch.rand(1, h, nb, nb, generator=g) < 0.5
    block_mask[..., 0] = True
    dev = _dev()
    for extra in ({}, {"seq_lens": torch.tensor([n - 100]), "block_mask": block_mask, "block_size": bs}):
        out = attn_mod.attention(*(t.to(dev) for t in (q, k, v, key_bias)), backend="triton",
                                 **{key: t if isinstance(t, int) else t.to(dev) for key, t in extra.items()})
        ref = attn_mod.attention_ref(q.float(), k.float(), v.float(), key_bias, **extra)
        assert out.dtype == dtype
        torch.testing.assert_close(out.cpu().float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bsz, n, d", [(1, 197, 32), (2, 65, 40)])
@pytest.mark.parametrize("bias, lens, blocks", [(False, False, False), (True, False, False), (True, True, False),
                                                (False, False, True), (True, True, True)])
def test_attention_matches_reference(bsz, n, d, bias, lens, blocks):
    """fp32 inputs; tolerance 2e-4 absolute (online softmax vs one-shot softmax)."""
    g = torch.Generator().manual_seed(n + d)
    h, bs = 2, 32
    q, k, v = (torch.randn(bsz, h, n, d, generator=g) for _ in range(3))
    key_bias = torch.randn(bsz, n, generator=g).abs().log1p() if bias else None
    seq_lens = torch.tensor([n - 7, n][:bsz]) if lens else None
    nb = (n + bs - 1) // bs
    block_mask = None
    if blocks:
        block_mask = torch.rand(1, h, nb, nb, generator=g) < 0.5
        block_mask[..., 0] = True
        block_mask[0, 0, 1] = False  # a query block with no keys: zeros
    dev = _dev()
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    out = attn_mod.attention(q.to(dev), k.to(dev), v.to(dev), mv(key_bias), mv(seq_lens), mv(block_mask),
                             block_size=bs, backend="triton")
    ref = attn_mod.attention_ref(q, k, v, key_bias, seq_lens, block_mask, block_size=bs)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-4)
    if not (bias or lens or blocks):  # the reference itself is SDPA
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-5)


def test_block_sparse_attention_at_577_tokens_per_sample_masks():
    """577 tokens, 64-blocks, a per-sample (head-broadcast) block mask, lengths that end mid-block and leave whole
    query blocks past the end, and a key bias: the compacted key-block loop against the dense reference."""
    g = torch.Generator().manual_seed(577)
    bsz, h, n, d, bs = 2, 2, 577, 64, 64
    q, k, v = (torch.randn(bsz, h, n, d, generator=g) for _ in range(3))
    key_bias = torch.rand(bsz, n, generator=g).log1p()
    seq_lens = torch.tensor([n - 150, n])
    nb = (n + bs - 1) // bs
    block_mask = torch.rand(bsz, 1, nb, nb, generator=g) < 0.5
    block_mask[1, 0, 2] = False  # a query block with no keys at all: zeros
    dev = _dev()
    out = attn_mod.attention(*(t.to(dev) for t in (q, k, v, key_bias, seq_lens, block_mask)), block_size=bs,
                             backend="triton")
    ref = attn_mod.attention_ref(q, k, v, key_bias, seq_lens, block_mask, block_size=bs)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-4)
    assert out[1, :, 2 * bs:3 * bs].abs().max() == 0 and out[0, :, n - 150:].abs().max() == 0


def test_attention_reads_qkv_views_in_place_and_writes_sdpa_layout():
    """q, k, v as a ViT block makes them (views of qkv's [B, N, 3, H, D] output, not copied); the output's memory
    is [B, N, H, D], so merging the heads is a free view, as after SDPA."""
    g = torch.Generator().manual_seed(5)
    b, n, h, d = 2, 197, 3, 32
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(_dev())
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    key_bias = torch.rand(b, n, generator=g).log1p().to(_dev())
    out = attn_mod.attention(q, k, v, key_bias=key_bias, backend="triton")
    ref = attn_mod.attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), key_bias)
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=0, atol=2e-4)
    assert out.transpose(1, 2).is_contiguous()


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(197, 64, dtype=torch.int8)
        w = torch.empty(64, 48, dtype=torch.int8)
        out = torch.ops.vitcompress.int8_gemm(a, w, torch.empty(197), torch.empty(48), None, True, torch.float16)
        assert out.shape == (197, 48) and out.dtype == torch.float16
        q = torch.empty(1, 2, 577, 40)
        assert torch.ops.vitcompress.attention(q, q, q, None, None, None, 64, 0.1).shape == q.shape
        qp = torch.empty(1, 2, 577, 40)  # [B,H,N,D]: the output is laid out [B,N,H,D], as SDPA's is (and the kernel's)
        assert torch.ops.vitcompress.attention(qp, qp, qp, None, None, None, 64, 0.1).transpose(1, 2).is_contiguous()
        x = torch.empty(5, 32)
        crow, col, vals = torch.empty(3, dtype=torch.long), torch.empty(2, dtype=torch.long), torch.empty(2, 16, 16)
        assert torch.ops.vitcompress.bsr_gemm(x, crow, col, vals, None, 32).shape == (5, 32)
        a8 = torch.empty(197, 64, dtype=torch.float8_e4m3fn)
        w8 = torch.empty(64, 48, dtype=torch.float8_e4m3fn)
        out = torch.ops.vitcompress.fp8_gemm(a8, w8, torch.empty(197), torch.empty(48), None, False, torch.bfloat16)
        assert out.shape == (197, 48) and out.dtype == torch.bfloat16
        qq, ss = torch.ops.vitcompress.quantize_rows(x, None, None, 0.0)
        assert qq.dtype == torch.int8 and ss.shape == (5,)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kernel_benchmark_script_runs(tmp_path):
    from benchmarks.kernels import main

    assert main(["--out", str(tmp_path / "a"), "--smoke", "--parts", "gemm"]) == 0
    assert main(["--out", str(tmp_path / "b"), "--smoke", "--parts", "bsr,attention"]) == 0
    parts = [str(tmp_path / d / "kernels.json") for d in "ab"]
    assert main(["--out", str(tmp_path), "--merge", *parts]) == 0
    md = (tmp_path / "kernels.md").read_text()
    assert "not speed figures" in md and "bsr gemm (ours)" in md and "ours + key bias" in md
    assert "int8 GEMM vs bf16 matmul" in md and "bsr GEMM 16-blocks at 25% density" in md  # the targets table
    res = json.loads((tmp_path / "kernels.json").read_text())
    kinds = {"gemm": lambda c: "fp8" if "fp8" in c else "int8", "bsr": lambda c: "bsr",
             "attention": lambda c: "attention"}
    for part, kind in kinds.items():  # every kernel's output on the timed inputs is checked against the exact one
        for row in res[part]:
            assert row["sqnr_db"] and all(v >= kb.SQNR_FLOOR_DB[kind(c)] for c, v in row["sqnr_db"].items())
    assert main(["--out", str(tmp_path), "--smoke", "--parts", "gemm,nope"]) == 2


def test_kernel_benchmark_targets_need_accuracy_too():
    """A target is met only when the kernel is both fast enough and accurate: a fast, wrong kernel fails."""
    ms = {"bf16 matmul": 2.0, kb.INT8: 1.0, "torch._int_mm (no dequant)": 0.5}
    row = {"shape": "ViT-B fc1", "M": 50432, "ms": ms, "sqnr_db": {kb.INT8: 41.0}}
    assert [t["met"] for t in kb.targets({"gemm": [row]})] == [True, False]  # 2x bf16 matmul; 0.5x _int_mm
    row["sqnr_db"][kb.INT8] = 12.0
    assert [t["met"] for t in kb.targets({"gemm": [row]})] == [False, False]

