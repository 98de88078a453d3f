"""Training-free sparse attention: the block pattern, identity at density 1, the kernel path in the interpreter,
the prefix block, stacking with token merging, and the artifact round trip."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, images, infer, wide_model

from vitcompress import compress_, load_artifact, save_artifact
from vitcompress.errors import ConfigError
from vitcompress.transforms import QuantConfig, SparseAttentionConfig, TokenMergeConfig
from vitcompress.transforms.sparse_attn import ops

_model, _x, _fwd = wide_model, images, infer


def test_block_pool_averages_each_block_including_the_partial_last():
    t = torch.arange(5, dtype=torch.float32).reshape(1, 1, 5, 1)
    assert ops.block_pool(t, 2)[0, 0, :, 0].tolist() == [0.5, 2.5, 4.0]


def test_block_mask_keeps_the_best_scored_blocks_and_the_forced_ones():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    nb, scale = 5, 8**-0.5
    mask = ops.block_mask(q, k, None, 8, 0.7, scale)  # 5 blocks: keep round((0.7 x 25 - 5) / 4) = 3 per row
    keep = ops.keep_blocks(37, 8, 0.7)
    assert mask.shape == (2, 3, nb, nb) and keep == 3
    assert mask[..., 0].all() and mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., 0, :].all()
    assert (mask[..., 1:, :].sum(-1) == keep).all()
    # independently, for query block 1 of image 0, head 0: each query's softmax over (its logit against a block's
    # mean key + log of the block's token count), averaged over the block's queries; the best unforced block
    counts = [8, 8, 8, 8, 5]
    means = [k[0, 0, j * 8:j * 8 + counts[j]].mean(0) for j in range(nb)]
    share = torch.zeros(nb)
    for i in range(8, 16):
        logits = torch.tensor([float(q[0, 0, i] @ means[j]) * scale + math.log(counts[j]) for j in range(nb)])
        share += logits.softmax(0) / 8
    share[[0, 1]] = -1
    assert mask[0, 0, 1].nonzero().flatten().tolist() == sorted({0, 1, int(share.argmax())})


def test_padding_blocks_are_never_chosen_over_real_ones():
    q, k = torch.randn(1, 1, 32, 4), torch.randn(1, 1, 32, 4)
    bias = torch.zeros(1, 1, 1, 32)
    bias[..., 24:] = -math.inf  # the last block is padding
    mask = ops.block_mask(q, k, bias, 8, 0.75, 0.5)
    assert not mask[0, 0, 1:3, 3].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_density_one_is_bit_exact(family):
    model = _model(family)
    ref = _fwd(model, _x())
    compress_(model, SparseAttentionConfig(density=1.0))
    assert torch.equal(_fwd(model, _x()), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_masked_attention_is_exactly_the_pattern(family):
    """Against the dense softmax with the skipped tiles masked out by hand, per layer."""
    model = _model(family)
    compress_(model, SparseAttentionConfig(density=0.5, block_size=8))
    attn = model.blocks[1].attn
    q, k, v = (torch.randn(2, attn.num_heads, 66, attn.head_dim) for _ in range(3))
    mask = ops.block_mask(q, k, None, 8, 0.5, attn.scale)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    logits = logits.masked_fill(~ops.token_mask(mask, 66, 8), -math.inf)
    torch.testing.assert_close(attn._vc_attend(q, k, v, None), logits.softmax(-1) @ v, atol=1e-5, rtol=1e-5)
    assert abs(ops.density(66, 8, 0.5) - 0.5) < 0.05


def test_the_block_sparse_kernel_path_matches_the_masked_sdpa():
    pytest.importorskip("triton")
    ref, tri = _model(), _model()
    compress_(ref, SparseAttentionConfig(density=0.5, block_size=16, backend="torch"))
    compress_(tri, SparseAttentionConfig(density=0.5, block_size=16, backend="triton"))
    x = _x(2)
    torch.testing.assert_close(_fwd(tri, x), _fwd(ref, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["deit_distilled", "registers_gap"])
def test_every_query_reads_the_prefix_block(family):
    model = _model(family)
    compress_(model, SparseAttentionConfig(density=0.25, block_size=8))
    p = model.num_prefix_tokens
    attn = model.blocks[0].attn
    q, k = torch.randn(1, attn.num_heads, 65 + p - 1, attn.head_dim), torch.randn(1, attn.num_heads, 65 + p - 1,
                                                                                   attn.head_dim)
    allowed = ops.token_mask(ops.block_mask(q, k, None, 8, 0.25, attn.scale), q.shape[2], 8)
    assert allowed[..., :p].all() and allowed[..., :p, :].all()  # prefix keys for everyone; prefix queries dense


def test_stacks_with_token_merging_and_round_trips(tmp_path):
    model = _model()
    compress_(model, SparseAttentionConfig(density=0.5, block_size=8))
    compress_(model, TokenMergeConfig(r=4))
    out = _fwd(model, _x())
    dense = _model()
    compress_(dense, TokenMergeConfig(r=4))
    assert not torch.equal(out, _fwd(dense, _x()))  # the pattern is applied in the merged layers too
    save_artifact(model, tmp_path / "a")
    assert torch.equal(_fwd(load_artifact(tmp_path / "a"), _x()), out)


def test_sdpa_sees_the_same_logits_as_timm_where_every_tile_is_kept():
    model = _model()
    compress_(model, SparseAttentionConfig(density=0.999, block_size=8))  # keeps every block: dense values
    attn = model.blocks[0].attn
    q, k, v = (torch.randn(1, attn.num_heads, 65, attn.head_dim) for _ in range(3))
    torch.testing.assert_close(attn._vc_attend(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("bad", [dict(density=0.0), dict(block_size=12), dict(block_size=8, backend="triton"),
                                 dict(layers=[7])])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        compress_(_model(), SparseAttentionConfig(**bad))


def test_quantizing_a_sparse_attention_is_refused():
    model = _model()
    compress_(model, SparseAttentionConfig(density=0.5, block_size=8))
    with pytest.raises(ConfigError, match="cannot quantize SparseAttention"):
        compress_(model, QuantConfig(w_bits=8, a_bits=8, layers=["attn_matmul"]),
                  calib=[(_x(4), torch.zeros(4))])
