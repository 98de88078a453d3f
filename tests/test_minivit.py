"""MiniViT: share 1 is bit-exact, sharing is module identity stored once, the transformations start as the
identity, the weight-distillation losses against hand computations, round trips and one-line errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import infer, wide_model

from vitcompress.artifact import save_artifact
from vitcompress.errors import ConfigError
from vitcompress.export import export_model
from vitcompress.models import model_info
from vitcompress.pipeline import apply_stack, load_artifact
from vitcompress.transforms import MiniVitConfig, compress_
from vitcompress.transforms import distill as D


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "registers_gap"])
def test_share_one_is_bit_exact(family):
    dense = wide_model(family)
    model = compress_(copy.deepcopy(dense), MiniVitConfig(share=1))
    assert torch.equal(infer(model, _x()), infer(dense, _x()))


@pytest.mark.parametrize("family", ["vit", "qk_norm", "deit_distilled"])
def test_fresh_transformations_are_the_identity(family):
    """Each group's first block keeps its own weights: with identity transformations it computes what it did."""
    dense = wide_model(family)
    model = compress_(copy.deepcopy(dense), MiniVitConfig(share=2))
    h = torch.randn(2, 64 + dense.num_prefix_tokens, dense.embed_dim)
    with torch.inference_mode():
        torch.testing.assert_close(model.blocks[0](h), dense.blocks[0](h), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.blocks[2](h), dense.blocks[2](h), atol=1e-5, rtol=1e-5)


def test_groups_share_modules_and_halve_the_block_parameters():
    dense = wide_model()
    model = compress_(copy.deepcopy(dense), MiniVitConfig(share=2, transforms=False))
    b = model.blocks
    assert b[1].attn.qkv is b[0].attn.qkv and b[1].mlp.fc2 is b[0].mlp.fc2 and b[2].attn.qkv is not b[0].attn.qkv
    assert b[1].norm1 is not b[0].norm1  # every layer keeps its own LayerNorms
    per_block = _params(dense.blocks[0])
    shared = per_block - _params(dense.blocks[0].norm1) - _params(dense.blocks[0].norm2)
    assert _params(dense) - _params(model) == 2 * shared


def test_artifact_stores_shared_weights_once_and_round_trips(tmp_path):
    dense = wide_model()
    model = apply_stack(copy.deepcopy(dense), [{"name": "minivit", "share": 2}])
    with torch.no_grad():  # trained-looking transformations
        for blk in model.blocks:
            blk._vc_local.weight.normal_(0, 0.05)
            blk._vc_logit_mix.weight.add_(0.1 * torch.randn_like(blk._vc_logit_mix.weight))
    save_artifact(model, tmp_path / "m")
    save_artifact(dense, tmp_path / "d")
    size = lambda p: os.path.getsize(p / "model.safetensors")  # noqa: E731
    assert size(tmp_path / "m") < 0.62 * size(tmp_path / "d")
    loaded = load_artifact(tmp_path / "m")
    assert loaded.blocks[1].attn.qkv is loaded.blocks[0].attn.qkv
    assert torch.equal(infer(loaded, _x()), infer(model, _x()))
    export_model(model, tmp_path / "m.onnx")
    export_model(dense, tmp_path / "d.onnx")
    assert os.path.getsize(tmp_path / "m.onnx") < 0.7 * os.path.getsize(tmp_path / "d.onnx")  # one copy there too


@pytest.mark.parametrize("bad, match", [(dict(share=3), "does not divide the depth 4"), (dict(share=0), ">= 1")])
def test_bad_share_is_a_one_line_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        compress_(wide_model(), MiniVitConfig(**bad))


def test_relation_losses_against_hand_computations():
    torch.manual_seed(0)
    s = tuple(torch.randn(2, 5, 8) for _ in range(3))
    t = tuple(torch.randn(2, 5, 12) for _ in range(3))
    want = 0.0
    for i in range(3):
        for j in range(3):
            rs = torch.einsum("bnc,bmc->bnm", s[i], s[j]) / 8 ** 0.5
            rt = torch.einsum("bnc,bmc->bnm", t[i], t[j]) / 12 ** 0.5
            want += -(torch.softmax(rt, -1) * torch.log_softmax(rs, -1)).sum(-1).mean() / 9
    torch.testing.assert_close(D.attention_relation_loss(s, t), want)
    assert D.attention_relation_loss(s, s) < D.attention_relation_loss(s, t)
    hs, ht = torch.randn(2, 5, 16), torch.randn(2, 5, 7)
    ns, nt = hs / hs.norm(dim=-1, keepdim=True), ht / ht.norm(dim=-1, keepdim=True)
    want_h = ((ns @ ns.transpose(1, 2) - nt @ nt.transpose(1, 2)) ** 2).mean() * 5
    torch.testing.assert_close(D.hidden_relation_loss(hs, ht), want_h)
    assert D.hidden_relation_loss(hs, hs) == 0


def test_capture_keeps_the_last_blocks_features_of_a_shared_model():
    model = compress_(wide_model(), MiniVitConfig(share=2))
    seen = []
    hook = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.append(model.blocks[-1].attn.qkv(o)))
    with D.capture(model) as got, torch.inference_mode():
        model(_x(2))
    hook.remove()
    assert torch.equal(got["qkv"], seen[-1]) and got["hidden"].shape == (2, 65, 256)  # mlp_ratio 4


def test_weight_distillation_recovers_end_to_end():
    dense = wide_model()
    model = apply_stack(copy.deepcopy(dense), [
        {"name": "minivit", "share": 2},
        {"name": "recovery", "data": "digits", "limit": 64, "epochs": 1, "batch_size": 32, "distill": "weight"}],
        teacher=dense)
    rec = model_info(model).provenance["recovery"]
    assert rec["config"]["distill"] == "weight" and rec["final_loss"] == rec["final_loss"]  # ran, finite
    assert model.blocks[1].attn.qkv is model.blocks[0].attn.qkv  # training kept the sharing
    assert torch.isfinite(infer(model, _x())).all()
