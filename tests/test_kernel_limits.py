"""Launch limits: the kernels index in int32, so wrappers split inputs that would overflow into launches that fit.

Big inputs are reached at ordinary batch sizes: the packed qkv of ViT-B at 577 tokens spans 2^31 elements from
batch 1616 on, and fc2's input at 197 tokens from batch 3549. The arithmetic is checked on meta tensors at those
sizes; the split launches themselves run in the interpreter with the limit lowered, and must give the same
bits as one launch.
"""

import pytest
import torch

from vitcompress.kernels import _triton
from vitcompress.kernels import attention as attn_mod
from vitcompress.kernels import bsr_gemm as bsr_mod
from vitcompress.kernels import int8_gemm as i8

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support")
LIMIT = _triton.INDEX_LIMIT


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_span_counts_addressed_elements_of_views():
    qkv = torch.empty(2, 197, 3, 12, 64, device="meta").permute(2, 0, 3, 1, 4)  # timm's q, k, v [B, H, N, D]
    q = qkv[0]
    assert _triton.span(q) == (1 * 197 * 2304 + 11 * 64 + 196 * 2304 + 63) + 1
    assert _triton.span(q, skip=0) == _triton.span(q[:1])
    assert _triton.span(torch.empty(5, 7, device="meta").expand(3, 5, 7), skip=1) == 7  # broadcast dims add nothing


@pytest.mark.parametrize("batch, tokens, one", [(1615, 577, True), (1616, 577, False), (4096, 577, False),
                                                 (4731, 197, True), (8192, 197, False)])
def test_attention_batch_split_fits_int32_and_grid(batch, tokens, one):
    qkv = torch.empty(batch, tokens, 3, 12, 64, device="meta", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    out = torch.empty(batch, tokens, 12, 64, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    per = _triton.per_launch(qkv[0], qkv[1], qkv[2], out, cap=_triton.GRID_Y_LIMIT // 12)
    assert (per >= batch) == one
    assert per * 12 <= _triton.GRID_Y_LIMIT and _triton.span(qkv[2][:per]) <= LIMIT  # v reaches furthest
    if not one:  # the largest split that fits
        assert per * 12 == _triton.GRID_Y_LIMIT // 12 * 12 or _triton.span(qkv[2][:per + 1]) > LIMIT


@pytest.mark.parametrize("rows, k", [(197 * 3549, 3072), (577 * 909, 4096), (197 * 256, 3072)])
def test_gemm_row_split_is_the_largest_that_fits(rows, k):
    a = torch.empty(rows, k, device="meta", dtype=torch.int8)
    out = torch.empty(rows, 768, device="meta", dtype=torch.bfloat16)
    per = _triton.per_launch(a, out)
    if rows * k <= LIMIT:
        assert per >= rows  # one launch
    else:
        assert _triton.span(a[:per]) <= LIMIT < _triton.span(a[:per + 1])


def test_one_launch_passes_the_tensors_through():
    a, out = torch.empty(197, 64), torch.empty(197, 8)
    ((a1, none, o1),) = list(_triton.chunks(a, None, out))
    assert a1 is a and o1 is out and none is None


def test_too_large_for_one_item_is_one_clear_error():
    with pytest.raises(ValueError, match="int32"):
        _triton.per_launch(torch.empty(2, 2**31, device="meta", dtype=torch.int8))
    with pytest.raises(ValueError, match="weight of shape"):
        _triton.check_fits(torch.empty(2**16, 2**15 + 1, device="meta"), "weight")


@pytest.fixture
def low_limit(monkeypatch):
    """Lower the offset limit so that small tensors need several launches; count the launches made."""
    def set_limit(limit: int) -> list[int]:
        monkeypatch.setattr(_triton, "INDEX_LIMIT", limit)
        seen: list[int] = []
        real = _triton.per_launch

        def spy(*tensors, **kw):
            seen.append(real(*tensors, **kw))
            return seen[-1]

        monkeypatch.setattr(_triton, "per_launch", spy)
        return seen
    return set_limit


def test_split_gemm_and_quantize_launches_give_the_same_bits(low_limit):
    g = torch.Generator().manual_seed(0)
    m, k, n = 197, 64, 48
    x, w = torch.randn(m, k, generator=g).to(_dev()), torch.randn(n, k, generator=g).to(_dev())
    bias = torch.randn(n, generator=g).to(_dev())
    a_q, a_s = i8.quantize_per_token(x, backend="triton")
    w_s = w.abs().amax(1) / 127
    w_q = torch.round(w / w_s[:, None]).clamp(-127, 127).to(torch.int8).t()
    one = i8.int8_gemm(a_q, w_q, a_s, w_s, bias, gelu=True, backend="triton")
    ln_one = i8.layernorm_quantize(x, torch.ones(k, device=x.device), bias[:1].expand(k), backend="triton")
    seen = low_limit(60 * k)  # 60 rows of a_q per launch: 4 launches
    a_q2, a_s2 = i8.quantize_per_token(x, backend="triton")
    split = i8.int8_gemm(a_q, w_q, a_s, w_s, bias, gelu=True, backend="triton")
    ln_split = i8.layernorm_quantize(x, torch.ones(k, device=x.device), bias[:1].expand(k), backend="triton")
    assert seen and max(seen) < m
    assert torch.equal(a_q2, a_q) and torch.equal(a_s2, a_s)
    assert torch.equal(split, one)
    assert all(torch.equal(s, o) for s, o in zip(ln_split, ln_one))


def test_split_bsr_launches_give_the_same_bits(low_limit):
    g = torch.Generator().manual_seed(1)
    m, b, n, k = 197, 16, 64, 48
    mask = (torch.rand(n // b, k // b, generator=g) < 0.5).repeat_interleave(b, 0).repeat_interleave(b, 1)
    bsr = (torch.randn(n, k, generator=g) * mask).to_sparse_bsr((b, b))
    dev = _dev()
    crow, col, vals = (t.to(dev) for t in (bsr.crow_indices(), bsr.col_indices(), bsr.values()))
    x, bias = torch.randn(m, k, generator=g).to(dev), torch.randn(n, generator=g).to(dev)
    one = bsr_mod.bsr_gemm(x, crow, col, vals, bias, n, backend="triton")
    seen = low_limit(50 * n)
    split = bsr_mod.bsr_gemm(x, crow, col, vals, bias, n, backend="triton")
    assert seen and max(seen) < m
    torch.testing.assert_close(split, one, rtol=1e-6, atol=1e-6)  # fp32 dots: BLAS order may differ by tile row


@pytest.mark.parametrize("blocks", [False, True])
def test_split_attention_launches_give_the_same_bits(low_limit, monkeypatch, blocks):
    """A packed qkv view (as timm's Attention makes it), a key bias, lengths and a block mask, split by batch."""
    g = torch.Generator().manual_seed(2)
    bsz, n, h, d = 5, 40, 2, 16
    qkv = torch.randn(bsz, n, 3, h, d, generator=g).to(_dev()).permute(2, 0, 3, 1, 4)
    key_bias = torch.randn(bsz, n, generator=g).to(_dev())
    lens = torch.tensor([40, 33, 17, 40, 1], device=_dev())
    block_mask = (torch.rand(bsz, 1, 2, 2, generator=g) < 0.6).to(_dev()) if blocks else None
    args = (qkv[0], qkv[1], qkv[2], key_bias, lens, block_mask)
    one = attn_mod.attention(*args, block_size=32, backend="triton")
    seen = low_limit(_triton.span(qkv[2][:2]))  # 2 samples per launch: 3 launches
    split = attn_mod.attention(*args, block_size=32, backend="triton")
    assert seen == [2] and torch.equal(split, one)
    monkeypatch.setattr(attn_mod, "GRID_Y_LIMIT", 3 * h)  # the grid cap alone: 3 samples x 2 heads per launch
    monkeypatch.setattr(_triton, "INDEX_LIMIT", LIMIT)
    assert torch.equal(attn_mod.attention(*args, block_size=32, backend="triton"), one) and seen[-1] == 3
