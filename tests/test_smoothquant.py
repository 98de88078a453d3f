"""SmoothQuant's scale migration: the float function is kept, outlier channels move into the weights, and it stacks
with every activation granularity, simulated and deployed."""

import copy

import torch

from vitcompress import compress_, data_config, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize.calib import smoothquant_reparam_


def _calib(model, n=16):
    return load_data("digits", data_config(model), purpose="calib", limit=n).loader(8)


def _x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _fwd(model, x):
    with torch.inference_mode():
        return model(x)


def _outliers_(model):
    """A LayerNorm gamma with a few channels 30x the others: what pretrained ViTs (DINOv2) look like."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.weight[:3] *= 30
            blk.attn.qkv.weight[:, :3] /= 30


def test_smoothquant_keeps_the_float_function(tiny_model):
    ref = _fwd(tiny_model, _x())
    folded = smoothquant_reparam_(tiny_model, QuantConfig(reparam="smoothquant"), _calib(tiny_model))
    assert folded == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert torch.allclose(_fwd(tiny_model, _x()), ref, atol=1e-4, rtol=1e-4)


def test_smoothquant_equalises_the_input_channels_as_the_paper_defines(tiny_model):
    """After migration, max|X_j| = max|X_j|^alpha * max|W_j|^(1-alpha) (before): with alpha 0.5, qkv's input and
    weight column maxima are equal per channel."""
    _outliers_(tiny_model)
    smoothquant_reparam_(tiny_model, QuantConfig(reparam="smoothquant", smooth_alpha=0.5), _calib(tiny_model))
    seen = []
    qkv = tiny_model.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    for x, _, _ in _calib(tiny_model):
        _fwd(tiny_model, x)
    x_max = torch.cat(seen).abs().amax(0)
    w_max = qkv.weight.abs().amax(0)
    assert torch.allclose(x_max, w_max, rtol=1e-3)


def test_smoothquant_rescues_per_token_w8a8_from_outlier_channels(tiny_model):
    _outliers_(tiny_model)
    ref = _fwd(tiny_model, _x())
    errs = {}
    for reparam in ("none", "smoothquant"):
        m = copy.deepcopy(tiny_model)
        compress_(m, QuantConfig(a_granularity="per_token", reparam=reparam, mode="deploy", backend="torch"),
                  calib=_calib(m))
        errs[reparam] = (_fwd(m, _x()) - ref).norm() / ref.norm()
    assert errs["smoothquant"] < 0.5 * errs["none"]


def test_smoothquant_deployed_round_trips(tmp_path, tiny_model):
    compress_(tiny_model, QuantConfig(reparam="smoothquant", mode="deploy"), calib=_calib(tiny_model))
    save_artifact(tiny_model, tmp_path / "s")
    assert torch.equal(_fwd(load_artifact(tmp_path / "s"), _x()), _fwd(tiny_model, _x()))


def test_smoothquant_settings_are_checked():
    import pytest

    with pytest.raises(ConfigError, match="smooth_alpha"):
        QuantConfig(reparam="smoothquant", smooth_alpha=1.5)
    with pytest.raises(ConfigError, match="needs a_bits"):
        QuantConfig(reparam="smoothquant", a_bits=None)
    assert QuantConfig.from_dict({"name": "quantize", "version": 5}).reparam == "none"


def test_the_real_activation_benchmark_runs_on_a_tiny_model(tmp_path, trained_artifact):
    import json

    from benchmarks.real_activations import main

    main(["--model", str(trained_artifact), "--data", "digits", "--images", "16", "--calib-size", "8",
          "--out", str(tmp_path)])
    res = json.loads((tmp_path / "activations.json").read_text())
    assert len(res["blocks"]) == 2 and len(res["layers"]) == 8
    e2e = {(r["quantization"], r["layers"]): r for r in res["end_to_end"]}
    assert e2e[("W8A8 static", "all")]["logit_rel_l2_%"] > 0
    assert ("W8A8 per-token + SmoothQuant", "all") in e2e
    assert all(r["W8A8 static"] >= 0 for r in res["layers"])


def test_params_count_every_stored_weight_whatever_its_dtype(tiny_model):
    from vitcompress.evaluate import count_params

    dense = count_params(tiny_model)
    compress_(tiny_model, QuantConfig(mode="deploy"), calib=_calib(tiny_model))
    assert count_params(tiny_model) == dense  # int8 codes count as the weights they are


def test_the_activation_grid_benchmark_runs_on_a_tiny_model(tmp_path, trained_artifact):
    import json

    from benchmarks.activation_grids import main

    main(["--model", str(trained_artifact), "--data", "digits", "--images", "32", "--calib-size", "8",
          "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "activation_grids.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["logit_rel_l2_%"] > 0 for r in rows)
