from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, TINY

from vitcompress import create_model, data_config, model_info
from vitcompress.errors import CheckpointError, ModelError, Note
from vitcompress.models import num_prefix_tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supported_family_loads_and_runs(family):
    name, extra = FAMILIES[family]
    model = create_model(name, **TINY, **extra)
    x = torch.randn(2, *data_config(model)["input_size"])
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert model_info(model).arch == name
    assert model_info(model).kwargs == {**TINY, **extra}


def test_family_features_are_what_the_tests_claim():
    assert num_prefix_tokens(create_model("deit_tiny_distilled_patch16_224", **TINY)) == 2
    assert create_model("deit3_small_patch16_224", **TINY).blocks[0].ls1.__class__.__name__ == "LayerScale"
    regs = create_model("vit_base_patch16_reg4_gap_256", **TINY)
    assert regs.num_reg_tokens == 4 and regs.global_pool == "avg"
    assert create_model("vit_tiny_patch16_224", qk_norm=True, **TINY).blocks[0].attn.q_norm.__class__.__name__ \
        == "LayerNorm"
    assert create_model("vit_base_patch16_gap_224", **TINY).global_pool == "avg"


def test_unknown_model_suggests_a_close_match():
    with pytest.raises(ModelError, match=r"unknown model 'deit_smal_patch16_224' \(did you mean 'deit_small"):
        create_model("deit_smal_patch16_224")


@pytest.mark.parametrize("name,extra", [
    ("resnet18", {}),
    ("vit_small_patch16_18x2_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}),
    ("vit_relpos_small_patch16_224", TINY),  # relative position bias (#43: not yet)
])
def test_unsupported_architectures_are_refused(name, extra):
    with pytest.raises(ModelError, match="unsupported architecture"):
        create_model(name, **extra)


def test_img_size_override_changes_the_data_config():
    model = create_model("vit_tiny_patch16_224", **{**TINY, "img_size": 48})
    assert data_config(model)["input_size"] == (3, 48, 48)
    assert model.patch_embed.num_patches == 36


@pytest.mark.parametrize("suffix,wrap", [(".pth", None), (".safetensors", None), (".pth", "model"),
                                         (".bin", "state_dict")])
def test_checkpoint_round_trip(tmp_path, tiny_model, suffix, wrap):
    sd = tiny_model.state_dict()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrap: sd} if wrap else {f"module.{k}": v for k, v in sd.items()}, path)
    loaded = create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), tiny_model(x))
    assert model_info(loaded).base["checkpoint"] == str(path.resolve())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        create_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.pth", **TINY)


def test_truncated_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "ckpt.pth"
    torch.save(tiny_model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


def test_mismatched_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "ckpt.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not match model 'vit_tiny_patch16_224'.*shape mismatch"):
        create_model("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "mlp_ratio": 2.0})
    with pytest.raises(CheckpointError, match="missing key"):
        create_model("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "depth": 3})
    sd = {k: v for k, v in tiny_model.state_dict().items() if k != "norm.bias"}
    torch.save({**sd, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \(norm.bias\).*1 unexpected key\(s\) \(extra"):
        create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


def _save(tmp_path, sd, name="backbone.safetensors"):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name))
    return tmp_path / name


def test_a_backbone_at_another_img_size_is_resampled_as_timm_does(tmp_path, tiny_model):
    """A checkpoint trained at 32 px loads at 48 px: pos_embed resampled by timm's own function, the rest exact."""
    from timm.layers import resample_abs_pos_embed

    path = _save(tmp_path, tiny_model.state_dict())
    big = create_model("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "img_size": 48})
    want = resample_abs_pos_embed(tiny_model.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    assert torch.equal(big.pos_embed, want)
    assert torch.equal(big.blocks[1].mlp.fc2.weight, tiny_model.blocks[1].mlp.fc2.weight)
    assert torch.equal(big.head.weight, tiny_model.head.weight)
    assert model_info(big).kwargs["img_size"] == 48


def test_a_backbone_without_a_classifier_gets_a_fresh_one_with_a_note(tmp_path, tiny_model):
    backbone = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("head.")}
    path = _save(tmp_path, backbone)
    with pytest.warns(Note, match=r"backbone.safetensors has no classifier: a fresh 10-class head"):
        one = create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    with pytest.warns(Note):
        two = create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    # the fresh head is seeded: rebuilding the same base gives the same model (agreement needs that)
    assert torch.equal(one.head.weight, two.head.weight) and one.head.weight.std() > 0.01
    assert torch.equal(one.blocks[0].attn.qkv.weight, tiny_model.blocks[0].attn.qkv.weight)
    with pytest.warns(Note, match=r"classifier \(10, 64\) does not fit 7 classes"):
        seven = create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 7},
                             checkpoint=_save(tmp_path, tiny_model.state_dict(), "c.safetensors"))
    assert seven.head.weight.shape == (7, 64)
    with pytest.warns(Note, match="classifier is dropped"):
        feats = create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 0},
                             checkpoint=_save(tmp_path, tiny_model.state_dict(), "f.safetensors"))
    assert feats(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_a_backbone_with_a_matching_classifier_loads_silently(tmp_path, tiny_model):
    import warnings

    path = _save(tmp_path, tiny_model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", Note)
        create_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


DINOV2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "dinov2_vits14" / "backbone.safetensors"


@pytest.mark.skipif(not DINOV2.is_file(), reason="../shared/models/dinov2_vits14 is not here")
def test_the_real_dinov2_backbone_loads_at_224_px_with_a_fresh_head():
    with pytest.warns(Note, match="no classifier"):
        model = create_model("vit_small_patch14_dinov2", checkpoint=DINOV2, img_size=224, num_classes=10)
    assert model.pos_embed.shape == (1, 257, 384)
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(torch.zeros(1, 3, 224, 224)), pre_logits=True)
    assert torch.isfinite(feats).all() and feats.abs().max() > 0.1  # a trained backbone, not zeros


def test_pretrained_offline_fails_cleanly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch pretrained weights for 'vit_tiny_patch16_224'"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_pretrained_without_a_reachable_hub_fails_at_once_without_retries(monkeypatch, capsys):
    """No retry loop: when the hub does not answer a quick connection, huggingface_hub runs offline for the load."""
    import huggingface_hub.constants as hub

    import vitcompress.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelError, match="could not fetch pretrained weights"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    assert hub.HF_HUB_OFFLINE is False  # restored after the load
    assert "Retry" not in capsys.readouterr().err


def test_a_missing_artifact_path(tmp_path):
    with pytest.raises(ModelError, match="no such artifact directory"):
        create_model(str(tmp_path / "gone"))


def test_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(ModelError, match="not a vitcompress artifact"):
        create_model(str(tmp_path))


@pytest.mark.parametrize("kwargs,match", [
    ({"mlp_layer": "SwiGLU"}, "SwiGLU"),
    ({"norm_layer": "RmsNorm"}, "not a LayerNorm"),
])
def test_a_vit_with_other_parts_is_refused_when_accepted_not_deep_in_a_transform(kwargs, match):
    """A plain VisionTransformer may carry a gated MLP or another norm: refused in one line at creation (#43)."""
    import timm.layers

    from vitcompress import create_model
    from vitcompress.errors import ModelError

    kw = {k: getattr(timm.layers, v) for k, v in kwargs.items()}
    with pytest.raises(ModelError, match=match) as e:
        create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, **kw)
    assert "\n" not in str(e.value)
