"""Block reconstruction (BRECQ / AdaRound): the rounding parameterisation against RTN, and that it lowers each
block's output error compared with RTN while keeping the weights on their grid."""

import pytest
import torch
from conftest import TINY

from vitcompress import compress_, create_model, load_artifact, save_artifact
from vitcompress.errors import ConfigError
from vitcompress.models import model_info
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize import ops
from vitcompress.transforms.quantize.reconstruct import AdaRoundWeight, init_v, rectified_sigmoid, round_reg


def _calib(n=32, seed=1):
    return [(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), torch.zeros(n))]


def test_the_rectified_sigmoid_starts_at_the_rtn_remainder():
    rest = torch.rand(1000) * 0.98 + 0.01
    torch.testing.assert_close(rectified_sigmoid(init_v(rest)), rest, atol=1e-5, rtol=1e-5)
    assert round_reg(torch.tensor([-50.0, 50.0]), 2.0) == 0  # h = 0 and 1 cost nothing


@pytest.mark.parametrize("group", [None, 16])
def test_the_initial_hard_rounding_is_rtn(group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    ada = AdaRoundWeight(w, 4, group, clip=0.9)
    torch.testing.assert_close(ada.weight(hard=True), ops.fake_quant_weight(w, 4, group, 0.9))
    grouped = w.reshape(*ada.scale.shape[:-1], -1)
    inside = torch.maximum(torch.minimum(grouped, ada.q * ada.scale), -ada.q * ada.scale).reshape(w.shape)
    torch.testing.assert_close(ada.weight(), inside, atol=1e-5, rtol=0)  # soft at the start: the float weight


@pytest.fixture(scope="module", params=["brecq", "brecq_joint"])
def reconstructed(request):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **{**TINY, "depth": 2})
    compress_(model, QuantConfig(w_bits=4, a_bits=4, rounding=request.param, recon_iters=60, calib_size=32),
              calib=_calib())
    return model


def test_reconstruction_lowers_every_blocks_output_error_below_rtn(reconstructed):
    cfg = model_info(reconstructed).transforms[-1]
    record = cfg["state"]["reconstruction"]
    assert set(record) == {"blocks.0", "blocks.1"}
    for r in record.values():
        if cfg["config"]["rounding"] == "brecq":  # stage 1 (weights, float activations), then stage 2 (steps)
            assert r["mse_weights"] < r["mse_rtn_weights"] and r["mse"] <= r["mse_before_steps"] * 1.01
        else:
            assert r["mse"] < r["mse_rtn"]


def test_reconstructed_weights_stay_on_their_grid(reconstructed):
    for blk in reconstructed.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            w = lin.weight.detach()
            codes = w / (w.abs().amax(1, keepdim=True) / 7)  # the absmax stays on the grid's end, +-7 x scale
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert isinstance(lin.a_scale, torch.Tensor) and "a_scale" in dict(lin.named_buffers())


def test_artifact_round_trip(reconstructed, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    save_artifact(reconstructed, tmp_path / "q")
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "q")(x), reconstructed(x))


@pytest.mark.parametrize("bad", [dict(rounding="brecq", mode="deploy"), dict(rounding="brecq", w_bits=None),
                                 dict(rounding="brecq", recon_iters=0)])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        QuantConfig(**bad)


def test_the_losses_are_the_references():
    """An independent restatement of the reference's LossFunction (yhhhli/BRECQ quant/block_recon.py): the
    reconstruction error summed over dim 1 and averaged over the rest; AdaRound's regulariser at weight 0.01,
    summed over every variable, off during the first 20 % of the steps, b linear from 20 to 2 after that."""
    from vitcompress.transforms.quantize import brecq

    g = torch.Generator().manual_seed(0)
    pred, tgt, grad = (torch.randn(4, 5, 6, generator=g) for _ in range(3))
    assert torch.allclose(brecq.lp_loss(pred, tgt), ((pred - tgt) ** 2).sum(1).mean())
    assert torch.allclose(brecq.lp_loss(pred, tgt, 2.4), (pred - tgt).abs().pow(2.4).sum(1).mean())
    assert torch.allclose(brecq.lp_loss(pred, tgt, fisher=grad), ((pred - tgt) ** 2 * grad ** 2).sum(1).mean())
    iters = 1000
    assert brecq.temperature(0, iters) == brecq.temperature(199, iters) == 20
    assert brecq.temperature(200, iters) == 20 and brecq.temperature(600, iters) == 11 and \
        brecq.temperature(1000, iters) == 2
    ada = AdaRoundWeight(torch.randn(8, 16, generator=g), 4, None, 1.0)
    h = rectified_sigmoid(ada.v)
    torch.testing.assert_close(brecq.round_loss([ada], 3.0), 0.01 * (1 - ((h - 0.5).abs() * 2).pow(3.0)).sum())


def test_brecq_ends_with_binary_rounding_on_a_small_block():
    """With the published strength (summed regulariser, weight 0.01), the rounding variables end binary."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=1,
                         num_classes=4, mlp_ratio=1.0)
    calib = [(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(16))]
    compress_(model, QuantConfig(w_bits=4, a_bits=8, rounding="brecq", recon_iters=6000, calib_size=16,
                                 layers=["qkv", "proj", "fc1", "fc2"]), calib=calib)
    r = model_info(model).transforms[-1]["state"]["reconstruction"]["blocks.0"]
    assert r["binary"] >= 0.99 and r["mse_weights"] < r["mse_rtn_weights"]


def test_older_brecq_configs_name_the_joint_variant_they_ran():
    old = QuantConfig.from_dict({"name": "quantize", "version": 4, "w_bits": 4, "a_bits": 4, "rounding": "brecq"})
    assert old.rounding == "brecq_joint"
