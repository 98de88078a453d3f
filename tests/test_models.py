import pytest
import torch
from conftest import FAMILIES, TINY

from vitcompress import create_model, data_config, model_info
from vitcompress.errors import CheckpointError, ModelError
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
    ("vit_base_patch16_siglip_224", TINY),
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
        create_model("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "num_classes": 7})
    with pytest.raises(CheckpointError, match="missing key"):
        create_model("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "depth": 3})


def test_pretrained_offline_fails_cleanly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch pretrained weights for 'vit_tiny_patch16_224'"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_a_missing_artifact_path(tmp_path):
    with pytest.raises(ModelError, match="no such artifact directory"):
        create_model(str(tmp_path / "gone"))


def test_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(ModelError, match="not a vitcompress artifact"):
        create_model(str(tmp_path))
