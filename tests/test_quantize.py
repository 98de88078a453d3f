"""Post-training quantization (simulate mode): exact codes, round trips, identity, calibration, errors."""

import copy
import json

import pytest
import torch

from vitcompress import compress_, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.models import data_config
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize import ops


def _x(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fwd(model, x):
    with torch.inference_mode():
        return model(x)


def _calib(model, n=16):
    return load_data("digits", data_config(model), purpose="calib", limit=n).loader(8)


def test_weight_codes_match_a_reference_exactly():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    scale = ops.weight_scale(w, 4)
    ref_scale = w.abs().amax(1, keepdim=True) / 7
    ref_codes = torch.round(w / ref_scale).clamp(-7, 7).to(torch.int8)
    assert torch.equal(scale, ref_scale) and torch.equal(ops.weight_codes(w, scale, 4), ref_codes)
    deq = ops.weight_dequant(ref_codes, scale)
    assert torch.equal(ops.weight_codes(deq, ops.weight_scale(deq, 4), 4), ref_codes)  # idempotent
    grouped = ops.weight_scale(w, 8, group_size=4)
    assert grouped.shape == (6, 4, 1)
    assert torch.equal(grouped[:, 1], w[:, 4:8].abs().amax(1, keepdim=True) / 127)
    assert (ops.fake_quant_weight(w, 8, 4) - w).abs().max() <= grouped.max() / 2 + 1e-7


def test_activation_codes_are_in_range_and_idempotent():
    x = torch.randn(5, 7, 16) * 3 + 1
    scale, zero = ops.act_qparams(x.min(), x.max(), 4)
    codes = ops.act_codes(x, scale, zero, 4)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    fq = ops.fake_quant_act(x, scale, zero, 4)
    assert torch.allclose(ops.fake_quant_act(fq, scale, zero, 4), fq, atol=1e-6)
    assert (fq - x).abs().max() <= scale / 2 + 1e-6
    per_token = ops.fake_quant_act_per_token(x, 8)
    assert per_token.shape == x.shape and (per_token - x).abs().max() < 0.05


def test_zero_strength_is_bit_exact(tiny_model):
    ref = _fwd(tiny_model, _x())
    compress_(tiny_model, QuantConfig(w_bits=None, a_bits=None))
    assert torch.equal(_fwd(tiny_model, _x()), ref)


def test_w8a8_is_close_to_float(tiny_model):
    ref = _fwd(tiny_model, _x())
    compress_(tiny_model, QuantConfig(w_bits=8, a_bits=8), calib=_calib(tiny_model))
    out = _fwd(tiny_model, _x())
    assert not torch.equal(out, ref)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("cfg", [
    QuantConfig(w_bits=4, a_bits=8, observer="mse"),
    QuantConfig(w_bits=6, a_bits=6, observer="percentile", layers=["fc1", "fc2"]),
    QuantConfig(w_bits=4, a_bits=4, a_granularity="per_token", w_granularity="per_group", group_size=16),
    QuantConfig(w_bits=8, a_bits=None, layers=["re:blocks\\.[01]\\.attn\\.qkv"], exclude=["blocks.1.*"]),
    QuantConfig(w_bits=4, a_bits=8, rounding="gptq"),
])
def test_artifact_reload_is_bit_exact(tmp_path, tiny_model, cfg):
    compress_(tiny_model, cfg, calib=_calib(tiny_model))
    save_artifact(tiny_model, tmp_path / "q")
    loaded = load_artifact(tmp_path / "q")
    assert torch.equal(_fwd(loaded, _x()), _fwd(tiny_model, _x()))
    state = json.loads((tmp_path / "q" / "vitcompress.json").read_text())["transforms"][0]["state"]
    assert state["layers"] == [n for n, m in loaded.named_modules() if type(m).__name__ == "FakeQuantLinear"]


def test_calibration_changes_with_merging_active(tiny_model):
    from vitcompress.transforms import TokenMergeConfig

    plain, merged = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress_(merged, TokenMergeConfig(r=4))
    compress_(plain, QuantConfig(), calib=_calib(plain))
    compress_(merged, QuantConfig(), calib=_calib(merged))
    scales = [(a.a_scale.item(), b.a_scale.item()) for a, b in zip(plain.modules(), merged.modules())
              if hasattr(a, "a_scale")]
    assert any(x != y for x, y in scales)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"w_bits": 0}, "w_bits must be an integer from 2 to 8"),
    ({"a_bits": 9}, "a_bits must be an integer from 2 to 8"),
    ({"mode": "deploy", "w_bits": 4}, "mode deploy executes int W8A8"),
    ({"mode": "deploy", "w_bits": 6, "a_bits": None}, "mode deploy executes"),
    ({"dtype": "fp8_e4m3", "w_bits": 4}, "fp8_e4m3 is 8-bit"),
    ({"backend": "bnb", "mode": "deploy", "w_bits": 4, "a_bits": 8}, "mode deploy executes"),
    ({"backend": "triton", "mode": "deploy", "a_bits": None}, "--backend triton runs the int8 and fp8"),
    ({"softmax": "log2", "a_bits": None}, "the softmax quantizer uses a_bits"),
    ({"softmax": "log2", "mode": "deploy"}, "simulate-only"),
    ({"softmax": "cubic"}, "softmax must be one of"),
    ({"backend": "bnb", "mode": "deploy", "w_bits": 4, "a_bits": None, "group_size": 48}, "NF4 takes blocks"),
    ({"observer": "magic"}, "observer must be one of: minmax, percentile, mse"),
    ({"percentile": 20}, "percentile must be in"),
    ({"rounding": "gptq", "mode": "deploy"}, "gptq is deployed weight-only"),
])
def test_bad_settings(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        QuantConfig(**kwargs)


def test_bad_layers_and_calibration(tiny_model):
    with pytest.raises(ConfigError, match="layer pattern 'blocks.9.*' matches no module"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(layers=["blocks.9.*"]), calib=_calib(tiny_model))
    with pytest.raises(ConfigError, match="only Linear, Conv2d, Attention layers"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(layers=["blocks.0.mlp"]), calib=_calib(tiny_model))
    with pytest.raises(ConfigError, match="need calibration images"):
        compress_(copy.deepcopy(tiny_model), QuantConfig())
    with pytest.raises(ConfigError, match="calibration set is empty"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(), calib=[])
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(w_granularity="per_group", group_size=48, a_bits=None))


def test_quantize_cli_end_to_end(tmp_path, cli, trained_artifact):
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "q", "--calib-data", "digits",
                     "--w-bits", "6", "--a-bits", "6", "--calib-size", "16")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "q" / "vitcompress.json").read_text())
    assert manifest["provenance"]["calibration"]["split"] == "train"  # never the eval split
    assert manifest["transforms"][0]["config"]["w_bits"] == 6
    rc, _, err = cli("eval", tmp_path / "q", "--data", "digits", "--limit", "40", "--no-speed", "--json",
                     tmp_path / "e.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["agreement"] is not None
    for args, pattern in [(["--w-bits", "9"], "w_bits must be an integer from 2 to 8"),
                          (["--a-bits", "x"], "a_bits must be a number"),
                          ([], "needs --calib-data"),
                          (["--calib-data", "digits", "--layers", "nothing"], "matches no module"),
                          (["--calib-data", "digits", "--reparam", "repq", "--a-granularity", "per_token"],
                           "repq reparameterizes for static per-tensor activations"),
                          (["--rounding", "gptq", "--a-bits", "none"], "needs --calib-data")]:
        rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "x", *args)
        assert rc != 0 and len(err.strip().splitlines()) == 1 and pattern in err, err


def test_int8_linear_loads_the_old_transposed_weight_key():
    from vitcompress.transforms.quantize.int8_linear import Int8Linear

    q = Int8Linear.from_linear(torch.nn.Linear(24, 10))
    old = {("w_qt" if k == "w_int8" else k): (v.t() if k == "w_int8" else v) for k, v in q.state_dict().items()}
    fresh = Int8Linear(24, 10)
    fresh.load_state_dict(old)  # strict: the [in, out] key of older artifacts maps onto w_int8 [out, in]
    assert torch.equal(fresh.w_int8, q.w_int8)


def test_int8_linear_matches_an_integer_reference(exact_int8):
    from vitcompress.transforms.quantize.int8_linear import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    x = torch.randn(2, 7, 24)
    q = Int8Linear.from_linear(lin)
    w_scale = lin.weight.abs().amax(1) / 127
    w_codes = torch.round(lin.weight / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q.w_int8, w_codes) and torch.equal(q.w_scale, w_scale)
    x2 = x.reshape(-1, 24)
    a_scale = x2.abs().amax(1, keepdim=True) / 127
    a_codes = torch.round(x2 / a_scale).clamp(-127, 127)
    ref = ((a_codes @ w_codes.float().t()) * a_scale * w_scale + lin.bias).reshape(2, 7, 10)
    with torch.inference_mode():
        out = q(x)
    assert torch.allclose(out, ref, atol=1e-5)
    with torch.inference_mode():
        exact = lin(x)
    sqnr = 10 * torch.log10(exact.pow(2).sum() / (out - exact).pow(2).sum())
    assert sqnr > 30  # dB


@pytest.mark.parametrize("a_granularity", ["per_token", "per_tensor"])
def test_w8a8_deploy_runs_in_int8_and_round_trips(tmp_path, tiny_model, a_granularity):
    from vitcompress.bench import count_flops
    from vitcompress.transforms.quantize.int8_linear import Int8Linear

    ref = _fwd(tiny_model, _x())
    flops = count_flops(tiny_model, (3, 32, 32))
    save_artifact(tiny_model, tmp_path / "fp32")
    compress_(tiny_model, QuantConfig(mode="deploy", a_granularity=a_granularity), calib=_calib(tiny_model))
    assert sum(isinstance(m, Int8Linear) for m in tiny_model.modules()) == 8
    out = _fwd(tiny_model, _x())
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    assert count_flops(tiny_model, (3, 32, 32)) == flops  # int8 GEMMs are counted too
    save_artifact(tiny_model, tmp_path / "int8")
    loaded = load_artifact(tmp_path / "int8")
    assert torch.equal(_fwd(loaded, _x()), out)
    ratio = (tmp_path / "int8" / "model.safetensors").stat().st_size / \
        (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert ratio < 0.41  # tiny model: patch embedding, position embedding and head stay float (and each layer
    # stores a few scalars: scales, zero point)


@pytest.mark.parametrize("group", [None, 8])
def test_gptq_beats_round_to_nearest_on_the_layer_output(group):
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen)
    x = torch.randn(512, 32, generator=gen) @ mix  # correlated inputs: where error compensation pays
    w = torch.randn(16, 32, generator=gen)
    rtn = ops.fake_quant_weight(w, 3, group)
    gptq, scale = ops.gptq_quantize(w, x.t() @ x, 3, group)
    assert torch.equal(ops.weight_dequant(ops.weight_codes(gptq, scale, 3), scale), gptq)  # on its own grid
    err = lambda q: (x @ (q - w).t()).norm().item()  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)
    if group is None:  # on the same per-channel grid as RTN
        codes = gptq / ops.weight_scale(w, 3)
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 3 + 1e-4


def test_gptq_cli(tmp_path, cli, trained_artifact):
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "g", "--calib-data", "digits",
                     "--w-bits", "4", "--a-bits", "none", "--rounding", "gptq", "--calib-size", "16")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "g" / "vitcompress.json").read_text())["transforms"][0]["config"]
    assert cfg["rounding"] == "gptq" and cfg["a_bits"] is None
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "h", "--calib-data", "digits",
                     "--w-bits", "4", "--a-bits", "none", "--rounding", "gptq", "--calib-size", "16",
                     "--act-order", "--gptq-one-pass", "--gptq-damp", "0.05")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "h" / "vitcompress.json").read_text())["transforms"][0]["config"]
    assert cfg["act_order"] is True and cfg["gptq_sequential"] is False and cfg["gptq_damp"] == 0.05


def test_repq_reparam_keeps_the_float_function(tiny_model):
    from vitcompress.transforms.quantize.calib import repq_reparam_

    ref = _fwd(tiny_model, _x())
    folded = repq_reparam_(tiny_model, QuantConfig(reparam="repq"), _calib(tiny_model))
    assert folded == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert torch.allclose(_fwd(tiny_model, _x()), ref, atol=1e-4, rtol=1e-4)


def test_repq_makes_per_tensor_quantization_act_per_channel(tiny_model):
    """After RepQ, qkv's inputs have one range per channel mapped onto a shared per-tensor range."""
    from vitcompress.transforms.quantize.calib import repq_reparam_

    repq_reparam_(tiny_model, QuantConfig(reparam="repq", a_bits=4), _calib(tiny_model))
    seen = []
    tiny_model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    for x, _, _ in _calib(tiny_model):
        _fwd(tiny_model, x)
    x = torch.cat(seen)
    widths = x.amax(0) - x.amin(0)
    assert (widths.max() / widths.min()).item() < 1.5  # every channel spans about the same range


def test_w4a4_repq_runs_and_reloads(tmp_path, tiny_model):
    compress_(tiny_model, QuantConfig(w_bits=4, a_bits=4, reparam="repq"), calib=_calib(tiny_model))
    save_artifact(tiny_model, tmp_path / "r")
    assert torch.equal(_fwd(load_artifact(tmp_path / "r"), _x()), _fwd(tiny_model, _x()))


def test_sequential_gptq_takes_hessians_from_the_quantized_earlier_layers(tiny_model):
    seq, one = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress_(seq, QuantConfig(w_bits=4, a_bits=8, rounding="gptq"), calib=_calib(tiny_model))
    compress_(one, QuantConfig(w_bits=4, a_bits=8, rounding="gptq", gptq_sequential=False), calib=_calib(tiny_model))
    first, last = "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"
    assert torch.equal(seq.state_dict()[first], one.state_dict()[first])  # the first layer sees the same inputs
    assert not torch.equal(seq.state_dict()[last], one.state_dict()[last])  # later ones see quantized inputs
    old = QuantConfig.from_dict({"name": "quantize", "version": 2, "w_bits": 4, "rounding": "gptq"})
    assert old.gptq_sequential is False  # what a v2 record did


def test_gptq_act_order_rounds_on_the_grid_and_beats_rtn():
    from vitcompress.transforms.quantize import ops

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 48, generator=g), torch.randn(256, 48, generator=g) * torch.linspace(0.1, 3, 48)
    h = x.t() @ x
    q, scale = ops.gptq_quantize(w, h, 4, act_order=True)
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)  # on the per-channel grid
    rtn = torch.round(w / scale).clamp(-7, 7) * scale

    def err(a):
        return float(((w - a) @ h @ (w - a).t()).trace())

    assert err(q) < err(rtn) and not torch.equal(q, ops.gptq_quantize(w, h, 4)[0])
    with pytest.raises(ConfigError, match="act_order is a GPTQ option"):
        QuantConfig(w_bits=4, act_order=True)


def _gptq_static_groups_reference(w, h, bits, group, damp=0.01):
    """GPTQ with act-order and static groups, restated one column at a time from the reference's loop (no blocks):
    group scales from the original weights, columns in descending Hessian-diagonal order, each rounded with the
    scale of the group it came from."""
    q = 2 ** (bits - 1) - 1
    scales = w.reshape(w.shape[0], -1, group).abs().amax(-1) / q  # [O, I/g]
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm].double().clone(), h[perm][:, perm].double()
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        s = scales[:, int(perm[j]) // group].double()
        out[:, j] = torch.round(w[:, j] / s).clamp(-q, q) * s
        w[:, j + 1:] -= ((w[:, j] - out[:, j]) / hinv[j, j])[:, None] * hinv[j, j + 1:][None, :]
    return out[:, torch.argsort(perm)].float(), scales


def test_gptq_act_order_with_groups_uses_static_group_scales():
    from vitcompress.transforms.quantize import ops

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 40, generator=g), torch.randn(128, 40, generator=g) * torch.linspace(0.1, 3, 40)
    h = x.t() @ x
    q, scale = ops.gptq_quantize(w, h, 4, group_size=8, act_order=True, block=16)  # blocks that cut groups
    ref, ref_scale = _gptq_static_groups_reference(w, h, 4, 8)
    assert scale.shape == (8, 5, 1) and torch.allclose(scale[..., 0], ref_scale)
    assert torch.allclose(q, ref, atol=1e-5)
    codes = q.reshape(8, 5, 8) / scale
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)  # on the static per-group grid
    QuantConfig(w_bits=4, rounding="gptq", act_order=True, w_granularity="per_group", group_size=8)  # accepted
