"""Drop-in modules: FusedAttention in a timm ViT, and all three in a plain PyTorch transformer block."""

import shutil

import pytest
import torch
from conftest import TINY
from torch import nn

from vitcompress import create_model
from vitcompress.dropins import BlockSparseLinear, FusedAttention, Int8Linear, use_fused_attention_
from vitcompress.kernels.attention import attention

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support")


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}])
def test_fused_attention_replaces_timm_attention(kw):
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", **{**TINY, **kw})
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = m(x)
        assert use_fused_attention_(m, backend="torch") == TINY["depth"]
        assert torch.equal(m(x), ref)  # torch backend without masks is timm's own SDPA call
        for blk in m.blocks:
            blk.attn.backend = "triton"
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


class PlainBlock(nn.Module):
    """A pre-norm transformer block written in plain PyTorch (the README example)."""

    def __init__(self, dim: int = 64, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, key_bias=key_bias, backend=self.backend)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


@pytest.mark.parametrize("autocast", [False, True])
def test_drop_ins_work_in_a_plain_pytorch_block(autocast, exact_int8):
    """fp32, and bf16 autocast (the setup users run: every kernel then sees bf16 activations); tolerance 1e-3 and
    1e-2 (bf16 rounds to 8 bits) between the Triton kernels and their torch references."""
    torch.manual_seed(0)
    blk = PlainBlock()
    x, bias = torch.randn(1, 197, 64), torch.rand(1, 197).log1p()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dense = blk(x, bias)
        blk.fc1 = Int8Linear.from_linear(blk.fc1, backend="torch")
        blk.fc2 = BlockSparseLinear.from_linear(blk.fc2, block_sparsity=0.5, block_size=16, backend="torch")
        torch_out = blk(x, bias)
        blk.fc1.backend = blk.fc2.backend = blk.backend = "triton"
        triton_out = blk(x, bias)
    tol = 1e-2 if autocast else 1e-3
    torch.testing.assert_close(triton_out, torch_out, rtol=tol, atol=tol)
    assert (torch_out - dense).abs().mean() < 0.2 * dense.abs().mean()  # compressed, still the same function


def test_fused_attention_rejects_dense_masks():
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", **TINY)
    fa = FusedAttention.from_timm(m.blocks[0].attn)
    with pytest.raises(ValueError, match="not a dense attn_mask"):
        fa(torch.randn(1, 5, TINY["embed_dim"]), attn_mask=torch.zeros(5, 5))


def test_quantize_deploy_runs_on_the_triton_int8_gemm(exact_int8):
    import copy

    from vitcompress import compress_
    from vitcompress.transforms import QuantConfig

    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", **TINY)
    t = copy.deepcopy(m)
    compress_(m, QuantConfig(mode="deploy", a_granularity="per_token", backend="torch"))
    compress_(t, QuantConfig(mode="deploy", a_granularity="per_token", backend="triton"))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(t(x), m(x), rtol=1e-3, atol=1e-3)


def test_quantize_backend_errors(cli, trained_artifact, tmp_path):
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "q", "--mode", "deploy", "--backend", "triton",
                     "--a-bits", "none")
    assert rc == 2 and "--backend triton runs the int8 and fp8 W8A8 GEMMs" in err and err.count("\n") == 1
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "q", "--backend", "triton",
                     "--calib-data", "digits")
    assert rc == 2 and "simulate runs in floating point" in err


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_drop_ins_compile_as_one_graph(compiler, exact_int8):
    """The kernels are torch custom ops with fake implementations: torch.compile captures the block without a
    graph break (aot_eager traces with fake tensors, then runs the ops) and gives the eager result. Inductor
    (C++ on the CPU, ~30 s) also asserts that each op's real output has the size and strides of its fake one
    (attention's output is a [B, N, H, D] buffer seen as [B, H, N, D])."""
    if compiler == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor on the CPU needs a C++ compiler")
    torch.manual_seed(0)
    blk = PlainBlock()
    blk.fc1 = Int8Linear.from_linear(blk.fc1, backend="triton")
    blk.fc2 = BlockSparseLinear.from_linear(blk.fc2, block_sparsity=0.5, block_size=16, backend="triton")
    blk.backend = "triton"
    x, bias = torch.randn(1, 197, 64), torch.rand(1, 197).log1p()
    torch._dynamo.reset()
    compiled = torch.compile(blk, fullgraph=True, backend=compiler)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, bias), blk(x, bias), rtol=1e-3, atol=1e-3)


def test_flop_counter_counts_the_kernels_custom_ops():
    """A model running our Triton ops reports the GFLOPs of its torch-backend twin (bsr: the stored blocks)."""
    from vitcompress.bench.measure import count_flops

    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", **TINY)
    dense = count_flops(m, (3, 32, 32))
    use_fused_attention_(m, backend="triton")
    assert count_flops(m, (3, 32, 32)) == dense
    blk = m.blocks[0]
    blk.mlp.fc1 = Int8Linear.from_linear(blk.mlp.fc1, backend="triton")
    assert count_flops(m, (3, 32, 32)) == dense
    blk.mlp.fc2 = BlockSparseLinear.from_linear(blk.mlp.fc2, mask=torch.tensor([[1, 0] * 8] * 4),
                                                block_size=16, backend="triton")  # fc2: 256 -> 64, half the blocks
    tokens = (32 // TINY["patch_size"]) ** 2 + 1
    assert count_flops(m, (3, 32, 32)) == dense - tokens * 256 * 64  # 2 x tokens x (half of 256 x 64) fewer
