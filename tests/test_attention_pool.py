"""Attention-pool (MAP) heads, SigLIP's: token reduction keeps the pooled query's view of every remaining token with
its size (proportional attention in the pool), and the deployable methods and the export cover such models (#43)."""

from __future__ import annotations

import pytest
import torch

from vitcompress.artifact import save_artifact
from vitcompress.export import ExportConfig, export_model
from vitcompress.pipeline import apply_stack, create_model, load_artifact
from vitcompress.transforms.token_merge.block import _size_aware_attn_pool

MAP = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}


def _model():
    torch.manual_seed(0)
    return create_model("vit_base_patch16_siglip_224", **MAP).eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_tome_at_zero_is_bit_exact_on_a_map_model():
    model = _model()
    with torch.inference_mode():
        ref = model(_x())
        apply_stack(model, [{"name": "token_merge", "r": 0}])
        assert torch.equal(model(_x()), ref)


def test_the_pool_sees_a_merged_token_as_its_size_in_copies():
    """Independent restatement: pooling tokens with sizes (2, 1, 3) equals pooling the list with each token repeated
    that many times, unmerged."""
    model = _model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64)
    sizes = torch.tensor([2.0, 1.0, 3.0])

    class State:
        size = sizes.expand(2, 3)[..., None]

    model._vc_token_state = State()
    with torch.inference_mode():
        got = _size_aware_attn_pool(model, x)
        want = model.attn_pool(torch.repeat_interleave(x, sizes.long(), dim=1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stack", [
    [{"name": "token_merge", "r": 2}],
    [{"name": "token_merge", "method": "evit", "keep_rate": 0.7}],
    [{"name": "quantize", "mode": "deploy"}],
    [{"name": "prune", "heads": 0.5, "mlp": 0.5}],
    [{"name": "token_merge", "r": 2}, {"name": "quantize", "mode": "deploy"}],
])
def test_map_models_compress_round_trip_and_export(stack, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = apply_stack(_model(), stack)
    save_artifact(model, tmp_path / "a")
    again = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        out = again(_x())
        assert torch.equal(out, model(_x()))
    export_model(again, tmp_path / "a.onnx", ExportConfig())
    got = ort.InferenceSession(str(tmp_path / "a.onnx")).run(None, {"input": _x().numpy()})[0]
    if not any(s["name"] == "quantize" for s in stack):  # int8 on CPUs without VNNI differs by its 7-bit weights
        assert abs(got - out.numpy()).max() <= 1e-3 * max(1.0, float(out.abs().max()))


def test_merging_changes_a_map_models_output_less_with_proportional_attention():
    """ToMe r=2 on a MAP model with the size-aware pool stays closer to the unmerged output than the same merge with
    the pool blind to sizes."""
    model = _model()
    with torch.inference_mode():
        ref = model(_x(4))
        apply_stack(model, [{"name": "token_merge", "r": 4}])
        aware = model(_x(4))
        feats = model.forward_features(_x(4))
        blind = model.head(model.fc_norm(type(model).pool(model, feats)))  # the pool without the sizes
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert err(aware) < err(blind)
