"""The compiled kernels (not the interpreter) at ViT-B/L shapes in bf16, on a CUDA device.

Marked ``gpu``: skipped without CUDA, run by ``pytest -m gpu`` on the GPU machine. Same references and
tolerances as the interpreter tests in test_kernels.py; these check what only a real GPU exercises: Triton's
code generation for each tile shape the autotuner may pick, wgmma layouts, and torch.compile with inductor.
"""

import pytest
import torch

from vitcompress.kernels import attention as attn_mod
from vitcompress.kernels import bsr_gemm as bsr_mod
from vitcompress.kernels import fp8_gemm as f8
from vitcompress.kernels import int8_gemm as i8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("m", [197, 197 * 8])
def test_int8_quantize_and_gemm(m):
    g = _gen(m)
    x = torch.randn(m, 768, device="cuda", generator=g)
    w = torch.randn(3072, 768, device="cuda", generator=g)
    a_q, a_s = i8.quantize_per_token(x)
    q_ref, s_ref = i8.quantize_per_token_ref(x)
    assert torch.equal(a_q, q_ref) and torch.equal(a_s, s_ref)
    ln_w, ln_b = torch.randn(768, device="cuda", generator=g), torch.randn(768, device="cuda", generator=g)
    q_ln, _ = i8.layernorm_quantize(x, ln_w, ln_b)
    assert ((q_ln.int() - i8.layernorm_quantize_ref(x, ln_w, ln_b)[0].int()).abs() <= 1).all()
    w_s = w.abs().amax(1) / 127
    w_q = torch.round(w / w_s[:, None]).clamp(-127, 127).to(torch.int8)
    bias = torch.randn(3072, device="cuda", generator=g)
    ref = i8.int8_gemm_ref(a_q, w_q.t(), a_s, w_s, bias, True)
    for operand in (w_q.t(), w_q.t().contiguous()):  # column-major (as deployed) and row-major
        torch.testing.assert_close(i8.int8_gemm(a_q, operand, a_s, w_s, bias, True).float(), ref.float(),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="e4m3 tensor cores: Ada / Hopper")
def test_fp8_gemm_matches_reference_and_scaled_mm():
    g = _gen(1)
    x, w = torch.randn(197 * 8, 768, device="cuda", generator=g), torch.randn(3072, 768, device="cuda", generator=g)
    a8, as8 = f8.quantize_per_token_fp8_ref(x)
    w_s8 = w.abs().amax(1) / 448
    w8 = (w / w_s8[:, None]).to(torch.float8_e4m3fn).t()
    bias = torch.randn(3072, device="cuda", generator=g).bfloat16()
    ref = f8.fp8_gemm_ref(a8, w8, as8, w_s8, bias)
    # Hopper's fp8 MMA accumulates with fewer than fp32's mantissa bits: at K = 768 (outputs up to ~100) 2 of
    # 4.8 M outputs were 0.024 off the fp32 reference on an H200, so the absolute tolerance is 5e-2.
    torch.testing.assert_close(f8.fp8_gemm(a8, w8, as8, w_s8, bias).float(), ref.float(), rtol=2e-2, atol=5e-2)
    assert f8.scaled_mm_rowwise("cuda")
    torch.testing.assert_close(f8.scaled_mm(a8, w8, as8, w_s8, bias).float(), ref.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("b", [32, 64, 128])
def test_bsr_gemm_at_vit_b_fc1(b):
    g = _gen(b)
    n, k, m = 3072, 768, 197 * 8
    mask = torch.rand(n // b, k // b, device="cuda", generator=g) < 0.5
    w = torch.randn(n, k, device="cuda", generator=g) * mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    bsr = w.to_sparse_bsr((b, b))
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    vals = bsr.values().bfloat16()
    out = bsr_mod.bsr_gemm(x, bsr.crow_indices(), bsr.col_indices(), vals, bias, n)
    ref = bsr_mod.bsr_gemm_ref(x, bsr.crow_indices(), bsr.col_indices(), vals, bias, n)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-1)  # bf16 output, K = 768


@pytest.mark.parametrize("heads", [12, 16])
def test_attention_577_tokens(heads):
    g = _gen(heads)
    b, n, d, bs = 8, 577, 64, 64
    q, k, v = (torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = torch.rand(b, n, device="cuda", generator=g).log1p()
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(attn_mod.attention(q, k, v, key_bias=bias).float(),
                               attn_mod.attention_ref(q, k, v, key_bias=bias).float(), **tol)
    lens = torch.randint(300, n + 1, (b,), device="cuda", generator=g)
    nb = (n + bs - 1) // bs
    blocks = torch.rand(b, heads, nb, nb, device="cuda", generator=g) < 0.5
    blocks[..., 0] = True
    out = attn_mod.attention(q, k, v, key_bias=bias, seq_lens=lens, block_mask=blocks, block_size=bs)
    ref = attn_mod.attention_ref(q, k, v, key_bias=bias, seq_lens=lens, block_mask=blocks, block_size=bs)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_drop_ins_under_inductor():
    """A ViT-B-sized block with all three drop-ins, compiled by inductor (the custom ops stay opaque)."""
    from vitcompress import create_model
    from vitcompress.dropins import BlockSparseLinear, Int8Linear, use_fused_attention_

    torch.manual_seed(0)
    m = create_model("vit_base_patch16_224", num_classes=10).cuda().eval()
    assert use_fused_attention_(m) == 12
    blk = m.blocks[0]
    blk.mlp.fc1 = Int8Linear.from_linear(blk.mlp.fc1)
    blk.mlp.fc2 = BlockSparseLinear.from_linear(blk.mlp.fc2, block_sparsity=0.5, block_size=64)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=5e-2, atol=5e-2)


def test_attention_past_int32_offsets():
    """ViT-B's packed qkv at 577 tokens spans 2^31 elements from batch 1616: the wrapper splits the launch (a
    kernel offset would wrap otherwise). 4.6 GB of qkv; the last samples, past the split, match SDPA."""
    g = _gen(7)
    b, n, h, d = 1700, 577, 12, 64
    qkv = torch.empty(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = attn_mod.attention(q, k, v)
    tail = slice(b - 4, b)
    ref = torch.nn.functional.scaled_dot_product_attention(q[tail], k[tail], v[tail])
    torch.testing.assert_close(out[tail].float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[:2].float(), torch.nn.functional.scaled_dot_product_attention(
        q[:2], k[:2], v[:2]).float(), rtol=2e-2, atol=2e-2)


def test_int8_gemm_past_int32_offsets():
    """fc2's input at 577 tokens x batch 1212 (K = 3072) spans 2^31 elements: split by rows."""
    g = _gen(8)
    m, k, n = 577 * 1212, 3072, 768
    a_q = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g).t()
    a_s, w_s = torch.rand(m, device="cuda", generator=g) / 100, torch.rand(n, device="cuda", generator=g) / 100
    out = i8.int8_gemm(a_q, w_q, a_s, w_s)
    for rows in (slice(0, 256), slice(m - 256, m)):
        ref = i8.int8_gemm_ref(a_q[rows], w_q, a_s[rows], w_s)
        torch.testing.assert_close(out[rows].float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_attention_past_the_grid_y_limit():
    """batch x heads > 65,535 (CUDA's grid y limit): 6000 merged 50-token sequences of ViT-B, split by batch."""
    g = _gen(9)
    b, n, h, d = 6000, 50, 12, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = torch.rand(b, n, device="cuda", generator=g).log1p()
    out = attn_mod.attention(q, k, v, key_bias=bias)
    for rows in (slice(0, 4), slice(b - 4, b)):
        ref = attn_mod.attention_ref(q[rows], k[rows], v[rows], key_bias=bias[rows])
        torch.testing.assert_close(out[rows].float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["adaptive", "sparse"])
def test_token_family_kernel_paths_on_vit_b(kind):
    """ATS's padded batch through the varlen kernel (seq_lens) and sparse attention through the block-sparse
    kernel, against the masked-SDPA path, in bf16 on ViT-B/16 (random weights)."""
    from vitcompress import compress_, create_model
    from vitcompress.transforms import AdaptiveTokensConfig, SparseAttentionConfig

    models = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)  # the same random weights for both
        m = create_model("vit_base_patch16_224").cuda().eval()
        cfg = AdaptiveTokensConfig(budget=0.5, attention=backend) if kind == "adaptive" else \
            SparseAttentionConfig(density=0.5, block_size=16, attention=backend)
        compress_(m, cfg)
        models.append(m)
    x = torch.randn(8, 3, 224, 224, device="cuda", generator=_gen(3))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref, got = (m(x).float() for m in models)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.75
    torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2)
